"""The `xendbg` command as a user and a script see it: run as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def xendbg(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "xendbg.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=environ, timeout=60)


def test_abi_json_schema():
    out = xendbg("abi", "--xen", "3.2", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["xen"] == "3.0.3"
    calls = {c["name"]: c for c in data["hypercalls"]}
    assert calls["event_channel_op"]["nr"] == 32 and calls["event_channel_op_compat"]["nr"] == 16
    assert "event_channel_op" in calls["event_channel_op_compat"]["former_names"]
    assert [a["name"] for a in calls["vcpu_op"]["args"]] == ["cmd", "vcpuid", "extra_args"]
    assert all(isinstance(c["nr"], int) for c in data["hypercalls"])


def test_decode_bundled_multicall_json():
    out = xendbg("decode", "@examples/linux-multicall.args", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert (data["nr"], data["name"], data["width"], data["xen"]) == (13, "multicall", 64, "4.17")
    assert [a["name"] for a in data["args"]] == ["call_list", "nr_calls"]
    entries = data["detail"]["entries"]
    assert [e["name"] for e in entries] == ["update_va_mapping", "mmuext_op", "vcpu_op", "event_channel_op"]
    assert all(set(e) >= {"op", "name", "args", "result"} for e in entries)
    assert entries[1]["detail"]["rows"][0]["cmd"] == "MMUEXT_PIN_L4_TABLE"
    assert data["findings"] == []


def test_decode_trap_table_json_and_findings():
    out = xendbg("decode", "@examples/xen20-trap-table.args", "--json")
    data = json.loads(out.stdout)
    entry = data["detail"]["entries"][3]
    assert set(entry) >= {"vector", "flags", "dpl", "if", "cs", "rpl", "address"}
    assert (entry["vector"], entry["cs"], entry["rpl"]) == (14, 0x0818, 0)
    assert [(f["rule"], f["severity"]) for f in data["findings"]] == [("selector-rpl", "error")]
    # The same table under a newer Xen: silently fixed up, so informational.
    out = xendbg("decode", "@examples/xen20-trap-table.args", "--xen", "4.17", "--json")
    assert [f["severity"] for f in json.loads(out.stdout)["findings"]] == ["info"]


def test_decode_callbacks_json_from_registers_and_file(tmp_path):
    (tmp_path / "stub.bin").write_bytes(bytes.fromhex("cd82"))
    out = xendbg("decode", "--width", "32", "--xen", "2.0", "--reg", "eax=4", "--reg", "ebx=0x0819",
                 "--reg", "ecx=0xc0100000", "--reg", "edx=0x0818", "--reg", "esi=0xc0100100",
                 "--reg", "eip=0x1000", "--mem", f"0x1000@{tmp_path / 'stub.bin'}", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    callbacks = data["detail"]["callbacks"]
    assert [(c["kind"], c["address"], c["selector"]) for c in callbacks] == [
        ("event", 0xC0100000, 0x0819), ("failsafe", 0xC0100100, 0x0818)]
    assert data["site"] == "at int 0x82"
    assert data["findings"][0]["severity"] == "error"


def test_plain_text_is_aligned_and_uncoloured():
    out = xendbg("decode", "@examples/linux-multicall.args", env={"NO_COLOR": "1", "COLUMNS": "120"})
    assert out.returncode == 0
    assert "\x1b[" not in out.stdout
    lines = out.stdout.splitlines()
    assert any("MMUEXT_PIN_L4_TABLE" in line for line in lines)
    header = next(line for line in lines if line.startswith("#  op"))
    row = next(line for line in lines if line.startswith("2  24"))
    assert row.index("vcpu_op") == header.index("hypercall")


@pytest.mark.parametrize("args,code,needle", [
    (["decode", "--width", "32", "--reg", "eax"], 2, "NAME=VALUE"),
    (["decode", "--width", "48"], 2, "invalid choice"),
    (["decode"], 2, "--width"),
    (["decode", "--width", "64", "--mem", "0x10:zz"], 2, "not hex"),
    (["decode", "--width", "64", "--mem", "0x10@/nonexistent/file"], 2, "cannot read"),
    (["abi", "--xen", "1.2"], 2, "older than 2.0"),
    (["decode", "--width", "64", "--reg", "rip=0x1000", "--mem", "0x1000:4889c3c3"], 1, "no hypercall pending"),
    (["multicall", "0x1000", "3", "--width", "64"], 0, "cannot be read"),
])
def test_errors_are_one_line(args, code, needle):
    out = xendbg(*args)
    assert out.returncode == code
    text = out.stderr if code else out.stdout
    assert needle in text
    if code:
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr

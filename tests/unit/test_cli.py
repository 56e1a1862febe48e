"""The `xendbg` command as a user and a script see it: run as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xendbg.cli import main

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


# --- in-process: xendbg.cli.main ------------------------------------------------------------------

TRAPS_32 = ["--xen", "2.0", "--mem", "0xc0300000@examples/xen20-trap-table.bin"]


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_traps_and_multicall_take_the_width_from_cs(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, err = run_main(capsys, "traps", "0xc0300000", "--reg", "cs=0x0819", *TRAPS_32, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert [e["vector"] for e in data["entries"]] == [3, 6, 13, 14, 128]
    code, out, err = run_main(capsys, "multicall", "0xffffc90000a00000", "4", "--reg", "cs=0xe033",
                              "--xen", "4.17", "--mem", MULTICALL_MEM, "--json")
    assert code == 0, err
    assert [e["name"] for e in json.loads(out)["entries"]] == [
        "update_va_mapping", "mmuext_op", "vcpu_op", "event_channel_op"]
    # A ring-0 selector says nothing about the guest: the width is still needed, as for decode.
    for command in (["traps", "0x1000"], ["multicall", "0x1000", "1"], ["decode"]):
        code, _, err = run_main(capsys, *command, "--reg", "cs=0xe008")
        assert code == 2 and "ring-0 selector" in err


# The batch of the bundled Linux example, without its --width.
MULTICALL_MEM = next(line.removeprefix("--mem=")
                     for line in (ROOT / "examples/linux-multicall.args").read_text().splitlines()
                     if line.startswith("--mem=0xffffc90000a00000:"))


@pytest.mark.parametrize("args,needle", [
    (["decode", "--width", "32", "--reg", "rax=4"], "rax is a 64-bit register; a 32-bit guest takes eax ebx"),
    (["decode", "--width", "64", "--reg", "eax=4"], "eax is a 32-bit register; a 64-bit guest takes rax rdi"),
    (["decode", "--reg", "cs=0xe033", "--reg", "eax=4"], "a 64-bit guest takes rax"),
    (["decode", "--width", "64", "--reg", "foo=1"], "unknown register 'foo'; a 64-bit guest takes rax"),
    (["traps", "0", "--width", "32", "--reg", "rip=1"], "a 32-bit guest takes eax"),
    (["decode", "--width", "64", "--reg", "rax=1", "--reg", "RAX=2"], "--reg rax is given twice"),
    (["decode", "--width", "64", "--mem", "0x100:"], "--mem 0x100:: no bytes"),
    (["decode", "--width", "64", "--mem", "0x100@/dev/null"], "is empty"),
    (["decode", "--width", "64", "--mem", "0x100:00112233", "--mem", "0x102:0011"],
     "--mem ranges overlap: 0x100-0x103 and 0x102-0x103"),
    (["multicall", "0x100", "1", "--width", "64", "--mem", "0x200:00", "--mem", "0x100:" + "00" * 0x101],
     "--mem ranges overlap: 0x100-0x200 and 0x200-0x200"),
    (["decode", "--width", "64", "--xen", "2.0"], "Xen 2.0 had no 64-bit PV guests"),
    (["decode", "--reg", "cs=0xe033", "--xen", "2.0.5"], "Xen 2.0.5 had no 64-bit PV guests"),
    (["abi", "--xen", "2.0", "--width", "64"], "had no 64-bit PV guests"),
    (["decode", "--width", "64", "--reg", "cs=0x0819"],
     "cs=0x0819 says 32-bit PV guest kernel (ring 1), but --width is 64"),
    (["decode", "--width", "32", "--reg", "cs=0xe033"], "cs=0xe033 says 64-bit PV guest (ring 3), but --width is 32"),
    (["traps", "0", "--width", "32", "--reg", "cs=0xe033"], "but --width is 32"),
    (["decode", "--width", "32", "--reg", "cs=0x10000"], "not a 16-bit selector"),
])
def test_inconsistent_options_are_refused(capsys, args, needle):
    code, out, err = run_main(capsys, *args)
    assert code == 2 and out == ""
    assert needle in err and len(err.strip().splitlines()) == 1


def test_xen_2_0_s_only_width_is_the_default(capsys, monkeypatch):
    """Xen 2.0 ran 32-bit PV guests only: --width may be left out, for every command taking --xen."""
    monkeypatch.chdir(ROOT)
    code, out, err = run_main(capsys, "abi", "--xen", "2.0", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert (data["xen"], data["width"]) == ("2.0", 32)
    assert {h["name"] for h in data["hypercalls"]} >= {"set_fast_trap", "set_callbacks"}
    assert json.loads(run_main(capsys, "abi", "--xen", "4.17", "--json")[1])["width"] == 64  # still 64 there
    code, out, err = run_main(capsys, "decode", "--xen", "2.0.7", "--reg", "eax=4", "--reg", "ebx=0x0819",
                              "--json")
    assert code == 0, err
    assert json.loads(out)["width"] == 32 and json.loads(out)["name"] == "set_callbacks"
    code, out, err = run_main(capsys, "traps", "0xc0300000", *TRAPS_32, "--json")
    assert code == 0, err
    assert [e["vector"] for e in json.loads(out)["entries"]] == [3, 6, 13, 14, 128]
    code, out, err = run_main(capsys, "multicall", "0x1000", "0", "--xen", "2.0", "--json")
    assert code == 0, err
    # a ring-0 selector says nothing, but Xen 2.0 has one width
    code, out, err = run_main(capsys, "decode", "--xen", "2.0", "--reg", "cs=0xe008", "--reg", "eax=4", "--json")
    assert code == 0 and json.loads(out)["width"] == 32, err
    # a newer Xen has two: the width is still needed
    code, _, err = run_main(capsys, "decode", "--xen", "3.0", "--reg", "eax=4")
    assert code == 2 and "give --width 32|64" in err


@pytest.mark.parametrize("args,source", [
    (["abi", "--xen", "2.0", "--width", "64"], "but --width is 64: drop --width (Xen 2.0's only width, 32, is"),
    (["decode", "--xen", "2.0", "--width", "64"], "but --width is 64: drop --width"),
    (["traps", "0", "--xen", "2.0", "--width", "64"], "but --width is 64: drop --width"),
    (["multicall", "0", "1", "--xen", "2.0", "--width", "64"], "but --width is 64: drop --width"),
    (["multicall", "0", "1", "--xen", "2.0", "--reg", "cs=0xe033"], "but cs=0xe033 says 64-bit PV guest (ring 3)"),
])
def test_a_width_xen_2_0_never_ran_is_refused_in_one_line(capsys, args, source):
    code, out, err = run_main(capsys, *args)
    assert code == 2 and out == ""
    assert err.startswith("xendbg: error: Xen 2.0 had no 64-bit PV guests (64-bit PV came with Xen 3.0)")
    assert source in err and err.rstrip().endswith("or give a newer --xen") and err.count("\n") == 1


def test_a_selector_that_does_not_say_the_width_leaves_it_to_width(capsys):
    # 0x33 is Linux's 64-bit user selector, a plain ring-3 selector to Xen: no contradiction.
    code, _, err = run_main(capsys, "decode", "--width", "64", "--reg", "cs=0x33", "--json")
    assert code == 0, err


@pytest.mark.parametrize("args,needle", [
    (["traps", "-5", "--width", "32"], "traps address -0x5 does not fit a 32-bit guest"),
    (["traps", "0x100000000", "--width", "32"], "traps address 0x100000000 does not fit a 32-bit guest"),
    (["multicall", "-5", "1", "--width", "64"], "multicall address -0x5 does not fit a 64-bit guest"),
    (["multicall", "0x1000", "-1", "--width", "64"], "multicall count -1 is not a batch size"),
    (["multicall", "0x1000", str(2**32), "--width", "64"], "multicall count 4294967296 is not a batch size"),
    (["decode", "--width", "32", "--reg", "ebx=-1"], "--reg ebx -0x1 does not fit a 32-bit guest"),
    (["decode", "--width", "32", "--mem=-0x10:00"], "--mem address -0x10 does not fit"),
    (["decode", "--width", "32", "--mem", "0xfffffffe:001122"], "its last byte 0x100000000 does not fit"),
])
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_addresses_and_counts_are_unsigned_in_text_and_json(capsys, args, needle, json_flag):
    code, out, err = run_main(capsys, *args, *json_flag)
    assert (code, out) == (2, "")
    assert needle in err and len(err.strip().splitlines()) == 1


def test_a_large_count_is_decoded_bounded_and_says_so(capsys):
    code, out, err = run_main(capsys, "multicall", "0x1000", "0xffffffff", "--width", "64", "--json",
                              "--mem", "0x1000:" + "00" * 64 * 300)
    assert code == 0, err
    data = json.loads(out)
    assert (data["count"], data["truncated"], len(data["entries"])) == (0xFFFFFFFF, True, 256)
    assert any(f["rule"] == "multicall-count" and "first 256" in f["message"] for f in data["findings"])
    # The highest 64-bit address is still an address.
    code, out, err = run_main(capsys, "traps", hex(2**64 - 1), "--width", "64", "--json")
    assert code == 0, err
    assert json.loads(out)["address"] == 2**64 - 1


@pytest.mark.parametrize("args,needle", [
    (["abi", "--xen", "banana"], "not a Xen version: 'banana'"),
    (["abi", "--xen", "1.2"], "older than 2.0"),
    (["abi", "--width", "48"], "argument --width: invalid choice:"),  # Python 3.13 quotes the value: '48'
    (["abi", "4.22"], "unrecognized arguments: 4.22 (see 'xendbg abi --help')"),
    (["decode"], "give --width 32|64"),
])
def test_usage_errors_are_one_line_exit_2(capsys, args, needle):
    code, out, err = run_main(capsys, *args)
    assert (code, out) == (2, "")
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_comments_in_argument_files(capsys, tmp_path):
    args = tmp_path / "call.args"
    args.write_text("# a comment\n\n--width\n32\n  # indented comment\n--reg=eax=4\n")
    code, out, err = run_main(capsys, "decode", f"@{args}", "--json")
    assert code == 0, err
    assert json.loads(out)["name"] == "set_callbacks"


def test_piped_text_is_not_folded():
    environ = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    out = subprocess.run([sys.executable, "-m", "xendbg.cli", "multicall", "0xffffc90000a00000", "4",
                          "--results", "@examples/linux-multicall.args"],
                         capture_output=True, text=True, cwd=ROOT, env=environ, timeout=60)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("0  14"))
    assert "va=0xffff888000100000, val=0x80000001234ad067, flags=UVMF_INVLPG|UVMF_LOCAL  0" in row
    assert max(len(line) for line in out.stdout.splitlines()) > 80
    out = xendbg("traps", "0xc0300000", "@examples/xen20-trap-table.args", env={"COLUMNS": ""})
    finding = next(line for line in out.stdout.splitlines() if line.startswith("error"))
    assert finding.endswith("runs in ring 1: Xen 2.0 rejects the call with -EPERM")


def test_a_xentrace_file_under_xen_2_0_is_named_with_its_32_bit_abi():
    # a xentrace file is read as a 64-bit Xen's, but Xen 2.0 ran 32-bit guests only (abi.guest_widths)
    from xendbg.cli import _xentrace_abi

    assert [(abi.generation, abi.width) for abi, _ in (_xentrace_abi("2.0"), _xentrace_abi("4.17"))] == [
        ("2.0", 32), ("4.17", 64)]

"""`xendbg core` and `xendbg trace` end to end on files the tests build, the runnable API example, and
`--to-gdb` read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.unit import dumpfiles as df
from tests.unit.test_dump import BIG64, K64, pv64, write
from xendbg.cli import main
from xendbg.dump import open_core
from xendbg.render import json as render_json
from xendbg.sites import ElfFile
from xendbg.trace import TraceLog

ROOT = Path(__file__).resolve().parents[2]


def run_json(capsys, argv: list[str]) -> object:
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def dump64(tmp_path, kdump: bool = False) -> str:
    ram, cpus, _ = pv64()
    data = df.kdump(bytes(ram.data), cpus, True) if kdump else df.elf_core(bytes(ram.data), cpus, True)
    return write(tmp_path, "pv64.kz" if kdump else "pv64.elf", data)


def test_core_subcommands_print_the_live_schema(tmp_path, capsys):
    path = dump64(tmp_path)
    with open_core(path, xen="4.17") as core:
        want = render_json.hypercall(core.vcpus[0].pending())
    assert run_json(capsys, ["core", path, "hypercall", "--xen", "4.17"]) == want
    batch = run_json(capsys, ["core", path, "multicall", "--xen", "4.17"])
    assert batch["type"] == "multicall" and [e["name"] for e in batch["entries"]] == ["xen_version", "console_io"]
    assert batch["xen"] == "4.17" and batch["xen_source"] == "set by hand"
    vcpus = run_json(capsys, ["core", path, "vcpus"])
    assert vcpus["schema"] == 1 and [r["pending"] for r in vcpus["vcpus"]] == ["multicall", None]
    assert set(vcpus["vcpus"][0]) == {"vcpu", "thread", "mode", "width", "pc", "pending", "registered_traps",
                                      "registered_callbacks", "registers_from"}
    assert vcpus["vcpus"][0]["registers_from"] == "live on a CPU"
    check = run_json(capsys, ["core", path, "check", "--xen", "4.17"])
    assert check == {"schema": 1, "pending": "multicall", "findings": []}
    summary = run_json(capsys, ["core", path])
    assert summary["vcpus"][0]["hypercall"]["name"] == "multicall"
    # vCPU 1's CR0 has paging off: no Xen runs there, and the dump says so rather than "in Xen"
    assert "paging off" in summary["vcpus"][1]["not_pending"] and "in Xen" not in summary["vcpus"][1]["not_pending"]


def test_core_traps_and_callbacks_say_what_a_dump_cannot_tell(tmp_path, capsys):
    path = dump64(tmp_path)
    for what in ("traps", "callbacks"):
        assert main(["core", path, what]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "not recoverable from this dump without xen-syms" in err


def test_core_summary_text_names_every_vcpu(tmp_path, capsys):
    assert main(["core", dump64(tmp_path, kdump=True)]) == 0
    out = capsys.readouterr().out
    assert "kdump-compressed, flattened (zlib) dump, 2 vCPU(s)" in out
    assert "pending: multicall(call_list=0xffffffff80201ff0, nr_calls=0x2)" in out
    assert "vCPU 1  in protected mode, paging off (ring 0, boot code)" in out and "registers live on a CPU" in out
    assert "in Xen (ring 0)" not in out


def test_core_names_a_vcpu_at_reset_real_mode_not_xen(tmp_path, capsys):
    ram, cpus, _ = pv64()
    cpus[1] = df.Cpu({"rip": 0xFFF0}, (0x60000010, 0, 0, 0, 0), 0xF000)  # a CPU that never left reset
    path = write(tmp_path, "reset.elf", df.elf_core(bytes(ram.data), cpus, True))
    assert main(["core", path]) == 0
    out = capsys.readouterr().out
    assert "vCPU 1  in real mode, paging off (firmware or boot code)" in out and "in Xen (ring 0)" not in out
    rows = run_json(capsys, ["core", path, "vcpus"])["vcpus"]
    assert (rows[1]["mode"], rows[1]["width"]) == ("in real mode, paging off (firmware or boot code)", None)


def test_core_with_xen_2_0_refuses_a_64_bit_vcpu_in_one_line(tmp_path, capsys):
    # Xen 2.0 ran no 64-bit PV guests: its numbers are not used on vCPU 0's CS 0xe033
    assert main(["core", dump64(tmp_path), "hypercall", "--vcpu", "0", "--xen", "2.0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Xen 2.0 had no 64-bit PV guests" in err and "CS 0xe033" in err
    assert "--xen for xendbg core" in err


def test_to_gdb_writes_the_virtual_address_space(tmp_path, capsys):
    out = tmp_path / "gdb.core"
    assert main(["core", dump64(tmp_path), "--to-gdb", str(out)]) == 0
    assert "vCPU 0's virtual address space" in capsys.readouterr().out
    data = out.read_bytes()
    elf = ElfFile(str(out), data)
    loads = {s.vaddr: s for s in elf.segments if s.type == 1}
    assert K64 + 0x1000 in loads and BIG64 in loads
    big = loads[BIG64]
    assert data[big.offset + 0x1230:big.offset + 0x1238] == b"[guest] "
    notes = [n for s in elf.segments if s.type == 4 for n in elf.notes(s.offset, s.filesz)]
    assert [name for name, _, _ in notes] == [b"CORE", b"CORE", b"QEMU", b"QEMU"]


def test_the_api_example_runs_on_a_dump(tmp_path):
    path = dump64(tmp_path)
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "postmortem.py"), path], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "vCPU 0: 64-bit PV guest (ring 3)" in r.stdout
    assert "pending: multicall(call_list=0xffffffff80201ff0, nr_calls=0x2)" in r.stdout
    assert "vCPU 0 code at pc: 0f05" in r.stdout  # syscall


def recorded_trace(tmp_path) -> Path:
    from tests.unit.test_trace import call

    path = tmp_path / "t.jsonl"
    log = TraceLog(str(path), ())
    a = log.call(0, call(17, 0, 0), "guest")
    log.result(0, a, "xen_version", 0x40011)
    b = log.call(1, call(24, 3, 1, 0), "guest")
    log.result(1, b, "vcpu_op", -22)
    c = log.call(0, call(24, 2, 1, 0), "guest")
    log.result(0, c, "vcpu_op", 0)
    text = path.read_text()
    path.write_text(text + '{"event":"call","seq":9,"cpu":0,"na')  # killed mid-write
    return path


def test_trace_lines_filters_stats_and_a_cut_off_end(tmp_path, capsys):
    path = str(recorded_trace(tmp_path))
    assert main(["trace", path]) == 0
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "the last line (8) is cut off" in err and "kept the 7 records" in err
    lines = out.splitlines()
    assert len(lines) == 3 and lines[1].endswith("vcpu_op(cmd=VCPUOP_is_up, vcpuid=0x1, extra_args=0x0) = -22 (EINVAL)")
    assert main(["trace", path, "--errors"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    records = run_json(capsys, ["trace", path, "xen_version"])
    assert [r["event"] for r in records] == ["call", "return"] and records[0]["name"] == "xen_version"
    stats = run_json(capsys, ["trace", path, "--stats"])
    rows = {r["name"]: r for r in stats["hypercalls"]}
    assert rows["vcpu_op"]["calls"] == 2 and rows["vcpu_op"]["errnos"] == {"EINVAL": 1}
    assert rows["vcpu_op"]["subops"] == {"VCPUOP_down": 1, "VCPUOP_is_up": 1}
    assert main(["trace", path, "--stats"]) == 0
    assert "vcpu_op" in capsys.readouterr().out


def test_trace_with_a_bad_line_inside_is_one_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"event":"start"}\nnot json\n{"event":"stop"}\n')
    assert main(["trace", str(path)]) == 1
    assert "bad.jsonl:2: not a trace record" in capsys.readouterr().err

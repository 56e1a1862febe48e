"""xendbg never misdecodes silently: under `set xen abi auto` it decodes as the right ABI set by hand, says
why, and what it prints matches raw `x/` reads and registers of the same stop; read-only commands change
nothing; a failing trace file stops the trace cleanly; a catch works with no symbol file loaded."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from conftest import XENDBG_SCRIPT as SCRIPT
from conftest import json_blocks

from xendbg.abi import resolve_generation

pytestmark = pytest.mark.platform

SETUP = (f"source {SCRIPT}", "set xen color off")


def raw_words(out: str, size: int) -> list[int]:
    """Every word gdb's `x/Nwx` (size 4) or `x/Ngx` (size 8) printed, in order."""
    digits = 2 * size
    return [int(w, 16) for line in out.splitlines() if re.match(r"^0x[0-9a-f]+(?: <[^>]*>)?:\s", line)
            for w in re.findall(rf"\b0x([0-9a-f]{{{digits}}})\b", line.split(":", 1)[1])]


def register(out: str, name: str) -> int:
    """A register's value as `show(name)` printed it (the last one printed for that register)."""
    values = re.findall(rf"^{name}=(0x[0-9a-f]+|0)$", out, re.M)
    return int(values[-1], 16)


def show(name: str) -> list[str]:
    """Print a register, raw, under a recognisable label."""
    return [f'printf "{name}=%#lx\\n", ${name}']


def check_batch_against_memory(hc: dict, words: list[int], era_2: bool) -> None:
    """Each decoded entry's op and arguments equal the raw multicall_entry words: 2.0 is `op, args[7]`
    (the result in args[5]), from 3.0 `op, result, args[6]` (public xen.h at the tags)."""
    entries = hc["detail"]["entries"]
    assert entries and len(words) >= 8 * len(entries)
    for i, entry in enumerate(entries):
        row = words[8 * i:8 * i + 8]
        assert entry["op"] == row[0]
        raw_args = row[1:6] if era_2 else row[2:8]
        assert [a["value"] for a in entry["args"]] == raw_args[:len(entry["args"])]


def without_source(hc: dict) -> dict:
    return {k: v for k, v in hc.items() if k != "xen_source"}


@pytest.mark.parametrize("abi", ["2.0", "3.0", "4.0"])
def test_auto_decodes_the_multicall_as_the_abi_set_by_hand_shim32(boot_gdb, abi):
    booted = boot_gdb("shim32", abi=abi, timeout=60)
    out = booted.gdb_batch(*SETUP, "xen catch hypercall multicall", "continue", "xen hc --json", "xen hc",
                           *show("ebx"), "x/24wx $ebx", f"set xen abi {abi}", "xen hc --json", "xen catch delete",
                           "continue", timeout=60)
    assert "Traceback" not in out
    auto, manual = json_blocks(out)
    assert auto["xen"] == abi and manual["xen"] == abi
    assert without_source(auto) == without_source(manual)
    assert auto["xen_source"].startswith(f"from xen_version() = {abi}")  # the guest asked Xen first
    assert not [f for f in auto["findings"] if f["rule"] == "abi-evidence"]
    assert re.search(rf"\[Xen {re.escape(abi)} ABI \(from xen_version\(\) = {re.escape(abi)}", out)
    assert auto["args"][0]["value"] == register(out, "ebx")
    check_batch_against_memory(auto, raw_words(out, 4), era_2=abi == "2.0")
    assert booted.finish().ok


@pytest.mark.parametrize("platform", ["xen64", "linux64"])
def test_auto_says_the_xen_that_runs_real_xen(boot_gdb, platform):
    booted = boot_gdb(platform, timeout=120)
    version = ".".join(booted.artifacts["xen_version"].split(".")[:2]) if "xen_version" in booted.artifacts \
        else None
    out = booted.gdb_batch(*SETUP, "xen catch hypercall multicall", "continue", "xen hc --json", *show("rdi"),
                           "x/48gx $rdi", "show xen abi", "xen catch delete", "detach", timeout=110)
    assert "Traceback" not in out
    (hc,) = json_blocks(out)
    expected = version or hc["xen"]  # Xen's X.Y; the JSON's "xen" is its ABI generation (4.20: 4.17)
    assert hc["xen"] == resolve_generation(expected) and expected.startswith("4.")
    assert hc["xen_source"] == f"from Xen's image: Xen {expected}"
    assert f"auto (now Xen {hc['xen']}: from Xen's image: Xen {expected}" in out
    assert hc["args"][0]["value"] == register(out, "rdi")
    check_batch_against_memory(hc, raw_words(out, 8), era_2=False)


def test_read_only_commands_change_no_registered_state(boot_gdb):
    """Decoding the pending call with a wrong width misdecodes it, but must not replay anything."""
    booted = boot_gdb("shim32", abi="4.0", timeout=60)
    out = booted.gdb_batch(*SETUP, "xen catch hypercall set_trap_table", "continue", "x/14wx $ebx",
                           "xen catch delete", "xen catch hypercall multicall", "continue",
                           "xen traps --registered --json", "set xen width 64", "xen hypercall", "xen hypercall",
                           "set xen width auto", "xen traps --registered --json", "xen catch delete", "continue",
                           timeout=60)
    assert "Traceback" not in out
    before, after = json_blocks(out)
    assert before["entries"] == after["entries"] and len(after["entries"]) == 6
    # The registered handlers are those of the table the guest handed Xen (trap_info: vector, flags,
    # cs, address; 8 bytes on 32-bit), read raw at the set_trap_table.
    words = raw_words(out.split("xendbg: catching multicall")[0], 4)
    handlers = {words[2 * i] & 0xFF: words[2 * i + 1] for i in range(len(words) // 2) if words[2 * i + 1]}
    assert handlers and {e["vector"]: e["address"] for e in after["entries"]} == handlers


def test_a_trace_file_that_cannot_be_written_stops_the_trace_cleanly(boot_gdb):
    booted = boot_gdb("shim32", abi="4.0", timeout=60)
    out = booted.gdb_batch(*SETUP, "xen trace start --file /dev/full", "continue", "xen trace show 3",
                           "xen trace", "xen trace start", "xen trace stop", "continue", timeout=60)
    assert "Traceback" not in out and "Python Exception" not in out
    assert out.count("xendbg: trace stopped: cannot write trace file /dev/full") == 1
    assert re.search(r"cpu0 \w+\(", out)  # the records stayed in memory: xen trace show lists them
    assert "no trace is running" in out  # the failed trace really ended
    assert "xendbg: tracing every hypercall" in out  # and a new one starts
    assert "xendbg: trace stopped:" in out.split("xendbg: tracing every hypercall")[-1]


def guest_entry(path: str) -> int:
    """The guest kernel's ELF entry point, read by readelf (not by xendbg)."""
    header = subprocess.run(["readelf", "-h", path], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"Entry point address:\s+(0x[0-9a-f]+)", header).group(1), 16)


@pytest.mark.parametrize("platform,abi", [("shim32", "2.0"), ("xen64", None)])
def test_catch_without_symbol_files(boot_gdb, platform, abi):
    """No `file`, no xen-syms: xendbg finds the hypercall entry from the machine (the IDT's 0x82 gate,
    or the hypercall page in guest memory near PC) and says where and why."""
    booted = boot_gdb(platform, abi=abi, timeout=60)
    entry = guest_entry(booted.artifacts["guest"])
    booted.artifacts = {"arch": booted.artifacts["arch"]}  # gdb loads no symbol file at all
    regs = ("ebx", "ecx") if platform == "shim32" else ("rdi", "rsi")
    out = booted.gdb_batch(*SETUP, "xen catch hypercall multicall", f"hbreak *{entry:#x}", "continue", "delete",
                           "xen catch hypercall multicall", "continue", "xen hc --json", *show(regs[0]),
                           *show(regs[1]), "xen catch delete", "continue", timeout=60)
    assert "Traceback" not in out
    assert "the machine says nowhere either" in out  # at reset: nothing to find yet, said in one line
    if platform == "shim32":
        assert re.search(r"observing in Xen at the int \$0x82 gate handler 0x[0-9a-f]+ \(.*IDT at 0x", out)
    else:
        assert "stubs of the hypercall page at 0xffffffff80001000 (found in guest memory near PC)" in out
    (hc,) = json_blocks(out)
    assert hc["name"] == "multicall"
    assert hc["args"][0]["value"] == register(out, regs[0]) and hc["args"][1]["value"] == register(out, regs[1])


def test_addresses_are_unsigned_and_counts_bounded(boot_gdb):
    booted = boot_gdb("xen64", timeout=60)
    out = booted.gdb_batch(*SETUP, "xen catch hypercall --guest multicall", "continue", *show("rdi"),
                           "xen multicall $rdi $rsi --json", "xen multicall $rdi -1", "xen multicall $rdi 0x100000000",
                           "xen traps -1 --json", "xen catch delete", "continue", timeout=60)
    assert "Traceback" not in out
    batch, traps = json_blocks(out)
    assert batch["address"] == register(out, "rdi") > 0x7FFFFFFFFFFFFFFF  # a kernel address, unsigned
    assert traps["address"] == 0xFFFFFFFFFFFFFFFF
    assert "COUNT -1 is out of range (0 to 4294967295)" in out
    assert "COUNT 4294967296 is out of range" in out
    assert "-0x" not in out
    assert booted.finish().ok


def test_symbols_as_addresses_and_break_bookkeeping_shim32(boot_gdb):
    booted = boot_gdb("shim32", abi="2.0", timeout=60)
    out = booted.gdb_batch(*SETUP, "xen catch hypercall multicall", "continue", "xen multicall xen_int82 1 --json",
                           "x/8wx xen_int82", "xen break trap PF", "xen break trap 14", "xen break", "xen check --json",
                           "xen catch delete", "xen break delete", "continue", timeout=60)
    assert "Traceback" not in out
    batch, check = json_blocks(out)
    raw = raw_words(out, 4)
    assert batch["address"] == 0x400028 and batch["entries"][0]["op"] == raw[0]
    assert "xendbg already breaks on the trap handler for vector 0xe (#PF)" in out
    assert out.count("the trap handler for vector 0xe (#PF): breakpoint") == 1  # one watch, listed once
    assert "xendbg: deleted 1 entry-point breakpoints" in out
    messages = [(f["rule"], f["message"]) for f in check["findings"]]
    assert len(messages) == len(set(messages))


def test_check_reports_a_pending_calls_finding_once(boot_gdb):
    """At a pending set_trap_table, the call has not run: its RPL finding comes from the call only."""
    booted = boot_gdb("shim32", abi="2.0", faulty=True, timeout=60)
    out = booted.gdb_batch(*SETUP, "xen catch hypercall set_trap_table", "continue", "xen check --json",
                           "xen catch delete", "continue", timeout=60)
    (check,) = json_blocks(out)
    assert check["pending"] == "set_trap_table"
    rpl = [f for f in check["findings"] if f["rule"] == "selector-rpl"]
    assert len(rpl) == 1 and rpl[0]["severity"] == "error"


def test_break_fails_without_leaving_a_phantom(boot_gdb):
    booted = boot_gdb("shim32", abi="4.0", timeout=60)
    booted.artifacts = {"arch": booted.artifacts["arch"]}  # no symbols: nowhere to observe at reset
    out = booted.gdb_batch(*SETUP, "xen break trap PF", "xen break", "xen break delete", "continue", timeout=60)
    assert "the machine says nowhere either" in out
    assert "no xen break entry points" in out
    assert "xendbg: deleted 0 entry-point breakpoints" in out


def test_vcpus_json_and_registered_indices(boot_gdb):
    booted = boot_gdb("shim32", abi="4.0", timeout=60)
    out = booted.gdb_batch(*SETUP, "xen catch hypercall multicall", "continue", "xen vcpus --json", "xen vcpus x",
                           "info threads", "xen traps --registered", "xen catch delete", "continue", timeout=60)
    (vcpus,) = json_blocks(out)
    threads = re.findall(r"^\*?\s+(\d+)\s+Thread", out, re.M)
    assert [v["thread"] for v in vcpus["vcpus"]] == [int(t) for t in threads]
    assert vcpus["vcpus"][0]["pending"] == "multicall" and vcpus["vcpus"][0]["width"] == 32
    assert "unexpected 'x' (usage: xen vcpus [--json])" in out
    indices = re.findall(r"^(\d+)\s+0x[0-9a-f]+\s+\S", out.split("registered:")[0].split("trap table at")[-1], re.M)
    assert indices == [str(i) for i in range(len(indices))] and len(indices) == 6


def test_runner_refuses_a_port_out_of_range():
    import sys

    from conftest import RUN

    r = subprocess.run([sys.executable, str(RUN), "shim32", "--gdb", "99999"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and "--gdb 99999 is not a TCP port" in r.stderr


def test_json_of_a_report_names_its_abi(boot_gdb):
    booted = boot_gdb("shim32", abi="2.0", timeout=60)
    out = booted.gdb_batch(*SETUP, "xen catch hypercall multicall", "continue", "xen multicall --json",
                           "xen callbacks --json", "xen catch delete", "continue", timeout=60)
    batch, callbacks = json_blocks(out)
    for report in (batch, callbacks):
        assert report["xen"] == "2.0" and report["xen_source"].startswith("from ")
    assert json.dumps(callbacks["fast_trap"]) != "null"


@pytest.mark.parametrize("side", ["--guest", "--xen"])
def test_continuations_are_marked_as_such_linux64(boot_gdb, side):
    """Xen preempts Linux's set_trap_table (32+ entries) and continues it with the table pointer
    advanced: each such stop says it is Xen's continuation, and only those do."""
    booted = boot_gdb("linux64", timeout=120)
    steps = []
    for _ in range(4):
        steps += ["continue", "xen hc --json"]
    out = booted.gdb_batch(*SETUP, f"xen catch hypercall {side} set_trap_table", *steps, "xen catch delete",
                           "detach", timeout=110)
    assert "Traceback" not in out
    caught = re.findall(r"^xendbg: cpu \d+ caught hypercall set_trap_table \((.*)\)$", out, re.M)
    calls = json_blocks(out)
    assert len(caught) == len(calls) >= 3
    for (before, after), label in zip(zip(calls, calls[1:], strict=False), caught[1:], strict=True):
        start, end = before["args"][0]["value"], before["args"][0]["value"] + 16 * len(before["detail"]["entries"])
        inside = start < after["args"][0]["value"] <= end and (after["args"][0]["value"] - start) % 16 == 0
        assert inside == label.endswith("Xen's continuation of the preempted call"), (before, after, label)

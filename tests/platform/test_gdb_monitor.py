"""xen catch, xen break, xen trace, xen stats, xen check and registered state, driven through Debian's
gdb against the shim32 guest (each ABI, normal and faulty) and our 64-bit guest on Xen 4.17."""

from __future__ import annotations

import json
import re

import pytest
from conftest import XENDBG_SCRIPT as SCRIPT
from conftest import json_blocks

pytestmark = pytest.mark.platform

SETUP = (f"source {SCRIPT}", "set xen color off")


def test_catch_by_name_then_registered_state_shim32_2_0(boot_gdb):
    booted = boot_gdb("shim32", abi="2.0", timeout=60)
    out = booted.gdb_batch(
        *SETUP, "set xen abi 2.0", "xen callbacks", "xen catch hypercall set_trap_table set_fast_trap",
        "continue", "xen hc --json", "x/14wx $ebx", "continue", "xen hc --json", "p/x $eax", "p/x $ebx",
        "xen catch delete", "xen catch hypercall multicall", "continue",
        "xen traps --json", "xen callbacks --json", "xen check --json", "xen catch delete", "continue",
        timeout=60)
    assert "Traceback" not in out
    assert "xendbg has seen no callback registration" in out  # before anything was observed
    assert "catching set_fast_trap, set_trap_table, observing in the guest at the hypercall instruction" in out
    first, fast, traps, callbacks, check = json_blocks(out)
    assert first["name"] == "set_trap_table" and fast["name"] == "set_fast_trap"
    assert "xendbg: cpu 0 caught hypercall multicall" in out
    # At the multicall, xen traps / xen callbacks show what the guest registered before it: the
    # trap_info array read raw at the set_trap_table (vector, flags, cs, address: 8 bytes each), and
    # the vector set_fast_trap passed in EBX.
    words = [int(w, 16) for line in out.splitlines() if re.match(r"^0x[0-9a-f]+.*:\s", line)
             for w in re.findall(r"0x([0-9a-f]{8})\b", line.split(":", 1)[1])]
    raw = {words[2 * i] & 0xFF: (words[2 * i] >> 16, words[2 * i + 1]) for i in range(len(words) // 2)
           if words[2 * i + 1]}
    assert {e["vector"]: (e["cs"], e["address"]) for e in traps["entries"]} == raw
    assert traps["note"].startswith(f"registered: {len(raw)} vectors")
    kinds = {c["kind"]: c for c in callbacks["callbacks"]["callbacks"]}
    assert set(kinds) == {"event", "failsafe"} and kinds["event"]["selector"] == 0x0819
    vector = int(re.findall(r"^\$\d+ = (0x[0-9a-f]+)$", out, re.M)[1], 16)
    assert callbacks["fast_trap"]["vector"] == vector == 0x80
    assert callbacks["fast_trap"]["handler"]["address"] == raw[vector][1]
    assert check["pending"] == "multicall" and check["findings"] == []


@pytest.mark.parametrize("abi", ["2.0", "3.0", "4.0"])
def test_break_on_callback_and_trap_entry_decodes_the_bounce_frame(boot_gdb, abi):
    booted = boot_gdb("shim32", abi=abi, timeout=60)
    out = booted.gdb_batch(
        *SETUP, f"set xen abi {abi}", "xen break callback event", "xen break trap PF", "continue", "continue",
        "xen break", "continue", "p/x $pc", "continue", "p/x $pc", "xen break delete", "continue", timeout=60)
    assert "Traceback" not in out
    assert "xendbg has not seen the guest register the event callback yet" in out
    moved = re.findall(r"xendbg: breakpoint (\d+) now on (the event callback|the trap handler for vector 0xe)"
                       r" \(?[#PF)]*\s*at (0x[0-9a-f]+)", out)
    assert len(moved) == 2, out
    # Both hits name the entry point and decode the frame: the event callback interrupted the guest
    # kernel, the #PF frame carries the error code (and CR2 on the stack only in 2.0).
    assert "xendbg: cpu 0 entered the event callback" in out
    assert "xendbg: cpu 0 entered the trap handler for vector 0xe (#PF)" in out
    assert re.search(r"error_code\s+0x0+\s", out)
    assert bool(re.search(r"^0x[0-9a-f]+\s+cr2\s", out, re.M)) == (abi == "2.0")  # a stack slot only in 2.0
    assert ("saved_upcall_mask 0" in out) == (abi != "2.0")  # 3.0+ saves the mask in the CS slot
    assert "interrupted guest kernel (ring 1)" in out
    assert booted.finish().ok


def test_fast_trap_entry_from_ring_3(boot_gdb):
    booted = boot_gdb("shim32", abi="2.0", timeout=60)
    out = booted.gdb_batch(*SETUP, "set xen abi 2.0", "xen break fasttrap", "continue", "continue", "p $cs & 3",
                           "continue", timeout=60)
    assert "xendbg: breakpoint" in out and "now on the fast trap" in out
    assert "xendbg: cpu 0 entered the fast trap" in out
    assert "interrupted guest user (ring 3)" in out  # int $0x80 from ring 3 through the real gate
    assert re.search(r"^\$1 = 1$", out, re.M)  # the handler runs in ring 1, entered without Xen
    assert booted.finish().ok


def test_break_fasttrap_needs_xen_2_0(boot_gdb):
    booted = boot_gdb("shim32", abi="4.0", timeout=30)
    out = booted.gdb_batch(*SETUP, "set xen abi 4.0", "xen break fasttrap", "xen break trap 300",
                           "xen break callback bogus", "xen catch hypercall no_such_call", "continue", timeout=30)
    assert "set_fast_trap exists only in Xen 2.0" in out and "xen break trap 0x80" in out
    assert "vector 300 is out of range" in out
    assert "unknown callback 'bogus'" in out
    assert "has no hypercall 'no_such_call'" in out
    assert "Traceback" not in out


def test_trace_file_results_and_stats_faulty_4_0(boot_gdb, tmp_path):
    log = tmp_path / "trace.jsonl"
    booted = boot_gdb("shim32", abi="4.0", faulty=True, timeout=60)
    out = booted.gdb_batch(*SETUP, "set xen abi 4.0", f"xen trace start --file {log}", "continue",
                           "xen stats --json", "xen trace show 500", "xen trace stop", timeout=60)
    assert "Traceback" not in out
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[0]["event"] == "start" and records[-1]["event"] == "stop"
    calls = {r["seq"]: r for r in records if r["event"] == "call"}
    results = {r["seq"]: r for r in records if r["event"] == "return"}
    assert len(calls) > 40
    # The faulty guest's set_fast_trap calls (number 11, gone since 3.0) come back -ENOSYS, seen as such.
    unknown = [seq for seq, r in calls.items() if r["nr"] == 11]
    assert unknown and all(results[seq]["errno"] == "ENOSYS" for seq in unknown)
    assert all(calls[seq]["hypercall"]["findings"] for seq in unknown)
    # Every call of vCPU 0 but the final shutdown came back with its result (vCPU 1 is taken down
    # with VCPUOP_down while it yields, so its last call never returns).
    unanswered = set(calls) - set(results)
    assert {seq for seq in unanswered if calls[seq]["cpu"] == 0} == {max(calls)}
    assert calls[max(calls)]["name"] == "sched_op"
    # The guest's own transcript says what each call returned: the trace must say the same, in order.
    steps = booted.finish().transcript.steps
    returned = [results[seq]["result"] for seq in sorted(results)]
    fast_traps = [results[seq]["result"] for seq in sorted(unknown)]
    assert fast_traps == [st.rc for name, st in steps.items() if name.startswith("set_fast_trap")]
    multicalls = [results[seq]["result"] for seq in sorted(results) if calls[seq]["name"] == "multicall"]
    assert multicalls == [st.rc for name, st in steps.items() if re.fullmatch(r"multicall#\d+", name)]
    assert steps["xen_version"].rc in returned
    (stats,) = [b for b in json_blocks(out) if "hypercalls" in b]
    rows = {r["name"]: r for r in stats["hypercalls"]}
    failed_fast_traps = sum(st.rc < 0 for name, st in steps.items() if name.startswith("set_fast_trap"))
    assert rows["hypercall_11"]["errors"] == failed_fast_traps and rows["hypercall_11"]["errnos"] == {"ENOSYS": 3}
    assert re.search(r"hypercall_11\(arg0=0x80, .*\) = -38 \(ENOSYS\)", out)
    assert f"records written to {log}" in out


def test_xen64_catch_guest_side_at_hypercall_page_and_xen_side_at_handler(boot_gdb):
    booted = boot_gdb("xen64", timeout=60)
    out = booted.gdb_batch(
        *SETUP, "set xen abi auto", "xen catch hypercall --guest set_trap_table", "continue", "xen hc --json",
        "p/x $pc", "xen catch delete", "xen catch hypercall multicall", "continue", "xen hc --json",
        "info symbol $pc", "xen callbacks --json",
        "xen catch delete", "continue", timeout=60)
    assert "Traceback" not in out
    assert "stubs of the hypercall page at 0xffffffff80001000 (by symbol)" in out
    guest, xen, callbacks = json_blocks(out)
    # Stopped on stub 0's own `syscall` (8 bytes in: push %rcx, push %r11, mov $0,%eax), where Xen
    # would also resume a continuation.
    assert guest["name"] == "set_trap_table" and guest["site"] == "at syscall"
    assert "$1 = 0xffffffff80001008" in out
    assert "observing in Xen at the handlers of" in out  # xen-syms is loaded: named calls caught in Xen
    assert xen["name"] == "multicall" and xen["site"] == "in Xen at do_multicall() (C arguments)"
    assert [e["op"] for e in xen["detail"]["entries"]] == [17, 24, 32, 17]
    assert "do_multicall in section .text" in out
    kinds = {c["kind"] for c in callbacks["callbacks"]["callbacks"]}
    assert {"event", "failsafe", "syscall"} <= kinds
    assert booted.finish().ok


def test_xen64_catch_every_hypercall_at_pv_hypercall(boot_gdb):
    """Without names, Xen side: one probe at pv_hypercall decodes the guest frame Xen saved."""
    booted = boot_gdb("xen64", timeout=60)
    out = booted.gdb_batch(*SETUP, "set xen abi auto", "xen catch hypercall --xen", "continue", "xen hc --json",
                           "xen catch delete", "continue", timeout=60)
    assert "observing in Xen at pv_hypercall (every PV hypercall)" in out
    (hc,) = json_blocks(out)
    assert hc["site"].startswith("in Xen at pv_hypercall(), from the guest's saved registers (guest PC 0xffffffff8")
    assert hc["width"] == 64 and hc["name"] is not None
    assert booted.finish().ok

"""The gdb front end (`source gdbscripts/xendbg.py`) on the real Xen 4.17 with our 64-bit PV guest.

The guest's hypercalls go through its hypercall page; a hardware breakpoint on a stub's `syscall`
(stub nr at hypercall_page + nr * 32, syscall at +8) stops the guest with the arguments in RDI, RSI, ...
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import XENDBG_SCRIPT as SCRIPT
from conftest import json_blocks

pytestmark = pytest.mark.platform

HC_set_trap_table, HC_multicall = 0, 13
KERNEL_CS = 0xE033  # FLAT_KERNEL_CS of a 64-bit PV guest (arch-x86/xen-x86_64.h, RELEASE-4.17.0)


def at_syscall(booted, nr: int) -> str:
    return f"hbreak *{booted.artifacts['hypercall_page'] + nr * 32 + 8:#x}"


def test_trap_table_and_multicall(boot_gdb) -> None:
    booted = boot_gdb("xen64", timeout=60)
    out = booted.gdb_batch(
        f"source {SCRIPT}", "set xen abi auto", "set xen color off",
        at_syscall(booted, HC_set_trap_table), "continue", "xen traps --json", "delete",
        at_syscall(booted, HC_multicall), "continue", "xen hypercall --json", "delete", "continue", timeout=60)
    traps, hc = json_blocks(out)
    assert [e["vector"] for e in traps["entries"]] == [3, 6, 13, 14, 0x80] and traps["terminated"]
    assert all(e["cs"] == KERNEL_CS for e in traps["entries"]) and traps["findings"] == []
    assert [e["dpl"] for e in traps["entries"]] == [3, 0, 0, 0, 3]
    assert hc["width"] == 64 and hc["name"] == "multicall" and hc["site"] == "at syscall"
    entries = hc["detail"]["entries"]
    assert [e["op"] for e in entries] == [17, 24, 32, 17]  # multicall#1 of the guest
    assert all(e["result"] is None for e in entries)  # still pending: Xen has not run the batch
    assert booted.finish().ok


def test_faulty_findings(boot_gdb) -> None:
    """RPL-0 trap-table selectors are info for Xen 4.17 (it raises them); a nested multicall is an error."""
    booted = boot_gdb("xen64", faulty=True, timeout=60)
    out = booted.gdb_batch(
        f"source {SCRIPT}", "set xen abi auto", "set xen color off",
        at_syscall(booted, HC_set_trap_table), "continue", "xen traps --json", "delete",
        # The faulty guest's second multicall (first entry: console_io) nests one. Not "the second stop":
        # Xen may preempt a batch and continue it by re-executing the syscall with the rest of it.
        at_syscall(booted, HC_multicall) + " if *(unsigned long *)$rdi == 18", "continue",
        "xen multicall --json", "delete", "continue", timeout=60)
    traps, mc = json_blocks(out)
    assert {(f["rule"], f["severity"]) for f in traps["findings"]} == {("selector-rpl", "info")}
    assert all(e["cs"] == KERNEL_CS & ~3 for e in traps["entries"])
    assert [e["op"] for e in mc["entries"]] == [18, 12, HC_multicall]
    assert "multicall-nested" in json.dumps(mc)
    assert booted.finish().ok


def test_registered_trap_table_shows_the_selector_xen_holds(boot_gdb) -> None:
    """The faulty guest passes RPL-0 selectors (0xe030); Xen 4.17 stores them with RPL 3
    (__fixup_guest_selector, asm/desc.h at RELEASE-4.17.0) and enters the handlers with that CS, as the
    guest's own transcript says (handler_cs). The registered table shows what Xen holds, and beside it
    what the guest passed, read raw from the guest's trap_table."""
    booted = boot_gdb("xen64", faulty=True, timeout=60)
    out = booted.gdb_batch(
        f"source {SCRIPT}", "set xen abi auto", "set xen color off", "xen trace start",
        at_syscall(booted, HC_multicall), "continue", "xen traps --registered --json", "x/12gx &trap_table",
        "delete", "xen trace stop", "continue", timeout=60)
    traps = json_blocks(out)[0]
    words = [int(w, 16) for line in out.splitlines() if line.startswith("0x") and "<trap_table" in line
             for w in line.split(":", 1)[1].split()]
    passed = {words[2 * i] & 0xFF: (words[2 * i] >> 16) & 0xFFFF for i in range(len(words) // 2) if words[2 * i + 1]}
    held = {e["vector"]: e["cs"] for e in traps["entries"]}
    assert passed and set(held) == set(passed)
    assert {e["vector"]: e["passed_cs"] for e in traps["entries"]} == passed == dict.fromkeys(passed, KERNEL_CS & ~3)
    run = booted.finish()
    handler_cs = {int(v, 16) for v in re.findall(r"\[guest\] trap\.\S+: .*handler_cs=(0x[0-9a-f]+)", run.stdout)}
    assert handler_cs and set(held.values()) == handler_cs == {KERNEL_CS}


def test_xen_2_0_set_by_hand_refuses_a_64_bit_guest(boot_gdb) -> None:
    """`set xen abi 2.0` at a 64-bit guest's hypercall: Xen 2.0 ran no 64-bit PV guests, so xendbg refuses
    in one line (naming the CS gdb reads) instead of decoding with numbers no Xen had."""
    booted = boot_gdb("xen64", timeout=60)
    out = booted.gdb_batch(
        f"source {SCRIPT}", "set xen color off", at_syscall(booted, HC_set_trap_table), "continue",
        "p/x $cs", "set xen abi 2.0", "xen hypercall", "set xen abi auto", "xen hypercall --json", "kill", timeout=60)
    assert f"= {KERNEL_CS:#x}" in out  # gdb's own reading of CS: the 64-bit guest kernel's selector
    refusals = [line for line in out.splitlines() if line.startswith("Xen 2.0 had no 64-bit PV guests")]
    assert refusals == [f"Xen 2.0 had no 64-bit PV guests (64-bit PV came with Xen 3.0), but the vCPU's CS "
                        f"{KERNEL_CS:#06x} says 64-bit PV guest (ring 3); xendbg decodes with Xen 2.0 (set by hand): "
                        f"choose Xen 3.0 or later (set xen abi in gdb, --xen for xendbg core)"], out
    (hc,) = json_blocks(out)
    assert hc["width"] == 64 and hc["name"] == "set_trap_table"

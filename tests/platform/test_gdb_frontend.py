"""The gdb front end (`source gdbscripts/xendbg.py`) against the shim32 guest under QEMU."""

from __future__ import annotations

import re

import pytest
from conftest import XENDBG_SCRIPT as SCRIPT
from conftest import json_blocks

pytestmark = pytest.mark.platform


@pytest.mark.parametrize("abi,kernel_cs", [("2.0", 0x0819), ("4.0", 0xE019)])
def test_xen_commands_at_first_multicall_and_trap_table(boot_gdb, abi, kernel_cs):
    booted = boot_gdb("shim32", abi=abi, timeout=90)
    generation = "2.0" if abi == "2.0" else "4.0"
    out = booted.gdb_batch(
        f"source {SCRIPT}", f"set xen abi {generation}", "set xen color off",
        "hbreak *xen_int82 if $eax == 0", "continue", "xen traps --json", "xen hc",
        "delete", "hbreak *xen_int82 if $eax == 13", "continue", "xen hypercall --json", "xen multicall",
        "xen vcpus", "delete", "continue", timeout=90)
    assert "xendbg ready" in out
    traps, multicall = json_blocks(out)
    vectors = [e["vector"] for e in traps["entries"]]
    assert {3, 6, 13, 14, 0x80} <= set(vectors) and traps["terminated"]
    assert all(e["cs"] == kernel_cs for e in traps["entries"])
    assert traps["findings"] == []
    assert multicall["name"] == "multicall" and multicall["xen"] == generation
    entries = multicall["detail"]["entries"]
    assert len(entries) == 3 and [e["op"] for e in entries] == [17, 18, 3]
    assert all(e["result"] is None for e in entries)  # pending: Xen has not run the batch yet
    assert re.search(r"set_trap_table\s+nr 0", out)
    assert "32-bit PV guest kernel (ring 1)" in out
    assert booted.finish().ok


def test_faulty_guest_findings_per_generation(boot_gdb):
    """The faulty guest's RPL-0 trap-table selector: an error for Xen 2.0, info for Xen 4.x."""
    booted = boot_gdb("shim32", abi="2.0", faulty=True, timeout=90)
    out = booted.gdb_batch(
        f"source {SCRIPT}", "set xen abi 2.0", "hbreak *xen_int82 if $eax == 0", "continue",
        "xen traps --json", "set xen abi 4.17", "xen traps --json", "delete", "continue", timeout=90)
    old, new = json_blocks(out)
    assert ("selector-rpl", "error") in [(f["rule"], f["severity"]) for f in old["findings"]]
    assert ("selector-rpl", "info") in [(f["rule"], f["severity"]) for f in new["findings"]]
    booted.finish()


def test_errors_are_one_line_gdb_errors(boot_gdb):
    booted = boot_gdb("shim32", abi="4.0", timeout=60)
    out = booted.gdb_batch(f"source {SCRIPT}", "xen traps 0xfffff000", "xen multicall", "xen hc --bogus",
                           "delete", "continue", timeout=60)
    assert "Traceback" not in out
    # QEMU is still at reset: the vCPU is in real mode (CR0), which xendbg says rather than "in Xen"
    assert "the selected vCPU is in real mode, paging off" in out or "cannot read" in out
    assert "in Xen" not in out
    assert "unknown option --bogus" in out
    booted.finish()

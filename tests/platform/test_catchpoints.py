"""`xen catch` and `xen break` as gdb users know breakpoints: each is a numbered gdb breakpoint that
`info breakpoints` lists with what it stands for, and that gdb's own delete, disable, enable,
condition, ignore and commands (and xen tcatch, as gdb's tcatch) act on.  The independent side is
gdb's own reading of registers and memory in the commands it runs, and the guest's transcript.

Each test shares one boot across its checks: none of them changes the guest's course, only where it
stops.
"""

from __future__ import annotations

import re

import pytest
from conftest import XENDBG_SCRIPT as SCRIPT
from conftest import build
from test_gdb_commands import gdb  # a gdb with no target

pytestmark = pytest.mark.platform

SETUP = (f"source {SCRIPT}", "set xen color off")


def breakpoint_rows(out: str) -> list[list[str]]:
    """Each `info breakpoints` listing as its lines (the header's and those below it)."""
    listings, current = [], None
    for line in out.splitlines():
        if line.startswith("Num     Type"):
            current = []
            listings.append(current)
        elif current is not None and (re.match(r"^\d+\s+breakpoint", line) or line.startswith(("\t", "  "))):
            current.append(line)
        else:
            current = None
    return listings


def values(out: str) -> dict[int, str]:
    """What gdb's print commands printed, by value number ($3 = 0x42)."""
    return {int(n): v for n, v in re.findall(r"^\$(\d+) = (.*)$", out, re.M)}


def test_shim32_catchpoints_through_gdbs_own_commands(boot_gdb, tmp_path):
    """Xen 2.0 guest: its 3rd console_io line is set_callbacks'; multicall#1 has 3 entries, #2 has 4;
    then its int $0x80 from ring 3 enters the fast trap, later it blocks in sched_op."""
    commands = tmp_path / "commands.gdb"
    commands.write_text("commands 2\np $ecx\nx/s $edx\nend\n")
    booted = boot_gdb("shim32", abi="2.0", timeout=60)
    idt_0x80 = "(unsigned int)((idt[0x80] & 0xffff) | ((idt[0x80] >> 32) & 0xffff0000))"
    out = booted.gdb_batch(
        *SETUP, "set xen abi 2.0",
        "xen catch hypercall multicall", "xen tcatch hypercall console_io", "ignore 2 2", f"source {commands}",
        "condition 1 $ecx == 4", "info breakpoints",
        "continue",                                          # the 3rd console_io: catchpoint 2's commands run
        "info breakpoints", "xen catch",
        "xen catch hypercall set_fast_trap", "disable 1",
        "continue",                                          # set_fast_trap, pending
        "p $eax", "xen break fasttrap", "delete 3",
        "continue",                                          # multicall#2 (disabled) goes by: the fast trap
        "p (unsigned int)$pc == " + idt_0x80, "p $cs & 3", "p *(unsigned int *)($sp + 4) & 3", "info breakpoints",
        "xen catch hypercall console_io", "delete", "xen catch hypercall sched_op", "info breakpoints",
        "continue",                                          # console_io calls go by: sched_op
        "p $eax", "delete", "continue", timeout=60)
    assert "Traceback" not in out
    res = booted.finish()
    assert res.ok and res.transcript.done, res.stdout[-2000:]
    guest_lines = [line for line in res.stdout.splitlines() if line.startswith("[guest] ")]
    listings = breakpoint_rows(out)
    assert len(listings) == 4, out

    # Two catchpoints, each saying what it catches, with gdb's own condition, ignore count and commands.
    first = "\n".join(listings[0])
    assert re.search(r"^1\s+breakpoint\s+keep y\s+<PENDING>\s+'catch hypercall multicall \(guest side, "
                     r"1 hypercall instruction\)'$", first, re.M), first
    assert re.search(r"^2\s+breakpoint\s+del\s+y\s+<PENDING>\s+'catch hypercall console_io \(guest side", first, re.M)
    assert "stop only if $ecx == 4" in first and "ignore next 2 hits" in first
    assert re.search(r"^\s+x/s \$edx$", first, re.M)

    # ignore 2 2: the first stop is the guest's 3rd console_io, read raw by catchpoint 2's own commands.
    third = guest_lines[2]
    assert third.startswith("[guest] set_callbacks:")
    caught = out.split("Catchpoint 2 (", 1)[1]
    assert caught.index("caught hypercall console_io") < caught.index("$1 = ")
    printed = values(out)
    assert int(printed[1]) == len(third) + 1  # count: the line and its newline
    raw = re.search(r'^0x[0-9a-f]+:\s+"(.*)"$', caught, re.M)
    assert raw and raw[1].startswith(third), caught[:2000]
    # tcatch: deleted at its stop; the other catch keeps its condition, and has no hit yet (the
    # first multicall comes later).
    assert not any(re.match(r"^2\s", line) for line in listings[1])
    assert any(re.match(r"^1\s+breakpoint", line) for line in listings[1])
    assert "  hypercall multicall: catchpoint 1\n" in out

    # disable 1: multicall#2 (4 entries, the condition holds) goes by; the fast trap set while its
    # set_fast_trap was pending stops at its entry, with no stop in between to move it.
    assert int(printed[2]) == 11  # __HYPERVISOR_set_fast_trap (Xen 2.0's xen/include/hypervisor-ifs/hypervisor-if.h)
    assert "Breakpoint 4 on the fast trap at 0x4000d6, where the call under way registers it" in out
    assert "stopped so that gdb could move" not in out
    assert printed[3] == "1" and printed[4] == "1" and printed[5] == "3"  # at the gate's target, ring 1, from ring 3
    assert "Breakpoint 4 (break on the fast trap)" in out and "xendbg: cpu 0 entered the fast trap" in out
    assert not re.search(r"caught hypercall multicall", out)
    assert re.search(r"^4\s+breakpoint\s+keep y\s+<PENDING>\s+'break on the fast trap'$", "\n".join(listings[2]), re.M)

    # delete (all), then a new catch: the console_io catch set just before is gone with it.
    assert [line.split()[0] for line in listings[3] if re.match(r"^\d", line)] == ["6"]
    after = out.split("Catchpoint 6 (catch hypercall sched_op", 1)[1]
    assert "caught hypercall console_io" not in out.split("Catchpoint 5 (", 1)[1]
    assert "caught hypercall sched_op" in after
    assert int(printed[6]) == 6  # __HYPERVISOR_sched_op in Xen 2.0


def test_xen64_catchpoints_xen_side(boot_gdb, tmp_path):
    """Xen 4.17 with xen-syms: catches in Xen (do_set_trap_table, do_multicall).  The guest's multicall#1
    starts with xen_version (17), #2 with console_io (18); its set_trap_table sets vector 14's handler."""
    commands = tmp_path / "commands.gdb"
    commands.write_text("commands 2\np/x *(unsigned long *)$rdi\np $rsi\nend\n")
    booted = boot_gdb("xen64", timeout=90)
    out = booted.gdb_batch(
        *SETUP, "set xen abi auto",
        "xen tcatch hypercall set_trap_table", "xen catch hypercall multicall",
        "condition 2 *(unsigned long *)$rdi == 18", f"source {commands}", "info breakpoints",
        "continue",                                           # at do_set_trap_table
        "x/10gx $rdi", "xen break trap PF", "info breakpoints",
        "continue",                                           # multicall#2, by the condition
        "continue",                                           # the #PF handler
        "p/x $pc", "xen catch", "delete", "continue", timeout=90)
    assert "Traceback" not in out
    res = booted.finish()
    assert res.ok and res.transcript.done
    listings = breakpoint_rows(out)
    first = "\n".join(listings[0])
    assert re.search(r"^1\s+breakpoint\s+del\s+y\s+<PENDING>\s+'catch hypercall set_trap_table \(Xen side, at "
                     r"do_set_trap_table\)'$", first, re.M), first
    assert re.search(r"^2\s+breakpoint\s+keep y\s+<PENDING>\s+'catch hypercall multicall \(Xen side, at "
                     r"(compat_multicall, )?do_multicall\)'$", first, re.M), first
    # The trap table read raw at do_set_trap_table (trap_info: vector, flags, cs, pad, address; 16 bytes).
    words = [int(w, 16) for line in out.splitlines() if re.match(r"^0x[0-9a-f]+( <[^>]*>)?:\s+0x", line)
             for w in re.findall(r"0x([0-9a-f]{16})\b", line.split(":", 1)[1])]
    table = {words[i] & 0xFF: words[i + 1] for i in range(0, len(words) - 1, 2)}
    handler = table[14]
    assert f"Breakpoint 3 on the trap handler for vector 0xe (#PF) at {handler:#x}, where the call under way" in out
    assert not any(re.match(r"^1\s", line) for line in listings[1])  # the tcatch went at its stop
    assert re.search(r"^3\s+breakpoint\s+keep y\s+<PENDING>\s+'break on the trap handler for vector 0xe \(#PF\)'$",
                     "\n".join(listings[1]), re.M)
    # The condition picked multicall#2 at do_multicall; the commands read its first op and count raw.
    printed = values(out)
    assert printed[1] == "0x12" and printed[2] == "3", out[-3000:]
    assert out.count("Catchpoint 2 (") == 2  # when set, and at its one stop
    assert "stopped so that gdb could move" not in out
    assert int(printed[3], 16) == handler and "entered the trap handler for vector 0xe (#PF)" in out
    assert "  hypercall multicall: catchpoint 2, hit 1 time\n" in out


def test_catch_delete_by_name_keeps_the_settings_and_gdbs_delete_ends_catches():
    """No target needed: `xen catch delete NAME` makes the narrowed catch anew (a new number, the same
    condition and ignore count), and gdb's `delete N` / `delete` end catches."""
    guest = build("shim32", "2.0")["guest"]
    out = gdb("xen catch hypercall multicall set_trap_table", "condition 1 $eax == 13", "ignore 1 5",
              "xen catch delete multicall", "info breakpoints", "xen catch", "delete 2", "xen catch",
              "xen catch hypercall sched_op", "xen tcatch hypercall console_io", "delete", "xen catch",
              "info breakpoints", guest=guest)
    assert "Traceback" not in out
    rows = breakpoint_rows(out)
    assert len(rows) == 1, out
    listing = "\n".join(rows[0])
    assert re.search(r"^2\s+breakpoint\s+keep y\s+<PENDING>\s+'catch hypercall set_trap_table \(guest side", listing,
                     re.M), listing
    assert not re.search(r"^1\s", listing, re.M)
    assert "stop only if $eax == 13" in listing and "ignore next 5 hits" in listing
    assert "  hypercall set_trap_table: catchpoint 2\n" in out
    assert out.count("xendbg catches no hypercalls") == 2  # after delete 2, and after delete
    assert out.rstrip().endswith("No breakpoints or watchpoints.")

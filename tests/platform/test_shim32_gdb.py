"""gdb against shim32 through QEMU's gdbstub: stop at the guest's first int $0x82 and at its first
multicall, and read the registers there."""

from __future__ import annotations

import re
import time

import pytest

pytestmark = pytest.mark.platform

KCS = {"2.0": 0x0819, "3.0": 0xE019, "4.0": 0xE019}


def values(out: str) -> list[int]:
    """The values gdb printed ($1 = 0x11, $2 = 13, ...), in order."""
    return [int(v, 0) for v in re.findall(r"^\$\d+ = (\S+)$", out, re.M)]


@pytest.mark.parametrize("abi", ["2.0", "4.0"])
def test_gdb_first_hypercall_and_first_multicall(boot_gdb, abi: str) -> None:
    booted = boot_gdb("shim32", abi=abi, timeout=60)
    # Hardware breakpoints: the multiboot loader copies the image after gdb attaches.
    out = booted.gdb_batch(
        "hbreak *xen_int82", "continue", "p/x $eax", "p/x $cs",
        "delete", "hbreak *xen_int82 if $eax == 13", "continue", "p $eax", "p/x $cs", "p $ecx",
        "delete", "continue",
    )
    vals = values(out)
    assert len(vals) == 5, out
    first_nr, cs1, mc_nr, cs2, nr_calls = vals
    assert first_nr == 17                      # xen_version opens the scenario
    assert cs1 == KCS[abi] and cs1 & 3 == 1    # issued from ring 1 with Xen's flat selector
    assert mc_nr == 13 and cs2 == KCS[abi]
    assert nr_calls == 3                       # multicall#1 has three entries
    res = booted.finish()
    assert res.ok, res.stderr + res.stdout
    assert res.transcript.done


@pytest.mark.parametrize("abi", ["2.0", "3.0"])
def test_gdb_int80_enters_ring1_through_a_dpl3_gate(boot_gdb, abi: str) -> None:
    """At the guest's int $0x80 handler: CPU in ring 1, frame from ring 3, and the shim's IDT entry
    0x80 is a present 32-bit trap gate of DPL 3 whose target is that handler."""
    booted = boot_gdb("shim32", abi=abi, timeout=60)
    out = booted.gdb_batch(
        "hbreak int80_entry", "continue", "p/x $cs", "p/x *(unsigned int *)($sp + 4)",
        "p/x (unsigned int)((idt[0x80] >> 40) & 0xff)", "p/x (unsigned int)((idt[0x80] >> 16) & 0xffff)",
        "p/x (unsigned int)((idt[0x80] & 0xffff) | ((idt[0x80] >> 32) & 0xffff0000))",
        "p/x (unsigned int)int80_entry", "delete", "continue",
    )
    vals = values(out)
    assert len(vals) == 6, out
    cs, frame_cs, access, gate_sel, gate_off, handler = vals
    assert cs == KCS[abi]                       # running in ring 1
    assert frame_cs & 3 == 3                    # came from ring 3
    assert access == 0xEF                       # present, DPL 3, 32-bit trap gate
    assert gate_sel == KCS[abi] and gate_off == handler
    assert booted.finish().ok


def words(out: str) -> list[list[int]]:
    """Each `x/Nwx` dump as a list of words (one list per command, assuming N <= 4 per line)."""
    dumps: list[list[int]] = []
    for line in out.splitlines():
        m = re.match(r"^0x([0-9a-f]+):\s+((?:0x[0-9a-f]+\s*)+)$", line)
        if not m:
            continue
        vals = [int(v, 16) for v in m[2].split()]
        if dumps and int(m[1], 16) == dumps[-1][0] + 4 * (len(dumps[-1]) - 1):
            dumps[-1] += vals
        else:
            dumps.append([int(m[1], 16), *vals])
    return [d[1:] for d in dumps]


@pytest.mark.parametrize("abi", ["2.0", "3.0"])
def test_gdb_bounce_frames(boot_gdb, abi: str) -> None:
    """The frames the shim builds on the guest stack, read at the guest's entry points:
    event callback {eip, cs[|mask<<16], eflags} and page fault 2.0 {cr2, error, eip, cs, eflags} /
    3.0 {error, eip, cs|mask<<16, eflags}."""
    booted = boot_gdb("shim32", abi=abi, timeout=60)
    out = booted.gdb_batch(
        "hbreak event_entry", "hbreak trap_14", "continue", "x/3wx $sp", "continue", "x/5wx $sp",
        "p/x (unsigned int)&touch_hole", "delete", "continue",
    )
    event, pf = words(out)[:2]
    touch_hole = values(out)[-1]
    kcs = KCS[abi]
    assert event[1] == kcs                       # 3.0: saved mask 0 in bits 16-23
    if abi == "3.0":
        assert event[2] & 0x200                  # EFLAGS.IF = !saved_upcall_mask
        error, eip, cs, eflags = pf[:4]
    else:
        cr2, error, eip, cs, eflags = pf
        assert cr2 == 0x600000
    assert error == 0                            # not present, read, supervisor
    assert cs == kcs and eflags & 0x2
    assert touch_hole <= eip < touch_hole + 16   # the faulting read in touch_hole
    assert booted.finish().ok


def test_gdb_vcpu1_runs_on_the_second_cpu(boot_gdb) -> None:
    """vCPU 1 (VCPUOP_initialise + VCPUOP_up) runs on QEMU's second CPU, i.e. gdb thread 2, in ring 1."""
    booted = boot_gdb("shim32", abi="4.0", timeout=60)
    out = booted.gdb_batch("hbreak vcpu1_main", "continue", "p/x $cs", "thread", "delete", "continue")
    assert re.search(r"^Thread 2 hit Breakpoint 1, vcpu1_main", out, re.M), out
    assert values(out) == [KCS["4.0"]], out
    assert "Current thread is 2 " in out, out
    assert booted.finish().ok


def test_gdb_mi_reads_registers(boot_gdb) -> None:
    """The same through an MI session (pygdbmi), as xendbg's MiTarget drives gdb."""
    booted = boot_gdb("shim32", abi="3.0", timeout=60)
    mi = booted.gdb_mi()
    mi.write("-break-insert -h -c \"$eax == 13\" *xen_int82", timeout_sec=10)
    resp = mi.write("-exec-continue", timeout_sec=0.2, raise_error_on_timeout=False)
    deadline = time.monotonic() + 30
    while not any(r.get("message") == "stopped" for r in resp) and time.monotonic() < deadline:
        resp += mi.get_gdb_response(timeout_sec=0.1, raise_error_on_timeout=False)
    stopped = [r for r in resp if r.get("message") == "stopped"]
    assert stopped and stopped[0]["payload"].get("reason") == "breakpoint-hit", resp
    regs = mi.write("-data-evaluate-expression $eax", timeout_sec=10)
    value = next(r["payload"]["value"] for r in regs if r.get("message") == "done")
    assert int(value) == 13
    mi.write("-break-delete", timeout_sec=10)
    mi.write("-exec-continue", timeout_sec=10)
    res = booted.finish()
    assert res.ok and res.transcript.done

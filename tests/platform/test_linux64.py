"""linux64: Debian's Linux 6.1 as a 64-bit PV dom0 on Debian's Xen 4.17 (QEMU, TCG).

"Completed" means Linux got through its whole Xen PV start-up and reached the root-mount panic
(there is no disk and no initrd); see fixtures/platforms/linux64.py. The gdb test loads xen-syms
and stops in Xen at Linux's first multicall.
"""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.platform

HC_update_va_mapping, NR_HYPERCALLS = 14, 64


def test_boots_to_root_mount_panic(platform_run) -> None:
    res = platform_run("linux64", timeout=120)
    t = res.transcript
    assert res.ok, res.stderr + t.text()[-3000:]
    assert t.done and t.failed is None
    # Milestones, in order: Xen builds dom0, Linux starts, brings up its second vCPU, panics at root.
    marks = ["xen.dom0_build", "linux.start", "linux.smp", "linux.root_mount_panic"]
    times = [float(t.steps[m].fields["t"]) for m in marks]
    assert times == sorted(times)
    assert any("smp: Brought up 1 node, 2 CPUs" in line for line in t.lines)


def test_gdb_first_multicall(boot_gdb) -> None:
    """Break in Xen's do_multicall (symbols from xen-syms) and read Linux's first batch."""
    booted = boot_gdb("linux64", timeout=120)
    out = booted.gdb_batch("hbreak do_multicall", "continue", "p/x $rip", "p/x $rsi", "x/2gx $rdi",
                           "bt 3", timeout=90)
    assert "in do_multicall ()" in out, out
    assert re.search(r"in pv_hypercall ()", out), out  # reached from the 64-bit PV hypercall path
    nr = int(re.search(r"^\$2 = (0x[0-9a-f]+)$", out, re.M).group(1), 16)
    assert 1 <= nr <= 64, out  # nr_calls (RSI)
    # RDI is the guest's call list: the CPU is in Xen on dom0's page tables, so gdb reads it
    # directly. The first entry's op is a hypercall number (Linux starts with update_va_mapping).
    m = re.search(r"^0xffffffff[0-9a-f]+:\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)$", out, re.M)
    assert m, out
    op = int(m.group(1), 16)
    assert op < NR_HYPERCALLS, out

"""xen64: Debian's real Xen 4.17 (under QEMU, TCG) running our 64-bit PV test guest as dom0.

Each transcript step is checked against what Xen 4.17 does for a 64-bit PV guest (the rules are
cited next to each check); the faulty variant shows Xen 4.17 silently raising RPL-0 selectors and
refusing a nested multicall. A gdb test stops the guest at its first syscall into Xen.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import FIXTURES, RUN, SYSTEM_PYTHON, build

sys.path.insert(0, str(FIXTURES))
from platforms import common  # noqa: E402

pytestmark = pytest.mark.platform

EINVAL, ENOSYS = -22, -38


def xen_version_word() -> int:
    """What xen_version(0) returns on the Xen that runs (Debian's: 4.17, 4.20), from the artifacts."""
    major, minor = build("xen64")["xen_release"].split(".")
    return int(major) << 16 | int(minor)


# FLAT_KERNEL_CS/SS of a 64-bit PV guest (arch-x86/xen-x86_64.h, RELEASE-4.17.0)
KERNEL_CS, KERNEL_SS = 0xE033, 0xE02B
HC_console_io, HC_multicall, HC_xen_version, HC_vcpu_op, HC_event_channel_op = 18, 13, 17, 24, 32


def rc(t: common.Transcript, step: str) -> int:
    assert step in t.steps, f"step {step!r} missing from the transcript:\n{t.text()}"
    return t.steps[step].rc


def field(t: common.Transcript, step: str, key: str) -> int:
    return int(t.steps[step].fields[key], 0)


def check_common(t: common.Transcript, variant: str) -> None:
    assert t.done and t.failed is None
    assert rc(t, "xen_version") == xen_version_word()
    assert t.steps["xen_version"].fields["variant"] == variant
    for step in ("update_va_mapping", "set_callbacks", "callback_op.event", "callback_op.failsafe",
                 "callback_op.syscall", "set_trap_table", "multicall#1", "multicall#2",
                 "evtchn.bind_ipi", "evtchn.unmask", "evtchn.send", "event", "trap.int3",
                 "trap.page_fault", "int80"):
        assert rc(t, step) == 0, step

    # Multicall #1: results differ entry by entry; closing a port that does not exist is -EINVAL.
    assert [rc(t, f"multicall#1.entry{i}") for i in range(4)] == [xen_version_word(), 1, EINVAL, 0]
    assert [field(t, f"multicall#1.entry{i}", "op") for i in range(4)] == [
        HC_xen_version, HC_vcpu_op, HC_event_channel_op, HC_xen_version]

    # The second vCPU: down, initialised from a 64-bit vcpu_guest_context, up, then down again.
    assert rc(t, "vcpu_op.is_up") == 0
    assert rc(t, "vcpu_op.initialise") == 0 and rc(t, "vcpu_op.up") == 0
    assert rc(t, "vcpu1") == 0 and field(t, "vcpu1", "cs") == KERNEL_CS
    assert rc(t, "vcpu_op.is_up#2") == 1
    assert rc(t, "vcpu_op.down") == 0 and rc(t, "vcpu_op.is_up#3") == 0

    # The event came through the event callback, on the bound IPI port.
    assert field(t, "event", "count") == 1 and field(t, "event", "port") == field(t, "evtchn.bind_ipi", "port")

    # Exceptions through the trap table. Xen shows the guest kernel's interrupted CS with RPL 0 in
    # the bounce frame (entry.S create_bounce_frame), while the handler itself runs with RPL 3.
    assert field(t, "trap.int3", "cs") == KERNEL_CS & ~3
    assert field(t, "trap.int3", "handler_cs") == KERNEL_CS
    assert field(t, "trap.page_fault", "cr2") == 0xFFFFFFFF40000000
    assert field(t, "trap.page_fault", "error") == 0  # read of a not-present page, in kernel mode
    assert field(t, "int80", "rax") == 0x80BEEF


def test_normal_scenario(platform_run) -> None:
    res = platform_run("xen64")
    t = res.transcript
    assert res.ok, res.stderr + t.text()
    check_common(t, "normal")
    assert field(t, "set_trap_table", "cs") == KERNEL_CS
    assert field(t, "vcpu_op.initialise", "cs") == KERNEL_CS and field(t, "vcpu1", "ss") == KERNEL_SS
    # console_io, XENMEM_current_reservation (dom0's page count), sched_op yield.
    assert rc(t, "multicall#2.entry0") == 0 and rc(t, "multicall#2.entry2") == 0
    assert rc(t, "multicall#2.entry1") > 0
    assert "callback_op.noncanonical" not in t.steps and "set_trap_table.noncanonical" not in t.steps


def test_faulty_scenario(platform_run) -> None:
    res = platform_run("xen64", faulty=True)
    t = res.transcript
    assert res.ok, res.stderr + t.text()
    check_common(t, "faulty")

    # RPL-0 code selectors: Xen 4.17 accepts the table and raises the RPL to 3
    # (fixup_guest_code_selector); the handlers really run with 0xe033.
    assert field(t, "set_trap_table", "cs") == KERNEL_CS & ~3
    assert field(t, "trap.page_fault", "handler_cs") == KERNEL_CS
    # Same in the vcpu_guest_context of VCPUOP_initialise (arch_set_info_guest): CS/SS given with
    # RPL 0, vCPU 1 runs with RPL 3.
    assert field(t, "vcpu_op.initialise", "cs") == KERNEL_CS & ~3
    assert field(t, "vcpu_op.initialise", "ss") == KERNEL_SS & ~3
    assert field(t, "vcpu1", "ss") == KERNEL_SS

    # What Xen 4.17 does refuse (pv/callback.c): a non-canonical handler or callback address
    # (-EINVAL) and an unknown callback type (-ENOSYS).
    assert rc(t, "set_trap_table.noncanonical") == EINVAL
    assert rc(t, "callback_op.noncanonical") == EINVAL
    assert rc(t, "callback_op.badtype") == ENOSYS

    # A multicall inside a multicall: do_multicall refuses re-entry with -EINVAL for that entry
    # only (common/multicall.c); the batch itself succeeds.
    assert rc(t, "multicall#2") == 0
    assert field(t, "multicall#2.entry2", "op") == HC_multicall
    assert [rc(t, f"multicall#2.entry{i}") for i in (0, 2)] == [0, EINVAL]


def test_gdb_first_hypercall(boot_gdb) -> None:
    """Stop at the guest's first syscall into Xen: the console_io stub of the hypercall page."""
    booted = boot_gdb("xen64")
    page = booted.artifacts["hypercall_page"]
    # Each stub is 32 bytes: push %rcx; push %r11; mov $nr,%eax; syscall (at +8) ...
    syscall_site = page + HC_console_io * 32 + 8
    out = booted.gdb_batch(f"hbreak *{syscall_site:#x}", "continue", "x/i $pc", "p/x $rax", "p/x $rdi",
                           "x/s $rdx", "detach")
    assert re.search(r"syscall", out), out
    assert re.search(r"^\$1 = 0x12$", out, re.M), out  # RAX = __HYPERVISOR_console_io
    assert re.search(r"^\$2 = 0x0$", out, re.M), out  # RDI = CONSOLEIO_write
    assert "[guest] xen64 PV guest" in out, out
    res = booted.finish()
    assert res.ok, res.stderr + res.stdout[-2000:]


def test_only_real_xen_abi() -> None:
    """xen64 is Debian's Xen 4.17: other ABI generations are refused before anything boots."""
    r = subprocess.run([SYSTEM_PYTHON, str(RUN), "xen64", "--abi", "3.0", "--build-only"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "3.0" in r.stderr

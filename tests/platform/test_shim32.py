"""shim32 under each ABI generation, normal and faulty: every scenario step reports what that generation
of Xen returns (see fixtures/README.md for the transcript format and the rules cited)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import FIXTURES, free_port

sys.path.insert(0, str(FIXTURES))
from platforms import common, shim32  # noqa: E402

pytestmark = pytest.mark.platform

ABIS = ("2.0", "3.0", "4.0")
EPERM, EINVAL, ENOSYS = -1, -22, -38
VERSION = {"2.0": 0x20000, "3.0": 0x30000, "4.0": 0x40000}
KCS = {"2.0": 0x0819, "3.0": 0xE019, "4.0": 0xE019}
UCS = {"2.0": 0x082B, "3.0": 0xE02B, "4.0": 0xE02B}


def rc(t: common.Transcript, step: str) -> int:
    assert step in t.steps, f"step {step!r} missing from the transcript:\n{t.text()}"
    return t.steps[step].rc


def field(t: common.Transcript, step: str, key: str) -> int:
    return int(t.steps[step].fields[key], 0)


@pytest.mark.parametrize("abi", ABIS)
def test_normal_scenario(platform_run, abi: str) -> None:
    res = platform_run("shim32", abi=abi)
    t = res.transcript
    assert res.ok, res.stderr + t.text()
    assert t.done and t.failed is None
    assert rc(t, "xen_version") == VERSION[abi]
    for step in ("stack_switch", "set_callbacks", "set_trap_table", "evtchn.bind_virq", "event",
                 "multicall#1", "multicall#2", "trap.int3", "trap.page_fault", "int81", "int80"):
        assert rc(t, step) == 0, step
    assert "set_callbacks.retry" not in t.steps and "set_trap_table.retry" not in t.steps

    # callback_op exists from 4.0 only (the guest uses it only there).
    assert ("callback_op.event" in t.steps) == (abi == "4.0")
    if abi == "4.0":
        assert rc(t, "callback_op.event") == 0 and rc(t, "callback_op.failsafe") == 0

    # set_fast_trap: hypercall 11 in 2.0, do_ni_hypercall afterwards.
    assert rc(t, "set_fast_trap") == (0 if abi == "2.0" else ENOSYS)

    # Multicall results, entry by entry, in the generation's layout.
    assert [rc(t, f"multicall#1.entry{i}") for i in range(3)] == [VERSION[abi], 0, 0]
    assert [rc(t, f"multicall#2.entry{i}") for i in range(4)] == [0, ENOSYS, 0, 0 if abi == "2.0" else ENOSYS]

    # Event and exceptions came through the callbacks and the trap table, from ring 1.
    assert field(t, "event", "count") == 1 and field(t, "event", "handler_cs") == KCS[abi]
    assert field(t, "event", "port") == field(t, "evtchn.bind_virq", "port")
    assert field(t, "trap.int3", "cs") == KCS[abi]
    assert field(t, "trap.page_fault", "cr2") == 0x600000
    assert field(t, "trap.page_fault", "events_masked") == 1   # trap entry with the IF flag
    # int $0x81 from ring 3: a #GP the shim forwards through the trap table (frame with esp/ss).
    assert rc(t, "int81") == 0 and field(t, "int81", "cs") == UCS[abi]
    assert any("int $0x81 from ring 3 bounced" in line for line in t.lines)
    # int $0x80 from ring 3: a real DPL-3 trap gate straight into ring 1, never through the shim.
    assert field(t, "int80", "cs") == UCS[abi] and field(t, "int80", "eax") == 0x5EED
    assert not any("int $0x80 from ring 3 bounced" in line for line in t.lines)
    gate = "set_fast_trap: IDT[80]" if abi == "2.0" else "int80 direct trap: IDT[80]"
    assert any(f"[shim] {gate} = trap gate {KCS[abi]:04x}:" in line and line.endswith("DPL 3")
               for line in t.lines), t.text()

    # vcpu_op: absent in 2.0; a real second CPU runs vCPU 1 in ring 1 otherwise.
    if abi == "2.0":
        assert rc(t, "vcpu_op.is_up") == ENOSYS
        assert "vcpu_op.initialise" not in t.steps
    else:
        steps = ("vcpu_op.is_up", "vcpu_op.initialise", "vcpu_op.up", "vcpu1", "vcpu_op.is_up#2",
                 "vcpu_op.down", "vcpu_op.is_up#3")
        assert [rc(t, s) for s in steps] == [0, 0, 0, 0, 1, 0, 0]
        assert field(t, "vcpu1", "cs") == KCS[abi]
        assert any("cpu1 started (INIT-SIPI-SIPI)" in line for line in t.lines)


@pytest.mark.parametrize("abi", ABIS)
def test_faulty_scenario(platform_run, abi: str) -> None:
    res = platform_run("shim32", abi=abi, faulty=True)
    t = res.transcript
    assert res.ok, res.stderr + t.text()
    assert rc(t, "xen_version") == VERSION[abi]
    bad_cs = KCS[abi] & ~3
    assert field(t, "set_callbacks", "event_cs") == bad_cs
    if abi in ("2.0", "3.0"):
        # VALID_CODESEL: RPL must be 1 -> -EPERM, and the guest has to retry.
        assert rc(t, "set_callbacks") == EPERM and rc(t, "set_callbacks.retry") == 0
        assert rc(t, "set_trap_table") == EPERM and rc(t, "set_trap_table.retry") == 0
    else:
        # fixup_guest_code_selector: accepted with the RPL raised to 1.
        assert rc(t, "set_callbacks") == 0 and "set_callbacks.retry" not in t.steps
        assert rc(t, "set_trap_table") == 0 and "set_trap_table.retry" not in t.steps
        assert rc(t, "callback_op.event") == 0
        fixed = f"selector {bad_cs:04x} fixed up to {KCS[abi]:04x}"
        assert sum(fixed in line for line in t.lines) >= 3, t.text()

    # Fast trap on a forbidden vector: 2.0 answers -1; later ABIs have no such hypercall.
    assert rc(t, "set_fast_trap.bad_vector") == (EPERM if abi == "2.0" else ENOSYS)
    # ... and on an allowed vector whose trap-table entry has the IF flag: 2.0 refuses it too.
    assert rc(t, "set_trap_table.vector21") == 0
    assert rc(t, "set_fast_trap.if_flag") == (EPERM if abi == "2.0" else ENOSYS)

    # Nested multicall: 3.0+ refuse it with -EINVAL; 2.0 writes the address of its own
    # multicall_return_from_call as the inner entry's result.
    assert rc(t, "multicall#3") == 0
    assert rc(t, "multicall#3.entry0") == VERSION[abi] and rc(t, "multicall#3.entry2") == 0
    if abi == "2.0":
        shim_elf = shim32.artifacts(common.Options("shim32", abi, faulty=True))["hypervisor"]
        nm = subprocess.run(["nm", shim_elf], capture_output=True, text=True, check=True).stdout
        addr = next(int(line.split()[0], 16) for line in nm.splitlines()
                    if line.endswith(" multicall_return_from_call"))
        assert rc(t, "multicall#3.entry1") & 0xFFFFFFFF == addr and addr >= 0xFC500000  # Xen 2.0's text
        assert rc(t, "multicall#3.entry1") < 0   # so the entry reads as failed
    else:
        assert rc(t, "multicall#3.entry1") == EINVAL
    # 4.0 raised the RPL-0 callback selector to 1: the callback runs in ring 1 all the same.
    assert field(t, "event", "handler_cs") == KCS[abi]
    # The mistakes do not derail the rest of the scenario.
    assert t.done and rc(t, "trap.page_fault") == 0 and rc(t, "int80") == 0


def test_boot_reaches_the_first_hypercall() -> None:
    """A plain QEMU run (no gdb) boots, reaches the first hypercall and runs the whole scenario.
    How long that takes is measured in bench/, not asserted here."""
    opts = common.Options("shim32", "4.0", timeout=20)
    shim32.build(opts)
    out = common.run_qemu(shim32.qemu_argv(opts), opts.timeout)
    assert out.ok, out.reason + out.transcript.text()
    assert out.first_hypercall is not None, out.transcript.text()
    assert out.transcript.done


def test_runner_reports_timeout() -> None:
    """A QEMU that never reaches the end (here: waiting for a gdb that never comes) is ended at the
    timeout, and the runner says so in one line."""
    argv = [sys.executable, str(FIXTURES / "run"), "shim32", "--abi", "3.0", "--gdb", str(free_port()),
            "--timeout", "1"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == "fixtures/run: shim32 abi=3.0: timeout after 1 s"

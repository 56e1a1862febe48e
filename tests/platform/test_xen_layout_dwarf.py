"""The struct offsets xendbg recovers from Xen's code (xendbg/dump/xenlayout.py, for Debian's xen-syms,
which has no DWARF) against the DWARF of the Xen built from Debian's source (CONFIG_DEBUG_INFO), which
gdb reads itself: the independent check the code recovery never had."""

from __future__ import annotations

import re
import subprocess

import pytest
from conftest import build

from xendbg.dump.xen import XenSyms

pytestmark = pytest.mark.platform

# What xendbg takes from struct vcpu / struct domain / struct cpu_info, as gdb names it (Xen 4.17's
# xen/include/xen/sched.h, asm/domain.h, asm/current.h).
DWARF = {
    "user_regs": "&((struct vcpu *)0)->arch.user_regs",
    "trap_ctxt": "&((struct vcpu *)0)->arch.pv.trap_ctxt",
    "kernel_ss": "&((struct vcpu *)0)->arch.pv.kernel_ss",
    "kernel_sp": "&((struct vcpu *)0)->arch.pv.kernel_sp",
    "ctrlreg": "&((struct vcpu *)0)->arch.pv.ctrlreg",
    "guest_table": "&((struct vcpu *)0)->arch.guest_table",
    "vgc_flags": "&((struct vcpu *)0)->arch.pv.vgc_flags",
    "domain_next": "&((struct domain *)0)->next_in_list",
    "pause_flags": "&((struct vcpu *)0)->pause_flags",
    "callback event": "&((struct vcpu *)0)->arch.pv.event_callback_eip",
    "callback failsafe": "&((struct vcpu *)0)->arch.pv.failsafe_callback_eip",
    "callback syscall": "&((struct vcpu *)0)->arch.pv.syscall_callback_eip",
    "callback syscall32": "&((struct vcpu *)0)->arch.pv.syscall32_callback_eip",
    "callback sysenter": "&((struct vcpu *)0)->arch.pv.sysenter_callback_eip",
    "disables syscall32": "&((struct vcpu *)0)->arch.pv.syscall32_disables_events",
    "disables sysenter": "&((struct vcpu *)0)->arch.pv.sysenter_disables_events",
    "vcpu_domain": "&((struct vcpu *)0)->domain",
    "domain_max_vcpus": "&((struct domain *)0)->max_vcpus",
    "domain_vcpus": "&((struct domain *)0)->vcpu",
    "cpu_info_size": "sizeof(struct cpu_info)",
    "cpu_info_processor_id": "&((struct cpu_info *)0)->processor_id",
    "cpu_info_current_vcpu": "&((struct cpu_info *)0)->current_vcpu",
    "cpu_info_per_cpu_offset": "&((struct cpu_info *)0)->per_cpu_offset",
}


def dwarf_offsets(xen_syms: str) -> dict[str, int]:
    argv = ["gdb", "-nx", "-batch", "-ex", f"file {xen_syms}"]
    for expr in DWARF.values():
        argv += ["-ex", f"print/x (unsigned long)({expr})"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120).stdout
    values = [int(v, 16) for v in re.findall(r"^\$\d+ = (0x[0-9a-f]+)$", out, re.M)]
    assert len(values) == len(DWARF), out
    return dict(zip(DWARF, values, strict=True))


def test_code_recovered_offsets_equal_dwarf() -> None:
    xen_syms = build("xen32")["xen_syms"]
    truth = dwarf_offsets(xen_syms)
    syms = XenSyms(xen_syms)
    lay, fields = syms.layout, syms.fields
    assert syms.version == build("xen32")["xen_release"] and fields is not None
    recovered = {"user_regs": lay.user_regs, "trap_ctxt": lay.trap_ctxt, "kernel_ss": lay.kernel_ss,
                 "kernel_sp": lay.kernel_sp, "ctrlreg": lay.ctrlreg, "guest_table": lay.guest_table,
                 "vgc_flags": lay.vgc_flags, "domain_next": lay.domain_next,
                 "pause_flags": lay.down[0] if lay.down else None}
    recovered |= {f"callback {k}": v for k, v in lay.callbacks.items()}
    recovered |= {f"disables {k}": v for k, v in lay.disables_events.items()}
    recovered |= {name: getattr(fields, name) for name in DWARF if hasattr(fields, name)}
    found = {name: value for name, value in recovered.items() if value is not None}
    assert found == {name: truth[name] for name in found}  # every offset xendbg recovered is DWARF's
    # What the recovery does not find on this build (gcc 12 with 32-bit PV compiled in): the ctrlreg
    # array and the VPF_down test in arch_get_info_guest. Say so here, so that a better recovery shows.
    assert set(DWARF) - set(found) == {"ctrlreg", "pause_flags"}

"""Hypercall signatures: argument names and kinds for each hypercall, per guest width.

Numbers come from `_tables.HYPERCALL` (generated from xen/include/public/xen.h at each tag).
The argument lists here are read from the hypervisor's prototypes: xen/include/hypercall-defs.c at
RELEASE-4.17.0 (the `do` prefix for 64-bit PV, `compat` for 32-bit PV), and for older forms the
prototypes of the handlers at RELEASE-2.0.0 and RELEASE-3.0.0 (xen/arch/x86/traps.c, mm.c,
xen/common/*.c).

An argument kind says how to show and follow the value:
  int, uint, ulong   plain numbers (int is shown signed)
  ptr                a guest pointer xendbg does not follow
  ptr:STRUCT         a guest pointer to STRUCT (a layout in layouts.py), decoded
  cmd:FAMILY         a sub-operation number, named from the enum FAMILY
  flags:FAMILY       a flag word, named bit by bit from FAMILY
  sel                a code or stack segment selector (its RPL is checked)
  code               a guest code address (must be canonical on 64-bit)
  vector             an interrupt vector
  domid              a domain id (DOMID_SELF is 0x7ff0)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArgSpec:
    name: str
    kind: str


@dataclass(frozen=True)
class Signature:
    args32: tuple[ArgSpec, ...]
    args64: tuple[ArgSpec, ...]

    def args(self, width: int) -> tuple[ArgSpec, ...]:
        return self.args32 if width == 32 else self.args64


def _args(text: str) -> tuple[ArgSpec, ...]:
    specs = []
    for word in text.split():
        name, kind = word.split(":", 1)
        specs.append(ArgSpec(name, kind))
    return tuple(specs)


def _sig(both: str = "", *, w32: str | None = None, w64: str | None = None) -> Signature:
    return Signature(_args(w32 if w32 is not None else both), _args(w64 if w64 is not None else both))


# Keyed by signature name: the hypercall's name, or NAME@GEN for a form only that generation used.
SIGNATURES: dict[str, Signature] = {
    "set_trap_table": _sig("traps:ptr:trap_info"),
    "mmu_update": _sig("reqs:ptr:mmu_update count:uint done:ptr foreigndom:domid"),
    "set_gdt": _sig("frame_list:ptr entries:uint"),
    "stack_switch": _sig("ss:sel sp:ulong"),
    "set_callbacks": _sig(
        w32="event_selector:sel event_address:code failsafe_selector:sel failsafe_address:code",
        w64="event_address:code failsafe_address:code syscall_address:code"),
    "fpu_taskswitch": _sig("set:int"),
    "sched_op_compat": _sig("cmd:cmd:SCHEDOP arg:ulong"),
    "platform_op": _sig("op:ptr"),
    "set_debugreg": _sig("reg:int value:ulong"),
    "get_debugreg": _sig("reg:int"),
    "update_descriptor": _sig(w32="ma_lo:uint ma_hi:uint desc_lo:uint desc_hi:uint", w64="ma:ulong desc:ulong"),
    "memory_op": _sig("cmd:cmd:XENMEM arg:ptr"),
    "multicall": _sig("call_list:ptr:multicall_entry nr_calls:uint"),
    "update_va_mapping": _sig(w32="va:ulong val_lo:uint val_hi:uint flags:flags:UVMF",
                              w64="va:ulong val:ulong flags:flags:UVMF"),
    "set_timer_op": _sig(w32="timeout_lo:uint timeout_hi:uint", w64="timeout:ulong"),
    "event_channel_op_compat": _sig("op:ptr:evtchn_op"),
    "xen_version": _sig("cmd:cmd:XENVER arg:ptr"),
    "console_io": _sig("cmd:cmd:CONSOLEIO count:uint buffer:ptr"),
    "physdev_op_compat": _sig("op:ptr"),
    "grant_table_op": _sig("cmd:cmd:GNTTABOP uop:ptr count:uint"),
    "vm_assist": _sig("cmd:cmd:VMASST_CMD type:cmd:VMASST_TYPE"),
    "update_va_mapping_otherdomain": _sig(
        w32="va:ulong val_lo:uint val_hi:uint flags:flags:UVMF domid:domid",
        w64="va:ulong val:ulong flags:flags:UVMF domid:domid"),
    "iret": _sig(""),
    "switch_vm86": _sig(""),
    "switch_to_user": _sig(""),
    "vcpu_op": _sig("cmd:cmd:VCPUOP vcpuid:uint extra_args:ptr"),
    "set_segment_base": _sig("which:uint base:ulong"),
    "mmuext_op": _sig("ops:ptr:mmuext_op count:uint done:ptr foreigndom:domid"),
    "acm_op": _sig("op:ptr"),
    "xsm_op": _sig("op:ptr"),
    "nmi_op": _sig("cmd:uint arg:ptr"),
    "sched_op": _sig("cmd:cmd:SCHEDOP arg:ptr"),
    "callback_op": _sig("cmd:cmd:CALLBACKOP arg:ptr"),
    "xenoprof_op": _sig("op:int arg:ptr"),
    "event_channel_op": _sig("cmd:cmd:EVTCHNOP arg:ptr"),
    "physdev_op": _sig("cmd:cmd:PHYSDEVOP arg:ptr"),
    "hvm_op": _sig("op:ulong arg:ptr"),
    "sysctl": _sig("op:ptr"),
    "domctl": _sig("op:ptr"),
    "kexec_op": _sig("op:ulong arg:ptr"),
    "tmem_op": _sig("op:ptr"),
    "argo_op": _sig("cmd:uint arg1:ptr arg2:ptr arg3:ulong arg4:ulong"),
    "xenpmu_op": _sig("op:uint arg:ptr"),
    "dm_op": _sig("domid:domid nr_bufs:uint bufs:ptr"),
    "hypfs_op": _sig("cmd:uint arg1:ptr arg2:ulong arg3:ptr arg4:ulong"),
    # x86 names for the arch_N slots: mca is arch_0 (public/arch-x86/xen-mca.h, since RELEASE-4.0.0);
    # paging_domctl_cont is arch_1, a continuation Xen creates itself (xen/arch/x86/include/asm/
    # hypercall.h and hypercall-defs.c at RELEASE-4.17.0).
    "mca": _sig("op:ptr"),
    "paging_domctl_cont": _sig("op:ptr"),
    # Xen 2.0 forms (RELEASE-2.0.0: xen/arch/x86/traps.c, x86_32/mm.c, common/schedule.c).
    "sched_op@2.0": _sig("op:cmd:SCHEDOP"),  # command in bits 0-7, shutdown reason in bits 8-15
    "fpu_taskswitch@2.0": _sig(""),
    "update_descriptor@2.0": _sig("pa:ulong word1:uint word2:uint"),
    "update_va_mapping@2.0": _sig("page_nr:ulong val:ulong flags:flags:UVMF"),
    "update_va_mapping_otherdomain@2.0": _sig("page_nr:ulong val:ulong flags:flags:UVMF domid:domid"),
    "set_fast_trap@2.0": _sig("idx:vector"),
    "dom_mem_op@2.0": _sig("op:cmd:XENMEM extent_list:ptr nr_extents:ulong extent_order:uint"),
    "xen_version@2.0": _sig("cmd:uint"),
    "event_channel_op@2.0": _sig("op:ptr:evtchn_op"),
    "physdev_op@2.0": _sig("op:ptr"),
    "dom0_op@2.0": _sig("op:ptr"),
}

# Generation-specific signatures: (generation, name) -> signature name.  Where a later generation
# reused a name for a new calling convention, the old generations keep the old form.
SIGNATURE_OVERRIDES: dict[tuple[str, str], str] = {
    ("2.0", "sched_op"): "sched_op@2.0",
    ("2.0", "fpu_taskswitch"): "fpu_taskswitch@2.0",
    ("2.0", "update_descriptor"): "update_descriptor@2.0",
    ("2.0", "update_va_mapping"): "update_va_mapping@2.0",
    ("2.0", "update_va_mapping_otherdomain"): "update_va_mapping_otherdomain@2.0",
    ("2.0", "set_fast_trap"): "set_fast_trap@2.0",
    ("2.0", "dom_mem_op"): "dom_mem_op@2.0",
    ("2.0", "xen_version"): "xen_version@2.0",
    ("2.0", "event_channel_op"): "event_channel_op@2.0",
    ("2.0", "physdev_op"): "physdev_op@2.0",
    ("2.0", "dom0_op"): "dom0_op@2.0",
    ("3.0", "sched_op"): "sched_op_compat",
    ("3.0", "event_channel_op"): "event_channel_op_compat",
    ("3.0", "physdev_op"): "physdev_op_compat",
    ("3.0", "dom0_op"): "platform_op",
    ("3.0.2", "event_channel_op"): "event_channel_op_compat",
    ("3.0.2", "physdev_op"): "physdev_op_compat",
    ("3.0.2", "dom0_op"): "platform_op",
}

# Names a hypercall was known by before it was renamed; xendbg accepts both (catch, lookup).
FORMER_NAMES: dict[str, tuple[str, ...]] = {
    "sched_op_compat": ("sched_op",),  # renamed when sched_op moved to 29 (3.0.2)
    "event_channel_op_compat": ("event_channel_op",),  # renamed when event_channel_op moved to 32 (3.0.3)
    "physdev_op_compat": ("physdev_op",),  # likewise, physdev_op moved to 33 (3.0.3)
    "platform_op": ("dom0_op",),
    "xsm_op": ("acm_op",),
}

# Hypercalls that exist for one guest width only.  xen.h marks them "x86/32 only" / "x86/64 only"
# (switch_vm86 and switch_to_user at RELEASE-3.0.0; set_segment_base at every tag from RELEASE-3.0.0
# to RELEASE-4.22.0).  The hypervisor agrees: the x86_32 hypercall_table has do_ni_hypercall at 25
# (RELEASE-3.0.0 to RELEASE-4.0.0, and compat_hypercall_table at RELEASE-4.0.0), and from 4.17
# do_set_segment_base returns -ENOSYS to a 32-bit vCPU (xen/arch/x86/pv/misc-hypercalls.c).
# Every other x86 hypercall is wired for both widths (hypercall-defs.c, RELEASE-4.17.0/4.22.0).
WIDTH_ONLY: dict[str, int] = {"switch_vm86": 32, "switch_to_user": 64, "set_segment_base": 64}


# The hypercalls Xen can preempt and continue (it rewinds the guest onto the hypercall instruction
# with the arguments it needs to go on): every caller of hypercall_create_continuation in xen/arch/x86,
# xen/common and xen/drivers, the same set at RELEASE-4.17.0 and RELEASE-4.20.0 (paging_domctl_cont is
# __HYPERVISOR_arch_1 under its 4.17 name).  Older Xen continues a subset of these.
CONTINUED_BY_XEN = frozenset({
    "multicall", "mmu_update", "mmuext_op", "update_va_mapping", "update_va_mapping_otherdomain",
    "set_trap_table", "console_io", "memory_op", "grant_table_op", "vcpu_op", "event_channel_op",
    "domctl", "sysctl", "platform_op", "hvm_op", "dm_op", "kexec_op", "paging_domctl_cont",
})
# Hypercalls that never come back to the instruction after them: iret goes where its frame says.
NEVER_RETURN = frozenset({"iret"})

"""Xen's own checks, generation by generation, as findings.

Read from the hypervisor at each tag:
- RELEASE-2.0.0 xen/arch/x86/traps.c (do_set_trap_table, do_set_callbacks, set_fast_trap) and
  xen/include/asm-x86/desc.h (VALID_CODESEL): a code selector must be the flat kernel CS, or have
  the kernel's RPL and not name one of Xen's reserved GDT entries; otherwise -EPERM.
- RELEASE-3.0.0: the same check (GUEST_KERNEL_RPL: 1 on x86_32, 3 on x86_64), still -EPERM.
- 3.0.2-branched onward (desc.h fixup_guest_code_selector): a selector whose RPL is below the
  kernel's is silently raised to it; the call succeeds.
- RELEASE-2.0.0 set_fast_trap: only vector 0x80 or 0x20-0x2f, and not one whose trap-table entry
  asks for the event mask to be cleared (Xen cannot virtualise an interrupt gate); 0 disables.
- RELEASE-4.17.0 xen/arch/x86/pv/callback.c: 64-bit addresses must be canonical (-EINVAL);
  unknown callback types get -ENOSYS; event/failsafe (and, from a 64-bit guest, syscall) callbacks
  cannot be unregistered (-EINVAL), other types but nmi not at all (-ENOSYS).
- do_multicall: RELEASE-2.0.0 x86_32/entry.S detects a nested multicall by its return address and
  skips it, writing the address of its multicall_return_from_call as the result; RELEASE-3.0.0 and
  later xen/common/multicall.c refuse re-entry with -EINVAL.
"""

from __future__ import annotations

from xendbg.abi import TRAP_FLAG_IF, Abi
from xendbg.abi.generations import at_least
from xendbg.arch import is_canonical
from xendbg.decode.model import Finding

MAX_TABLE_ENTRIES = 256  # a trap table has at most one entry per vector
MAX_MULTICALL_ENTRIES = 256  # xendbg decodes no more of a batch than this


def _in_reserved_gdt(abi: Abi, selector: int) -> bool:
    first, last = abi.reserved_gdt
    return not selector & 4 and first <= (selector >> 3) <= last


def vector_list(vectors: list[int]) -> str:
    """'vectors 0x0-0x1f, 0x80' (runs of consecutive vectors collapsed)."""
    runs: list[list[int]] = []
    for v in vectors:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    parts = [f"{r[0]:#x}-{r[-1]:#x}" if len(r) > 2 else ", ".join(f"{v:#x}" for v in r) for r in runs]
    return ("vector " if len(vectors) == 1 else "vectors ") + ", ".join(parts)


def check_code_selector(abi: Abi, selector: int, what: str) -> list[Finding]:
    """The RPL rule for a code selector a PV guest hands Xen (trap table, callbacks, vCPU context)."""
    kernel = abi.kernel_rpl
    rpl = selector & 3
    if selector == abi.kernel_cs:
        return []
    width = f"{abi.width}-bit PV"
    if abi.rejects_bad_selectors:
        if rpl != kernel:
            return [Finding("selector-rpl", "error",
                            f"{what}: selector {selector:#06x} has RPL {rpl}, but a {width} kernel runs in "
                            f"ring {kernel}: Xen {abi.generation} rejects the call with -EPERM")]
        if _in_reserved_gdt(abi, selector):
            return [Finding("selector-reserved", "error",
                            f"{what}: selector {selector:#06x} names GDT entry {selector >> 3}, one of "
                            f"Xen's reserved entries: Xen {abi.generation} rejects the call with -EPERM")]
        return []
    if rpl < kernel:
        fixed = (selector & ~3) | kernel
        return [Finding("selector-rpl", "info",
                        f"{what}: selector {selector:#06x} has RPL {rpl}; Xen {abi.generation} silently "
                        f"raises it to the {width} kernel's RPL {kernel} ({fixed:#06x})")]
    if rpl > kernel:
        return [Finding("selector-rpl", "warning",
                        f"{what}: selector {selector:#06x} has RPL {rpl}, above the {width} kernel's "
                        f"ring {kernel}: Xen accepts it and will enter this code in ring {rpl}")]
    return []


def check_vcpu_context(abi: Abi, vcpu: int, regs: dict[str, int], callbacks: dict[str, int],
                       trap_selectors: dict[int, list[int]], cr3: int, ldt_base: int, ldt_ents: int) -> list[Finding]:
    """VCPUOP_initialise's context, as arch_set_info_guest (xen/arch/x86/domain.c) takes it:
    - RELEASE-3.0.0: a CS or SS with RPL 0 is -EINVAL; callback and trap-table selectors are not checked.
    - 3.0.2-branched, RELEASE-4.0.0: SS, kernel_ss, CS, the 32-bit callback CSes and every trap_ctxt CS are
      fixed up (fixup_guest_{code,stack}_selector); 4.0.0 also refuses an LDT base that is not page-aligned
      or more than 8192 LDT entries (-EINVAL).
    - all: ctrlreg[3] must name a page-table page of the domain (get_page_and_type(PGT_base_page_table)),
      else -EINVAL; xendbg can only tell that 0 is none.
    `regs` has cs, ss, kernel_ss; `callbacks` kind -> selector; `trap_selectors` selector -> vectors."""
    who = f"vCPU {vcpu}"
    found: list[Finding] = []
    if abi.rejects_bad_selectors:
        for name in ("cs", "ss"):
            if regs[name] & 3 == 0:
                found.append(Finding("selector-rpl", "error",
                                     f"{who} initial {name.upper()} {regs[name]:#06x} has RPL 0: Xen "
                                     f"{abi.generation} fails VCPUOP_initialise with -EINVAL"))
    else:
        found += check_code_selector(abi, regs["cs"], f"{who} initial CS")
        for name in ("ss", "kernel_ss"):
            rpl = regs[name] & 3
            if name == "kernel_ss" and (abi.width == 64 or not regs[name]):
                continue  # a 64-bit kernel has no kernel_ss; 0 is none given
            if rpl < abi.kernel_rpl:
                fixed = (regs[name] & ~3) | abi.kernel_rpl
                found.append(Finding("selector-rpl", "info",
                                     f"{who} {name} {regs[name]:#06x} has RPL {rpl}; Xen {abi.generation} "
                                     f"silently raises it to {abi.kernel_rpl} ({fixed:#06x})"))
        for kind, selector in callbacks.items():
            found += check_code_selector(abi, selector, f"{who} {kind} callback")
        for selector, vectors in trap_selectors.items():
            found += check_code_selector(abi, selector, f"{who} trap_ctxt entries for {vector_list(vectors)}")
        if at_least(abi.generation, "4.0") and (ldt_base & 0xFFF or ldt_ents > 8192):
            found.append(Finding("vcpu-context-ldt", "error",
                                 f"{who} LDT at {ldt_base:#x} with {ldt_ents} entries: Xen {abi.generation} wants "
                                 f"a page-aligned base and at most 8192 entries, and fails the call with -EINVAL"))
    if cr3 == 0:
        found.append(Finding("vcpu-context-cr3", "error",
                             f"{who} ctrlreg[3] is 0, not a page table of the domain: Xen fails VCPUOP_initialise "
                             f"with -EINVAL (arch_set_info_guest wants the frame of a page directory)"))
    return found


def unknown_vcpu_op(abi: Abi, cmd: int) -> Finding:
    """RELEASE-3.0.0 xen/common/domain.c do_vcpu_op has no default case (the call returns 0, doing nothing);
    from 3.0.2-branched the default goes to arch_do_vcpu_op, whose default is -ENOSYS."""
    if abi.generation == "3.0":
        return Finding("unknown-subop", "warning",
                       f"vcpu_op command {cmd} is unknown: Xen 3.0.0 does nothing and returns 0")
    return Finding("unknown-subop", "error", f"vcpu_op command {cmd} is unknown: Xen fails the call with -ENOSYS")


def check_stack_switch(abi: Abi, selector: int) -> list[Finding]:
    """do_stack_switch (xen/arch/x86/x86_32/mm.c) on the kernel stack selector a 32-bit guest gives:
    RELEASE-2.0.0 refuses RPL 0 (-EPERM), RELEASE-3.0.0 any RPL but 1 (-EPERM); 3.0.2-branched and
    RELEASE-4.0.0 raise an RPL below 1 to 1 (fixup_guest_stack_selector) and keep a higher one."""
    if abi.width != 32:
        return []
    rpl = selector & 3
    what = f"stack_switch: stack selector {selector:#06x} has RPL {rpl}"
    if abi.generation == "2.0" and rpl == 0:
        return [Finding("selector-rpl", "error", f"{what}: Xen 2.0 fails the call with -EPERM")]
    if abi.generation == "3.0" and rpl != 1:
        return [Finding("selector-rpl", "error", f"{what}, not the kernel's 1: Xen 3.0.0 fails the call with -EPERM")]
    if rpl > 1:
        return [Finding("selector-rpl", "warning", f"{what}: Xen {abi.generation} takes it, and the CPU faults "
                        f"(#TS) when it next switches to ring 1 on that stack")]
    if rpl == 0:
        return [Finding("selector-rpl", "info", f"{what}; Xen {abi.generation} silently raises it to 1 "
                        f"({selector | 1:#06x})")]
    return []


def null_delivery(abi: Abi, what: str) -> str:
    """What Xen does when it bounces to `what` and finds nothing registered there (create_bounce_frame,
    xen/arch/x86/x86_32/entry.S): RELEASE-2.0.0 checks nothing (it enters address 0 of a null CS, whose
    iret faults and crashes the domain); RELEASE-3.0.0 crashes the domain on a null address; RELEASE-4.0.0
    only on a null CS, so an address of 0 with a CS set is entered."""
    if abi.width == 64:  # x86_64/entry.S create_bounce_frame at RELEASE-4.17.0: a null address crashes it
        return f"Xen {abi.generation} crashes the domain when it has to deliver to {what}, whose address is 0"
    if abi.generation == "2.0":
        return (f"Xen 2.0 does not check: it enters {what} at address 0, and the domain crashes when the "
                f"selector is null too")
    if not at_least(abi.generation, "4.0"):
        return f"Xen {abi.generation} crashes the domain when it has to deliver to {what}"
    return (f"Xen {abi.generation} crashes the domain when {what} has a null CS, and enters address 0 when "
            f"only the address is 0")


def check_int80_gate(abi: Abi, flags: int) -> list[Finding]:
    """init_int80_direct_trap (xen/arch/x86/x86_32/traps.c), on installing vector 0x80 with the IF flag:
    RELEASE-3.0.0 returns early, leaving the previous direct gate in place (stale); 3.0.2-branched and
    RELEASE-4.0.0 clear the vCPU's gate, so int $0x80 goes through Xen (and the flag is honoured)."""
    if abi.width != 32 or not flags & TRAP_FLAG_IF or abi.generation == "2.0":
        return []
    if abi.generation == "3.0":
        return [Finding("int80-gate-stale", "warning",
                        "vector 0x80 has the IF flag, which a direct gate cannot honour: Xen 3.0.0 leaves the "
                        "previous int $0x80 gate in place, so int $0x80 still enters the old handler, events "
                        "unmasked")]
    return [Finding("int80-gate-none", "info",
                    f"vector 0x80 has the IF flag: Xen {abi.generation} gives it no direct gate, and int $0x80 "
                    f"goes through Xen, which masks events as asked")]


def block_unmasks(abi: Abi) -> Finding:
    """do_block (xen/common/schedule.c at RELEASE-2.0.0, RELEASE-3.0.0, RELEASE-4.0.0) clears the event mask."""
    return Finding("block-unmasks", "info",
                   f"SCHEDOP_block: Xen {abi.generation} clears this vCPU's event mask (evtchn_upcall_mask) first: "
                   f"an event already pending is delivered at once instead of blocking")


def check_code_address(abi: Abi, address: int, what: str) -> list[Finding]:
    if abi.width == 64 and not is_canonical(address):
        action = ("rejects the call with -EINVAL" if at_least(abi.generation, "4.0")
                  else "cannot enter it: the guest will take a fault on delivery")
        return [Finding("non-canonical", "error",
                        f"{what}: address {address:#018x} is not canonical: Xen {abi.generation} {action}")]
    return []


def check_fast_trap(abi: Abi, vector: int, interrupt_flag: bool | None, current: int | None = None) -> list[Finding]:
    """set_fast_trap (xen/arch/x86/traps.c, RELEASE-2.0.0): one gate per domain; vector 0 removes it
    (CLEAR_FAST_TRAP zeroes its IDT entry, SET_DEFAULT_FAST_TRAP), and a new vector first removes the old
    one.  `current` is the vector xendbg saw installed last, if any."""
    if not abi.has_fast_trap:
        return [Finding("fast-trap-removed", "error",
                        f"set_fast_trap does not exist in Xen {abi.generation} (removed in 3.0): "
                        f"the call fails with -ENOSYS")]
    if vector == 0:
        gone = f"the gate for vector {current:#x}" if current else "its gate"
        return [Finding("fast-trap-disable", "info",
                        f"vector 0 disables the fast trap: Xen 2.0 zeroes {gone} in the IDT, and that int $n "
                        f"goes through Xen's #GP handler again")]
    findings = []
    if current and current != vector:
        findings.append(Finding("fast-trap-moved", "info",
                                f"the fast trap moves from vector {current:#x} to {vector:#x}: Xen 2.0 zeroes the "
                                f"old gate first, so int ${current:#x} goes through Xen's #GP handler again"))
    if vector != 0x80 and not 0x20 <= vector <= 0x2F:
        findings.append(Finding("fast-trap-vector", "error",
                                f"vector {vector:#x} cannot be a fast trap: Xen 2.0 accepts only 0x80 "
                                f"and 0x20-0x2f and fails the call with -EPERM"))
    if interrupt_flag:
        findings.append(Finding("fast-trap-interrupt-flag", "error",
                                f"the trap-table entry for vector {vector:#x} asks Xen to clear the event "
                                f"mask on entry, which a fast trap cannot do: Xen 2.0 fails the call "
                                f"with -EPERM"))
    if interrupt_flag is None:
        findings.append(Finding("fast-trap-handler-unknown", "info",
                                f"xendbg has not seen a trap-table entry for vector {vector:#x}; Xen "
                                f"installs whatever entry the guest registered last"))
    return findings


# Callback types Xen refuses to unregister (-EINVAL); any other type but nmi gets -ENOSYS.
# unregister_guest_callback (64-bit) and compat_unregister_guest_callback (32-bit) in
# xen/arch/x86/pv/callback.c at RELEASE-4.17.0, the same lists in x86_64/traps.c and
# x86_64/compat/traps.c at RELEASE-4.0.0.  At 3.0.3-branched every type but nmi got -EINVAL.
_UNREGISTER_EINVAL = {64: ("event", "failsafe", "syscall", "syscall32", "sysenter"),
                      32: ("event", "failsafe", "syscall32", "sysenter")}


def check_unregister(abi: Abi, kind: str) -> list[Finding]:
    """callback_op(CALLBACKOP_unregister) of a known callback type `kind`."""
    if kind == "nmi":
        return []
    if not at_least(abi.generation, "4.0") or kind in _UNREGISTER_EINVAL[abi.width]:
        return [Finding("callback-unregister", "error",
                        f"the {kind} callback cannot be unregistered: Xen fails the call with -EINVAL")]
    return [Finding("callback-unregister", "error",
                    f"Xen {abi.generation} cannot unregister a {kind} callback of a {abi.width}-bit PV guest: "
                    f"the call fails with -ENOSYS")]


# Xen 2.0's text starts here (xen/arch/x86/x86_32/xen.lds at RELEASE-2.0.0): its own addresses, written as
# a nested multicall's result, are above 2 GiB and read as negative numbers.
XEN_2_0_TEXT = 0xFC500000


def check_nested_multicall(abi: Abi, index: int) -> Finding:
    """RELEASE-2.0.0 x86_32/entry.S do_multicall: a nested multicall's entry is recognised by its return
    address and returns at once to multicall_return_from_call, which stores %eax, that very address, as the
    result; RELEASE-3.0.0 and later xen/common/multicall.c refuse re-entry with -EINVAL."""
    if abi.multicall_result_in_args:
        return Finding("multicall-nested", "error",
                       f"entry {index} is itself a multicall: Xen 2.0 skips it without running it and writes "
                       f"the address of its own multicall_return_from_call (in Xen's text, from "
                       f"{XEN_2_0_TEXT:#x}) as its result, which reads as a negative number: a failure")
    return Finding("multicall-nested", "error",
                   f"entry {index} is itself a multicall: Xen {abi.generation} refuses nested "
                   f"multicalls and sets its result to -EINVAL")


# How many numbers each generation's hypercall entry dispatches.  Before 3.0.3 the entry masks the number
# with NR_hypercalls-1 instead of checking it ("andl $(NR_hypercalls-1),%eax": xen/arch/x86/x86_32/entry.S
# `hypercall` at RELEASE-2.0.0, RELEASE-3.0.0 and 3.0.2-branched, x86_64/entry.S likewise; NR_hypercalls 32
# in xen/include/asm-x86/config.h), and so does do_multicall for each entry (2.0: x86_32/entry.S
# do_multicall; 3.0.0, 3.0.2: do_multicall_call in xen/include/asm-x86/multicall.h).  From 3.0.3-branched
# (NR_hypercalls 64) a number of 64 or more gets -ENOSYS (`bad_hypercall` in the entry, the .fixup path of
# do_multicall_call), as at RELEASE-4.0.0.
_WRAPPING_NR_HYPERCALLS = {"2.0": 32, "3.0": 32, "3.0.2": 32}


def dispatched_number(abi: Abi, nr: int) -> int:
    """The table slot Xen's entry really calls for hypercall number `nr` (itself unless it wraps)."""
    size = _WRAPPING_NR_HYPERCALLS.get(abi.generation)
    return nr & (size - 1) if size is not None else nr


def wrapped_hypercall(abi: Abi, nr: int, name: str | None) -> Finding:
    """Number `nr` is past the table of a Xen that masks it: say what Xen really runs."""
    size = _WRAPPING_NR_HYPERCALLS[abi.generation]
    slot = nr & (size - 1)
    runs = (f"runs {name} (number {slot})" if name else
            f"runs number {slot}, which does not exist either: the call fails with -ENOSYS")
    return Finding("hypercall-number-wraps", "warning" if name else "error",
                   f"hypercall number {nr} is past Xen {abi.generation}'s {size} hypercalls, and its "
                   f"entry masks the number with {size - 1} instead of refusing it: number {nr} {runs}")


def unknown_hypercall(abi: Abi, nr: int) -> Finding:
    return Finding("unknown-hypercall", "error",
                   f"hypercall number {nr} does not exist in Xen {abi.generation} "
                   f"({abi.width}-bit PV): the call fails with -ENOSYS")


def unreadable(what: str, address: int, action: str = "Xen would fail the call with -EFAULT") -> Finding:
    return Finding("unreadable-memory", "error", f"{what} at {address:#x} cannot be read: {action}")

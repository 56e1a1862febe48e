"""Decode the frame a PV guest's handler finds on its stack: Xen's bounce frame, or the CPU's own.

When Xen delivers an event, a failsafe callback, an exception or a software interrupt through the
guest's virtual IDT (set_trap_table), or a 64-bit guest's syscall, it builds an interrupt-like frame
on the guest kernel's stack (`create_bounce_frame`) and resumes the guest at the handler.  At a
Xen 2.0 fast trap the CPU itself enters the handler through a real DPL-3 IDT gate and pushes a plain
CPU frame.  `decode_bounce_frame` reads either kind at the handler's stack pointer; like every
decoder it reads through the Target and returns a frozen dataclass.

Read from the hypervisor at each tag (one home for these facts; FRAME_SLOTS below):
- RELEASE-2.0.0 xen/arch/x86/x86_32/entry.S: create_bounce_frame writes {EIP, CS, EFLAGS, [ESP,
  SS]} (ESP/SS when the interrupted CS has bit 1 set, on the stack from the TSS, i.e. stack_switch);
  failsafe_callback adds DS, ES, FS, GS below it; process_guest_exception_and_events pushes the
  error code below that (unless GTBF_TRAP_NOCODE), then %cr2 below the error code for a page fault
  (GTBF_TRAP_CR2, set by do_page_fault in traps.c).  Events are masked before delivery and the old
  mask is not saved; the CS and EFLAGS slots are the interrupted ones.  The x86_64 entry.S is
  empty at that tag: Xen 2.0 ran no 64-bit PV guests.
- RELEASE-3.0.0, 3.0.2-branched, 3.0.3-branched, RELEASE-4.0.0 xen/arch/x86/x86_32/entry.S
  create_bounce_frame: {[DS, ES, FS, GS (TBF_FAILSAFE)], [error code (TBF_EXCEPTION_ERRCODE)], EIP,
  CS | saved_upcall_mask << 16, EFLAGS with IF = !saved_upcall_mask, [ESP, SS, [ES, DS, FS, GS]]};
  the last four only when the guest was interrupted in vm86 mode (EFLAGS.VM, x86_32 Xen only).
  TBF_INTERRUPT sets the upcall mask after saving the old one.  32-bit guests on a 64-bit Xen get
  the same frame from xen/arch/x86/x86_64/compat/entry.S compat_create_bounce_frame (RELEASE-4.0.0,
  RELEASE-4.17.0, RELEASE-4.22.0) and, for the failsafe callback, xen/arch/x86/domain.c
  load_segments (4.17/4.22: TBF_FAILSAFE is gone).  Page faults leave %cr2 in vcpu_info.arch.cr2.
- RELEASE-3.0.0 .. RELEASE-4.22.0 xen/arch/x86/x86_64/entry.S create_bounce_frame and domain.c
  load_segments (failsafe): {RCX, R11, [DS, ES, FS, GS], [error code], RIP, CS | saved_upcall_mask
  << 32, RFLAGS with IF = !saved_upcall_mask, RSP, SS}, 16-byte aligned, always with RSP/SS.  The
  guest kernel and user both run in ring 3; Xen clears CS.RPL in the frame ("Indicate kernel
  context to guest") when it interrupted the guest kernel.  In 3.0.0 and 3.0.2 load_segments wrote
  the plain CS and RFLAGS (no saved mask); the mask arrived there in 3.0.3-branched.
- Fast trap (RELEASE-2.0.0 xen/arch/x86/traps.c set_fast_trap): a present trap gate (0x8f00 with
  the entry's DPL) straight to the guest handler; the CPU pushes {EIP, CS, EFLAGS, [ESP, SS]}, the
  last two on an inter-privilege entry (from ring 3 to the ring-1 kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

from xendbg import arch
from xendbg.abi import Abi
from xendbg.abi.generations import at_least
from xendbg.abi.layouts import ERA_2, ERA_3
from xendbg.errors import DecodeError, UsageError
from xendbg.target import Target

KINDS = ("event", "failsafe", "trap", "syscall", "fasttrap")

EFLAGS_IF = 1 << 9
EFLAGS_VM = 1 << 17

# Every slot Xen may write, lowest address first; a frame holds the subset its kind needs (the
# module docstring says which code writes which slot).
FRAME_SLOTS: dict[tuple[str, int], tuple[str, ...]] = {
    # RELEASE-2.0.0 x86_32/entry.S create_bounce_frame, failsafe_callback,
    # process_guest_exception_and_events.
    (ERA_2, 32): ("ds", "es", "fs", "gs", "cr2", "error_code", "eip", "cs", "eflags", "esp", "ss"),
    # RELEASE-3.0.0, 3.0.2-branched, 3.0.3-branched, RELEASE-4.0.0 x86_32/entry.S create_bounce_frame;
    # RELEASE-4.0.0, RELEASE-4.17.0, RELEASE-4.22.0 x86_64/compat/entry.S compat_create_bounce_frame
    # and domain.c load_segments.
    (ERA_3, 32): ("ds", "es", "fs", "gs", "error_code", "eip", "cs", "eflags", "esp", "ss",
                  "vm86_es", "vm86_ds", "vm86_fs", "vm86_gs"),
    # RELEASE-3.0.0 .. RELEASE-4.22.0 x86_64/entry.S create_bounce_frame and domain.c load_segments.
    (ERA_3, 64): ("rcx", "r11", "ds", "es", "fs", "gs", "error_code", "rip", "cs", "rflags", "rsp", "ss"),
}
# The CPU's frame at a fast trap (Intel SDM vol. 3, 6.12.1; the gate from RELEASE-2.0.0 traps.c
# set_fast_trap): no Xen slots at all.
FAST_TRAP_SLOTS: tuple[str, ...] = ("eip", "cs", "eflags", "esp", "ss")

# Where the saved upcall mask sits in the CS slot (bits 16-23 of the dword, 32-39 of the qword);
# the byte above it is whatever followed evtchn_upcall_mask in vcpu_info (padding), so only 8 bits.
UPCALL_MASK_SHIFT = {32: 16, 64: 32}

# Vectors whose bounce frame carries an error code.
# RELEASE-2.0.0 traps.c: DO_ERROR (10, 11, 12, 17), do_general_protection (GTBF_TRAP) and
# do_page_fault (GTBF_TRAP_CR2: error code and %cr2).  RELEASE-3.0.0, 3.0.2-branched,
# 3.0.3-branched, RELEASE-4.0.0 traps.c: the same (DO_ERROR, do_general_protection,
# propagate_page_fault with TBF_EXCEPTION_ERRCODE).  RELEASE-4.17.0 and RELEASE-4.22.0:
# pv_inject_event (pv/traps.c) uses X86_EXC_HAVE_EC (asm/x86-defns.h), which adds #DF, #CP, #VC
# and #SX.  A software `int n` that Xen forwards through the trap table never carries one.
_EC_OLD = frozenset({10, 11, 12, 13, 14, 17})
_EC_4_17 = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})


def error_code_vectors(abi: Abi) -> frozenset[int]:
    """The exception vectors Xen of this generation bounces with an error code."""
    return _EC_4_17 if at_least(abi.generation, "4.17") else _EC_OLD


@dataclass(frozen=True)
class BounceFrame:
    """A decoded bounce frame (or fast-trap CPU frame); `fields` lists its slots from `address` up.

    cs is the selector itself (the slot's low 16 bits).  saved_upcall_mask and events_masked are
    None where the frame does not record the mask (2.0, fast traps, see `notes`).  sp/ss are None
    when a 32-bit frame has none (the guest kernel was interrupted: no stack switch).
    """

    kind: str  # event, failsafe, trap, syscall, fasttrap
    generation: str
    width: int
    tag: str  # the Xen tag the layout was read from
    source: str  # the code in Xen (or the CPU) that builds this frame
    address: int  # lowest address: the handler's stack pointer on entry
    vector: int | None
    vector_name: str | None
    ip: int  # EIP / RIP of the interrupted code
    cs: int
    cs_name: str | None  # FLAT_* name of the selector (a 64-bit kernel's RPL-0 CS names its RPL-3 twin)
    rpl: int  # CS.RPL as the frame has it (0 for an interrupted 64-bit guest kernel)
    saved_upcall_mask: int | None
    eflags: int  # EFLAGS / RFLAGS slot
    interrupt_flag: bool  # EFLAGS.IF in the frame (3.0+: !saved_upcall_mask)
    events_masked: bool | None  # were events masked when the guest was interrupted
    guest_mode: str  # "kernel", "user" or "vm86": what the guest was running when interrupted
    ring: int  # the CPU ring the guest was interrupted in
    sp: int | None
    ss: int | None
    error_code: int | None
    cr2: int | None  # 2.0 page faults only; later Xen leaves it in vcpu_info.arch.cr2
    rcx: int | None  # 64-bit only: Xen saves them because the guest's SYSRET-style return clobbers them
    r11: int | None
    ds: int | None  # failsafe only: the segment values Xen failed to load
    es: int | None
    fs: int | None
    gs: int | None
    fields: tuple[tuple[str, int], ...]
    notes: tuple[str, ...] = ()

    @property
    def from_user(self) -> bool:
        return self.guest_mode != "kernel"

    @property
    def slot_size(self) -> int:
        return self.width // 8

    @property
    def size(self) -> int:
        return len(self.fields) * self.slot_size

    def slots(self) -> tuple[tuple[int, str, int], ...]:
        """(address, name, value) of each slot, lowest address first."""
        return tuple((self.address + i * self.slot_size, name, value) for i, (name, value) in enumerate(self.fields))


def decode_bounce_frame(target: Target, abi: Abi, kind: str, stack_pointer: int | None = None,
                        vector: int | None = None, *, has_error_code: bool | None = None) -> BounceFrame:
    """Read the frame at `stack_pointer` (default: the vCPU's ESP/RSP, i.e. at the handler's entry).

    kind: "event", "failsafe", "trap" (exception or software interrupt via the trap table; give its
    vector), "syscall" (a 64-bit guest's syscall callback) or "fasttrap" (Xen 2.0 set_fast_trap).
    has_error_code overrides the vector table (a software `int $0xd` forwarded by Xen has none).
    Raises UnreadableMemory when the stack cannot be read.
    """
    if kind not in KINDS:
        raise UsageError(f"unknown frame kind {kind!r} (expected one of {', '.join(KINDS)})")
    if abi.width == 64 and abi.era == ERA_2:
        raise DecodeError("Xen 2.0 runs no 64-bit PV guests (x86_64/entry.S is empty at RELEASE-2.0.0)")
    if kind == "fasttrap" and not abi.has_fast_trap:
        raise DecodeError(f"Xen {abi.generation} has no fast traps (set_fast_trap went in 3.0)")
    if kind == "syscall" and abi.width != 64:
        raise DecodeError("only 64-bit PV guests get a bounce frame for syscall (x86_64/entry.S)")
    if kind == "trap" and vector is None and has_error_code is None:
        raise UsageError("a trap frame needs its vector (it says whether Xen pushed an error code)")
    if vector is not None and kind in ("event", "failsafe", "syscall"):
        raise UsageError(f"{kind} frames have no vector")

    if stack_pointer is None:
        stack_pointer = target.read_register("esp" if abi.width == 32 else "rsp")
    address = stack_pointer & abi.address_mask

    if kind == "fasttrap":
        error = False
    elif has_error_code is not None:
        error = has_error_code and kind == "trap"
    else:
        error = kind == "trap" and vector in error_code_vectors(abi)
    # 2.0 pushes %cr2 only behind an error code (process_guest_exception_and_events).
    cr2 = abi.era == ERA_2 and kind == "trap" and vector == arch.PAGE_FAULT and error
    return _Reader(target, abi, kind, address, vector, error, cr2).decode()


class _Reader:
    """One frame: choose its slots, read them (at most two reads), interpret them."""

    def __init__(self, target: Target, abi: Abi, kind: str, address: int, vector: int | None,
                 error: bool, cr2: bool) -> None:
        self.target, self.abi, self.kind, self.address, self.vector = target, abi, kind, address, vector
        self.step = abi.width // 8
        if kind == "fasttrap":
            self.all = FAST_TRAP_SLOTS
        else:
            self.all = FRAME_SLOTS[(abi.era, abi.width)]
        wanted = {"eip", "cs", "eflags", "rip", "rflags", "rcx", "r11"}
        if abi.width == 64:
            wanted |= {"rsp", "ss"}  # a 64-bit frame always switches stacks (IRETQ frame)
        if kind == "failsafe":
            wanted |= {"ds", "es", "fs", "gs"}
        if error:
            wanted.add("error_code")
        if cr2:
            wanted.add("cr2")
        self.wanted = wanted

    def _read(self, names: list[str], at: int) -> list[int]:
        data = self.target.read_memory(at & self.abi.address_mask, len(names) * self.step)
        return [int.from_bytes(data[i * self.step:(i + 1) * self.step], "little") for i in range(len(names))]

    def decode(self) -> BounceFrame:
        abi, width = self.abi, self.abi.width
        flags_name = "eflags" if width == 32 else "rflags"
        # A 64-bit frame is known from its kind alone: one read.  In a 32-bit one, what lies above
        # the flags slot (ESP/SS, vm86 segments) depends on the interrupted CS and EFLAGS, read first.
        last = self.all.index(flags_name) if width == 32 else len(self.all) - 1
        base = [s for s in self.all[:last + 1] if s in self.wanted]
        values = dict(zip(base, self._read(base, self.address), strict=True))
        slots = list(base)
        eflags = values[flags_name]
        cs_slot = values["cs"]
        vm86 = width == 32 and abi.era == ERA_3 and self.kind != "fasttrap" and bool(eflags & EFLAGS_VM)
        if width == 32:
            # Xen (and the CPU) switch stacks when the interrupted CS has bit 1 set, or from vm86.
            extra = ["esp", "ss"] if (cs_slot & 2 or vm86) else []
            if vm86:
                extra += ["vm86_es", "vm86_ds", "vm86_fs", "vm86_gs"]
        else:
            extra = []
        if extra:
            values.update(zip(extra, self._read(extra, self.address + len(base) * self.step), strict=True))
            slots += extra

        cs = cs_slot & 0xFFFF
        mask, notes = self._upcall_mask(cs_slot)
        if vm86:
            mode, ring = "vm86", 3
        elif width == 32:
            mode, ring = ("user" if cs & 2 else "kernel"), cs & 3
        else:
            mode, ring = ("kernel" if cs & 3 == 0 else "user"), 3
        if self.kind == "trap" and self.vector == arch.PAGE_FAULT and abi.era == ERA_3:
            notes.append("the faulting address is in vcpu_info.arch.cr2, not on the stack")
        if self.kind == "event" and abi.era == ERA_2:
            notes.append("Xen 2.0 masks events before delivering one and does not save the old mask")
        if self.kind == "fasttrap":
            notes.append("a fast trap enters the handler through a real IDT gate: the CPU built this frame")

        def seg(name: str) -> int | None:
            return values[name] & 0xFFFF if name in values else None  # selectors: upper bits are padding

        name_cs = cs | 3 if width == 64 and cs & 3 == 0 else cs
        return BounceFrame(
            kind=self.kind, generation=abi.generation, width=width, tag=abi.tag, source=self._source(),
            address=self.address, vector=self.vector,
            vector_name=arch.vector_name(self.vector) if self.vector is not None else None,
            ip=values["eip" if width == 32 else "rip"], cs=cs, cs_name=abi.selector_name(name_cs),
            rpl=cs & 3, saved_upcall_mask=mask, eflags=eflags, interrupt_flag=bool(eflags & EFLAGS_IF),
            events_masked=None if mask is None else mask != 0, guest_mode=mode, ring=ring,
            sp=values.get("esp" if width == 32 else "rsp"), ss=seg("ss"),
            error_code=values.get("error_code"), cr2=values.get("cr2"),
            rcx=values.get("rcx"), r11=values.get("r11"),
            ds=seg("ds"), es=seg("es"), fs=seg("fs"), gs=seg("gs"),
            fields=tuple((name, values[name]) for name in slots), notes=tuple(notes))

    def _upcall_mask(self, cs_slot: int) -> tuple[int | None, list[str]]:
        abi = self.abi
        if self.kind == "fasttrap" or abi.era == ERA_2:
            return None, []
        mask = (cs_slot >> UPCALL_MASK_SHIFT[abi.width]) & 0xFF
        if (self.kind == "failsafe" and abi.width == 64 and mask == 0
                and not at_least(abi.generation, "3.0.3")):
            # 3.0.0-3.0.2 load_segments wrote a bare CS: a 0 there may be "no mask saved".
            return None, ["Xen 3.0.0-3.0.2 load_segments() builds this frame without the upcall mask "
                          "(CS bits 32-39 read 0, RFLAGS.IF is the real one)"]
        return mask, []

    def _source(self) -> str:
        abi, kind = self.abi, self.kind
        if kind == "fasttrap":
            return "the CPU, through the IDT gate of set_fast_trap (traps.c)"
        if abi.width == 64:
            if kind == "failsafe":
                # TBF_FAILSAFE (a faulting IRET) is gone by RELEASE-4.17.0; load_segments remains.
                if at_least(abi.generation, "4.17"):
                    return "domain.c load_segments"
                return "x86_64/entry.S create_bounce_frame or domain.c load_segments"
            return "x86_64/entry.S create_bounce_frame"
        if abi.era == ERA_2:
            return "x86_32/entry.S create_bounce_frame"
        if at_least(abi.generation, "4.17"):
            if kind == "failsafe":
                return "domain.c load_segments"
            return "x86_64/compat/entry.S compat_create_bounce_frame"
        if at_least(abi.generation, "4.0"):
            return "x86_32/entry.S create_bounce_frame (x86_64/compat/entry.S on a 64-bit Xen)"
        return "x86_32/entry.S create_bounce_frame"

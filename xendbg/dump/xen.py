"""What each vCPU of each domain had registered with Xen, read from Xen's own data in a whole-machine
QEMU dump, given Xen's xen-syms (symbols only: the struct offsets come from xendbg/dump/xenlayout.py).

The walk:
- Xen's memory is read through the page tables of a CPU of the dump (a PV guest's top table carries
  Xen's slots too); the dump's Xen must be the build of xen-syms (its GNU build id, in memory).
- Each physical CPU's `struct cpu_info` sits at the top of its stack (`stack_base[cpu]` + 8 pages):
  `current_vcpu`, and the guest frame Xen saved on entry.  `per_cpu(curr_vcpu)` is the vCPU whose
  registers the CPU holds: with Xen's lazy context switch a CPU running its idle vCPU may still hold a
  guest vCPU's registers (xen/arch/x86/domain.c context_switch, RELEASE-4.17.0).
- `domain_list` links the domains; `d->vcpu[i]` their vCPUs, each checked (`vcpu_id == i`,
  `v->domain == d`) before it is believed.
- Per vCPU: the trap table (`arch.pv.trap_ctxt`, 256 `struct trap_info` indexed by vector: each used
  entry's `vector` must equal its index), the callbacks (each must be mapped by the guest's own page
  tables, and lie in the guest kernel when its ELF is given), kernel_ss/sp, the guest's CR3
  (`arch.guest_table`), the saved registers (`arch.user_regs`) and whether it is down (VPF_down).
A check that fails drops what it checks and says why; nothing unverified is shown.
"""

from __future__ import annotations

import bisect
import os
import re
import struct
from dataclasses import dataclass, field

from xendbg import arch
from xendbg.abi import TRAP_FLAG_DPL_MASK, TRAP_FLAG_IF
from xendbg.abi.layouts import ERA_3, layout, unpack
from xendbg.decode.model import Callback, GuestState, TrapEntry, TrapTable
from xendbg.dump import xenlayout as xl
from xendbg.dump.cpus import CpuState, Segment
from xendbg.dump.paging import PhysicalMemory
from xendbg.dump.target import DumpTarget
from xendbg.errors import DecodeError, TargetError, XendbgError
from xendbg.files import map_regular
from xendbg.session import Symbols, xen_image_version
from xendbg.sites import ElfFile

SOURCE = "from Xen's struct vcpu"
NT_GNU_BUILD_ID = 3
_SYMBOLS = ("domain_list", "stack_base", "__per_cpu_offset", "per_cpu__curr_vcpu", "idle_vcpu",
            "__note_gnu_build_id_start")
_MAX_DOMAINS, _MAX_VCPUS = 1024, 8192
_TRAP_ENTRIES = 256
_FRAME = layout("cpu_user_regs", 64, ERA_3)  # Xen is 64-bit: its saved guest frame has the 64-bit layout
_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
# REX.W mov disp32(%rip), %reg: the loads of a global such as domain_list
_RIP_LOAD = re.compile(rb"[\x48\x4c]\x8b[\x05\x0d\x15\x1d\x25\x2d\x35\x3d]", re.DOTALL)

LIVE, IN_XEN, DESCHEDULED, OFFLINE = "live", "in Xen", "descheduled", "offline"


class XenSyms:
    """Xen's xen-syms: its symbols, code and build id, and the struct offsets read off its code."""

    def __init__(self, path: str) -> None:
        self.path = path
        data = map_regular(path, "Xen's xen-syms")
        self._data = data
        self.elf = ElfFile(path, data)
        self.functions = self.elf.functions()
        self._starts = [start for start, _, _ in self.functions]
        self._by_name = {name: (start, size) for start, size, name in self.functions}
        self.symbols = self.elf.symbols(_SYMBOLS) or {}
        self.build_id = self._build_id()
        self.version = xen_image_version(lambda name: (found := self.code_of(name)) and found[0])
        self.fields, self.fields_note = xl.leading_fields(self.version)
        self.layout = xl.recover(self.code_of, self._users_of(self.symbols.get("domain_list")),
                                 self.symbols.get("domain_list"))

    def code_of(self, name: str) -> tuple[bytes, int] | None:
        if name not in self._by_name:
            return None
        start, size = self._by_name[name]
        where = self.elf.file_offset(start)
        if where is None:
            return None
        return self.elf.read(where[0], min(size, where[1], 1 << 16), f"code of {name}"), start

    def _build_id(self) -> tuple[int, bytes] | None:
        """(virtual address, bytes) of Xen's GNU build id, which Xen keeps in memory like the rest of it."""
        for seg in self.elf.segments:
            if seg.type == 4:  # PT_NOTE
                for name, kind, desc in self.elf.notes(seg.offset, seg.filesz):
                    if name == b"GNU" and kind == NT_GNU_BUILD_ID and desc:
                        at = self.elf.read(seg.offset, seg.filesz, "build id note").find(desc)
                        return seg.vaddr + at, desc
        return None

    def _users_of(self, variable: int | None, limit: int = 48) -> list[tuple[bytes, int]]:
        """Functions that load `variable` through a RIP-relative mov (found by byte pattern, then checked)."""
        if variable is None:
            return []
        users: dict[int, tuple[bytes, int]] = {}
        for seg in self.elf.segments:
            if seg.type != 1 or not seg.flags & 1:  # executable PT_LOADs
                continue
            for match in _RIP_LOAD.finditer(self._data, seg.offset, seg.offset + seg.filesz):
                at = match.start()
                if at + 7 > seg.offset + seg.filesz:
                    continue
                disp = struct.unpack_from("<i", self._data, at + 3)[0]
                end = seg.vaddr + at - seg.offset + 7
                if (end + disp) & ((1 << 64) - 1) != variable:
                    continue
                i = bisect.bisect_right(self._starts, end) - 1
                if i < 0:
                    continue
                start, size, name = self.functions[i]
                if start <= end <= start + size and start not in users:
                    code = self.code_of(name)
                    if code is not None:
                        users[start] = code
                if len(users) >= limit:
                    return list(users.values())
        return list(users.values())

    def close(self) -> None:
        self._data.close()


@dataclass
class XenVcpu:
    """One vCPU of one domain as Xen kept it, verified against the dump."""

    domain: int
    vcpu_id: int
    address: int  # its struct vcpu
    where: str  # LIVE, IN_XEN, DESCHEDULED or OFFLINE
    registers_from: str  # a sentence
    cpu: CpuState  # its registers as a CPU state, with the guest's own CR3
    physical_cpu: int | None  # the CPU holding its registers, if any
    guest_cr3: int | None
    in_hypercall: bool = False  # Xen is serving its hypercall now (a return into pv_hypercall on the stack)
    frame: int | None = None  # where Xen saved its guest frame (cpu_info), when in Xen
    entry_vector: int | None = None  # how the guest entered Xen last (TRAP_syscall 0x100: a hypercall)
    kernel_ss: int | None = None
    kernel_sp: int | None = None
    state: GuestState | None = None  # None: not recovered (see XenData.problems)
    why_no_state: str = ""


@dataclass
class XenData:
    """Xen's view of the dump's domains and vCPUs."""

    vcpus: list[XenVcpu] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what could not be recovered or verified, and why

    def domains(self) -> list[int]:
        return sorted({v.domain for v in self.vcpus})


class _Reader:
    """Xen's virtual memory through one CPU's page tables."""

    def __init__(self, memory: PhysicalMemory, cpu: CpuState) -> None:
        self.target = DumpTarget(memory, cpu)

    def read(self, address: int, size: int) -> bytes:
        return self.target.read_memory(address, size)

    def u64(self, address: int) -> int:
        return int.from_bytes(self.read(address, 8), "little")

    def u32(self, address: int) -> int:
        return int.from_bytes(self.read(address, 4), "little")

    def u16(self, address: int) -> int:
        return int.from_bytes(self.read(address, 2), "little")


def _xen_reader(memory: PhysicalMemory, cpus: list[CpuState], syms: XenSyms) -> _Reader:
    """A reader whose page tables map Xen's image, checked to hold the build of `syms`."""
    if syms.build_id is None:
        raise DecodeError(f"{syms.path}: no GNU build id note: xendbg cannot tell whether the dump's Xen is "
                          f"this build")
    at, build_id = syms.build_id
    seen = []
    for cpu in sorted(cpus, key=lambda c: c.segments["cs"].selector & 3):  # CPUs in Xen first
        if not cpu.long_mode:
            continue
        reader = _Reader(memory, cpu)
        try:
            found = reader.read(at, len(build_id))
        except TargetError:
            continue
        if found == build_id:
            return reader
        seen.append(found.hex())
    if seen:
        raise DecodeError(f"the dump's Xen is not the build of {syms.path}: build id {seen[0]} in memory, "
                          f"{build_id.hex()} in the file")
    raise DecodeError("no CPU of the dump maps Xen's image (its build id note) in its page tables: not a dump "
                      "of a machine running 64-bit Xen")


def _frame_cpu(model: CpuState, regs: dict[str, object], cr3: int | None, index: int) -> CpuState:
    """A CPU state from a saved guest frame (cpu_user_regs), with `cr3` as the page-table root."""
    gprs = {name: int(regs[name]) for name in _GPRS}  # type: ignore[call-overload]
    segments = dict(model.segments)
    for name in ("cs", "ss", "ds", "es", "fs", "gs"):
        segments[name] = Segment(int(regs[name]), 0, 0, 0)  # type: ignore[call-overload]
    cr0, cr1, cr2, model_cr3, cr4 = model.cr
    return CpuState(index, True, gprs, segments, (cr0, cr1, cr2, cr3 if cr3 is not None else model_cr3, cr4))


def trap_entries(raw: bytes, width: int = 64) -> tuple[dict[int, TrapEntry], str | None]:
    """The used entries of a 256-entry trap_ctxt, or why it is not one (a used entry off its index)."""
    lay = layout("trap_info", width, ERA_3)
    entries: dict[int, TrapEntry] = {}
    for index in range(_TRAP_ENTRIES):
        row = unpack(lay, raw[index * lay.size:(index + 1) * lay.size], width, ERA_3)
        address = int(row["address"])
        vector, flags, cs = int(row["vector"]), int(row["flags"]), int(row["cs"])
        if address == 0:
            continue
        if vector != index:
            return {}, f"entry {index} says vector {vector}"
        entries[vector] = TrapEntry(index=len(entries), vector=vector, vector_name=arch.vector_name(vector),
                                    flags=flags, dpl=flags & TRAP_FLAG_DPL_MASK,
                                    interrupt_flag=bool(flags & TRAP_FLAG_IF), cs=cs, rpl=cs & 3, address=address)
    return entries, None


def read_xen(memory: PhysicalMemory, cpus: list[CpuState], syms: XenSyms, guest_symbols: Symbols | None = None,
             guest_ranges: list[tuple[int, int]] | None = None) -> XenData:
    """Walk Xen's domains and vCPUs in the dump.  Raises DecodeError (one line) when Xen's memory or
    its domain list cannot be read with the recovered offsets; smaller failures go to `problems`."""
    lay = syms.layout
    sym = syms.symbols
    missing_syms = [n for n in _SYMBOLS if n not in sym]
    if missing_syms:
        raise DecodeError(f"{syms.path}: no symbol {', '.join(missing_syms)}: not a 64-bit Xen 4.x xen-syms "
                          f"xendbg can walk")
    if lay.domain_next is None:
        raise DecodeError(f"{syms.path}: could not recover struct domain's next_in_list from the code that walks "
                          f"domain_list (an unknown Xen build): the domains cannot be listed")
    fields = syms.fields
    if fields is None:
        raise DecodeError(f"{syms.path}: {syms.fields_note}: its domains cannot be listed")
    reader = _xen_reader(memory, cpus, syms)
    data = XenData()
    if syms.fields_note:
        data.problems.append(syms.fields_note)
    data.problems += [f"not recovered from {os.path.basename(syms.path)}'s code: {what}" for what in lay.missing]

    # Physical CPUs: cpu_info at the top of each stack, checked by its processor_id and per-CPU offset.
    holders: dict[int, tuple[CpuState, int, int, int]] = {}  # vcpu -> (CPU, cpu_info, current, stack top)
    idle = set()
    for cpu in cpus:
        try:
            base = reader.u64(sym["stack_base"] + 8 * cpu.index)
            offset = reader.u64(sym["__per_cpu_offset"] + 8 * cpu.index)
            info = base + xl.STACK_SIZE - fields.cpu_info_size
            processor = reader.u32(info + fields.cpu_info_processor_id)
            if base == 0 or processor != cpu.index or reader.u64(info + fields.cpu_info_per_cpu_offset) != offset:
                data.problems.append(f"CPU {cpu.index}: its cpu_info does not check out (processor_id "
                                     f"{processor}): its registers are not attributed to a vCPU")
                continue
            current = reader.u64(info + fields.cpu_info_current_vcpu)
            curr = reader.u64(sym["per_cpu__curr_vcpu"] + offset)
            idle.add(reader.u64(sym["idle_vcpu"] + 8 * cpu.index))
        except TargetError as exc:
            data.problems.append(f"CPU {cpu.index}: its stack or per-CPU data is unreadable ({exc})")
            continue
        holders[curr] = (cpu, info, current, base + xl.STACK_SIZE)

    # Domains and their vCPUs, each checked by its back-pointer and index.
    d = reader.u64(sym["domain_list"])
    seen: set[int] = set()
    while d and len(seen) < _MAX_DOMAINS:
        if d in seen:
            raise DecodeError("domain_list loops: struct domain's next_in_list offset is wrong for this build")
        seen.add(d)
        try:
            domid = reader.u16(d + xl.DOMAIN_ID)
            count = reader.u32(d + fields.domain_max_vcpus)
            array = reader.u64(d + fields.domain_vcpus)
            if count > _MAX_VCPUS:
                raise DecodeError(f"domain at {d:#x} says {count} vCPUs: struct domain's layout is not the one "
                                  f"xendbg assumes ({_which(syms)})")
            pointers = struct.unpack(f"<{count}Q", reader.read(array, 8 * count)) if count else ()
        except TargetError as exc:
            raise DecodeError(f"domain_list leads to unreadable memory ({exc}): not this Xen's layout") from None
        for index, v in enumerate(pointers):
            if not v:
                continue
            vcpu_id, back = reader.u32(v + xl.VCPU_ID), reader.u64(v + fields.vcpu_domain)
            if vcpu_id != index or back != d:
                raise DecodeError(f"d{domid} vcpu[{index}] at {v:#x} says vcpu_id {vcpu_id}, domain {back:#x}: "
                                  f"struct vcpu's layout is not the one xendbg assumes ({_which(syms)})")
            data.vcpus.append(_vcpu(reader, memory, syms, domid, index, v, holders.get(v), guest_symbols,
                                    guest_ranges, cpus[0], data.problems))
        d = reader.u64(d + lay.domain_next)
    return data


def _which(syms: XenSyms) -> str:
    """Which Xen the leading struct fields were taken for, for an error message."""
    return syms.fields_note or f"Xen {syms.version}"


def _in_hypercall(reader: _Reader, symbols: XenSymbolsView, sp: int, top: int) -> bool:
    """Whether Xen's stack between `sp` and `top` holds a return address into the hypercall entry."""
    if not sp <= top or top - sp > xl.STACK_SIZE:
        return False
    try:
        words = struct.unpack(f"<{(top - sp) // 8}Q", reader.read(sp, (top - sp) // 8 * 8))
    except TargetError:
        return False
    for word in words:
        found = symbols.symbol_at(word)
        if found is not None and found[0] in arch.XEN_FRAME_ENTRIES and found[1] > 0:
            return True
    return False


class XenSymbolsView:
    """address -> (function, offset) over xen-syms' functions (Xen's own code only)."""

    def __init__(self, syms: XenSyms) -> None:
        self.syms = syms

    def symbol_at(self, address: int) -> tuple[str, int] | None:
        i = bisect.bisect_right(self.syms._starts, address) - 1
        if i < 0:
            return None
        start, size, name = self.syms.functions[i]
        return (name, address - start) if address < start + size else None


def _vcpu(reader: _Reader, memory: PhysicalMemory, syms: XenSyms, domid: int, index: int, v: int,
          holder: tuple[CpuState, int, int, int] | None, guest_symbols: Symbols | None,
          guest_ranges: list[tuple[int, int]] | None, model: CpuState, problems: list[str]) -> XenVcpu:
    lay = syms.layout
    name = f"d{domid}v{index}"
    cr3 = None
    if lay.guest_table is not None:
        frame = reader.u64(v + lay.guest_table)
        cr3 = frame << 12 if frame and memory.has(frame << 12) else None
    down = None
    if lay.down is not None:
        down = bool(reader.u64(v + lay.down[0]) & lay.down[1])
    in_hypercall = False
    frame_at = entry_vector = None
    physical = None
    if holder is not None and not (holder[0].segments["cs"].selector & 3 == 0):
        cpu, physical = holder[0], holder[0].index
        where, text = LIVE, f"live on a CPU (CPU {physical}, in the guest)"
    elif holder is not None:
        qemu, info, current, top = holder
        physical, frame_at = qemu.index, info
        regs = unpack(_FRAME, reader.read(info, _FRAME.size), 64, ERA_3)
        cpu = _frame_cpu(model, regs, cr3, index)
        where = IN_XEN
        entry_vector = int(regs["entry_vector"])
        if current == v:
            text = f"inside Xen on CPU {physical}: the guest frame Xen saved (cpu_info at the top of its stack)"
            in_hypercall = _in_hypercall(reader, XenSymbolsView(syms), qemu.gprs["rsp"], info)
        else:
            text = (f"inside Xen on CPU {physical}, which runs another vCPU but still holds this one's registers "
                    f"(lazy context switch): the guest frame in its cpu_info")
    elif lay.user_regs is not None:
        regs = unpack(_FRAME, reader.read(v + lay.user_regs, _FRAME.size), 64, ERA_3)
        cpu = _frame_cpu(model, regs, cr3, index)
        if down is None:  # the VPF_down test was not recovered from this xen-syms: either may be true
            where, text = DESCHEDULED, ("descheduled or offline (xendbg did not find Xen's VPF_down test in this "
                                        "xen-syms): the registers Xen saved in its struct vcpu (arch.user_regs)")
        else:
            where, text = (OFFLINE, "offline (VPF_down): the stale registers in Xen's struct vcpu") if down else \
                (DESCHEDULED, "descheduled: the registers Xen saved in its struct vcpu (arch.user_regs)")
    else:
        cpu = _frame_cpu(model, {n: 0 for n in (*_GPRS, "cs", "ss", "ds", "es", "fs", "gs")}, cr3, index)
        where, text = DESCHEDULED, "descheduled: its saved registers could not be located in struct vcpu"
    out = XenVcpu(domid, index, v, where, text, cpu, physical, cr3, in_hypercall, frame_at, entry_vector)
    if lay.kernel_ss is not None and lay.kernel_sp is not None:
        out.kernel_ss, out.kernel_sp = reader.u64(v + lay.kernel_ss), reader.u64(v + lay.kernel_sp)
    width = arch.cpu_mode(cpu.segments["cs"].selector).width
    if width == 32:
        out.why_no_state = (f"{name} is a 32-bit PV guest on 64-bit Xen: xendbg reads the registered state of "
                            f"64-bit PV domains only")
        return out
    out.state, out.why_no_state = _state(reader, memory, lay, v, cr3, name, guest_symbols, guest_ranges)
    if out.state is None:
        problems.append(out.why_no_state)
    return out


def _state(reader: _Reader, memory: PhysicalMemory, lay: xl.VcpuLayout, v: int, cr3: int | None, name: str,
           guest_symbols: Symbols | None, guest_ranges: list[tuple[int, int]] | None
           ) -> tuple[GuestState | None, str]:
    """The registered trap table and callbacks of the vCPU at `v`, each checked against the dump."""
    if lay.trap_ctxt is None or lay.guest_table is None or not all(k in lay.callbacks for k in
                                                                  ("event", "failsafe", "syscall")):
        return None, f"{name}: registered state not recovered: {'; '.join(lay.missing)}"
    if cr3 is None:
        return None, f"{name}: its page table (arch.guest_table) is not a frame of the dump's RAM"
    table = reader.u64(v + lay.trap_ctxt)
    try:
        raw = reader.read(table, _TRAP_ENTRIES * 16)
    except TargetError as exc:
        return None, f"{name}: arch.pv.trap_ctxt ({table:#x}) is unreadable ({exc}): not this build's layout"
    entries, wrong = trap_entries(raw)
    if wrong:
        return None, f"{name}: arch.pv.trap_ctxt at {table:#x} is not a trap table by vector ({wrong})"
    guest = DumpTarget(memory, _cpu_with(cr3))
    flags = reader.u32(v + lay.vgc_flags) if lay.vgc_flags is not None else 0
    callbacks: dict[str, Callback] = {}
    for kind, offset in lay.callbacks.items():
        address = reader.u64(v + offset)
        if not address:
            continue
        problem = _not_guest_code(guest, address, guest_symbols, guest_ranges)
        if problem:
            return None, f"{name}: the {kind} callback read at struct vcpu +{offset:#x} ({address:#x}) {problem}"
        disables = {"failsafe": bool(flags & xl.VGCF_FAILSAFE_DISABLES_EVENTS),
                    "syscall": bool(flags & xl.VGCF_SYSCALL_DISABLES_EVENTS)}.get(kind)
        if kind in lay.disables_events:
            disables = bool(reader.read(v + lay.disables_events[kind], 1)[0])
        names = ("CALLBACKF_mask_events",) if disables else ()
        callbacks[kind] = Callback(kind, address, flags=1 if disables else 0, flag_names=names)
    for vector, entry in entries.items():
        problem = _not_guest_code(guest, entry.address, guest_symbols, guest_ranges)
        if problem:
            return None, f"{name}: trap_ctxt[{vector}] ({entry.address:#x}) {problem}"
    state = GuestState(trap_table=entries, callbacks=callbacks, width=64)
    state.table = TrapTable(table, tuple(entries.values()), True, note=f"registered: {len(entries)} vectors, "
                            f"{SOURCE} (arch.pv.trap_ctxt at {table:#x})")
    state.history.append(f"{SOURCE} at {v:#x}")
    return state, ""


def _cpu_with(cr3: int) -> CpuState:
    """A 64-bit CPU state with paging on and `cr3` as its root (for reading a guest's memory)."""
    segments = {n: Segment(0, 0, 0, 0) for n in ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")}
    return CpuState(0, True, dict.fromkeys(_GPRS, 0), segments, (0x80000001, 0, 0, cr3, 0x20))


def _not_guest_code(guest: DumpTarget, address: int, symbols: Symbols | None,
                    ranges: list[tuple[int, int]] | None) -> str:
    """Why `address` is not code of the guest kernel ('' when it is): mapped by the guest's own page
    tables, and inside its ELF's loaded range when the ELF was given."""
    try:
        guest.read_memory(address, 1)
    except TargetError:
        return "is not mapped by the guest's page tables: not a guest kernel address, so not this build's layout"
    if ranges and not any(start <= address < end for start, end in ranges):
        return "lies outside the guest kernel's ELF: not this build's layout"
    return ""


def describe_failure(exc: XendbgError) -> str:
    return f"registered state not recoverable from Xen's data: {exc}"

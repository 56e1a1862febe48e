"""How a guest issues a hypercall, and where its number and arguments live.

x86_32 PV   `int $0x82` from ring 1; number in EAX, arguments in EBX ECX EDX ESI EDI.
x86_64 PV   `syscall` from ring 3 (usually a 32-byte stub of the hypercall page, or an inline stub
            such as Linux 6.x's `xen_hypercall_pv`); number in RAX, arguments in RDI RSI RDX R10 R8.
HVM/PVH     `vmcall` (Intel) or `vmmcall` (AMD), same registers as PV of that width.
Arm         `hvc #0xEA1`; number in x16 (r12 on arm32), arguments in x0-x4 (r0-r4).
Inside Xen  at the first instruction of a `do_*` handler, the arguments are in the System V AMD64
            C registers RDI RSI RDX RCX R8 and the handler's name says which hypercall it is.

A guest's width comes from its code selector, not from gdb's architecture: a 32-bit PV guest
under a 64-bit Xen still shows gdb a 64-bit register file.  Capstone (imported lazily, so loading
xendbg into gdb stays cheap) recognises the instruction at PC and the stubs of a hypercall page.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from functools import cache

from xendbg.errors import DecodeError, TargetError, UnknownRegister
from xendbg.names import TRAP_VECTORS  # x86 exception vectors: mnemonic and name
from xendbg.target import Target

HYPERCALL_STUB_SIZE = 32  # each hypercall-page stub is 32 bytes: stub N is at page + 32 * N
HYPERCALL_PAGE_SIZE = 4096


@dataclass(frozen=True)
class CallingConvention:
    name: str
    instruction: str
    nr_register: str
    arg_registers: tuple[str, ...]


CONVENTIONS: dict[str, CallingConvention] = {
    "x86_32-pv": CallingConvention("x86_32 PV", "int $0x82", "eax", ("ebx", "ecx", "edx", "esi", "edi")),
    "x86_64-pv": CallingConvention("x86_64 PV", "syscall", "rax", ("rdi", "rsi", "rdx", "r10", "r8")),
    "x86_32-hvm": CallingConvention("x86_32 HVM", "vmcall/vmmcall", "eax", ("ebx", "ecx", "edx", "esi", "edi")),
    "x86_64-hvm": CallingConvention("x86_64 HVM", "vmcall/vmmcall", "rax", ("rdi", "rsi", "rdx", "r10", "r8")),
    "arm64": CallingConvention("Arm64", "hvc #0xea1", "x16", ("x0", "x1", "x2", "x3", "x4")),
    "arm32": CallingConvention("Arm32", "hvc #0xea1", "r12", ("r0", "r1", "r2", "r3", "r4")),
    # Xen's C handlers (System V AMD64 ABI): used when stopped at a do_* handler inside Xen.
    "xen-c": CallingConvention("Xen handler (C ABI)", "call", "", ("rdi", "rsi", "rdx", "rcx", "r8")),
}

# Which instruction issues a hypercall under which convention (capstone mnemonic, operand).
_HYPERCALL_INSNS: dict[tuple[str, str], str] = {
    ("int", "0x82"): "x86_32-pv",
    ("syscall", ""): "x86_64-pv",
    ("vmcall", ""): "hvm",
    ("vmmcall", ""): "hvm",
}
_END_OF_STUB = {"ret", "jmp", "call", "int3", "hlt", "ud2", "iret", "iretd", "iretq", "sysret"}


def pv_convention(width: int) -> CallingConvention:
    return CONVENTIONS["x86_32-pv" if width == 32 else "x86_64-pv"]


@dataclass(frozen=True)
class CpuMode:
    """What the registers say about the code running on a vCPU."""

    width: int | None  # guest width, None when the vCPU is not in a PV guest (in Xen, firmware, boot code)
    ring: int
    description: str
    paging: bool | None = None  # whether paging is on, None when no CR0 or EFER said (then assumed on)


# 64-bit code selector of a PV guest: FLAT_RING3_CS64, 0xe033 from RELEASE-3.0.0 (arch-x86_64.h; later
# arch-x86/xen-x86_64.h).  Xen 2.0 ran no 64-bit PV guests (its x86_64 entry.S is empty at
# RELEASE-2.0.0), so 0x082b is only ever 2.0's 32-bit FLAT_RING3_CS (arch-x86_32.h): ring-3 user code
# of a 32-bit guest.  The selectors of 2.0's unused arch-x86_64.h are left out for the same reason.
_PV64_CS = frozenset({0xE033})
# The compat (32-bit) user code selector of a 64-bit PV guest, FLAT_RING3_CS32 (0xe023, same tags).
_PV64_CS32 = frozenset({0xE023})

# Control bits (Intel SDM vol. 3, 2.5 and 2.2.1): CR0.PE protected mode, CR0.PG paging, EFER.LMA long
# mode active (which needs paging).  Xen and its PV guests always run with paging on.
CR0_PE, CR0_PG = 1 << 0, 1 << 31
# Xen's own ring-0 code selectors: __HYPERVISOR_CS64 0xe008 and __HYPERVISOR_CS32 0xe038
# (xen/arch/x86/include/asm/config.h, RELEASE-4.17.0; 0xe008 since 3.0), and the 2.0 series' x86_32
# __HYPERVISOR_CS 0x0808 (xen/include/asm-x86/config.h).  Only the selector: at reset CS is 0xf000, which
# lies in the GDT range Xen reserves but is no selector of Xen's.
_XEN_CS = frozenset({0xE008, 0xE038, 0x0808})
EFER_LMA = 1 << 10
REAL_MODE = "in real mode, paging off (firmware or boot code)"


def cpu_mode(cs: int, *, long_mode: bool | None = None, cr0: int | None = None,
             efer: int | None = None) -> CpuMode:
    """Classify the vCPU from its CS (and, when known, whether the segment is a 64-bit one), and from
    CR0 and EFER when the target has them: a CPU at reset or in boot code is neither Xen nor a guest.
    Without CR0 (gdbsx, a dump without control registers) ring 0 is said to be ring 0, and no more."""
    ring = cs & 3
    paging = bool(cr0 & CR0_PG) if cr0 is not None else (True if efer is not None and efer & EFER_LMA else None)
    if cr0 is not None and not cr0 & CR0_PE:
        return CpuMode(None, 0, REAL_MODE, False)  # no rings in real mode: CS is a segment, not a selector
    if paging is False:
        return CpuMode(None, ring, f"in protected mode, paging off (ring {ring}, boot code)", False)
    if ring == 0:
        if paging is None and not _xen_selector(cs):
            return CpuMode(None, 0, "in ring 0 (no CR0 to tell Xen from firmware or boot code)")
        return CpuMode(None, 0, "in Xen (ring 0)", paging)
    if ring == 1:
        return CpuMode(32, 1, "32-bit PV guest kernel (ring 1)", paging)
    if ring == 2:
        return CpuMode(32, 2, "ring 2 (unusual for a PV guest)", paging)
    if cs in _PV64_CS or long_mode:
        return CpuMode(64, 3, "64-bit PV guest (ring 3)", paging)
    if cs in _PV64_CS32:
        return CpuMode(32, 3, "32-bit user code of a 64-bit PV guest (ring 3)", paging)
    return CpuMode(32, 3, "32-bit guest user code (ring 3)", paging)


def _xen_selector(cs: int) -> bool:
    """Whether CS is one of Xen's own ring-0 code selectors, which no firmware or boot code uses."""
    return cs in _XEN_CS


def vcpu_mode(target: Target) -> CpuMode:
    """cpu_mode of the vCPU a target shows: its CS, and its CR0 and EFER where the target has them
    (QEMU's gdbstub and dumps do; gdbsx and gdb on an ELF core do not)."""
    cr0 = _optional_register(target, "cr0")
    efer = _optional_register(target, "efer") if cr0 is None else None  # CR0 says all EFER would
    return cpu_mode(target.read_register("cs") & 0xFFFF, cr0=cr0, efer=efer)


def _optional_register(target: Target, name: str) -> int | None:
    try:
        return target.read_register(name)
    except TargetError:  # absent (UnknownRegister), or present but unavailable
        return None


@dataclass(frozen=True)
class Site:
    """Where a stopped vCPU stands relative to a hypercall it is about to make."""

    # "instruction" (PC at int/syscall/vmcall), "stub" (before it in a stub), "registers", or inside
    # Xen: "handler" (at a do_* handler), "frame" (at pv_hypercall, reading the saved guest frame),
    # "gate" (at the int $0x82 handler the IDT names, with the guest's registers)
    kind: str
    convention: str
    instruction: str  # e.g. "syscall" or "int 0x82"
    address: int  # address of the hypercall instruction (PC for "registers")
    stub_nr: int | None = None  # the number a stub loads into EAX/RAX before the instruction
    pushes: int = 0  # bytes the stub pushes before its instruction (the stack then is this much lower)
    pushed: tuple[str, ...] = ()  # what it pushes, in order: a register name or an immediate ("rcx", "0x10")

    def describe(self) -> str:
        if self.kind == "instruction":
            return f"at {self.instruction}"
        if self.kind == "stub":
            where = f"stub for hypercall {self.stub_nr}" if self.stub_nr is not None else "inline stub"
            return f"in {where}, before {self.instruction} at {self.address:#x}"
        if self.kind == "handler":
            return f"in Xen at {self.instruction} (C arguments)"
        if self.kind == "frame":
            return f"in Xen at {self.instruction}, from the guest's saved registers (guest PC {self.address:#x})"
        if self.kind == "gate":
            return f"in Xen at {self.instruction} (IDT), from the guest's registers (returns to {self.address:#x})"
        return "from registers"


@cache
def _disassembler(width: int):  # noqa: ANN202 - capstone's Cs type, imported lazily
    """One capstone decoder per width: building one costs more than the stub walk itself."""
    import capstone

    mode = capstone.CS_MODE_32 if width == 32 else capstone.CS_MODE_64
    return capstone.Cs(capstone.CS_ARCH_X86, mode)


def find_hypercall_site(code: bytes, pc: int, width: int, max_insns: int = 8) -> Site | None:
    """Look at the code at PC: is it a hypercall instruction, or a stub leading to one?

    Walks at most `max_insns` instructions and stops at anything that leaves the stub (ret, jmp,
    call).  A `mov $N, %eax` before the instruction gives the stub's number, as in the hypercall
    page's stubs; without one (Linux's xen_hypercall_pv) the number is already in EAX/RAX.
    """
    stub_nr: int | None = None
    pushes = 0
    pushed: list[str] = []
    for index, insn in enumerate(_disassembler(width).disasm(code, pc)):
        if index >= max_insns:
            break
        mnemonic, ops = insn.mnemonic, insn.op_str.replace(" ", "")
        convention = _HYPERCALL_INSNS.get((mnemonic, ops))
        if convention is not None:
            if convention == "hvm":
                convention = f"x86_{width}-hvm"
            kind = "instruction" if index == 0 else "stub"
            text = f"{mnemonic} {insn.op_str}".strip()
            return Site(kind, convention, text, insn.address, stub_nr, pushes, tuple(pushed))
        if mnemonic in _END_OF_STUB:
            break
        if mnemonic in ("push", "pushq", "pushl"):
            pushes += width // 8  # push imm and push reg both store one word
            pushed.append(ops)
        if mnemonic == "mov" and (ops.startswith("eax,") or ops.startswith("rax,")):
            try:
                stub_nr = int(ops.split(",", 1)[1], 0)
            except ValueError:
                stub_nr = None  # loaded from somewhere else: the number is not the stub's
    return None


def hypercall_instructions(code: bytes, address: int, width: int) -> dict[int, int | None]:
    """The hypercall instructions in a function's code, disassembled from its start: address -> the
    number a `mov $N, %eax` right before it loads (None when the number comes from elsewhere)."""
    found: dict[int, int | None] = {}
    loaded: int | None = None
    for insn in _disassembler(width).disasm(code, address):
        mnemonic, ops = insn.mnemonic, insn.op_str.replace(" ", "")
        if (mnemonic, ops) in _HYPERCALL_INSNS:
            found[insn.address] = loaded
        loaded = None
        if mnemonic == "mov" and (ops.startswith("eax,") or ops.startswith("rax,")):
            try:
                loaded = int(ops.split(",", 1)[1], 0)
            except ValueError:
                loaded = None
    return found


def stub_number(stub: bytes, address: int, width: int) -> int | None:
    """The hypercall number a 32-byte hypercall-page stub loads, or None if it is not such a stub."""
    site = find_hypercall_site(stub[:HYPERCALL_STUB_SIZE], address, width)
    return site.stub_nr if site is not None else None


def hypercall_page_stubs(page: bytes, base: int, width: int) -> dict[int, int]:
    """Map hypercall number -> stub address for a hypercall page's contents."""
    stubs: dict[int, int] = {}
    for offset in range(0, min(len(page), HYPERCALL_PAGE_SIZE), HYPERCALL_STUB_SIZE):
        nr = stub_number(page[offset:offset + HYPERCALL_STUB_SIZE], base + offset, width)
        if nr is not None and nr == offset // HYPERCALL_STUB_SIZE:
            stubs[nr] = base + offset
    return stubs


@dataclass(frozen=True)
class PendingCall:
    nr: int
    args: tuple[int, ...]
    site: Site


def _reg(target: Target, name: str) -> int:
    return target.read_register(name)


def _pc_name(width: int) -> str:
    return "eip" if width == 32 else "rip"


@dataclass(frozen=True)
class StubShape:
    """Where the hypercall instruction sits in a hypercall-page stub, and what the stub pushed first."""

    instruction_offset: int
    pushed: int  # bytes on the stack between the stub's entry and its hypercall instruction
    instruction_size: int = 2  # `syscall` and `int $0x82` are both 2 bytes

    @property
    def return_offset(self) -> int:
        return self.instruction_offset + self.instruction_size


# The stubs Xen writes into a guest's hypercall page (pv_ring3_init_hypercall_page and
# pv_ring1_init_hypercall_page in xen/arch/x86/pv/hypercall.c at RELEASE-4.17.0): 64-bit
# `push %rcx; push %r11; mov $N,%eax; syscall; pop %r11; pop %rcx; ret`, 32-bit
# `mov $N,%eax; int $0x82; ret`.  The iret stub pushes %rax (%eax) first as well, so its
# instruction is one byte later; it does not return.
PAGE_STUB_SHAPE = {64: StubShape(8, 16), 32: StubShape(5, 0)}
IRET_STUB_SHAPE = {64: StubShape(9, 24), 32: StubShape(6, 4)}


def stub_shape(width: int, iret: bool) -> StubShape:
    """The shape of a hypercall-page stub: the iret stub's, or every other one's."""
    return (IRET_STUB_SHAPE if iret else PAGE_STUB_SHAPE)[width]


def stub_pushed_words(target: Target, site: Site, width: int) -> tuple[int | None, ...]:
    """The words a stub will push before its instruction, lowest address first (the last push lands
    lowest): from the registers it pushes, or the immediate; None for an operand xendbg cannot read
    (a memory operand, a segment register)."""
    words: list[int | None] = []
    for operand in site.pushed:
        value: int | None
        try:
            value = int(operand, 0) & ((1 << width) - 1)
        except ValueError:
            try:
                value = _reg_either(target, operand, width) & ((1 << width) - 1)
            except (UnknownRegister, TargetError):
                value = None
        words.append(value)
    return tuple(reversed(words))


def pv_args(target: Target, width: int) -> tuple[int, ...]:
    """The five hypercall arguments of a vCPU about to make a PV hypercall."""
    return _read_args(target, pv_convention(width), width)


def wide_name(name: str) -> str:
    """The 64-bit register holding a 32-bit one: 'ebx' -> 'rbx' ('rdi' stays)."""
    return "r" + name[1:] if name.startswith("e") else name


def _other_name(name: str) -> str:
    """The same register under the other width's name: 'ebx' <-> 'rbx'."""
    return wide_name(name) if name.startswith("e") else "e" + name[1:]


def _reg_either(target: Target, name: str, width: int) -> int:
    """A register by its name for `width`, or under the other width's name: a 64-bit register file seen
    through a 32-bit name, or the other way round."""
    try:
        return _reg(target, name) & ((1 << width) - 1)
    except UnknownRegister:
        return _reg(target, _other_name(name)) & ((1 << width) - 1)


def signed(value: int, width: int) -> int:
    """A `width`-bit register or memory word read as a signed number (results, int arguments)."""
    return value - (1 << width) if value >> (width - 1) & 1 else value


def _read_args(target: Target, convention: CallingConvention, width: int) -> tuple[int, ...]:
    return tuple(_reg_either(target, name, width) for name in convention.arg_registers)


def pending_call(target: Target, width: int, *, code_at_pc: bytes | None = None,
                 pc: int | None = None) -> PendingCall:
    """The hypercall a vCPU stopped at (or in a stub leading to) a hypercall instruction will make.

    `code_at_pc` spares a memory read when the caller already has the bytes.  Without code (an
    offline decode with no memory at PC) the number and arguments come from the registers.
    """
    if pc is None:
        try:
            pc = _reg(target, _pc_name(width))
        except UnknownRegister:
            pc = _reg(target, "pc")
    if code_at_pc is None:
        code_at_pc = read_code(target, pc)
    convention = pv_convention(width)
    site = find_hypercall_site(code_at_pc, pc, width) if code_at_pc else None
    if code_at_pc and site is None:
        raise DecodeError(f"no hypercall pending: the code at {pc:#x} is not a hypercall instruction "
                          f"or a stub leading to one")
    if site is None:
        site = Site("registers", convention.name, convention.instruction, pc)
    else:
        convention = CONVENTIONS.get(site.convention, convention)
    nr = site.stub_nr if site.stub_nr is not None else _reg_nr(target, convention, width)
    return PendingCall(nr, _read_args(target, convention, width), site)


# Inside a 64-bit Xen (symbols from xen-syms).  Xen names a hypercall's handler `do_NAME` for a
# native 64-bit guest and `compat_NAME` for a 32-bit one (xen/include/hypercall-defs.c at
# RELEASE-4.17.0); `pv_hypercall(struct cpu_user_regs *regs)` is where every PV hypercall enters C
# with the guest's saved registers (xen/arch/x86/pv/hypercall.c at RELEASE-4.17.0).
# A 32-bit guest's `int $0x82` enters C at `do_entry_int82(struct cpu_user_regs *regs)` instead.
XEN_HYPERCALL_ENTRY = "pv_hypercall"
XEN_FRAME_ENTRIES = (XEN_HYPERCALL_ENTRY, "do_entry_int82")
_HANDLER_PREFIXES = (("do_", 64), ("compat_", 32))


# Without Xen's symbols, a 32-bit guest's hypercalls are still seen where the CPU enters Xen: the handler
# of IDT vector 0x82 (the gate Xen installs with DPL 1, so only a ring-1 kernel can use it).
XEN_GATE_ENTRY = "the int $0x82 gate"
HYPERCALL_VECTOR = 0x82


def idt_gate_handler(gate: bytes, long_mode: bool) -> int | None:
    """The handler address of an IDT gate descriptor (8 bytes, 16 in long mode), None if not present
    (Intel SDM vol. 3, 6.11 and 6.14.1)."""
    if len(gate) < (16 if long_mode else 8) or not gate[5] & 0x80:
        return None
    offset = int.from_bytes(gate[0:2], "little") | int.from_bytes(gate[6:8], "little") << 16
    if long_mode:
        offset |= int.from_bytes(gate[8:12], "little") << 32
    return offset


def gate_entry(target: Target) -> XenEntry:
    """Stopped at the first instruction of Xen's int $0x82 handler: the guest's registers are untouched
    but for what the CPU pushed on Xen's stack (EIP, CS, EFLAGS, ESP, SS), which says where from."""
    try:
        sp, word = _reg(target, "rsp"), 8
    except UnknownRegister:
        sp, word = _reg(target, "esp"), 4
    frame = target.read_memory(sp, 5 * word)
    eip, cs, _, esp = (int.from_bytes(frame[i * word:(i + 1) * word], "little") for i in range(4))
    width = cpu_mode(cs & 0xFFFF).width or 32
    convention = pv_convention(width)
    site = Site("gate", convention.name, XEN_GATE_ENTRY, eip)
    return XenEntry(_reg_nr(target, convention, width), None, _read_args(target, convention, width), width, site,
                    esp & ((1 << width) - 1), cs & 0xFFFF)


def handler_hypercall(function: str) -> tuple[str, int] | None:
    """The hypercall name and guest width a Xen handler serves: 'do_multicall' -> ('multicall', 64)."""
    if function in XEN_FRAME_ENTRIES:
        return None
    for prefix, width in _HANDLER_PREFIXES:
        if function.startswith(prefix):
            return function[len(prefix):], width
    return None


def handler_symbol(name: str, width: int) -> str:
    """The Xen handler of hypercall `name` for a guest of `width` bits (inverse of handler_hypercall)."""
    return ("do_" if width == 64 else "compat_") + name


@dataclass(frozen=True)
class XenEntry:
    """A hypercall seen from inside Xen: its number (None until the caller maps a handler name),
    raw arguments in the guest's order, the guest's width, and where it was read from."""

    nr: int | None
    name: str | None
    args: tuple[int, ...]
    width: int
    site: Site
    guest_sp: int | None = None  # the guest's stack pointer at its hypercall, when Xen's frame says
    guest_cs: int | None = None  # the guest's code selector, when Xen's frame says


def handler_entry(target: Target, function: str) -> XenEntry:
    """Stopped at the first instruction of Xen's handler `function`: arguments are C arguments."""
    served = handler_hypercall(function)
    if served is None:
        raise DecodeError(f"{function} is not a Xen hypercall handler (do_NAME or compat_NAME)")
    name, width = served
    pc = _reg(target, "rip")
    convention = CONVENTIONS["xen-c"]
    site = Site("handler", "xen-c", f"{function}()", pc)
    return XenEntry(None, name, _read_args(target, convention, width), width, site)


def handler_guest_frame(target: Target, numbers: Collection[int]) -> XenEntry | None:
    """At a Xen handler, the guest frame Xen saved when the guest entered it: `guest_cpu_user_regs` at the
    start of the `struct cpu_info` at the top of the CPU's stack (get_cpu_info_from_stack in
    asm/current.h, RELEASE-4.17.0 to RELEASE-4.20.0).  None unless the frame checks out: a guest code
    selector, and in its RAX/EAX one of `numbers`: the hypercall being served, or multicall while
    do_multicall runs its entries' handlers."""
    from xendbg.dump.xenlayout import CPU_INFO_SIZES, STACK_SIZE

    try:
        top = (_reg(target, "rsp") | (STACK_SIZE - 1)) + 1
    except TargetError:
        return None
    for size in CPU_INFO_SIZES:
        try:
            entry = guest_frame_entry(target, top - size)
        except TargetError:
            continue
        if entry.guest_cs is not None and cpu_mode(entry.guest_cs).width is not None and entry.nr in numbers:
            return entry
    return None


def cpu_guest_frame_address(target: Target, stack_base: int, cpu: int) -> int | None:
    """Where Xen saves the guest's registers on each entry from the guest on physical CPU `cpu`: the
    guest_cpu_user_regs at the start of the cpu_info at the top of that CPU's stack (`stack_base[cpu]`,
    xen/arch/x86/smpboot.c; asm/current.h at RELEASE-4.17.0 to RELEASE-4.20.0).  None until the CPU's
    stack exists or when its cpu_info does not name this CPU (another layout)."""
    from xendbg.dump.xenlayout import CPU_INFO_SIZES, STACK_SIZE

    try:
        base = int.from_bytes(target.read_memory(stack_base + 8 * cpu, 8), "little")
        if not base:
            return None
        for size in CPU_INFO_SIZES:
            info = base + STACK_SIZE - size
            processor_id = info + _xen_frame_layout().size  # cpu_info's first field after the frame
            if int.from_bytes(target.read_memory(processor_id, 4), "little") == cpu:
                return info
    except TargetError:
        return None
    return None


# The entry_vector Xen stores in the frame of a `syscall` entry (TRAP_syscall, asm/processor.h at
# RELEASE-4.17.0); an `int $0x82` entry stores HYPERCALL_VECTOR (x86_64/compat/entry.S).
TRAP_SYSCALL = 256


def _xen_frame_layout():  # noqa: ANN202 - abi.layouts.Layout, imported lazily
    """struct cpu_user_regs as a 64-bit Xen saves it (its guests' registers in it, 32-bit ones too)."""
    from xendbg.abi.layouts import ERA_3, layout

    return layout("cpu_user_regs", 64, ERA_3)


def xen_frame_size() -> int:
    return _xen_frame_layout().size


def frame_code_selector(frame: bytes) -> int:
    """The guest's CS in a frame Xen saved (`xen_frame_size()` bytes)."""
    from xendbg.abi.layouts import ERA_3, unpack

    return int(unpack(_xen_frame_layout(), frame, 64, ERA_3)["cs"]) & 0xFFFF


def frame_shows_rewound_hypercall(frame: bytes, instruction: int, sp: int) -> bool:
    """Whether Xen's saved guest frame says its last entry was a hypercall from `instruction` with stack
    `sp` that it rewound onto the instruction to continue it (pv_hypercall's `regs->rip -= 2` for a
    preempted call, pv/hypercall.c at RELEASE-4.17.0: after it returned, RIP is past the instruction)."""
    from xendbg.abi.layouts import ERA_3, unpack

    lay = _xen_frame_layout()
    if len(frame) < lay.size:
        return False
    regs = unpack(lay, frame[:lay.size], 64, ERA_3)
    vector = int(regs["entry_vector"])
    mask = (1 << 64) - 1 if vector == TRAP_SYSCALL else (1 << 32) - 1
    return (vector in (TRAP_SYSCALL, HYPERCALL_VECTOR) and int(regs["rip"]) & mask == instruction
            and int(regs["rsp"]) & mask == sp)


def guest_frame_entry(target: Target, regs_address: int, function: str = XEN_HYPERCALL_ENTRY) -> XenEntry:
    """The hypercall in the guest registers Xen saved at `regs_address` (the argument of
    pv_hypercall or do_entry_int82)."""
    from xendbg.abi.layouts import ERA_3, layout, unpack

    lay = layout("cpu_user_regs", 64, ERA_3)  # Xen itself is 64-bit: its frame is the 64-bit layout
    regs = unpack(lay, target.read_memory(regs_address, lay.size), 64, ERA_3)
    mode = cpu_mode(int(regs["cs"]))
    width = mode.width or 64
    convention = pv_convention(width)
    wide = {name: int(v) for name, v in regs.items() if isinstance(v, int)}
    mask = (1 << width) - 1
    # A 32-bit guest's EBX..EDI sit in the low halves of the 64-bit frame's RBX..RDI.
    args = tuple(wide[wide_name(reg)] & mask for reg in convention.arg_registers)
    nr_reg = convention.nr_register
    nr = wide[wide_name(nr_reg)] & mask
    guest_pc = int(regs["rip"])
    site = Site("frame", convention.name, f"{function}()", guest_pc)
    return XenEntry(nr, None, args, width, site, int(regs["rsp"]) & mask, int(regs["cs"]))


def read_code(target: Target, pc: int) -> bytes:
    """Up to one stub's worth of code at PC; less when PC is near the end of mapped memory."""
    to_page_end = HYPERCALL_PAGE_SIZE - pc % HYPERCALL_PAGE_SIZE
    sizes = [HYPERCALL_STUB_SIZE] + ([to_page_end] if to_page_end < HYPERCALL_STUB_SIZE else [])
    for size in sizes:
        try:
            return target.read_memory(pc, size)
        except TargetError:
            pass
    size = HYPERCALL_STUB_SIZE // 2
    while size >= 2:
        try:
            return target.read_memory(pc, size)
        except TargetError:
            size //= 2
    return b""


def mov_eax_immediate(code: bytes) -> int | None:
    """N when `code` starts with `mov $N, %eax` (b8 imm32), as Xen's xen_major_version() does."""
    return int.from_bytes(code[1:5], "little") if len(code) >= 5 and code[0] == 0xB8 else None


def read_result(target: Target, width: int) -> int:
    """A hypercall's return value, as the guest sees it back in EAX/RAX (signed)."""
    return signed(_reg_nr(target, pv_convention(width), width), width)


def _reg_nr(target: Target, convention: CallingConvention, width: int) -> int:
    return _reg_either(target, convention.nr_register, width)


PAGE_FAULT = 14  # #PF: the one exception whose faulting address Xen hands over (stack or vcpu_info)


def vector_name(vector: int) -> str:
    if vector in TRAP_VECTORS:
        return TRAP_VECTORS[vector][0]
    if vector == 0x80:
        return "int 0x80"
    if vector == 0x82:
        return "int 0x82"
    return f"int {vector:#x}" if vector >= 32 else "reserved"


def is_canonical(address: int) -> bool:
    """A 64-bit address is canonical when bits 63..47 are all equal."""
    top = address >> 47
    return top == 0 or top == (1 << 17) - 1

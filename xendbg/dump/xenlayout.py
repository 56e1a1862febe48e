"""Where Xen keeps each vCPU's registered PV state, read off Xen's own code (xen-syms has symbols but
no DWARF, so the offsets inside `struct vcpu` and `struct domain` are not written down anywhere).

`arch_get_info_guest(v, c)` copies `struct vcpu` fields into the public `vcpu_guest_context`, whose
layout xendbg knows (xendbg/abi, from the public headers): following which field of `v` each store
into `c` came from gives the offsets of the saved guest registers, the trap table pointer, the kernel
stack, the callbacks and the guest's page table (xen/arch/x86/domctl.c, RELEASE-4.17.0).
`register_guest_callback` gives the two callbacks the public context has no room for (syscall32 and
sysenter, xen/arch/x86/pv/callback.c), and `for_each_domain` loops the link of `domain_list`.

The leading fields of `struct vcpu` (vcpu_id, processor, vcpu_info, domain) and `struct domain`
(domain_id, max_vcpus, vcpu) and `struct cpu_info` at the top of each CPU's stack are taken from
Xen's headers per release (`leading_fields`); xendbg/dump/xen.py checks every offset against the dump
before trusting it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from xendbg.abi import get_abi

# struct vcpu and struct domain both start with their id (xen/include/xen/sched.h, RELEASE-4.17.0 to
# RELEASE-4.22.0): int vcpu_id; domid_t domain_id.
VCPU_ID, DOMAIN_ID = 0x0, 0x0
# Each CPU's stack is STACK_SIZE (8 pages, asm/config.h STACK_ORDER 3) with struct cpu_info at its top.
STACK_SIZE = 8 * 4096


@dataclass(frozen=True)
class LeadingFields:
    """The offsets xendbg takes from one Xen release's internal headers."""

    vcpu_domain: int  # struct vcpu's `struct domain *domain`
    domain_max_vcpus: int  # struct domain's `unsigned int max_vcpus`
    domain_vcpus: int  # struct domain's `struct vcpu **vcpu`
    cpu_info_size: int  # struct cpu_info (asm/current.h), at the top of each CPU's stack
    cpu_info_processor_id: int
    cpu_info_current_vcpu: int
    cpu_info_per_cpu_offset: int


# (first release, its fields), newest first.  struct cpu_info is guest_cpu_user_regs (200 bytes),
# processor_id, verw_sel, current_vcpu, per_cpu_offset, cr4, xen_cr3, pv_cr3, spec-ctrl bytes: 264
# bytes from RELEASE-4.17.0 to RELEASE-4.20.0.
_LEADING: tuple[tuple[tuple[int, int], LeadingFields], ...] = (
    # RELEASE-4.20.0: struct domain gains `uint64_t unique_id` before vcpu.
    ((4, 20), LeadingFields(0x18, 0x4, 0x10, 264, 200, 208, 216)),
    # RELEASE-4.18.0: struct vcpu's `vcpu_info_t *vcpu_info` becomes a 16-byte struct guest_area.
    ((4, 18), LeadingFields(0x18, 0x4, 0x8, 264, 200, 208, 216)),
    # RELEASE-4.17.0: int vcpu_id; int processor; vcpu_info_t *vcpu_info; struct domain *domain.
    ((4, 17), LeadingFields(0x10, 0x4, 0x8, 264, 200, 208, 216)),
)
# The sizes struct cpu_info has had in the releases above (its guest_cpu_user_regs is at offset 0).
CPU_INFO_SIZES = tuple(sorted({fields.cpu_info_size for _, fields in _LEADING}))
# RELEASE-4.21.0 puts a struct fred_info into struct cpu_info and RELEASE-4.22.0 an enum into struct
# domain: layouts xendbg has not verified against a running Xen.
NEWEST_KNOWN = (4, 20)


def leading_fields(version: str | None) -> tuple[LeadingFields | None, str]:
    """The fields for Xen `version` ("4.20", from its image) and a note when they are assumed: None
    when xendbg knows this Xen's internal layout is different from every one it has."""
    key = tuple(int(part) for part in version.split(".")[:2]) if version else None
    if key is not None and key > NEWEST_KNOWN:
        return None, (f"Xen {version}'s struct cpu_info and struct domain differ from the releases xendbg "
                      f"knows (4.17 to {NEWEST_KNOWN[0]}.{NEWEST_KNOWN[1]})")
    for first, fields in _LEADING:
        if key is not None and key >= first:
            return fields, ""
    oldest = _LEADING[-1]
    what = f"Xen {version}" if version else "a Xen whose version is not in its image"
    return oldest[1], f"{what}: read with Xen {oldest[0][0]}.{oldest[0][1]}'s struct layouts, each checked"

# vcpu_guest_context fields whose source in struct vcpu is wanted (public arch-x86/xen-x86_64.h).
_CONTEXT_FIELDS = ("flags", "user_regs", "trap_ctxt", "kernel_ss", "kernel_sp", "ctrlreg",
                   "event_callback_eip", "failsafe_callback_eip", "syscall_callback_eip")
# CALLBACKTYPE_* of register_guest_callback's switch (public callback.h).
_CALLBACK_TYPES = {"syscall32": 7, "sysenter": 5}
# vcpu_guest_context.flags bits (public arch-x86/xen.h, RELEASE-4.17.0 and libxen-dev): _VGCF_online 5,
# _VGCF_failsafe_disables_events 3, _VGCF_syscall_disables_events 4.
VGCF_ONLINE, VGCF_FAILSAFE_DISABLES_EVENTS, VGCF_SYSCALL_DISABLES_EVENTS = 1 << 5, 1 << 3, 1 << 4
ONLINE_TEST = -1  # the key of context_sources' pause-flags test


@dataclass(frozen=True)
class Source:
    """Where a value stored into the context came from: a field of struct vcpu (`deref`: the field is
    a pointer and the value was read at `inner` bytes into what it points to; `frame`: the field is
    a frame number shifted into an address; `indexed`: an array copied element by element)."""

    offset: int
    kind: str = "field"  # field, deref, frame, indexed, test
    inner: int = 0  # deref: the offset inside the pointee; test: the bits tested
    into: int = 0  # test: the context offset then or'ed ...
    bits: int = 0  # ... with these bits


@dataclass
class VcpuLayout:
    """Offsets into `struct vcpu` (None: not recovered) and why any is missing."""

    user_regs: int | None = None
    vgc_flags: int | None = None
    trap_ctxt: int | None = None  # a pointer to 256 struct trap_info
    kernel_ss: int | None = None
    kernel_sp: int | None = None
    ctrlreg: int | None = None
    guest_table: int | None = None  # a frame number: the guest kernel's top page table (CR3)
    callbacks: dict[str, int] = field(default_factory=dict)  # event, failsafe, syscall, syscall32, sysenter
    disables_events: dict[str, int] = field(default_factory=dict)  # syscall32/sysenter: a bool byte
    domain_next: int | None = None  # struct domain's next_in_list
    down: tuple[int, int] | None = None  # (offset of pause_flags, its VPF_down bit): the vCPU is offline
    missing: list[str] = field(default_factory=list)
    candidates: dict[str, list[Source]] = field(default_factory=dict)  # every source seen, per context field

    def require(self, *names: str) -> list[str]:
        """The names among `names` that were not recovered."""
        return [n for n in names if getattr(self, n) is None]


_WIDE = {}
for _names in (("rax", "eax", "ax", "al", "ah"), ("rbx", "ebx", "bx", "bl", "bh"), ("rcx", "ecx", "cx", "cl", "ch"),
               ("rdx", "edx", "dx", "dl", "dh"), ("rsi", "esi", "si", "sil"), ("rdi", "edi", "di", "dil"),
               ("rbp", "ebp", "bp", "bpl"), ("rsp", "esp", "sp", "spl")):
    for _n in _names:
        _WIDE[_n] = _names[0]
for _i in range(8, 16):
    for _suffix in ("", "d", "w", "b"):
        _WIDE[f"r{_i}{_suffix}"] = f"r{_i}"
_MASK = (1 << 64) - 1
_CALLER_SAVED = ("rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11")


def _wide(name: str) -> str:
    return _WIDE.get(name, name)


def _disassemble(code: bytes, address: int):  # noqa: ANN202 - capstone instructions, imported lazily
    import capstone

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    md.skipdata = True
    return list(md.disasm(code, address))


def _operands(insn) -> list:  # noqa: ANN001 - a capstone instruction
    try:
        return list(insn.operands)
    except Exception:  # skipdata pseudo-instructions have no detail
        return []


def context_sources(code: bytes, address: int) -> dict[int, list[Source]]:
    """For `arch_get_info_guest(struct vcpu *v, vcpu_guest_context *c)`: every store into `c`, by
    offset, with the field of `v` it came from (a small linear data-flow over the function)."""
    from capstone import x86

    values: dict[str, object] = {"rdi": "vcpu", "rsi": "ctx"}
    stores: dict[int, list[Source]] = {}
    tested: Source | None = None  # the last `test $BITS, OFF(v)`
    for insn in _disassemble(code, address):
        ops = _operands(insn)
        mnemonic = insn.mnemonic
        if mnemonic in ("test", "or") and len(ops) == 2 and ops[0].type == x86.X86_OP_MEM and ops[0].mem.base:
            base = values.get(_wide(insn.reg_name(ops[0].mem.base)))
            if ops[1].type == x86.X86_OP_IMM and base == "vcpu" and mnemonic == "test":
                tested = Source(ops[0].mem.disp, "test", ops[1].imm)
            elif ops[1].type == x86.X86_OP_IMM and base == "ctx" and tested is not None:
                # `flags |= VGCF_online` right after testing a vCPU field: that field is pause_flags
                stores.setdefault(ONLINE_TEST, []).append(Source(tested.offset, "test", tested.inner,
                                                                 ops[0].mem.disp, ops[1].imm))
            continue
        written = []
        try:
            written = [_wide(insn.reg_name(r)) for r in insn.regs_access()[1]]
        except Exception:
            pass
        if mnemonic.startswith("call") or mnemonic in ("jmp", "ret"):
            # A call clobbers the scratch registers; after a jump or return the next instruction is
            # reached from elsewhere, where they hold something else.
            for reg in _CALLER_SAVED:
                values.pop(reg, None)
            continue
        if mnemonic == "pop":
            # An epilogue in the middle of the function (before a tail call): the code after it is
            # reached by a branch, with the registers the prologue set up still holding v and c.
            continue
        if mnemonic in ("mov", "movzx", "movsxd", "movsx") and len(ops) == 2:
            dst, src = ops
            if dst.type == x86.X86_OP_REG:
                target = _wide(insn.reg_name(dst.reg))
                value: object = None
                if src.type == x86.X86_OP_REG:
                    value = values.get(_wide(insn.reg_name(src.reg)))
                elif src.type == x86.X86_OP_MEM and src.mem.base:
                    base = values.get(_wide(insn.reg_name(src.mem.base)))
                    if base == "vcpu":
                        value = Source(src.mem.disp, "indexed" if src.mem.index else "field")
                    elif isinstance(base, Source) and base.kind == "field" and not src.mem.index:
                        value = Source(base.offset, "deref", src.mem.disp)
                if value is None:
                    values.pop(target, None)
                else:
                    values[target] = value
                continue
            if dst.type == x86.X86_OP_MEM and src.type == x86.X86_OP_REG and dst.mem.base:
                if values.get(_wide(insn.reg_name(dst.mem.base))) == "ctx":
                    value = values.get(_wide(insn.reg_name(src.reg)))
                    if isinstance(value, Source):
                        stores.setdefault(dst.mem.disp, []).append(value)
                continue
        if mnemonic == "shl" and len(ops) == 2 and ops[0].type == x86.X86_OP_REG and ops[1].type == x86.X86_OP_IMM:
            reg = _wide(insn.reg_name(ops[0].reg))
            value = values.get(reg)
            if isinstance(value, Source) and value.kind == "field" and ops[1].imm == 12:
                values[reg] = Source(value.offset, "frame")
                continue
        if mnemonic in ("and", "or") and len(ops) == 2 and ops[1].type == x86.X86_OP_IMM:
            continue  # flags masked or set: still the same field's value
        for reg in written:
            if reg != "rflags":
                values.pop(reg, None)
    return stores


def callback_stores(code: bytes, address: int) -> dict[int, tuple[int, int | None]]:
    """For `register_guest_callback(struct callback_register *reg)`: callback type -> (offset in
    struct vcpu of its address, offset of its disables-events byte), following the switch on
    reg->type (`cmp $TYPE, %ax` with je/jne) to the first store of reg->address (read at 8(%rdi))."""
    from capstone import x86

    insns = _disassemble(code, address)
    by_address = {insn.address: i for i, insn in enumerate(insns)}
    starts: dict[int, int] = {}  # type -> instruction index where its case starts
    for i, insn in enumerate(insns[:-1]):
        ops = _operands(insn)
        compared = None
        if insn.mnemonic == "cmp" and len(ops) == 2 and ops[0].type == x86.X86_OP_REG and ops[1].type == x86.X86_OP_IMM:
            compared = ops[1].imm
        elif (insn.mnemonic == "test" and len(ops) == 2 and ops[0].type == x86.X86_OP_REG
              and ops[1].type == x86.X86_OP_REG and ops[0].reg == ops[1].reg):
            compared = 0
        if compared is None:
            continue
        jump = insns[i + 1]
        jops = _operands(jump)
        to = jops[0].imm & _MASK if jops and jops[0].type == x86.X86_OP_IMM else None  # capstone's is signed
        if jump.mnemonic == "je" and to in by_address:
            starts.setdefault(compared, by_address[to])
        elif jump.mnemonic == "jne" and i + 2 < len(insns):
            starts.setdefault(compared, i + 2)
    found: dict[int, tuple[int, int | None]] = {}
    for ctype, start in starts.items():
        holder: str | None = None
        store: int | None = None
        for insn in insns[start:start + 12]:
            ops = _operands(insn)
            if insn.mnemonic in ("ret", "jmp") or insn.mnemonic.startswith("call"):
                break
            if insn.mnemonic != "mov" or len(ops) != 2:
                continue
            dst, src = ops
            if dst.type == x86.X86_OP_MEM and src.type == x86.X86_OP_REG and dst.mem.base and not dst.mem.index:
                if store is None and src.size == 8 and insn.reg_name(src.reg) == holder_of(insns, start):
                    store = dst.mem.disp
                    holder = insn.reg_name(dst.mem.base)
                elif store is not None and src.size == 1 and insn.reg_name(dst.mem.base) == holder:
                    found[ctype] = (store, dst.mem.disp)
                    break
        if store is not None:
            found.setdefault(ctype, (store, None))
    return found


def holder_of(insns: list, before: int) -> str | None:
    """The register that holds reg->address: the last load from 8(%rdi) before instruction `before`."""
    from capstone import x86

    name = None
    for insn in insns[:before]:
        ops = _operands(insn)
        if insn.mnemonic == "mov" and len(ops) == 2 and ops[0].type == x86.X86_OP_REG and ops[1].type == x86.X86_OP_MEM:
            if insn.reg_name(ops[1].mem.base) == "rdi" and ops[1].mem.disp == 8 and not ops[1].mem.index:
                name = insn.reg_name(ops[0].reg)
    return name


def list_link(functions: list[bytes], addresses: list[int], head: int) -> int | None:
    """struct domain's next_in_list: in code that loads `head` (domain_list) into a register R, the
    displacement of the `mov DISP(R), R` that walks the list, by majority."""
    from capstone import x86

    votes: Counter[int] = Counter()
    for code, address in zip(functions, addresses, strict=True):
        insns = _disassemble(code, address)
        for i, insn in enumerate(insns):
            ops = _operands(insn)
            if not (insn.mnemonic == "mov" and len(ops) == 2 and ops[0].type == x86.X86_OP_REG
                    and ops[1].type == x86.X86_OP_MEM and insn.reg_name(ops[1].mem.base) == "rip"):
                continue
            if (insn.address + insn.size + ops[1].mem.disp) & _MASK != head:
                continue
            reg = ops[0].reg
            for later in insns[i + 1:i + 24]:
                lops = _operands(later)
                if (later.mnemonic == "mov" and len(lops) == 2 and lops[0].type == x86.X86_OP_REG
                        and lops[0].reg == reg and lops[1].type == x86.X86_OP_MEM and lops[1].mem.base == reg
                        and not lops[1].mem.index and lops[1].mem.disp > 0):
                    votes[lops[1].mem.disp] += 1
                    break
    if not votes:
        return None
    (best, count), *rest = votes.most_common(2) + [(None, 0)]
    return best if count >= 2 and count > 2 * (rest[0][1] if rest else 0) else None


def recover(code_of: Callable[[str], tuple[bytes, int] | None], list_users: list[tuple[bytes, int]],
            domain_list: int | None) -> VcpuLayout:
    """The struct vcpu / struct domain offsets from Xen's code.  `code_of(name)` gives a function's
    bytes and address (None when xen-syms has no such function); `list_users` the functions that
    read `domain_list`."""
    layout = VcpuLayout()
    ctx = get_abi("4.17", 64).layout("vcpu_guest_context")
    at = {ctx.field(name).offset: name for name in _CONTEXT_FIELDS}
    ctrlreg3 = ctx.field("ctrlreg").offset + 3 * 8
    found = code_of("arch_get_info_guest")
    if found is None:
        layout.missing.append("arch_get_info_guest is not in xen-syms")
    else:
        stores = context_sources(*found)
        layout.candidates = {at[off]: srcs for off, srcs in stores.items() if off in at}

        def pick(name: str, kind: str, inner: int = 0) -> int | None:
            for src in layout.candidates.get(name, []):
                if src.kind == kind and src.inner == inner:
                    return src.offset
            return None

        layout.user_regs = pick("user_regs", "field")
        layout.vgc_flags = pick("flags", "field")
        layout.trap_ctxt = pick("trap_ctxt", "deref")
        layout.kernel_ss = pick("kernel_ss", "field")
        layout.kernel_sp = pick("kernel_sp", "field")
        layout.ctrlreg = pick("ctrlreg", "indexed")
        online = [s for s in stores.get(ONLINE_TEST, []) if s.into == ctx.field("flags").offset
                  and s.bits == VGCF_ONLINE]
        layout.down = (online[0].offset, online[0].inner) if online else None
        frames = [s.offset for s in stores.get(ctrlreg3, []) if s.kind == "frame"]
        layout.guest_table = frames[0] if frames else None
        for kind in ("event", "failsafe", "syscall"):
            offset = pick(f"{kind}_callback_eip", "field")
            if offset is not None:
                layout.callbacks[kind] = offset
    found = code_of("register_guest_callback")
    if found is not None:
        stores_by_type = callback_stores(*found)
        for kind, ctype in _CALLBACK_TYPES.items():
            if ctype in stores_by_type:
                offset, disables = stores_by_type[ctype]
                layout.callbacks[kind] = offset
                if disables is not None:
                    layout.disables_events[kind] = disables
    if domain_list is not None and list_users:
        layout.domain_next = list_link([c for c, _ in list_users], [a for _, a in list_users], domain_list)
    names = {"user_regs": "the saved guest registers (arch.user_regs)", "trap_ctxt": "the trap table "
             "(arch.pv.trap_ctxt)", "kernel_ss": "kernel_ss", "kernel_sp": "kernel_sp",
             "guest_table": "the guest's page table (arch.guest_table)", "vgc_flags": "arch.pv.vgc_flags",
             "domain_next": "struct domain's next_in_list"}
    layout.missing += [names[n] for n in names if getattr(layout, n) is None]
    layout.missing += [f"the {kind} callback" for kind in ("event", "failsafe", "syscall")
                       if kind not in layout.callbacks]
    return layout

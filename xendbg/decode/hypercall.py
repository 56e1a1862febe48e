"""Decode a hypercall: its arguments, its sub-operation, and the structures its pointers lead to.

`decode_call` works from a number and raw argument values (a stopped vCPU's registers, or one
entry of a multicall batch); `decode_pending` first finds them on a stopped vCPU.  Both are pure:
they read the target and return dataclasses, and never print.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from xendbg import arch
from xendbg.abi import DOMIDS, TRAP_FLAG_DPL_MASK, TRAP_FLAG_IF, Abi, result_name
from xendbg.abi.generations import at_least
from xendbg.abi.hypercalls import ArgSpec
from xendbg.abi.layouts import MULTICALL_2_0_RESULT_ARG, Fields, Layout, unpack
from xendbg.decode import rules
from xendbg.decode.model import (
    Arg,
    Callback,
    Callbacks,
    Detail,
    FastTrap,
    Finding,
    GuestStack,
    GuestState,
    Hypercall,
    MulticallBatch,
    MulticallEntry,
    StructFields,
    TableOf,
    Text,
    TrapEntry,
    TrapTable,
)
from xendbg.errors import DecodeError, UnknownRegister, UnreadableMemory
from xendbg.target import Target

MAX_CONSOLE_TEXT = 512
MAX_ARRAY_ROWS = 64


class _Ctx:
    """One decode: the target, the ABI, what the guest registered, and the findings so far."""

    def __init__(self, target: Target, abi: Abi, state: GuestState | None, depth: int,
                 stack: GuestStack | None = None, in_xen: bool = False) -> None:
        self.target = target
        self.abi = abi
        self.state = state
        self.depth = depth
        self.findings: list[Finding] = []
        # The guest's stack at its hypercall instruction (iret reads its frame there): given when the
        # decode does not stand there itself (a stub's entry, Xen's saved frame); inside a Xen handler
        # without the saved frame it is unknown, and the stack pointer register is Xen's own.
        self.stack = stack
        self.in_xen = in_xen

    def read(self, address: int, size: int) -> bytes:
        return self.target.read_memory(address & self.abi.address_mask, size)

    def read_struct(self, name: str, address: int) -> Fields:
        lay = self.abi.layout(name)
        return unpack(lay, self.read(address, lay.size), self.abi.width, self.abi.era)

    def read_array(self, lay: Layout, address: int, count: int) -> list[Fields | None]:
        """Read `count` structs with as few target reads as possible; None marks an unreadable one."""
        try:
            data = self.read(address, lay.size * count)
            return [unpack(lay, data[i * lay.size:(i + 1) * lay.size], self.abi.width, self.abi.era)
                    for i in range(count)]
        except UnreadableMemory:
            pass
        rows: list[Fields | None] = []
        for i in range(count):
            try:
                rows.append(unpack(lay, self.read(address + i * lay.size, lay.size), self.abi.width,
                                   self.abi.era))
            except UnreadableMemory:
                rows.extend([None] * (count - i))
                break
        return rows

    def add(self, findings: list[Finding] | Finding) -> None:
        if isinstance(findings, Finding):
            self.findings.append(findings)
        else:
            self.findings.extend(findings)


# ---------------------------------------------------------------------------------------------
# Arguments


def _arg(ctx: _Ctx, spec: ArgSpec, value: int) -> Arg:
    abi = ctx.abi
    text: str | None = None
    kind = spec.kind
    if kind == "int":
        signed = arch.signed(value, 32 if abi.width == 32 else 64)
        text = str(signed) if signed < 0 else None
    elif kind.startswith("cmd:"):
        family = kind[4:]
        raw = value
        if abi.generation == "2.0" and family == "SCHEDOP":
            raw = value & 0xFF  # Xen 2.0: command in bits 0-7, shutdown reason in bits 8-15
        name = abi.enum(family).name_of(raw)
        text = name if name else f"unknown {family} {raw}"
        if raw != value:
            text += f", reason {value >> 8}"
    elif kind.startswith("flags:UVMF"):
        text = _uvmf_text(abi, value)
    elif kind == "sel":
        text = abi.selector_text(value & 0xFFFF)
    elif kind == "domid":
        text = DOMIDS.get(value & 0xFFFF)
    elif kind == "vector":
        text = arch.vector_name(value)
    return Arg(spec.name, kind, value, text)


def _uvmf_text(abi: Abi, value: int) -> str:
    uvmf = abi.enum("UVMF")
    if abi.generation == "2.0":
        names = [n for n, bit in uvmf.values.items() if value & bit]
        return "|".join(names) if names else "0"
    flush = {0: "UVMF_NONE", 1: "UVMF_TLB_FLUSH", 2: "UVMF_INVLPG"}.get(value & 3, "UVMF_FLUSHTYPE_MASK")
    scope = "UVMF_ALL" if value & 4 else "UVMF_LOCAL"
    if value & ~7:
        # UVMF_MULTI: the upper bits are a pointer to a vCPU mask
        return f"{flush}|UVMF_MULTI (vcpumask at {value & ~7:#x})"
    return f"{flush}|{scope}"


# ---------------------------------------------------------------------------------------------
# Structures behind the arguments


def _trap_entry(ctx: _Ctx, index: int, row: Fields) -> TrapEntry:
    return trap_entry(index, row)


def trap_entry(index: int, row: Fields) -> TrapEntry:
    """One trap_info as decoded (`row` unpacked from its layout)."""
    flags = int(row["flags"])
    vector = int(row["vector"])
    cs = int(row["cs"])
    return TrapEntry(index=index, vector=vector, vector_name=arch.vector_name(vector), flags=flags,
                     dpl=flags & TRAP_FLAG_DPL_MASK, interrupt_flag=bool(flags & TRAP_FLAG_IF), cs=cs,
                     rpl=cs & 3, address=int(row["address"]))


def decode_trap_table(target: Target, abi: Abi, address: int,
                      limit: int = rules.MAX_TABLE_ENTRIES) -> tuple[TrapTable, tuple[Finding, ...]]:
    """Read a trap_info array up to its zero-address terminator, with Xen's checks on each entry."""
    ctx = _Ctx(target, abi, None, 0)
    table = _trap_table(ctx, address, limit)
    return table, tuple(ctx.findings)


def _trap_table(ctx: _Ctx, address: int, limit: int = rules.MAX_TABLE_ENTRIES) -> TrapTable:
    abi = ctx.abi
    if address == 0:
        if abi.null_trap_table_clears:
            ctx.add(Finding("trap-table-null", "info", "a NULL table clears every entry of the virtual IDT"))
        else:
            ctx.add(rules.unreadable("trap table", 0))
        return TrapTable(0, (), True, "NULL table")
    lay = abi.layout("trap_info")
    entries: list[TrapEntry] = []
    seen: dict[int, int] = {}
    by_selector: dict[int, list[TrapEntry]] = {}
    terminated = False
    chunk = 32
    index = 0
    while index < limit and not terminated:
        rows = ctx.read_array(lay, address + index * lay.size, min(chunk, limit - index))
        for row in rows:
            if row is None:
                ctx.add(rules.unreadable(f"trap_info[{index}]", address + index * lay.size))
                return TrapTable(address, tuple(entries), False, "unreadable")
            if row["address"] == 0:
                terminated = True
                break
            entry = _trap_entry(ctx, index, row)
            what = f"trap_info[{index}] (vector {entry.vector:#x} {entry.vector_name})"
            by_selector.setdefault(entry.cs, []).append(entry)
            ctx.add(rules.check_code_address(abi, entry.address, what))
            if entry.vector in seen:
                ctx.add(Finding("trap-duplicate", "warning",
                                f"{what}: vector also set by entry {seen[entry.vector]}; the later entry wins"))
            seen[entry.vector] = index
            entries.append(entry)
            index += 1
    for selector, same in by_selector.items():  # one finding per selector, not one per entry
        first = same[0]
        what = (f"trap_info[{first.index}] (vector {first.vector:#x} {first.vector_name})" if len(same) == 1 else
                f"{len(same)} entries from trap_info[{first.index}] ({rules.vector_list([e.vector for e in same])})")
        ctx.add(rules.check_code_selector(abi, selector, what))
    note = ""
    for entry in entries:
        if entry.vector == 0x80:
            ctx.add(rules.check_int80_gate(abi, entry.flags))
    if any(e.vector == arch.PAGE_FAULT for e in entries):
        note = ("#PF: Xen 2.0 pushes the faulting address (CR2) onto the guest frame below the error code"
                if abi.generation == "2.0" else
                "#PF: the guest finds the faulting address in its vcpu_info (arch.cr2), not in CR2")
    if not terminated:
        ctx.add(Finding("trap-table-unterminated", "error",
                        f"no entry with address 0 in the first {limit} entries at {address:#x}: Xen keeps "
                        f"reading past the table until it finds one or faults (-EFAULT)"))
    return TrapTable(address, tuple(entries), terminated, note)


def _set_trap_table(ctx: _Ctx, args: list[Arg]) -> Detail:
    return _trap_table(ctx, args[0].value)


def _set_callbacks(ctx: _Ctx, args: list[Arg]) -> Detail:
    abi = ctx.abi
    entries = []
    if abi.width == 32:
        pairs = (("event", args[0].value, args[1].value), ("failsafe", args[2].value, args[3].value))
        for kind, selector, address in pairs:
            selector &= 0xFFFF
            ctx.add(rules.check_code_selector(abi, selector, f"{kind} callback"))
            entries.append(Callback(kind, address, selector, selector & 3))
    else:
        for kind, arg in zip(("event", "failsafe", "syscall"), args, strict=False):
            ctx.add(rules.check_code_address(abi, arg.value, f"{kind} callback"))
            entries.append(Callback(kind, arg.value))
    return Callbacks("set_callbacks", tuple(entries))


def _callback_flag_names(abi: Abi, flags: int) -> tuple[str, ...]:
    return tuple(n for n, bit in abi.enum("CALLBACKF").values.items() if flags & bit)


def _callback_op(ctx: _Ctx, args: list[Arg]) -> Detail:
    abi = ctx.abi
    cmd = abi.enum("CALLBACKOP").name_of(args[0].value)
    types = abi.enum("CALLBACKTYPE")
    pointer = args[1].value
    if cmd not in ("CALLBACKOP_register", "CALLBACKOP_unregister"):
        ctx.add(Finding("unknown-subop", "error", f"callback_op command {args[0].value} is unknown: "
                        f"Xen fails the call with -ENOSYS"))
        return None
    struct = "callback_register" if cmd == "CALLBACKOP_register" else "callback_unregister"
    try:
        reg = ctx.read_struct(struct, pointer)
    except UnreadableMemory:
        ctx.add(rules.unreadable(struct, pointer))
        return None
    ctype = int(reg["type"])
    tname = types.name_of(ctype)
    kind = tname.removeprefix("CALLBACKTYPE_") if tname else f"type {ctype}"
    if tname is None:
        ctx.add(Finding("callback-type", "error",
                        f"callback type {ctype} is unknown: Xen fails the call with -ENOSYS"))
    if cmd == "CALLBACKOP_unregister":
        if tname is not None:
            ctx.add(rules.check_unregister(abi, kind))
        return Callbacks("unregister", (Callback(kind, 0),))
    flags = int(reg["flags"])
    address = int(reg["address"])
    selector = None
    if abi.width == 32:
        selector = int(reg["cs"]) & 0xFFFF
        ctx.add(rules.check_code_selector(abi, selector, f"{kind} callback"))
    ctx.add(rules.check_code_address(abi, address, f"{kind} callback"))
    names = _callback_flag_names(abi, flags)
    if "CALLBACKF_mask_events" in names and kind in ("event", "nmi"):
        ctx.add(Finding("callback-mask-events", "info",
                        f"CALLBACKF_mask_events is ignored for the {kind} callback: Xen always masks events "
                        f"while delivering it (xen/include/public/callback.h, RELEASE-4.0.0)"))
    callback = Callback(kind, address, selector, None if selector is None else selector & 3, flags, names)
    return Callbacks("register", (callback,))


def _stack_switch(ctx: _Ctx, args: list[Arg]) -> Detail:
    ctx.add(rules.check_stack_switch(ctx.abi, args[0].value & 0xFFFF))
    return None


def _set_fast_trap(ctx: _Ctx, args: list[Arg]) -> Detail:
    vector = args[0].value & 0xFF if args else 0
    handler = ctx.state.trap_table.get(vector) if ctx.state else None
    current = ctx.state.fast_trap.vector if ctx.state and ctx.state.fast_trap else None
    ctx.add(rules.check_fast_trap(ctx.abi, vector, handler.interrupt_flag if handler else None, current))
    return FastTrap(vector, arch.vector_name(vector), handler)


def decode_multicall(target: Target, abi: Abi, address: int, count: int, *, results: bool = True,
                     state: GuestState | None = None,
                     stack: GuestStack | None = None) -> tuple[MulticallBatch, tuple[Finding, ...]]:
    """Decode a multicall_entry array; `results` says whether Xen has run it and written results.
    `stack` is the guest's stack at its multicall instruction (an iret entry's frame is there), when
    the vCPU does not stand at that instruction (the pending call's `stack`)."""
    ctx = _Ctx(target, abi, state, 0, stack, in_xen=stack is not None and stack.sp is None)
    batch = _multicall(ctx, address, count, results)
    return batch, tuple(ctx.findings)


def _multicall(ctx: _Ctx, address: int, count: int, results: bool) -> MulticallBatch:
    abi = ctx.abi
    count &= 0xFFFFFFFF
    lay = abi.layout("multicall_entry")
    shown = min(count, rules.MAX_MULTICALL_ENTRIES)
    if count == 0:
        ctx.add(Finding("multicall-empty", "info", "the batch has no entries: Xen returns 0 at once"))
    if count > shown:
        ctx.add(Finding("multicall-count", "warning",
                        f"nr_calls is {count}: xendbg decodes the first {shown} entries only"))
    rows = ctx.read_array(lay, address, shown)
    entries = []
    for index, row in enumerate(rows):
        entry_address = address + index * lay.size
        if row is None:
            ctx.add(rules.unreadable(f"multicall entry {index}", entry_address))
            break
        op = int(row["op"])
        raw_args = [int(a) for a in row["args"]]
        if abi.multicall_result_in_args:
            result_raw = raw_args[MULTICALL_2_0_RESULT_ARG]
            raw_args = raw_args[:MULTICALL_2_0_RESULT_ARG]  # Xen 2.0 passes args[0..4]
        else:
            result_raw = int(row["result"])
        hc = abi.hypercall(rules.dispatched_number(abi, op))
        if hc is not None and hc.name == "multicall":
            ctx.add(rules.check_nested_multicall(abi, index))
            call = Hypercall(op, hc.name, tuple(_arg(ctx, s, v) for s, v in zip(hc.args, raw_args, strict=False)),
                             abi.generation, abi.width)
        else:
            call = _decode(ctx.target, abi, op, raw_args, ctx.state, ctx.depth + 1,
                           where=f"multicall entry {index}", stack=ctx.stack, in_xen=ctx.in_xen)
        result = arch.signed(result_raw, abi.width) if results else None
        result_text = None
        if result is not None:
            result_text = result_name(result)
            if abi.multicall_result_in_args and call.name == "multicall" and result_raw >= rules.XEN_2_0_TEXT:
                result_text = "Xen 2.0's multicall_return_from_call (the nested entry was skipped)"
        entries.append(MulticallEntry(index, entry_address, call, result, result_text))
    return MulticallBatch(address, count, tuple(entries), truncated=count > shown)


def _multicall_detail(ctx: _Ctx, args: list[Arg]) -> Detail:
    if ctx.depth > 0:
        return None
    return _multicall(ctx, args[0].value, args[1].value, results=False)


def _fields(row: Fields, names: tuple[str, ...] | None = None) -> tuple[tuple[str, int | str], ...]:
    out: list[tuple[str, int | str]] = []
    for key, value in row.items():
        if names is not None and key not in names:
            continue
        if isinstance(value, int):
            out.append((key, value))
    return tuple(out)


def _struct_at(ctx: _Ctx, struct: str, address: int, names: tuple[str, ...] | None = None) -> Detail:
    try:
        row = ctx.read_struct(struct, address)
    except UnreadableMemory:
        ctx.add(rules.unreadable(struct, address))
        return None
    return StructFields(struct, address, _fields(row, names))


_VCPU_CONTEXT_FIELDS_32 = ("flags", "kernel_ss", "kernel_sp", "event_callback_cs", "event_callback_eip",
                           "failsafe_callback_cs", "failsafe_callback_eip", "vm_assist")
_VCPU_CONTEXT_FIELDS_64 = ("flags", "kernel_ss", "kernel_sp", "event_callback_eip", "failsafe_callback_eip",
                           "syscall_callback_eip", "vm_assist", "fs_base", "gs_base_kernel")


def _vcpu_op(ctx: _Ctx, args: list[Arg]) -> Detail:
    abi = ctx.abi
    cmd = abi.enum("VCPUOP").name_of(args[0].value)
    pointer = args[2].value
    if cmd is None:
        ctx.add(rules.unknown_vcpu_op(abi, args[0].value))
        return None
    if cmd == "VCPUOP_initialise":
        try:
            ctxt = ctx.read_struct("vcpu_guest_context", pointer)
        except UnreadableMemory:
            ctx.add(rules.unreadable("vcpu_guest_context", pointer))
            return None
        regs = ctxt["user_regs"]
        assert isinstance(regs, dict)
        ip, sp = ("eip", "esp") if abi.width == 32 else ("rip", "rsp")
        fields: list[tuple[str, int | str]] = [(ip, int(regs[ip])), (sp, int(regs[sp])), ("cs", int(regs["cs"])),
                                               ("ss", int(regs["ss"]))]
        names = _VCPU_CONTEXT_FIELDS_32 if abi.width == 32 else _VCPU_CONTEXT_FIELDS_64
        fields += [(n, int(ctxt[n])) for n in names]
        fields.append(("cr3", int(ctxt["ctrlreg"][3])))
        trap_ctxt = ctxt["trap_ctxt"]
        assert isinstance(trap_ctxt, list)
        traps = sum(1 for t in trap_ctxt if t["address"])
        fields.append(("trap_ctxt entries", traps))
        callbacks: dict[str, int] = {}
        if abi.width == 32:
            for kind in ("event", "failsafe"):
                selector = int(ctxt[f"{kind}_callback_cs"]) & 0xFFFF
                if selector or int(ctxt[f"{kind}_callback_eip"]):  # no callback given: nothing to check
                    callbacks[kind] = selector
        by_selector: dict[int, list[int]] = {}
        for vector, row in enumerate(trap_ctxt):
            if row["address"]:
                by_selector.setdefault(int(row["cs"]) & 0xFFFF, []).append(vector)
        selectors = {"cs": int(regs["cs"]) & 0xFFFF, "ss": int(regs["ss"]) & 0xFFFF,
                     "kernel_ss": int(ctxt["kernel_ss"]) & 0xFFFF}
        ctx.add(rules.check_vcpu_context(abi, args[1].value, selectors, callbacks, by_selector,
                                         int(ctxt["ctrlreg"][3]), int(ctxt["ldt_base"]), int(ctxt["ldt_ents"])))
        return StructFields("vcpu_guest_context", pointer, tuple(fields))
    if cmd == "VCPUOP_set_singleshot_timer":
        return _struct_at(ctx, "vcpu_set_singleshot_timer", pointer)
    if cmd == "VCPUOP_register_vcpu_info":
        return _struct_at(ctx, "vcpu_register_vcpu_info", pointer)
    return None


def _shutdown_reason(abi: Abi, reason: int) -> str:
    name = abi.enum("SHUTDOWN").name_of(reason)
    return name if name else str(reason)


def _sched_op(ctx: _Ctx, args: list[Arg]) -> Detail:
    abi = ctx.abi
    cmd = abi.enum("SCHEDOP").name_of(args[0].value)
    if cmd == "SCHEDOP_block":
        ctx.add(rules.block_unmasks(abi))
    if cmd in ("SCHEDOP_shutdown", "SCHEDOP_shutdown_code"):
        try:
            reason = int(ctx.read_struct("sched_shutdown", args[1].value)["reason"])
        except UnreadableMemory:
            ctx.add(rules.unreadable("sched_shutdown", args[1].value))
            return None
        return StructFields("sched_shutdown", args[1].value, (("reason", _shutdown_reason(abi, reason)),))
    return None


def _sched_op_compat(ctx: _Ctx, args: list[Arg]) -> Detail:
    abi = ctx.abi
    raw = args[0].value & 0xFF if abi.generation == "2.0" else args[0].value  # 2.0: reason in bits 8-15
    if abi.enum("SCHEDOP").name_of(raw) == "SCHEDOP_block":
        ctx.add(rules.block_unmasks(abi))
    if abi.generation == "2.0":
        cmd = abi.enum("SCHEDOP").name_of(args[0].value & 0xFF)
        if cmd == "SCHEDOP_shutdown":
            return StructFields("sched_op", 0, (("reason", args[0].value >> 8 & 0xFF),))
        return None
    if abi.enum("SCHEDOP").name_of(args[0].value) == "SCHEDOP_shutdown":
        return StructFields("sched_op", 0, (("reason", _shutdown_reason(abi, args[1].value)),))
    return None


# Event-channel sub-operation -> the struct it takes (xen/include/public/event_channel.h).
_EVTCHN_STRUCTS = {
    "EVTCHNOP_send": "evtchn_port", "EVTCHNOP_close": "evtchn_close", "EVTCHNOP_unmask": "evtchn_port",
    "EVTCHNOP_bind_virq": "evtchn_bind_virq", "EVTCHNOP_alloc_unbound": "evtchn_alloc_unbound",
    "EVTCHNOP_bind_ipi": "evtchn_bind_ipi", "EVTCHNOP_bind_interdomain": "evtchn_bind_interdomain",
}


def _evtchn_fields(ctx: _Ctx, cmd: str | None, data: bytes, address: int) -> Detail:
    struct = _EVTCHN_STRUCTS.get(cmd or "")
    if struct is None:
        return None
    lay = ctx.abi.layout(struct)
    row = unpack(lay, data[:lay.size], ctx.abi.width, ctx.abi.era)
    fields = list(_fields(row))
    if struct == "evtchn_bind_virq":
        virq = ctx.abi.enum("VIRQ").name_of(int(row["virq"]))
        fields[0] = ("virq", virq or int(row["virq"]))
    return StructFields(struct, address, tuple(fields))


def _event_channel_op(ctx: _Ctx, args: list[Arg]) -> Detail:
    cmd = ctx.abi.enum("EVTCHNOP").name_of(args[0].value)
    struct = _EVTCHN_STRUCTS.get(cmd or "")
    if struct is None:
        return None
    try:
        data = ctx.read(args[1].value, ctx.abi.layout(struct).size)
    except UnreadableMemory:
        ctx.add(rules.unreadable(struct, args[1].value))
        return None
    return _evtchn_fields(ctx, cmd, data, args[1].value)


def _event_channel_op_compat(ctx: _Ctx, args: list[Arg]) -> tuple[Detail, str | None]:
    """The pre-3.0.3 form: one evtchn_op struct, the command inside it."""
    pointer = args[0].value
    lay = ctx.abi.layout("evtchn_op")
    try:
        data = ctx.read(pointer, lay.size)
    except UnreadableMemory:
        ctx.add(rules.unreadable("evtchn_op", pointer))
        return None, None
    row = unpack(lay, data, ctx.abi.width, ctx.abi.era)
    cmd_value = int(row["cmd"])
    cmd = ctx.abi.enum("EVTCHNOP").name_of(cmd_value)
    union = lay.field("u").offset
    return _evtchn_fields(ctx, cmd, data[union:], pointer + union), cmd or f"unknown EVTCHNOP {cmd_value}"


def _console_io(ctx: _Ctx, args: list[Arg]) -> Detail:
    if ctx.abi.enum("CONSOLEIO").name_of(args[0].value) != "CONSOLEIO_write":
        return None
    count = args[1].value & 0xFFFFFFFF
    shown = min(count, MAX_CONSOLE_TEXT)
    try:
        data = ctx.read(args[2].value, shown)
    except UnreadableMemory:
        ctx.add(rules.unreadable("console buffer", args[2].value))
        return None
    return Text(args[2].value, data.decode("utf-8", "replace"), truncated=count > shown)


def _request_array(ctx: _Ctx, struct: str, args: list[Arg],
                   describe: Callable[[Fields], tuple[tuple[str, int | str], ...]]) -> Detail:
    """mmu_update/mmuext_op: (requests, count, done, foreigndom), one row per request."""
    lay = ctx.abi.layout(struct)
    count = args[1].value & 0x7FFFFFFF  # bit 31 of the count marks a preempted continuation
    shown = min(count, MAX_ARRAY_ROWS)
    rows = []
    for i, row in enumerate(ctx.read_array(lay, args[0].value, shown)):
        if row is None:
            ctx.add(rules.unreadable(f"{struct}[{i}]", args[0].value + i * lay.size))
            break
        rows.append(describe(row))
    return TableOf(struct, args[0].value, tuple(rows), truncated=count > shown)


def _mmu_update(ctx: _Ctx, args: list[Arg]) -> Detail:
    types = ctx.abi.enum("MMU")

    def describe(row: Fields) -> tuple[tuple[str, int | str], ...]:
        ptr = int(row["ptr"])
        kind = types.name_of(ptr & 3) or f"type {ptr & 3}"  # the request type is in ptr's low bits
        return (("ptr", ptr & ~3), ("type", kind), ("val", int(row["val"])))

    return _request_array(ctx, "mmu_update", args, describe)


def _mmuext_op(ctx: _Ctx, args: list[Arg]) -> Detail:
    cmds = ctx.abi.enum("MMUEXT")

    def describe(row: Fields) -> tuple[tuple[str, int | str], ...]:
        cmd = int(row["cmd"])
        return (("cmd", cmds.name_of(cmd) or f"unknown {cmd}"), ("arg1", int(row["arg1"])),
                ("arg2", int(row["arg2"])))

    return _request_array(ctx, "mmuext_op", args, describe)


def _iret(ctx: _Ctx, args: list[Arg]) -> Detail:
    """HYPERVISOR_iret: the frame is on the guest stack (rax r11 rcx flags rip cs rflags rsp ss on
    64-bit; eax eip cs eflags [esp ss] on 32-bit, xen/include/public/arch-x86/xen-x86_*.h).  A 32-bit
    frame has ESP and SS only when it returns to ring 2 or 3 (compat_iret, pv/iret.c at RELEASE-4.17.0:
    a ring-1 return just pops 16 bytes), so xendbg reads them only then."""
    abi = ctx.abi
    names = (("eax", "eip", "cs", "eflags", "esp", "ss") if abi.width == 32 else
             ("rax", "r11", "rcx", "flags", "rip", "cs", "rflags", "rsp", "ss"))
    word = abi.width // 8
    stack = ctx.stack
    if (stack is None and ctx.in_xen) or (stack is not None and stack.sp is None):
        ctx.add(Finding("iret-frame-unknown", "info", "the iret frame is on the guest's stack, whose pointer "
                        "xendbg does not know at a Xen handler's entry (catch at pv_hypercall or guest side "
                        "to see it)"))
        return None
    # Stopped in a stub before its pushes: the frame's first words are still in registers.
    pushed = stack.pushed[:len(names)] if stack is not None else ()
    if None in pushed:
        ctx.add(Finding("iret-frame-unknown", "info", "the stub pushes part of the iret frame from an operand "
                        "xendbg cannot read: step to the hypercall instruction to see it"))
        return None
    try:
        sp = stack.sp if stack is not None and stack.sp is not None else ctx.target.read_register(
            "esp" if abi.width == 32 else "rsp")
        values = [int(v) for v in pushed if v is not None]
        values += _stack_words(ctx, sp + word * len(values), (4 if abi.width == 32 else len(names)) - len(values))
        if abi.width == 32 and values[2] & 2:  # back to ring 2 or 3: ESP and SS follow
            values += _stack_words(ctx, sp + 4 * word, 2)
    except UnreadableMemory as exc:
        ctx.add(rules.unreadable("iret frame", exc.address))
        return None
    except UnknownRegister:  # no stack pointer (an offline decode without it)
        return None
    if abi.width == 32 and values[2] & 3 == 0 and at_least(abi.generation, "4.17"):
        ctx.add(Finding("iret-ring-0", "error", f"the frame returns to ring 0 (cs {values[2]:#06x}): Xen "
                        f"{abi.generation} crashes the domain (compat_iret)"))
    return StructFields("iret_context", sp, tuple(zip(names, values, strict=False)))


def _stack_words(ctx: _Ctx, address: int, count: int) -> list[int]:
    word = ctx.abi.width // 8
    data = ctx.read(address, word * count) if count > 0 else b""
    return [int.from_bytes(data[i * word:(i + 1) * word], "little") for i in range(max(count, 0))]


_DETAILS: dict[str, Callable[[_Ctx, list[Arg]], Detail]] = {
    "set_trap_table": _set_trap_table,
    "set_callbacks": _set_callbacks,
    "stack_switch": _stack_switch,
    "callback_op": _callback_op,
    "set_fast_trap@2.0": _set_fast_trap,
    "multicall": _multicall_detail,
    "vcpu_op": _vcpu_op,
    "sched_op": _sched_op,
    "sched_op_compat": _sched_op_compat,
    "sched_op@2.0": _sched_op_compat,
    "event_channel_op": _event_channel_op,
    "console_io": _console_io,
    "mmu_update": _mmu_update,
    "mmuext_op": _mmuext_op,
    "iret": _iret,
}


def _subop(args: list[Arg]) -> str | None:
    for arg in args:
        if arg.kind.startswith("cmd:"):
            return arg.text
    return None


def _decode(target: Target, abi: Abi, nr: int, raw_args: list[int] | tuple[int, ...],
            state: GuestState | None, depth: int, where: str = "", site: str = "",
            stack: GuestStack | None = None, in_xen: bool = False) -> Hypercall:
    ctx = _Ctx(target, abi, state, depth, stack, in_xen)
    mask = abi.address_mask
    raw = [v & mask for v in raw_args]
    slot = rules.dispatched_number(abi, nr)  # old Xen masks a number past its table (rules.py)
    hc = abi.hypercall(slot)
    if slot != nr:
        ctx.add(rules.wrapped_hypercall(abi, nr, hc.name if hc else None))
    if hc is None:
        if slot != nr:
            pass  # the wrap finding says what runs
        elif nr == abi.removed_fast_trap_nr:
            ctx.add(rules.check_fast_trap(abi, 0, None))  # says set_fast_trap was removed in 3.0
        else:
            ctx.add(rules.unknown_hypercall(abi, nr))
        unknown = tuple(Arg(f"arg{i}", "ulong", v) for i, v in enumerate(raw[:5]))
        return Hypercall(nr, None, unknown, abi.generation, abi.width, findings=_located(ctx.findings, where),
                         site=site)
    raw += [0] * (len(hc.args) - len(raw))
    args = [_arg(ctx, spec, value) for spec, value in zip(hc.args, raw, strict=False)]
    subop = _subop(args)
    detail: Detail = None
    if hc.signature in ("event_channel_op_compat", "event_channel_op@2.0"):
        detail, subop = _event_channel_op_compat(ctx, args)
    elif hc.signature in _DETAILS:
        detail = _DETAILS[hc.signature](ctx, args)
    elif hc.name in _DETAILS:
        detail = _DETAILS[hc.name](ctx, args)
    return Hypercall(nr, hc.name, tuple(args), abi.generation, abi.width, hc.former_names, subop, detail,
                     _located(ctx.findings, where), site, stack=stack)


def _located(findings: list[Finding], where: str) -> tuple[Finding, ...]:
    """Findings of a batched call say which entry they are about ("multicall entry 2: ...")."""
    return tuple(replace(f, message=f"{where}: {f.message}") if where else f for f in findings)


def decode_call(target: Target, abi: Abi, nr: int, args: list[int] | tuple[int, ...], *,
                state: GuestState | None = None, site: str = "") -> Hypercall:
    """Decode hypercall `nr` with raw argument values `args` (in ABI order)."""
    return _decode(target, abi, nr, list(args), state, 0, site=site)


def decode_pending(target: Target, abi: Abi, *, state: GuestState | None = None,
                   code_at_pc: bytes | None = None) -> Hypercall:
    """Decode the hypercall a stopped vCPU is about to make (at the instruction or in its stub)."""
    pending = arch.pending_call(target, abi.width, code_at_pc=code_at_pc)
    stack = None
    if pending.site.pushes:  # stopped in a stub before its pushes: the stack is lower at the instruction
        try:
            sp = target.read_register("esp" if abi.width == 32 else "rsp")
        except UnknownRegister:
            sp = None  # an offline decode without a stack pointer
        if sp is not None:
            stack = GuestStack((sp - pending.site.pushes) & abi.address_mask,
                               arch.stub_pushed_words(target, pending.site, abi.width))
    return _decode(target, abi, pending.nr, list(pending.args), state, 0, site=pending.site.describe(),
                   stack=stack)


def decode_in_xen(target: Target, function: str, abi_for_width: Callable[[int, int | None], Abi], *,
                  state: GuestState | None = None) -> Hypercall:
    """Decode the hypercall a vCPU stopped inside Xen is serving: at the entry of its handler
    (`do_multicall`, `compat_vcpu_op`, ...), of `pv_hypercall` / `do_entry_int82`, or of the int $0x82
    gate.  `abi_for_width(width, code_selector)` picks the ABI once the guest's width is known (the
    handler's prefix, or the code selector in the saved frame, which it also gets when known)."""
    if function in arch.XEN_FRAME_ENTRIES:
        entry = arch.guest_frame_entry(target, target.read_register("rdi"), function)
    elif function == arch.XEN_GATE_ENTRY:
        entry = arch.gate_entry(target)
    else:
        entry = arch.handler_entry(target, function)
    abi = abi_for_width(entry.width, entry.guest_cs)
    nr = entry.nr
    if nr is None:
        known = abi.hypercall_named(entry.name or "")
        if known is None:
            raise DecodeError(f"{function} serves {entry.name}, which Xen {abi.generation} has no number for")
        nr = known.nr
    guest_sp = entry.guest_sp
    multicall, iret = abi.hypercall_named("multicall"), abi.hypercall_named("iret")
    batching = {multicall.nr} if multicall else set()
    if guest_sp is None and entry.site.kind == "handler" and (nr in batching or (iret is not None and nr == iret.nr)):
        # An iret, alone or batched, reads the guest's stack, whose pointer is in the frame Xen saved;
        # other calls spare the read.
        frame = arch.handler_guest_frame(target, {nr} | batching)
        guest_sp = frame.guest_sp if frame is not None and frame.width == entry.width else None
    return _decode(target, abi, nr, list(entry.args), state, 0, site=entry.site.describe(),
                   stack=GuestStack(guest_sp), in_xen=True)


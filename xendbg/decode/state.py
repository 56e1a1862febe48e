"""What a guest has registered with Xen, replayed from the hypercalls xendbg has seen, and Xen's rules
run over it.

Xen keeps trap tables and callbacks per vCPU; the front end keeps one GuestState per vCPU and feeds
each decoded call (with its result once known) to `apply`.  Replay follows Xen's own semantics:
- set_trap_table merges entries by vector, stops at the first entry Xen refuses (2.0/3.0.0: wrong
  RPL; 4.x: non-canonical address), and from 3.0.2 a NULL table clears the whole virtual IDT
  (xen/arch/x86/traps.c at 3.0.2-branched and RELEASE-4.0.0; xen/arch/x86/pv/callback.c at
  RELEASE-4.17.0); 2.0 and 3.0.0 fail a NULL table with -EFAULT.
- set_callbacks / callback_op replace one callback each; a call Xen refuses changes nothing.
- set_fast_trap (2.0 only) copies the trap-table entry of its vector into a real gate at call time
  (xen/arch/x86/traps.c at RELEASE-2.0.0), so re-registering that vector later leaves the gate stale.
- a multicall applies its entries in order.
- VCPUOP_initialise gives the new vCPU the whole context it was handed (arch_set_info_guest,
  xen/arch/x86/domain.c at RELEASE-3.0.0 and RELEASE-4.0.0): its trap table and callbacks start as the
  context's, not as those of the vCPU that made the call (`seed_initialised_vcpu`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from xendbg import arch
from xendbg.abi import TRAP_FLAG_IF, Abi
from xendbg.abi.layouts import unpack
from xendbg.decode import rules
from xendbg.decode.hypercall import trap_entry
from xendbg.decode.model import (
    Callback,
    Callbacks,
    FastTrap,
    Finding,
    GuestState,
    Hypercall,
    MulticallBatch,
    TrapEntry,
    TrapTable,
)
from xendbg.errors import UnreadableMemory
from xendbg.target import Target

TRAP_NMI = 2  # the NMI's vector (TRAP_nmi, xen/include/asm-x86/processor.h)


def _refused(findings: list[Finding]) -> bool:
    return any(f.severity == "error" for f in findings)


def _apply_trap_table(state: GuestState, abi: Abi, table: TrapTable) -> str:
    if table.address == 0 and not table.entries:
        if abi.null_trap_table_clears:
            state.trap_table.clear()
            state.table = table
            return "trap table cleared (NULL table)"
        return "NULL trap table: refused (-EFAULT)"
    applied = 0
    for entry in table.entries:
        what = f"trap {entry.vector:#x}"
        if _refused(rules.check_code_selector(abi, entry.cs, what) + rules.check_code_address(abi, entry.address,
                                                                                             what)):
            break
        state.trap_table[entry.vector] = held_trap_entry(abi, entry)
        applied += 1
    state.table = table
    return f"trap table: {applied} of {len(table.entries)} entries applied"


def _apply_callbacks(state: GuestState, abi: Abi, callbacks: Callbacks, findings: tuple[Finding, ...]) -> str:
    if _refused(list(findings)):
        return f"{callbacks.operation} refused: nothing changes"
    for cb in callbacks.entries:
        if callbacks.operation == "unregister":
            state.callbacks.pop(cb.kind, None)
        else:
            state.callbacks[cb.kind] = _held_callback(abi, cb)
        if cb.kind == "nmi":
            # register_guest_nmi_callback (xen/arch/x86/traps.c, RELEASE-4.0.0; pv/callback.c, RELEASE-4.17.0):
            # the NMI callback is trap_ctxt[2], with the IF flag and the flat kernel CS; unregistering clears it.
            if callbacks.operation == "unregister":
                state.trap_table.pop(TRAP_NMI, None)
            else:
                state.trap_table[TRAP_NMI] = TrapEntry(
                    len(state.trap_table), TRAP_NMI, arch.vector_name(TRAP_NMI), TRAP_FLAG_IF, 0, True,
                    abi.kernel_cs, abi.kernel_cs & 3, cb.address)
    kinds = ", ".join(cb.kind for cb in callbacks.entries)
    return f"callbacks {'unregistered' if callbacks.operation == 'unregister' else 'registered'}: {kinds}"


def _apply_fast_trap(state: GuestState, fast: FastTrap, findings: tuple[Finding, ...]) -> str:
    if _refused(list(findings)):
        return "set_fast_trap refused: nothing changes"
    if fast.vector == 0:
        state.fast_trap = None
        return "fast trap disabled"
    # The gate takes the handler registered *now*: remember it, later set_trap_table calls do not move it.
    state.fast_trap = FastTrap(fast.vector, fast.vector_name, state.trap_table.get(fast.vector))
    return f"fast trap: vector {fast.vector:#x}"


def apply(state: GuestState, abi: Abi, call: Hypercall, result: int | None = None) -> list[str]:
    """Replay one decoded hypercall into `state`; returns what changed, one line each.

    `result` is Xen's return value when known: a negative one means Xen refused the call (a
    multicall's own result says nothing about its entries, whose results are in the batch)."""
    if result is not None and result < 0 and call.name != "multicall":
        return []
    detail = call.detail
    changes: list[str] = []
    if call.name == "set_trap_table" and isinstance(detail, TrapTable):  # a NULL table decodes as empty
        changes.append(_apply_trap_table(state, abi, detail))
    elif isinstance(detail, Callbacks):
        changes.append(_apply_callbacks(state, abi, detail, call.findings))
    elif isinstance(detail, FastTrap):
        changes.append(_apply_fast_trap(state, detail, call.findings))
    elif isinstance(detail, MulticallBatch):
        for entry in detail.entries:
            if entry.result is not None and entry.result < 0:
                continue
            changes += [f"multicall entry {entry.index}: {c}" for c in apply(state, abi, entry.call)]
    if changes:
        state.history.append(f"{call.display_name}: {'; '.join(changes)}")
        state.width = call.width
    return changes


def _fixed(abi: Abi, selector: int) -> int:
    """A selector as Xen keeps it: from 3.0.2 an RPL below the kernel's is raised to it
    (__fixup_guest_selector in asm/desc.h at RELEASE-4.17.0: 1 for a 32-bit guest, 3 for a 64-bit one)."""
    if abi.rejects_bad_selectors or selector & 3 >= abi.kernel_rpl:
        return selector
    return (selector & ~3) | abi.kernel_rpl


def held_trap_entry(abi: Abi, entry: TrapEntry) -> TrapEntry:
    """A trap-table entry as Xen stores it in the virtual IDT, with what the guest passed when it differs."""
    held = _fixed(abi, entry.cs)
    if held == entry.cs:
        return entry
    return replace(entry, cs=held, rpl=held & 3, passed_cs=entry.cs)


def _held_callback(abi: Abi, cb: Callback) -> Callback:
    if cb.selector is None or _fixed(abi, cb.selector) == cb.selector:
        return cb
    held = _fixed(abi, cb.selector)
    return replace(cb, selector=held, rpl=held & 3, passed_selector=cb.selector)


def _initialise_calls(call: Hypercall, result: int | None) -> list[Hypercall]:
    """The VCPUOP_initialise calls Xen accepted in `call` (itself, or entries of its multicall batch)."""
    if isinstance(call.detail, MulticallBatch):
        return [c for e in call.detail.entries for c in _initialise_calls(e.call, e.result)]
    if call.name == "vcpu_op" and call.subop == "VCPUOP_initialise" and result == 0 and len(call.args) >= 3:
        return [call]
    return []


def seed_initialised_vcpu(state_of: Callable[[int], GuestState], target: Target, abi: Abi, call: Hypercall,
                          result: int | None) -> list[str]:
    """After `call` came back with `result`: each VCPUOP_initialise in it that Xen accepted starts the new
    vCPU's registered state (`state_of(vcpu)`) from the context it handed over, re-read from the target:
    Xen copies the whole context (arch_set_info_guest, xen/arch/x86/domain.c, RELEASE-3.0.0 and
    RELEASE-4.0.0), its trap table and callbacks included, with 3.0.2's selector fix-ups.  Returns what
    changed, one line per seeded vCPU; [] for any other call or a failed one."""
    changes: list[str] = []
    initialised = _initialise_calls(call, result)
    if not initialised:
        return changes  # most calls: nothing to seed (and Xen 2.0 has no vcpu_guest_context at all)
    lay = abi.layout("vcpu_guest_context")
    for init in initialised:
        vcpu, pointer = init.args[1].value, init.args[2].value
        try:
            ctxt = unpack(lay, target.read_memory(pointer & abi.address_mask, lay.size), abi.width, abi.era)
        except UnreadableMemory:
            changes.append(f"vCPU {vcpu}: its initial context at {pointer:#x} is unreadable now; not seeded")
            continue
        rows = ctxt["trap_ctxt"]
        assert isinstance(rows, list)
        state = state_of(vcpu)
        state.trap_table.clear()
        for vector, row in enumerate(rows):
            if row["address"]:
                entry = trap_entry(len(state.trap_table), row)
                state.trap_table[vector] = held_trap_entry(abi, replace(entry, vector=vector,
                                                                        vector_name=arch.vector_name(vector)))
        state.table = TrapTable(pointer + lay.field("trap_ctxt").offset, tuple(state.trap_table.values()), True,
                                f"the trap_ctxt of vCPU {vcpu}'s initial context")
        state.callbacks.clear()
        kinds = ("event", "failsafe") if abi.width == 32 else ("event", "failsafe", "syscall")
        for kind in kinds:
            address = int(ctxt[f"{kind}_callback_eip"])
            if not address:
                continue
            selector = int(ctxt[f"{kind}_callback_cs"]) & 0xFFFF if abi.width == 32 else None
            state.callbacks[kind] = _held_callback(abi, Callback(kind, address, selector,
                                                                 None if selector is None else selector & 3))
        state.fast_trap = None
        state.width = abi.width
        line = (f"trap table of {len(state.trap_table)} entries and callbacks "
                f"{', '.join(state.callbacks) or '(none)'} from its initial context")
        state.history.append(f"VCPUOP_initialise: {line}")
        changes.append(f"vCPU {vcpu}: {line}")
    return changes


def check_state(state: GuestState, abi: Abi) -> list[Finding]:
    """Xen's rules over everything the guest has registered (as far as xendbg has seen); each finding's
    subject says what it is about (trap_table, callbacks, fast_trap, state)."""
    if not state.seen_anything:
        return [Finding("state-unknown", "info", "xendbg has seen no registration from this vCPU yet "
                        "(it sees the hypercalls made while xen catch, xen trace or xen break is active)",
                        subject="state")]
    traps: list[Finding] = []
    by_selector: dict[int, list[int]] = {}
    for vector, entry in sorted(state.trap_table.items()):  # the rules are about what the guest passed
        by_selector.setdefault(entry.cs if entry.passed_cs is None else entry.passed_cs, []).append(vector)
        traps += rules.check_code_address(abi, entry.address, f"trap table entry for vector {vector:#x}")
    for selector, vectors in by_selector.items():  # one finding per selector, not per vector
        traps += rules.check_code_selector(abi, selector, f"trap table entries for {rules.vector_list(vectors)}")
    if state.table is not None and arch.PAGE_FAULT not in state.trap_table:
        traps.append(Finding("no-page-fault-handler", "warning",
                             "the trap table has no page-fault (#PF, vector 14) handler: Xen has nowhere to "
                             "bounce the guest's page faults (Xen 4.17, for one, logs 'Unhandled: vec 14')"))
    callbacks: list[Finding] = []
    for kind, cb in state.callbacks.items():
        if cb.selector is not None:
            passed = cb.selector if cb.passed_selector is None else cb.passed_selector
            callbacks += rules.check_code_selector(abi, passed, f"{kind} callback")
        callbacks += rules.check_code_address(abi, cb.address, f"{kind} callback")
    if "event" not in state.callbacks and state.callbacks:
        callbacks.append(Finding("no-event-callback", "warning",
                                 f"no event callback registered: Xen cannot deliver event-channel upcalls; "
                                 f"{rules.null_delivery(abi, 'the event callback')}"))
    fast: list[Finding] = []
    gate = state.fast_trap
    if gate is not None and gate.handler is not None:
        current = state.trap_table.get(gate.vector)
        if current is not None and current.address != gate.handler.address:
            fast.append(Finding("fast-trap-stale", "warning",
                                f"the fast-trap gate for vector {gate.vector:#x} still enters "
                                f"{gate.handler.address:#x}; the trap table now says {current.address:#x}: "
                                f"Xen 2.0 copies the handler at set_fast_trap time, so call it again"))
    return ([replace(f, subject="trap_table") for f in traps] + [replace(f, subject="callbacks") for f in callbacks]
            + [replace(f, subject="fast_trap") for f in fast])

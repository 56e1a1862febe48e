"""Registered-state replay (decode/state.py) and decoding from inside Xen (decode_in_xen)."""

from __future__ import annotations

import pytest

from tests.unit.images import pack, pack_many, registers, stub
from xendbg.abi import get_abi
from xendbg.abi.layouts import ERA_3, layout
from xendbg.decode import GuestState, decode_call, decode_in_xen, decode_pending
from xendbg.decode.state import apply, check_state
from xendbg.errors import DecodeError
from xendbg.target import InMemoryTarget

TABLE, PC = 0x10000, 0x7000


def decoded(version: str, width: int, nr: int, *args: int, memory=()):
    abi = get_abi(version, width)
    target = InMemoryTarget(registers(width, nr, *args, pc=PC), [(PC, stub(width, nr)), *memory])
    return abi, decode_pending(target, abi)


def table(abi, rows):
    return [(TABLE, pack_many(abi, "trap_info", [*rows, {"vector": 0, "address": 0}]))]


def test_trap_tables_merge_by_vector():
    abi = get_abi("4.17", 64)
    state = GuestState()
    _, first = decoded("4.17", 64, 0, TABLE, memory=table(abi, [
        {"vector": 3, "cs": 0xE033, "address": 0xFFFFFFFF81000030},
        {"vector": 14, "cs": 0xE033, "address": 0xFFFFFFFF810000E0}]))
    assert apply(state, abi, first) == ["trap table: 2 of 2 entries applied"]
    _, second = decoded("4.17", 64, 0, TABLE, memory=table(abi, [
        {"vector": 14, "cs": 0xE033, "address": 0xFFFFFFFF81000EEE}]))
    apply(state, abi, second)
    assert sorted(state.trap_table) == [3, 14]
    assert state.trap_table[14].address == 0xFFFFFFFF81000EEE
    assert state.trap_table[3].address == 0xFFFFFFFF81000030
    assert len(state.history) == 2


def test_old_xen_stops_at_the_refused_entry_and_failed_calls_change_nothing():
    abi = get_abi("2.0", 32)
    state = GuestState()
    _, hc = decoded("2.0", 32, 0, TABLE, memory=table(abi, [
        {"vector": 3, "cs": 0x0819, "address": 0xC0001030},
        {"vector": 6, "cs": 0x0818, "address": 0xC0001060},   # RPL 0: -EPERM here
        {"vector": 13, "cs": 0x0819, "address": 0xC00010D0}]))
    assert apply(state, abi, hc) == ["trap table: 1 of 3 entries applied"]
    assert sorted(state.trap_table) == [3]
    fresh = GuestState()
    assert apply(fresh, abi, hc, result=-1) == []
    assert not fresh.seen_anything


@pytest.mark.parametrize("version,cleared", [("4.17", True), ("3.0", False)])
def test_null_trap_table(version, cleared):
    abi = get_abi(version, 32)
    state = GuestState()
    apply(state, abi, decoded(version, 32, 0, TABLE, memory=table(abi, [
        {"vector": 3, "cs": abi.kernel_cs, "address": 0xC0001030}]))[1])
    _, null = decoded(version, 32, 0, 0)
    apply(state, abi, null)
    assert (state.trap_table == {}) is cleared


def test_callbacks_replace_and_refusals_keep_the_old_ones():
    abi = get_abi("3.0", 32)
    state = GuestState()
    apply(state, abi, decoded("3.0", 32, 4, 0xE019, 0xC0100000, 0xE019, 0xC0100100)[1])
    assert state.callbacks["event"].address == 0xC0100000
    # RPL 0 selector: Xen 3.0.0 refuses the whole call with -EPERM.
    changes = apply(state, abi, decoded("3.0", 32, 4, 0xE018, 0xC0200000, 0xE019, 0xC0200100)[1])
    assert changes == ["set_callbacks refused: nothing changes"]
    assert state.callbacks["event"].address == 0xC0100000


def test_callback_op_in_a_multicall_is_applied():
    abi = get_abi("4.17", 64)
    reg = pack(abi, "callback_register", type=0, flags=0, address=0xFFFFFFFF81002000)
    entry = pack(abi, "multicall_entry", op=30, args=[0, 0x9000, 0, 0, 0, 0])
    _, hc = decoded("4.17", 64, 13, 0x8000, 1, memory=[(0x8000, entry), (0x9000, reg)])
    state = GuestState()
    assert apply(state, abi, hc) == ["multicall entry 0: callbacks registered: event"]
    assert state.callbacks["event"].address == 0xFFFFFFFF81002000


def test_fast_trap_gate_goes_stale_when_its_vector_is_re_registered():
    abi = get_abi("2.0", 32)
    state = GuestState()
    apply(state, abi, decoded("2.0", 32, 0, TABLE, memory=table(abi, [
        {"vector": 0x80, "flags": 3, "cs": 0x0819, "address": 0xC0008000},
        {"vector": 14, "cs": 0x0819, "address": 0xC00010E0}]))[1])
    fast_nr = abi.hypercall_named("set_fast_trap").nr
    target = InMemoryTarget(registers(32, fast_nr, 0x80, pc=PC), [(PC, stub(32, fast_nr))])
    apply(state, abi, decode_pending(target, abi, state=state))
    assert state.fast_trap.handler.address == 0xC0008000
    assert [f.rule for f in check_state(state, abi)] == []
    apply(state, abi, decoded("2.0", 32, 0, TABLE, memory=table(abi, [
        {"vector": 0x80, "flags": 3, "cs": 0x0819, "address": 0xC0009000}]))[1])
    assert [f.rule for f in check_state(state, abi)] == ["fast-trap-stale"]


def test_check_state_reports_nothing_seen_and_missing_handlers():
    abi = get_abi("4.17", 64)
    state = GuestState()
    assert [f.rule for f in check_state(state, abi)] == ["state-unknown"]
    apply(state, abi, decoded("4.17", 64, 0, TABLE, memory=table(abi, [
        {"vector": 3, "cs": 0xE030, "address": 0xFFFFFFFF81000030}]))[1])
    assert [(f.rule, f.severity) for f in check_state(state, abi)] == [
        ("selector-rpl", "info"), ("no-page-fault-handler", "warning")]


# --- decoding from inside Xen ---------------------------------------------------------------------

def abi_for(width: int, code_selector: int | None = None):
    return get_abi("4.17", width)


def test_at_a_handler_the_arguments_are_c_arguments():
    abi = get_abi("4.17", 64)
    entry = pack(abi, "multicall_entry", op=17, args=[0, 0, 0, 0, 0, 0])
    # rdi, rsi as a C call; r10 (the guest's 4th register) must not be used.
    regs = {"rip": 0xFFFF82D040200000, "rdi": 0x8000, "rsi": 1, "rdx": 0, "rcx": 7, "r8": 0, "r10": 99,
            "cs": 0xE008}
    hc = decode_in_xen(InMemoryTarget(regs, [(0x8000, entry)]), "do_multicall", abi_for)
    assert (hc.name, hc.width, hc.args[0].value, hc.args[1].value) == ("multicall", 64, 0x8000, 1)
    assert hc.detail.entries[0].call.name == "xen_version"
    assert "do_multicall" in hc.site


def test_compat_handler_means_a_32_bit_guest():
    regs = {"rip": 0xFFFF82D040200000, "rdi": 3, "rsi": 0xC0001000, "rdx": 0, "rcx": 0, "r8": 0}
    hc = decode_in_xen(InMemoryTarget(regs), "compat_vcpu_op", abi_for)
    assert (hc.name, hc.width, hc.subop) == ("vcpu_op", 32, "VCPUOP_is_up")


def test_at_pv_hypercall_the_guest_frame_is_read():
    lay = layout("cpu_user_regs", 64, ERA_3)
    frame = bytearray(lay.size)

    def put(name: str, value: int) -> None:
        f = lay.field(name)
        size = {"u64": 8, "u32": 4, "u16": 2, "u8": 1}[f.kind]
        frame[f.offset:f.offset + size] = value.to_bytes(size, "little")

    put("rax", 24)   # vcpu_op
    put("rdi", 3)    # VCPUOP_is_up
    put("rsi", 1)
    put("rip", 0xFFFFFFFF81001005)
    put("cs", 0xE033)
    hc = decode_in_xen(InMemoryTarget({"rdi": 0xFFFF830000001000}, [(0xFFFF830000001000, bytes(frame))]),
                       "pv_hypercall", abi_for)
    assert (hc.name, hc.subop, hc.width, hc.args[1].value) == ("vcpu_op", "VCPUOP_is_up", 64, 1)
    assert "0xffffffff81001005" in hc.site


def test_not_a_handler():
    with pytest.raises(DecodeError, match="not a Xen hypercall handler"):
        decode_in_xen(InMemoryTarget({"rip": 0}), "schedule", abi_for)
    with pytest.raises(DecodeError, match="no number"):
        decode_in_xen(InMemoryTarget({"rip": 0, "rdi": 0, "rsi": 0, "rdx": 0, "rcx": 0, "r8": 0}),
                      "do_no_such_call", abi_for)


def test_replay_is_independent_of_how_the_call_was_decoded():
    abi = get_abi("4.17", 64)
    regs = registers(64, 4, 0xFFFFFFFF81001000, 0xFFFFFFFF81002000, 0)
    hc = decode_call(InMemoryTarget(regs), abi, 4, (0xFFFFFFFF81001000, 0xFFFFFFFF81002000, 0))
    state = GuestState()
    apply(state, abi, hc)
    assert {k: c.address for k, c in state.callbacks.items()} == {
        "event": 0xFFFFFFFF81001000, "failsafe": 0xFFFFFFFF81002000, "syscall": 0}


# --- what replay and check_state say, word for word ----------------------------------------------------

def test_check_state_messages():
    from xendbg.decode import Callback, TrapTable

    abi = get_abi("4.17", 64)
    state = GuestState()
    (f,) = check_state(state, abi)
    assert (f.rule, f.severity, f.message) == (
        "state-unknown", "info", "xendbg has seen no registration from this vCPU yet (it sees the hypercalls made "
        "while xen catch, xen trace or xen break is active)")
    _, hc = decoded("4.17", 64, 0, TABLE, memory=table(abi, [
        {"vector": 3, "cs": 0xE030, "address": 0xFFFFFFFF81000030},
        {"vector": 6, "cs": 0xE030, "address": 0xFFFFFFFF81000060},
        {"vector": 14, "cs": 0xE033, "address": 0xFFFFFFFF810000E0}]))
    apply(state, abi, hc)
    state.trap_table[13] = state.trap_table[14].__class__(**{**state.trap_table[14].__dict__, "vector": 13,
                                                             "address": 0x0000900000000000})
    state.callbacks["failsafe"] = Callback("failsafe", 0xFFFF900000000000)
    assert [(f.rule, f.severity, f.message) for f in check_state(state, abi)] == [
        ("non-canonical", "error", "trap table entry for vector 0xd: address 0x0000900000000000 is not canonical: "
                                   "Xen 4.17 rejects the call with -EINVAL"),
        ("selector-rpl", "info", "trap table entries for vectors 0x3, 0x6: selector 0xe030 has RPL 0; Xen 4.17 "
                                 "silently raises it to the 64-bit PV kernel's RPL 3 (0xe033)"),
        ("no-event-callback", "warning", "no event callback registered: Xen cannot deliver event-channel upcalls; "
                                         "Xen 4.17 crashes the domain when it has to deliver to the event callback, "
                                         "whose address is 0")]
    del state.trap_table[14]
    (f,) = [f for f in check_state(state, abi) if f.rule == "no-page-fault-handler"]
    assert (f.severity, f.message) == ("warning", "the trap table has no page-fault (#PF, vector 14) handler: Xen "
                                       "has nowhere to bounce the guest's page faults (Xen 4.17, for one, logs "
                                       "'Unhandled: vec 14')")
    state.table = None  # no set_trap_table seen: xendbg cannot tell what Xen's table holds
    assert "no-page-fault-handler" not in [f.rule for f in check_state(state, abi)]
    state.table = TrapTable(0, (), True)
    assert "no-page-fault-handler" in [f.rule for f in check_state(state, abi)]


def test_fast_trap_replay_messages_and_staleness():
    from xendbg.decode import FastTrap

    abi = get_abi("2.0", 32)
    state = GuestState()
    changes = apply(state, abi, decoded("2.0", 32, 0, TABLE, memory=table(abi, [
        {"vector": 0x80, "flags": 3, "cs": 0x0819, "address": 0xC0008000},
        {"vector": 14, "cs": 0x0819, "address": 0xC00010E0}]))[1])
    assert changes == ["trap table: 2 of 2 entries applied"]
    assert state.history == ["set_trap_table: trap table: 2 of 2 entries applied"]
    target = InMemoryTarget(registers(32, 11, 0x80, pc=PC), [(PC, stub(32, 11))])
    assert apply(state, abi, decode_pending(target, abi, state=state)) == ["fast trap: vector 0x80"]
    assert state.fast_trap == FastTrap(0x80, "int 0x80", state.trap_table[0x80])
    bad = InMemoryTarget(registers(32, 11, 0x81, pc=PC), [(PC, stub(32, 11))])
    assert apply(state, abi, decode_pending(bad, abi, state=state)) == ["set_fast_trap refused: nothing changes"]
    assert state.fast_trap.vector == 0x80
    moved = state.trap_table[0x80].__class__(**{**state.trap_table[0x80].__dict__, "address": 0xC0009000})
    state.trap_table[0x80] = moved
    (f,) = check_state(state, abi)
    assert (f.rule, f.severity, f.message) == (
        "fast-trap-stale", "warning", "the fast-trap gate for vector 0x80 still enters 0xc0008000; the trap table "
        "now says 0xc0009000: Xen 2.0 copies the handler at set_fast_trap time, so call it again")
    del state.trap_table[0x80]  # no entry now: nothing to compare with
    assert [f.rule for f in check_state(state, abi)] == []
    off = InMemoryTarget(registers(32, 11, 0, pc=PC), [(PC, stub(32, 11))])
    assert apply(state, abi, decode_pending(off, abi, state=state)) == ["fast trap disabled"]
    assert state.fast_trap is None


def test_null_table_replay_messages():
    for version, message, cleared in (("4.17", "trap table cleared (NULL table)", True),
                                      ("3.0", "NULL trap table: refused (-EFAULT)", False)):
        abi = get_abi(version, 32)
        state = GuestState()
        state.trap_table[3] = "old entry"  # type: ignore[assignment]
        assert apply(state, abi, decoded(version, 32, 0, 0)[1]) == [message]
        assert (state.trap_table == {}) is cleared and (state.table is not None) is cleared


def test_replay_of_callbacks_and_batches_messages():
    abi = get_abi("4.17", 64)
    state = GuestState()
    assert apply(state, abi, decoded("4.17", 64, 4, 0xFFFFFFFF81001000, 0xFFFFFFFF81002000, 0)[1]) == [
        "callbacks registered: event, failsafe, syscall"]
    entries = pack_many(abi, "multicall_entry", [
        {"op": 30, "result": 0, "args": [0, 0x9000]},
        {"op": 30, "result": 2**64 - 22, "args": [0, 0x9100]}])  # refused by Xen: not applied
    memory = [(0x8000, entries), (0x9000, pack(abi, "callback_register", type=4, address=0xFFFFFFFF81003000)),
              (0x9100, pack(abi, "callback_register", type=0, address=0xFFFFFFFF81004000))]
    batch, _ = decode_multicall_results(abi, memory)
    changes = apply(state, abi, batch, result=-1)  # a multicall's own result says nothing of its entries
    assert changes == ["multicall entry 0: callbacks registered: nmi"]
    assert state.callbacks["event"].address == 0xFFFFFFFF81001000
    assert state.history[-1] == "multicall: multicall entry 0: callbacks registered: nmi"
    before = list(state.history)
    assert apply(state, abi, decoded("4.17", 64, 17, 0, 0)[1]) == []  # xen_version registers nothing
    assert state.history == before


def decode_multicall_results(abi, memory):
    """A multicall as the trace sees it once Xen has run it: entries with their results."""
    from dataclasses import replace

    from xendbg.decode import decode_multicall

    batch, found = decode_multicall(InMemoryTarget(memory=memory), abi, 0x8000, 2, results=True)
    _, hc = decoded("4.17", 64, 13, 0x8000, 2, memory=memory)
    return replace(hc, detail=batch), found


def test_check_state_reports_trap_table_and_callback_findings_together():
    from xendbg.decode import Callback

    abi = get_abi("3.0", 32)
    state = GuestState()
    apply(state, abi, decoded("3.0", 32, 0, TABLE, memory=table(abi, [
        {"vector": 14, "cs": 0xE019, "address": 0xC00010E0}]))[1])
    state.trap_table[3] = state.trap_table[14].__class__(**{**state.trap_table[14].__dict__, "vector": 3,
                                                            "cs": 0xE01B})
    state.callbacks["event"] = Callback("event", 0xC0100000, 0xE018, 0)
    assert [f.message for f in check_state(state, abi)] == [
        "trap table entries for vector 0x3: selector 0xe01b has RPL 3, but a 32-bit PV kernel runs in ring 1: Xen "
        "3.0 rejects the call with -EPERM",
        "event callback: selector 0xe018 has RPL 0, but a 32-bit PV kernel runs in ring 1: Xen 3.0 rejects the call "
        "with -EPERM"]


def test_replay_edges():
    abi = get_abi("4.17", 64)
    state = GuestState()
    # Unregistering a callback xendbg never saw registered changes nothing and does not fail.
    unreg = pack(abi, "callback_unregister", type=4)
    assert apply(state, abi, decoded("4.17", 64, 30, 1, 0x9000, memory=[(0x9000, unreg)])[1]) == [
        "callbacks unregistered: nmi"]
    # An empty table (its first entry is the terminator) is not a NULL table: nothing is cleared.
    state.trap_table[3] = "old"  # type: ignore[assignment]
    assert apply(state, abi, decoded("4.17", 64, 0, TABLE, memory=table(abi, []))[1]) == [
        "trap table: 0 of 0 entries applied"]
    assert state.trap_table == {3: "old"}
    # A result of 0 is success.
    changes = apply(state, abi, decoded("4.17", 64, 4, 0xFFFFFFFF81001000, 0, 0)[1], result=0)
    assert changes == ["callbacks registered: event, failsafe, syscall"]


def test_replay_of_a_batch_goes_on_after_a_refused_entry():
    abi = get_abi("4.17", 64)
    entries = pack_many(abi, "multicall_entry", [
        {"op": 4, "result": 2**64 - 22, "args": [1, 2, 3]},  # refused
        {"op": 0, "result": 0, "args": [TABLE]},
        {"op": 4, "result": 0, "args": [0xFFFFFFFF81001000, 0, 0]}])
    memory = [(0x8000, entries)] + table(abi, [{"vector": 14, "cs": 0xE033, "address": 0xFFFFFFFF810000E0}])
    from dataclasses import replace

    from xendbg.decode import decode_multicall

    batch, _ = decode_multicall(InMemoryTarget(memory=memory), abi, 0x8000, 3, results=True)
    _, hc = decoded("4.17", 64, 13, 0x8000, 3, memory=memory)
    state = GuestState()
    assert apply(state, abi, replace(hc, detail=batch)) == [
        "multicall entry 1: trap table: 1 of 1 entries applied",
        "multicall entry 2: callbacks registered: event, failsafe, syscall"]
    assert state.history[-1] == ("multicall: multicall entry 1: trap table: 1 of 1 entries applied; multicall entry "
                                 "2: callbacks registered: event, failsafe, syscall")
    assert state.callbacks["event"].address == 0xFFFFFFFF81001000


def test_seeding_ignores_calls_that_start_no_vcpu_even_where_xen_has_no_vcpu_context():
    """Xen 2.0 has no vcpu_guest_context: a returned call that initialises no vCPU must not need one."""
    from xendbg.decode.model import Hypercall
    from xendbg.decode.state import seed_initialised_vcpu

    call = Hypercall(17, "xen_version", (), "2.0", 32)
    assert seed_initialised_vcpu(lambda vcpu: GuestState(), InMemoryTarget(), get_abi("2.0", 32), call, 0) == []


@pytest.mark.parametrize("version,width,passed,held", [
    ("4.17", 64, 0xE030, 0xE033),  # a 64-bit kernel's RPL 0 becomes 3
    ("4.17", 32, 0xE018, 0xE019),  # a 32-bit kernel's RPL 0 becomes 1
    ("4.17", 32, 0xE01A, 0xE01A),  # RPL 2 is not below 1: kept
    ("4.0", 32, 0x0818, 0x0819),
])
def test_registered_trap_table_holds_the_selector_xen_keeps(version, width, passed, held):
    """__fixup_guest_selector (asm/desc.h, RELEASE-4.17.0): Xen raises an RPL below the kernel's; the
    registered entry is what Xen holds, with what the guest passed beside it, and the rules still speak
    about what the guest passed."""
    abi = get_abi(version, width)
    table = pack_many(abi, "trap_info", [{"vector": 14, "cs": passed, "address": 0xC0101000}, {}])
    state = GuestState()
    apply(state, abi, decoded(version, width, 0, 0x9000, memory=[(0x9000, table)])[1], 0)
    entry = state.trap_table[14]
    assert (entry.cs, entry.rpl) == (held, held & 3)
    assert entry.passed_cs == (passed if held != passed else None)
    found = {(f.rule, f.severity) for f in check_state(state, abi) if f.subject == "trap_table"}
    assert (("selector-rpl", "info") in found) is (held != passed)


def test_xen_2_0_keeps_no_fixed_selector_it_refuses_the_table():
    abi = get_abi("2.0", 32)
    table = pack_many(abi, "trap_info", [{"vector": 14, "cs": 0x0818, "address": 0xC0101000}, {}])
    state = GuestState()
    apply(state, abi, decoded("2.0", 32, 0, 0x9000, memory=[(0x9000, table)])[1], 0)
    assert 14 not in state.trap_table  # 2.0 rejects RPL 0 with -EPERM (traps.c do_set_trap_table)


def test_registered_32_bit_callback_holds_the_fixed_selector():
    abi = get_abi("4.17", 32)
    state = GuestState()
    apply(state, abi, decoded("4.17", 32, 4, 0xE018, 0xC0100000, 0xE019, 0xC0100100)[1], 0)  # set_callbacks
    event, failsafe = state.callbacks["event"], state.callbacks["failsafe"]
    assert (event.selector, event.passed_selector, event.rpl) == (0xE019, 0xE018, 1)
    assert (failsafe.selector, failsafe.passed_selector) == (0xE019, None)

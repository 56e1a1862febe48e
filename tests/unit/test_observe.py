"""Watching a guest without gdb (xendbg/observe.py): probe plans for given sites and generations, which
calls a probe hit starts, repeats or continues, entry points followed across registrations, and the
scan of guest memory for the hypercall page."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.unit.images import pack_many, registers, stub
from xendbg import arch
from xendbg.abi import get_abi
from xendbg.decode import decode_pending
from xendbg.decode.model import Arg, Callback, FastTrap, GuestState, Hypercall, StructFields, TrapEntry
from xendbg.errors import XendbgError
from xendbg.observe import (
    PREEMPTED_COUNT_BIT,
    REGISTERING,
    SCAN_WINDOW,
    CallTracker,
    Catch,
    Entered,
    EntryWatch,
    GuestSite,
    PendingCall,
    ProbeSpec,
    completed_part,
    guest_sites,
    is_continuation,
    is_version_query,
    plan_gate,
    plan_guest,
    plan_xen,
    scan_memory,
    vectors_entering,
    wanted_calls,
)
from xendbg.sites import IRET_NR, SOURCE_NOTE, SOURCE_SIGNATURE, SOURCE_SYMBOL, HypercallSites, InlineSite
from xendbg.target import InMemoryTarget

PAGE = 0xFFFFFFFF81001000
PAGE32 = 0xC0001000
A417_64, A417_32 = get_abi("4.17", 64), get_abi("4.17", 32)
A20_32 = get_abi("2.0", 32)


def only(*abis):
    return lambda width: [a for a in abis if a.width == width]


# --- what to watch ----------------------------------------------------------------------------------------


def test_wanted_calls():
    assert wanted_calls([frozenset({"vcpu_op"})], active=False) == frozenset()
    assert wanted_calls([], active=True) == frozenset({*REGISTERING, "xen_version"})
    assert REGISTERING == ("set_trap_table", "set_callbacks", "callback_op", "set_fast_trap")
    assert wanted_calls([frozenset({"vcpu_op"}), frozenset({"mmu_update"})], active=True) == frozenset(
        {"set_trap_table", "set_callbacks", "callback_op", "set_fast_trap", "xen_version", "vcpu_op", "mmu_update"})
    assert wanted_calls([frozenset({"vcpu_op"}), frozenset()], active=True) is None  # an empty set: every call


def test_catch_matches():
    assert Catch().matches("anything")
    assert Catch(frozenset({"multicall"})).matches("multicall")
    assert not Catch(frozenset({"multicall"})).matches("vcpu_op")


def test_is_version_query_needs_command_zero():
    def hc(name, *values):
        return Hypercall(17, name, tuple(Arg(f"a{i}", "ulong", v) for i, v in enumerate(values)), "4.17", 64)

    assert is_version_query(hc("xen_version", 0, 0))
    assert not is_version_query(hc("xen_version", 1, 0))  # XENVER_extraversion
    assert not is_version_query(hc("xen_version"))
    assert not is_version_query(hc("vcpu_op", 0, 0))


def test_guest_sites_from_scanned_files():
    found = [
        HypercallSites("vmlinux", 64, True, PAGE, SOURCE_NOTE, (
            InlineSite("xen_hypercall_pv", 0xFFFFFFFF81002000, 0xFFFFFFFF81002003, "x86_64-pv", SOURCE_SYMBOL),
            InlineSite("xen_iret", 0xFFFFFFFF81002100, 0xFFFFFFFF8100210B, "x86_64-pv", SOURCE_SIGNATURE, IRET_NR))),
        HypercallSites("guest32", 32, True, None, "none", ()),
    ]
    assert guest_sites(found) == [
        GuestSite("page", PAGE, 64, f"by {SOURCE_NOTE}"),
        GuestSite("instruction", 0xFFFFFFFF81002003, 64, f"xen_hypercall_pv, by {SOURCE_SYMBOL}", None),
        GuestSite("instruction", 0xFFFFFFFF8100210B, 64, f"xen_iret, by {SOURCE_SIGNATURE}", IRET_NR),
    ]


# --- guest-side plans -------------------------------------------------------------------------------------


def test_a_64_bit_page_stub_probe_sits_on_its_syscall():
    page = GuestSite("page", PAGE, 64, "by symbol")
    plan = plan_guest([page], frozenset({"xen_version", "set_trap_table"}), only(A417_64))
    # multicall too: a batch may register (guest-side probes see only the batch, not its entries)
    assert plan.probes == [ProbeSpec("stub", PAGE + 32 * nr + 8, 64, nr=nr) for nr in (0, 13, 17)]
    assert plan.returns == [PAGE + 32 * nr + 10 for nr in (0, 13, 17)]
    assert plan.description == f"in the guest at 3 stubs of the hypercall page at {PAGE:#x} (by symbol)"


def test_the_iret_stub_probe_is_one_byte_later_and_has_no_return_place():
    plan = plan_guest([GuestSite("page", PAGE, 64, "found")], frozenset({"iret"}), only(A417_64))
    assert ProbeSpec("stub", PAGE + 32 * 23 + 9, 64, nr=23) in plan.probes
    assert PAGE + 32 * 23 + 11 not in plan.returns and PAGE + 32 * 23 + 10 not in plan.returns
    assert [p.address - 32 * p.nr - PAGE for p in plan.probes if p.nr != 23] == [8] * (len(plan.probes) - 1)


def test_32_bit_page_stubs():
    plan = plan_guest([GuestSite("page", PAGE32, 32, "by note")], None, only(A417_32))
    by_nr = {p.nr: p for p in plan.probes}
    assert sorted(by_nr) == [h.nr for h in A417_32.hypercalls()]
    assert by_nr[17] == ProbeSpec("stub", PAGE32 + 32 * 17 + 5, 32, nr=17)
    assert by_nr[23] == ProbeSpec("stub", PAGE32 + 32 * 23 + 6, 32, nr=23)  # push %eax first
    assert PAGE32 + 32 * 17 + 7 in plan.returns
    assert not any(PAGE32 + 32 * 23 <= r < PAGE32 + 32 * 24 for r in plan.returns)
    assert len(plan.returns) == len(plan.probes) - 1


def test_every_candidate_generations_numbers_are_watched():
    # Before the guest ran, 2.0 and 4.17 are both possible: event_channel_op is 16 in one and 32 in the
    # other, set_fast_trap exists only in 2.0.
    plan = plan_guest([GuestSite("page", PAGE32, 32, "x")], frozenset({"event_channel_op", "set_fast_trap"}),
                      only(A417_32, A20_32))
    assert [p.nr for p in plan.probes] == [11, 13, 16, 32]


def test_former_names_find_their_number():
    plan = plan_guest([GuestSite("page", PAGE, 64, "x")], frozenset({"dom0_op"}), only(A417_64))
    assert [p.nr for p in plan.probes] == [7, 13]  # platform_op, once dom0_op; and multicall


def test_an_instruction_site_filters_by_number_and_returns_two_bytes_later():
    site = GuestSite("instruction", 0xFFFFFFFF81002003, 64, "xen_hypercall_pv, by symbol")
    plan = plan_guest([site], frozenset({"xen_version"}), only(A417_64))
    assert plan.probes == [ProbeSpec("instruction", 0xFFFFFFFF81002003, 64, numbers=(13, 17))]
    assert plan.returns == [0xFFFFFFFF81002005]
    assert plan.description == ("in the guest at the hypercall instruction at 0xffffffff81002003 "
                                "(xen_hypercall_pv, by symbol)")
    unfiltered = plan_guest([site], None, only(A417_64))
    assert unfiltered.probes == [ProbeSpec("instruction", 0xFFFFFFFF81002003, 64, numbers=None)]


def test_a_fixed_iret_instruction_is_watched_only_when_wanted_and_never_returns():
    iret = GuestSite("instruction", 0xFFFFFFFF8100210B, 64, "xen_iret, by signature", IRET_NR)
    assert plan_guest([iret], frozenset({"xen_version"}), only(A417_64)).probes == []
    plan = plan_guest([iret], frozenset({"iret"}), only(A417_64))
    assert plan.probes == [ProbeSpec("instruction", 0xFFFFFFFF8100210B, 64, numbers=None)]
    assert plan.returns == []
    assert plan_guest([iret], None, only(A417_64)).returns == []


def test_sites_of_both_widths_use_their_own_abis():
    plan = plan_guest([GuestSite("page", PAGE32, 32, "a"), GuestSite("instruction", 0x9000, 64, "b")],
                      wanted_calls([frozenset({"xen_version"})], True), only(A417_64, A20_32))
    assert [(p.kind, p.width, p.nr, p.numbers) for p in plan.probes] == [
        ("stub", 32, nr, None) for nr in (0, 4, 11, 13, 17)] + [("instruction", 64, None, (0, 4, 13, 17, 30))]
    assert plan.description.count("; ") == 1


# --- Xen-side plans -------------------------------------------------------------------------------------


def test_the_gate_plan():
    plan = plan_gate(0xFFFF82D040390000, frozenset({"xen_version"}), [A417_32, A20_32], "from the IDT")
    assert plan.probes == [ProbeSpec("gate", 0xFFFF82D040390000, 32, function=arch.XEN_GATE_ENTRY,
                                     numbers=(17,))]
    assert plan.returns == []
    assert plan.description == f"in Xen at {arch.XEN_GATE_ENTRY} handler 0xffff82d040390000 (from the IDT)"
    assert plan_gate(0x1000, None, [A417_32], "x").probes[0].numbers is None


XEN = {"pv_hypercall": 0xFFFF82D040380000, "do_entry_int82": 0xFFFF82D040381000,
       "do_multicall": 0xFFFF82D040200000, "compat_multicall": 0xFFFF82D040210000,
       "do_xen_version": 0xFFFF82D040220000}


def test_xen_plan_for_every_call_probes_every_frame_entry():
    plan = plan_xen(None, [A417_64], XEN.get)
    assert plan.probes == [ProbeSpec("frame", XEN["pv_hypercall"], function="pv_hypercall"),
                           ProbeSpec("frame", XEN["do_entry_int82"], function="do_entry_int82")]
    assert plan.returns == []
    assert plan.description == "in Xen at pv_hypercall and do_entry_int82 (every PV hypercall)"
    older = plan_xen(None, [A417_64], {"pv_hypercall": XEN["pv_hypercall"]}.get)
    assert [p.function for p in older.probes] == ["pv_hypercall"]


def test_xen_plan_uses_handlers_and_falls_back_to_the_entry_by_number():
    plan = plan_xen(frozenset({"xen_version", "multicall", "set_fast_trap"}), [A417_64, get_abi("2.0", 64)],
                    XEN.get)
    assert plan.probes == [
        ProbeSpec("handler", XEN["do_multicall"], function="do_multicall"),
        ProbeSpec("handler", XEN["compat_multicall"], function="compat_multicall"),
        ProbeSpec("handler", XEN["do_xen_version"], function="do_xen_version"),
        ProbeSpec("frame", XEN["pv_hypercall"], function="pv_hypercall", numbers=(11,)),
        ProbeSpec("frame", XEN["do_entry_int82"], function="do_entry_int82", numbers=(11,)),
    ]
    assert plan.description == ("in Xen at the handlers of multicall, xen_version, and at pv_hypercall and "
                                "do_entry_int82 for set_fast_trap")


def test_xen_plan_drops_names_no_candidate_generation_has():
    plan = plan_xen(frozenset({"xen_version", "set_fast_trap"}), [A417_64], XEN.get)
    assert [p.function for p in plan.probes] == ["do_xen_version"]
    assert plan.description == "in Xen at the handlers of xen_version"


def test_xen_plan_without_any_handler_says_only_where_it_filters():
    plan = plan_xen(frozenset({"vcpu_op"}), [A417_64], {"pv_hypercall": XEN["pv_hypercall"]}.get)
    assert plan.probes == [ProbeSpec("frame", XEN["pv_hypercall"], function="pv_hypercall", numbers=(24,))]
    assert plan.description == "in Xen at pv_hypercall for vcpu_op"


# --- continuations -----------------------------------------------------------------------------------


def call(nr: int, name: str | None, *values: int) -> Hypercall:
    return Hypercall(nr, name, tuple(Arg(f"a{i}", "ulong", v) for i, v in enumerate(values)), "4.17", 64)


BATCH = 0x20000


@pytest.mark.parametrize("after,abi,verdict", [
    ((BATCH + 64, 4), A417_64, True),  # one entry done
    ((BATCH + 4 * 64, 1), A417_64, True),
    ((BATCH + 5 * 64, 0), A417_64, False),  # all done: nothing left to continue
    ((BATCH, 5), A417_64, False),  # not advanced
    ((BATCH + 64, 5), A417_64, False),  # advanced but the count did not drop
    ((BATCH + 64, 3), A417_64, False),  # the count dropped by more than the entries skipped
    ((BATCH + 72, 4), A417_64, False),  # not a whole entry
    ((BATCH - 64, 6), A417_64, False),  # backwards
    ((BATCH + 32, 4), A417_32, True),  # a 32-bit guest's entries are 32 bytes
    ((BATCH + 32, 4), A417_64, False),
])
def test_multicall_continuation(after, abi, verdict):
    assert is_continuation(call(13, "multicall", BATCH, 5), call(13, "multicall", *after), abi) is verdict


@pytest.mark.parametrize("after,abi,verdict", [
    (BATCH + 16, A417_64, True),
    (BATCH + 48, A417_64, True),
    (BATCH + 8, A417_64, False),  # half a 64-bit trap_info
    (BATCH + 8, A417_32, True),  # a whole 32-bit one
    (BATCH, A417_64, False),
    (BATCH - 16, A417_64, False),
])
def test_set_trap_table_continuation(after, abi, verdict):
    assert is_continuation(call(0, "set_trap_table", BATCH), call(0, "set_trap_table", after), abi) is verdict


@pytest.mark.parametrize("name,nr", [("mmu_update", 1), ("mmuext_op", 26)])
def test_mmu_continuations_are_marked_in_the_count(name, nr):
    earlier = call(nr, name, BATCH, 8, 0, 0x7FF0)
    assert is_continuation(earlier, call(nr, name, BATCH + 24, 5 | PREEMPTED_COUNT_BIT, 0, 0x7FF0), A417_64)
    assert PREEMPTED_COUNT_BIT == 0x80000000
    assert not is_continuation(earlier, call(nr, name, BATCH + 24, 5, 0, 0x7FF0), A417_64)
    assert not is_continuation(earlier, call(nr, name, BATCH, 5 | 1 << 30, 0, 0x7FF0), A417_64)


def test_no_continuation_across_numbers_for_unknown_or_other_calls():
    assert not is_continuation(call(13, "multicall", BATCH, 5), call(0, "set_trap_table", BATCH + 64), A417_64)
    assert not is_continuation(call(99, None, BATCH, 5), call(99, None, BATCH + 64, 4), A417_64)
    assert not is_continuation(call(24, "vcpu_op", 0, 0, BATCH), call(24, "vcpu_op", 0, 0, BATCH + 64), A417_64)


def _decoded(abi, nr, *args, memory=()):
    target = InMemoryTarget(registers(abi.width, nr, *args), [(0x7000, stub(abi.width, nr)), *memory])
    return decode_pending(target, abi)


def test_completed_part_of_a_preempted_multicall():
    entries = pack_many(A417_64, "multicall_entry", [{"op": 17, "args": [0] * 6}] * 3)
    earlier = _decoded(A417_64, 13, BATCH, 3, memory=[(BATCH, entries)])
    now = _decoded(A417_64, 13, BATCH + 128, 1, memory=[(BATCH, entries)])
    done = completed_part(earlier, now, A417_64)
    assert [e.index for e in done.detail.entries] == [0, 1]
    assert (done.detail.address, done.detail.count) == (BATCH, 2)
    assert done.name == "multicall" and done.args == earlier.args


def test_completed_part_of_a_preempted_trap_table():
    rows = [{"vector": v, "cs": 0xE033, "address": 0xFFFFFFFF81000000 + v} for v in (0, 3, 14)]
    table = pack_many(A417_64, "trap_info", [*rows, {}])
    earlier = _decoded(A417_64, 0, BATCH, memory=[(BATCH, table)])
    now = _decoded(A417_64, 0, BATCH + 32, memory=[(BATCH, table)])
    done = completed_part(earlier, now, A417_64)
    assert [e.vector for e in done.detail.entries] == [0, 3]
    assert done.detail.address == BATCH and done.detail.terminated
    other = call(24, "vcpu_op", 0, 0, 0)
    assert completed_part(other, other, A417_64) is other


# --- which call a probe hit is ---------------------------------------------------------------------


def test_call_tracker_tells_new_repeat_and_continuation_apart():
    tracker = CallTracker()
    key = (0, 0x7002, 0xFFFFC90000003F00)
    first = PendingCall(call(13, "multicall", BATCH, 5), A417_64, seq=1, registers=(0x7000, 1, 13, BATCH, 5))
    assert tracker.enter(key, first) == Entered("new")
    same = PendingCall(call(13, "multicall", BATCH, 5), A417_64, seq=2, registers=(0x7000, 1, 13, BATCH, 5))
    # Identical, but Xen could be continuing the batch without progress: a repeat, not a certain one.
    assert tracker.enter(key, same) == Entered("repeat", first, certain=False)
    assert tracker.pending[key] is first  # the repeat does not replace the call
    cont = PendingCall(call(13, "multicall", BATCH + 64, 4), A417_64, seq=3,
                       registers=(0x7000, 1, 13, BATCH + 64, 4))
    assert tracker.enter(key, cont) == Entered("continuation", first)
    assert tracker.pending[key] is cont
    # Same key, other registers, not a continuation: a new call (the earlier one never came back).
    fresh = PendingCall(call(17, "xen_version", 0, 0), A417_64, registers=(0x7000, 1, 17, 0, 0))
    assert tracker.enter(key, fresh) == Entered("new", cont)
    other_cpu = (1, 0x7002, 0xFFFFC90000003F00)
    assert tracker.enter(other_cpu, PendingCall(call(17, "xen_version", 0, 0), A417_64,
                                                registers=(0x7000, 1, 17, 0, 0))) == Entered("new")
    assert tracker.returned(key) is fresh
    assert tracker.returned(key) is None
    tracker.clear()
    assert tracker.pending == {}


def test_a_call_xen_never_continues_repeats_for_certain():
    tracker = CallTracker()
    key = (0, 0x7002, 0x8000)
    first = PendingCall(call(17, "xen_version", 0, 0), A417_64, registers=(0x7000, 0x8000, 17, 0, 0))
    tracker.enter(key, first)
    again = PendingCall(call(17, "xen_version", 0, 0), A417_64, registers=(0x7000, 0x8000, 17, 0, 0))
    assert tracker.enter(key, again) == Entered("repeat", first, certain=True)


def test_a_multicall_continued_at_its_first_entry_is_told_by_the_rewritten_entry():
    """Xen rewrites a preempted sub-call into the batch and continues the multicall with the same
    registers (common/multicall.c, RELEASE-4.17.0): the guest memory the decode read differs."""
    entries = pack_many(A417_64, "multicall_entry", [{"op": 1, "args": [BATCH + 0x1000, 40, 0, 0x7FF0]}])
    rewritten = pack_many(A417_64, "multicall_entry",
                          [{"op": 1, "args": [BATCH + 0x1000 + 16 * 24, 16 | PREEMPTED_COUNT_BIT, 0, 0x7FF0]}])
    tracker = CallTracker()
    key = (0, 0x7002, 0x7F00)
    regs = (0x7000, 0x7F00, 13, BATCH, 1)
    first = PendingCall(_decoded(A417_64, 13, BATCH, 1, memory=[(BATCH, entries)]), A417_64, registers=regs)
    assert tracker.enter(key, first) == Entered("new")
    cont = PendingCall(_decoded(A417_64, 13, BATCH, 1, memory=[(BATCH, rewritten)]), A417_64, registers=regs)
    assert tracker.enter(key, cont) == Entered("continuation", first)


@pytest.mark.parametrize("name,nr", [("vcpu_op", 24), ("update_va_mapping", 14), ("memory_op", 12)])
def test_any_call_xen_continues_is_a_continuation_at_the_same_place(name, nr):
    """vcpu_op, update_va_mapping, ... continue with the arguments unchanged or re-encoded: back at
    the same instruction and stack with no return in between, it can only be Xen's rewind."""
    tracker = CallTracker()
    key = (0, 0x7002, 0x7F00)
    first = PendingCall(call(nr, name, 1, 2, 3), A417_64, registers=(0x7000, 0x7F00, nr, 1, 2, 3))
    tracker.enter(key, first)
    cont = PendingCall(call(nr, name, 1 | 5 << 6, 2, 3), A417_64, registers=(0x7000, 0x7F00, nr, 1 | 5 << 6, 2, 3))
    assert tracker.enter(key, cont) == Entered("continuation", first)
    assert not is_continuation(first.call, cont.call, A417_64)  # a handler seen again needs progress


@pytest.mark.parametrize("after,verdict", [
    ((0, 200 - 127, BATCH + 127), True),  # guest_console_write wrote 127 bytes and continues
    ((0, 200, BATCH), False),
    ((0, 100, BATCH + 127), False),  # advanced by other than what it wrote
    ((1, 73, BATCH + 127), False),  # another command
])
def test_console_io_continuation(after, verdict):
    """drivers/char/console.c guest_console_write at RELEASE-4.17.0 and RELEASE-4.20.0."""
    assert is_continuation(call(18, "console_io", 0, 200, BATCH), call(18, "console_io", *after), A417_64) is verdict


def _iret(frame_rip: int) -> PendingCall:
    frame = StructFields("iret_context", 0x7F00, (("rax", 0), ("rip", frame_rip)))
    return PendingCall(replace(call(23, "iret"), detail=frame), A417_64, registers=(0x7000, 0x7F00, 23))


def test_a_second_iret_from_the_same_stack_is_a_new_call_once_anything_happened_between():
    tracker = CallTracker()
    key = (0, 0x7002, 0x7F00)
    first = _iret(0x401000)
    assert tracker.enter(key, first) == Entered("new")
    assert tracker.pending == {}  # an iret never comes back: nothing awaits it
    assert tracker.enter(key, _iret(0x402000)) == Entered("new")  # another frame: another iret
    other = (0, 0x9002, 0x7E00)
    tracker.enter(other, PendingCall(call(17, "xen_version", 0, 0), A417_64, registers=(0x9000, 0x7E00, 17)))
    tracker.returned(other)
    assert tracker.enter(key, _iret(0x402000)) == Entered("new")  # the CPU ran between: a new iret
    same = _iret(0x402000)
    entered = tracker.enter(key, same)
    assert entered.kind == "repeat" and not entered.certain  # nothing between: cannot tell
    assert tracker.enter((1, 0x7002, 0x7F00), _iret(0x402000)) == Entered("new")  # another CPU


def test_a_repeat_needs_every_register_equal():
    tracker = CallTracker()
    key = (0, 0x7002, 0x8000)
    tracker.enter(key, PendingCall(call(17, "xen_version", 0, 0), A417_64, registers=(0x7000, 0x8000, 17, 0, 0)))
    entered = tracker.enter(key, PendingCall(call(17, "xen_version", 0, 0), A417_64,
                                             registers=(0x7000, 0x8000, 17, 0, 1)))
    assert entered.kind == "new"


# --- entry points followed across registrations -----------------------------------------------------


def _trap(vector: int, address: int) -> TrapEntry:
    return TrapEntry(0, vector, arch.vector_name(vector), 0, 0, False, 0xE033, 3, address)


def test_entry_watch_describes_itself():
    assert EntryWatch("callback", "event").describe() == "the event callback"
    assert EntryWatch("trap", "0xe", 14).describe() == "the trap handler for vector 0xe (#PF)"
    assert EntryWatch("fasttrap", "", 0x80).describe() == "the fast trap"
    assert EntryWatch("trap", "0xe", 14).same_as(EntryWatch("trap", "0xe", 14, address=0x1234))
    assert not EntryWatch("trap", "0xe", 14).same_as(EntryWatch("trap", "0xd", 13))
    assert not EntryWatch("callback", "event").same_as(EntryWatch("callback", "failsafe"))


def test_entry_watch_follows_the_latest_registration_on_any_vcpu():
    first, second, empty = GuestState(), GuestState(), GuestState()
    first.trap_table[14] = _trap(14, 0x1000)
    second.trap_table[14] = _trap(14, 0x2000)
    first.callbacks["event"] = Callback("event", 0x3000)
    second.callbacks["event"] = Callback("event", 0)  # an address 0 does not move the watch
    trap, event = EntryWatch("trap", "0xe", 14), EntryWatch("callback", "event")
    assert trap.current_address([first, second]) == 0x2000
    assert trap.current_address([second, first]) == 0x1000
    assert trap.current_address([empty]) is None
    assert event.current_address([first, second]) == 0x3000
    second.callbacks["event"] = Callback("event", 0x5000)
    assert event.current_address([first, second]) == 0x5000  # the last vCPU's registration
    assert EntryWatch("trap", "0xd", 13).current_address([first, second]) is None
    fast = EntryWatch("fasttrap", "", 0x80)
    assert fast.current_address([first]) is None
    first.fast_trap = FastTrap(0x80, "int 0x80", None)
    assert fast.current_address([first]) is None  # no handler seen yet
    first.fast_trap = FastTrap(0x80, "int 0x80", _trap(0x80, 0x4000))
    assert fast.current_address([first, empty]) == 0x4000


def test_vectors_entering_a_shared_handler():
    first, second = GuestState(), GuestState()
    first.trap_table |= {13: _trap(13, 0x1000), 2: _trap(2, 0x1000), 14: _trap(14, 0x2000)}
    second.trap_table |= {13: _trap(13, 0x1000), 0x80: _trap(0x80, 0x1000)}
    assert vectors_entering(0x1000, [first, second]) == [2, 13, 0x80]
    assert vectors_entering(0x2000, [first, second]) == [14]
    assert vectors_entering(0x3000, [first, second]) == []


# --- the guest's hypercall page found in memory -------------------------------------------------------


def _reader(target: InMemoryTarget):
    def read(address: int, size: int) -> bytes | None:
        try:
            return target.read_memory(address, size)
        except XendbgError:
            return None

    return read


def test_scan_finds_a_64_bit_page_and_linux_stubs_near_pc():
    base = 0xFFFFFFFF81000000
    page = b"".join(stub(64, nr) for nr in range(128))
    hypercall_pv = bytes.fromhex("514153 0f05 415b59 c3")
    xen_iret = bytes.fromhex("6a00 51 4153 50 b8") + IRET_NR.to_bytes(4, "little") + b"\x0f\x05"
    memory = [(base - 0x40000, bytes(0x100000)), (base + 0x5000, page), (base + 0x9010, hypercall_pv),
              (base + 0x9100, xen_iret)]
    found = scan_memory(_reader(InMemoryTarget({}, memory)), base + 0x8123, 64, window=0x20000)  # pages stay aligned
    assert found == [
        GuestSite("page", base + 0x5000, 64, "found in guest memory near PC"),
        GuestSite("instruction", base + 0x9013, 64,
                  "xen_hypercall_pv, found in guest memory near PC by its instruction sequence"),
        GuestSite("instruction", base + 0x910B, 64,
                  "xen_iret, found in guest memory near PC by its instruction sequence", IRET_NR),
    ]
    assert SCAN_WINDOW == 1 << 20


def test_scan_finds_a_32_bit_page_and_needs_stubs_1_and_2():
    page = b"".join(stub(32, nr) for nr in range(128))
    memory = [(0xC0000000, bytes(0x40000)), (0xC0011000, page)]
    found = scan_memory(_reader(InMemoryTarget({}, memory)), 0xC0012000, 32, window=0x10000)
    assert found == [GuestSite("page", 0xC0011000, 32, "found in guest memory near PC")]
    half = stub(32, 0) + stub(32, 1) + stub(32, 3) * 2  # stub 2 is not Xen's
    memory = [(0xC0000000, bytes(0x40000)), (0xC0011000, half)]
    assert scan_memory(_reader(InMemoryTarget({}, memory)), 0xC0012000, 32, window=0x10000) == []


def test_scan_skips_what_cannot_be_read():
    assert scan_memory(lambda address, size: None, 0x100000, 64, window=0x20000) == []


def test_a_set_trap_table_continues_within_its_table_only():
    """A later table further on in memory is a new call, not a continuation of a 3-entry table."""
    abi = A417_64
    entries = pack_many(abi, "trap_info", [{"vector": v, "cs": 0xE033, "address": 0x1000 + v} for v in (3, 6, 14)])
    table = _decoded(abi, 0, BATCH, memory=[(BATCH, entries + bytes(16))])
    assert len(table.detail.entries) == 3
    assert is_continuation(table, call(0, "set_trap_table", BATCH + 3 * 16), abi)  # at its terminator
    assert not is_continuation(table, call(0, "set_trap_table", BATCH + 4 * 16), abi)


def _xen_frame(vector: int, rip: int, rsp: int) -> bytes:
    """A 64-bit Xen's saved guest frame (struct cpu_user_regs, xen-x86_64.h at RELEASE-4.17.0)."""
    frame = bytearray(200)
    frame[124:128] = vector.to_bytes(4, "little")
    frame[128:136] = rip.to_bytes(8, "little")
    frame[152:160] = rsp.to_bytes(8, "little")
    return bytes(frame)


def _mmu(frame: bytes | None) -> PendingCall:
    return PendingCall(call(1, "mmu_update", BATCH, 8 | PREEMPTED_COUNT_BIT, 0, 0x7FF0), A417_64,
                       registers=(0x7000, 0x7F00, 1, BATCH, 8 | PREEMPTED_COUNT_BIT, 0, 0x7FF0), xen_frame=frame)


@pytest.mark.parametrize("second,verdict", [
    (_xen_frame(0xF0, 0x9000, 0x8000), Entered("repeat", None, certain=True)),  # Xen not entered since
    (_xen_frame(256, 0x7000, 0x7F00), Entered("continuation", None)),  # a syscall from here, rewound onto it
    (_xen_frame(256, 0x7002, 0x7F00), Entered("repeat", None, certain=False)),  # returned past it: not rewound
    (_xen_frame(0xF0, 0x7000, 0x7F00), Entered("repeat", None, certain=False)),  # an interrupt at the instruction
    (_xen_frame(256, 0x7000, 0x7E00), Entered("repeat", None, certain=False)),  # another stack
    (None, Entered("repeat", None, certain=False)),  # no evidence
])
def test_xens_saved_frame_tells_a_repeat_from_a_continuation_without_progress(second, verdict):
    """Two identical hits on a call Xen continues: Xen's saved guest frame (cpu_info's guest_cpu_user_regs)
    says whether Xen was entered between them, and from where (pv_hypercall rewinds RIP by 2)."""
    tracker = CallTracker()
    key = (0, 0x7002, 0x7F00)
    first = _mmu(_xen_frame(0xF0, 0x9000, 0x8000))
    tracker.enter(key, first)
    entered = tracker.enter(key, _mmu(second))
    assert (entered.kind, entered.certain) == (verdict.kind, verdict.certain) and entered.earlier is first


def test_an_iret_hit_again_with_xens_frame_unchanged_is_the_same_stop():
    tracker = CallTracker()
    key = (0, 0x7002, 0x7F00)
    frame = _xen_frame(256, 0x5002, 0x6000)
    tracker.enter(key, replace(_iret(0x401000), xen_frame=frame))
    entered = tracker.enter(key, replace(_iret(0x401000), xen_frame=frame))
    assert (entered.kind, entered.certain) == ("repeat", True)


def test_the_guest_frame_address_of_a_cpu_is_checked_by_its_processor_id():
    stack_base, stack = 0xFFFF82D040600000, 0xFFFF830000100000
    info = stack + 8 * 4096 - 264
    memory = [(stack_base, (0).to_bytes(8, "little") + stack.to_bytes(8, "little")),
              (info + 200, (1).to_bytes(4, "little"))]
    target = InMemoryTarget({}, memory)
    assert arch.cpu_guest_frame_address(target, stack_base, 1) == info
    assert arch.cpu_guest_frame_address(target, stack_base, 0) is None  # its stack is not there yet
    wrong = InMemoryTarget({}, [memory[0], (info + 200, (0).to_bytes(4, "little"))])
    assert arch.cpu_guest_frame_address(wrong, stack_base, 1) is None  # cpu_info names another CPU
    assert arch.cpu_guest_frame_address(InMemoryTarget({}, []), stack_base, 1) is None

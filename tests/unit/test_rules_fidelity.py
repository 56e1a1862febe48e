"""The decoder's rules for the cases tests/platform/test_shim32_fidelity.py runs on shim32, on their own:
each against what Xen's source at the tag does (the tag is cited next to the rule in xendbg/decode)."""

from __future__ import annotations

import pytest

from tests.unit.images import pack, pack_many
from xendbg.abi import get_abi
from xendbg.decode import GuestState, decode_call, decode_multicall
from xendbg.decode.model import Callback, TrapEntry
from xendbg.decode.rules import dispatched_number
from xendbg.decode.state import apply, check_state, seed_initialised_vcpu
from xendbg.target import InMemoryTarget

TABLE = 0x10000


def trap_table(abi, rows):
    return [(TABLE, pack_many(abi, "trap_info", [*rows, {"vector": 0, "address": 0}]))]


@pytest.mark.parametrize("version,wraps", [("2.0", True), ("3.0", True), ("3.0.2", True), ("3.0.3", False),
                                           ("4.0", False)])
def test_number_past_the_table(version, wraps):
    abi = get_abi(version, 32)
    assert dispatched_number(abi, 64) == (0 if wraps else 64)
    memory = trap_table(abi, [{"vector": 0x23, "cs": abi.kernel_cs, "address": 0x401000}])
    hc = decode_call(InMemoryTarget(memory=memory), abi, 64, [TABLE])
    if wraps:
        assert hc.nr == 64 and hc.name == "set_trap_table"
        assert [e.vector for e in hc.detail.entries] == [0x23]
        assert [f.rule for f in hc.findings] == ["hypercall-number-wraps"]
        assert "number 64 runs set_trap_table" in hc.findings[0].message
    else:
        assert hc.name is None and [f.rule for f in hc.findings] == ["unknown-hypercall"]
        assert "-ENOSYS" in hc.findings[0].message


def test_number_wrapping_to_nothing_fails_with_enosys():
    abi = get_abi("3.0", 32)
    hc = decode_call(InMemoryTarget(), abi, 32 + 25, [0])  # 25 is do_ni_hypercall in 3.0.0
    assert hc.name is None
    assert [(f.rule, f.severity) for f in hc.findings] == [("hypercall-number-wraps", "error")]
    assert "-ENOSYS" in hc.findings[0].message


def test_multicall_entry_number_wraps_too():
    """do_multicall masks each entry's number the same way (2.0: entry.S; 3.0.0: asm-x86/multicall.h)."""
    abi = get_abi("3.0", 32)
    rows = [{"op": 32 + 17, "result": 0x30000, "args": [0]},   # xen_version
            {"op": 32 + 13, "result": (-22) & 0xFFFFFFFF}]     # a nested multicall after all
    target = InMemoryTarget(memory=[(0x20000, pack_many(abi, "multicall_entry", rows))])
    batch, found = decode_multicall(target, abi, 0x20000, 2)
    assert [e.call.name for e in batch.entries] == ["xen_version", "multicall"]
    assert [f.rule for f in found] == ["multicall-nested"]
    assert [f.rule for f in batch.entries[0].call.findings] == ["hypercall-number-wraps"]


# --- VCPUOP_initialise (point 2) ----------------------------------------------------------------------

CTXT = 0x40000


def vcpu_context(abi, *, cs=None, ss=None, cr3=0x1000, event_cs=None, trap_cs=None):
    kcs, kds = abi.kernel_cs, abi.kernel_cs + 8
    return pack(abi, "vcpu_guest_context",
                user_regs={"eip": 0x401000, "esp": 0x402000, "cs": kcs if cs is None else cs,
                           "ss": kds if ss is None else ss},
                trap_ctxt=[{}] * 3 + [{"vector": 3, "flags": 3, "cs": kcs if trap_cs is None else trap_cs,
                                       "address": 0x401300}],
                kernel_ss=kds, kernel_sp=0x402000, ctrlreg=[0, 0, 0, cr3, 0, 0, 0, 0],
                event_callback_cs=kcs if event_cs is None else event_cs, event_callback_eip=0x401400,
                failsafe_callback_cs=kcs, failsafe_callback_eip=0x401500)


def initialise(version, **kw):
    abi = get_abi(version, 32)
    target = InMemoryTarget(memory=[(CTXT, vcpu_context(abi, **kw))])
    return abi, target, decode_call(target, abi, 24, [0, 1, CTXT])


def test_initialise_rpl0_is_einval_on_3_0_0_and_fixed_up_later():
    _, _, hc = initialise("3.0", cs=0xE018, ss=0xE020)
    assert [(f.rule, f.severity) for f in hc.findings] == [("selector-rpl", "error")] * 2
    assert all("-EINVAL" in f.message and "-EPERM" not in f.message for f in hc.findings)
    _, _, hc = initialise("4.0", cs=0xE018, ss=0xE020)
    assert {(f.rule, f.severity) for f in hc.findings} == {("selector-rpl", "info")}
    assert len(hc.findings) == 2


def test_initialise_callback_and_trap_selectors_unchecked_on_3_0_0():
    _, _, hc = initialise("3.0", event_cs=0xE018, trap_cs=0xE018)
    assert hc.findings == ()
    _, _, hc = initialise("3.0.2", event_cs=0xE018, trap_cs=0xE018)
    assert [(f.rule, f.severity) for f in hc.findings] == [("selector-rpl", "info")] * 2
    assert "event callback" in hc.findings[0].message and "vector 0x3" in hc.findings[1].message


@pytest.mark.parametrize("version", ["3.0", "4.0"])
def test_initialise_without_page_table_is_einval(version):
    _, _, hc = initialise(version, cr3=0)
    assert [(f.rule, f.severity) for f in hc.findings] == [("vcpu-context-cr3", "error")]
    assert "-EINVAL" in hc.findings[0].message


@pytest.mark.parametrize("version,severity,says", [("3.0", "warning", "returns 0"), ("4.0", "error", "-ENOSYS")])
def test_unknown_vcpu_op(version, severity, says):
    hc = decode_call(InMemoryTarget(), get_abi(version, 32), 24, [99, 1, 0])
    assert [(f.rule, f.severity) for f in hc.findings] == [("unknown-subop", severity)]
    assert says in hc.findings[0].message


@pytest.mark.parametrize("version,fixed", [("3.0", False), ("4.0", True)])
def test_seed_initialised_vcpu_from_the_context(version, fixed):
    abi, target, hc = initialise(version, event_cs=0xE018, trap_cs=0xE018)
    states: dict[int, GuestState] = {}
    vcpu0 = states.setdefault(0, GuestState())
    vcpu0.trap_table[14] = TrapEntry(0, 14, "#PF", 0, 0, False, 0xE019, 1, 0x409999)
    assert seed_initialised_vcpu(lambda v: states.setdefault(v, GuestState()), target, abi, hc, -22) == []
    assert 1 not in states
    changes = seed_initialised_vcpu(lambda v: states.setdefault(v, GuestState()), target, abi, hc, 0)
    assert changes == ["vCPU 1: trap table of 1 entries and callbacks event, failsafe from its initial context"]
    new = states[1]
    cs = 0xE019 if fixed else 0xE018
    assert {v: (e.cs, e.address) for v, e in new.trap_table.items()} == {3: (cs, 0x401300)}
    assert (new.callbacks["event"].selector, new.callbacks["event"].address) == (cs, 0x401400)
    assert new.callbacks["failsafe"].address == 0x401500
    assert list(vcpu0.trap_table) == [14]  # the caller's own state is not touched
    # not an initialise, or its result unknown: nothing
    assert seed_initialised_vcpu(lambda v: states.setdefault(v, GuestState()), target, abi, hc, None) == []


def test_seed_from_a_multicall_entry():
    abi = get_abi("4.0", 32)
    rows = [{"op": 24, "result": 0, "args": [0, 1, CTXT]}]
    target = InMemoryTarget(memory=[(0x20000, pack_many(abi, "multicall_entry", rows)),
                                    (CTXT, vcpu_context(abi))])
    hc = decode_call(target, abi, 13, [0x20000, 1])
    batch, _ = decode_multicall(target, abi, 0x20000, 1, results=True)
    states: dict[int, GuestState] = {}
    from dataclasses import replace
    done = replace(hc, detail=batch)
    assert len(seed_initialised_vcpu(lambda v: states.setdefault(v, GuestState()), target, abi, done, 0)) == 1
    assert list(states[1].trap_table) == [3]


# --- stack_switch (point 5) --------------------------------------------------------------------------

@pytest.mark.parametrize("version,ss,expect", [
    ("2.0", 0x0820, ("selector-rpl", "error")), ("2.0", 0x0823, ("selector-rpl", "warning")),
    ("2.0", 0x0821, None),
    ("3.0", 0xE020, ("selector-rpl", "error")), ("3.0", 0xE023, ("selector-rpl", "error")),
    ("3.0", 0xE021, None),
    ("4.0", 0xE020, ("selector-rpl", "info")), ("4.0", 0xE023, ("selector-rpl", "warning")),
    ("4.0", 0xE021, None)])
def test_stack_switch_selector(version, ss, expect):
    hc = decode_call(InMemoryTarget(), get_abi(version, 32), 3, [ss, 0x402000])
    assert [(f.rule, f.severity) for f in hc.findings] == ([expect] if expect else [])
    if expect and expect[1] == "error":
        assert "-EPERM" in hc.findings[0].message


# --- set_fast_trap (point 6): one gate, moved or removed, and the registered state follows -------------

def test_fast_trap_moves_then_goes_in_the_registered_state():
    abi = get_abi("2.0", 32)
    state = GuestState()
    memory = trap_table(abi, [{"vector": 0x80, "flags": 3, "cs": 0x0819, "address": 0x401080},
                              {"vector": 0x21, "flags": 3, "cs": 0x0819, "address": 0x401021}])
    target = InMemoryTarget(memory=memory)
    apply(state, abi, decode_call(target, abi, 0, [TABLE]), 0)
    first = decode_call(target, abi, 11, [0x80], state=state)
    assert first.findings == ()
    apply(state, abi, first, 0)
    assert state.fast_trap.vector == 0x80 and state.fast_trap.handler.address == 0x401080
    move = decode_call(target, abi, 11, [0x21], state=state)
    assert [f.rule for f in move.findings] == ["fast-trap-moved"] and "int $0x80" in move.findings[0].message
    apply(state, abi, move, 0)
    assert state.fast_trap.vector == 0x21 and state.fast_trap.handler.address == 0x401021
    off = decode_call(target, abi, 11, [0], state=state)
    assert [f.rule for f in off.findings] == ["fast-trap-disable"] and "vector 0x21" in off.findings[0].message
    apply(state, abi, off, 0)
    assert state.fast_trap is None
    # refused: nothing changes
    apply(state, abi, move, 0)
    bad = decode_call(target, abi, 11, [0x30], state=state)
    apply(state, abi, bad, -1)
    assert state.fast_trap.vector == 0x21


# --- a nested multicall under 2.0 (point 3) -------------------------------------------------------------

def test_nested_multicall_result_is_xen_2_0s_own_address():
    abi = get_abi("2.0", 32)
    rows = [{"op": 17, "args": [0, 0, 0, 0, 0, 0x20000, 0]},
            {"op": 13, "args": [0x30000, 1, 0, 0, 0, 0xFC5000B8, 0]}]
    target = InMemoryTarget(memory=[(0x20000, pack_many(abi, "multicall_entry", rows))])
    batch, found = decode_multicall(target, abi, 0x20000, 2, results=True)
    assert [f.rule for f in found] == ["multicall-nested"]
    assert "skips it" in found[0].message and "multicall_return_from_call" in found[0].message
    nested = batch.entries[1]
    assert nested.result == 0xFC5000B8 - 2**32 < 0
    assert "multicall_return_from_call" in nested.result_text
    assert batch.entries[0].result_text == "OK"


# --- callback_op under 4.0 (point 9) ---------------------------------------------------------------------

def callback_call(abi, cmd, **fields):
    struct = "callback_register" if cmd == 0 else "callback_unregister"
    target = InMemoryTarget(memory=[(0x9000, pack(abi, struct, **fields))])
    return decode_call(target, abi, 30, [cmd, 0x9000])


def test_callback_op_unregister_nmi_register_and_mask_events():
    abi = get_abi("4.0", 32)
    state = GuestState()
    for value in (0, 1):  # event, failsafe
        hc = callback_call(abi, 1, type=value)
        assert [(f.rule, f.severity) for f in hc.findings] == [("callback-unregister", "error")]
        assert "-EINVAL" in hc.findings[0].message
        assert apply(state, abi, hc, -22) == []
    nmi = callback_call(abi, 0, type=4, cs=0xE019, address=0x401234)
    assert nmi.findings == ()
    apply(state, abi, nmi, 0)
    assert state.callbacks["nmi"].address == 0x401234
    entry = state.trap_table[2]  # Xen keeps the NMI callback as trap_ctxt[2], IF flag, flat kernel CS
    assert (entry.address, entry.cs, entry.interrupt_flag) == (0x401234, 0xE019, True)
    masked = callback_call(abi, 0, type=1, flags=1, cs=0xE019, address=0x401500)
    assert masked.findings == () and masked.detail.entries[0].flag_names == ("CALLBACKF_mask_events",)
    ignored = callback_call(abi, 0, type=0, flags=1, cs=0xE019, address=0x401400)
    assert [f.rule for f in ignored.findings] == ["callback-mask-events"]
    gone = callback_call(abi, 1, type=4)
    assert gone.findings == ()
    apply(state, abi, gone, 0)
    assert "nmi" not in state.callbacks and 2 not in state.trap_table


# --- delivery (point 7) -----------------------------------------------------------------------------------

@pytest.mark.parametrize("version,says", [("2.0", "does not check"), ("3.0", "crashes the domain when it has"),
                                          ("4.0", "null CS")])
def test_no_event_callback_per_generation(version, says):
    abi = get_abi(version, 32)
    state = GuestState()
    state.callbacks["failsafe"] = Callback("failsafe", 0x401500, abi.kernel_cs, 1)
    state.history.append("set_callbacks")
    (finding,) = [f for f in check_state(state, abi) if f.rule == "no-event-callback"]
    assert says in finding.message


@pytest.mark.parametrize("version,rule", [("2.0", None), ("3.0", "int80-gate-stale"), ("3.0.2", "int80-gate-none"),
                                          ("4.0", "int80-gate-none")])
def test_int80_entry_with_the_if_flag(version, rule):
    abi = get_abi(version, 32)
    memory = trap_table(abi, [{"vector": 0x80, "flags": 3 | 4, "cs": abi.kernel_cs, "address": 0x401080}])
    hc = decode_call(InMemoryTarget(memory=memory), abi, 0, [TABLE])
    assert [f.rule for f in hc.findings] == ([rule] if rule else [])


@pytest.mark.parametrize("version,nr,args", [("2.0", 6, [1]), ("3.0", 6, [1, 0]), ("4.0", 29, [1, 0])])
def test_block_clears_the_event_mask(version, nr, args):
    hc = decode_call(InMemoryTarget(), get_abi(version, 32), nr, args)
    assert [f.rule for f in hc.findings] == ["block-unmasks"]

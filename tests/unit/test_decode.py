"""Decoders and Xen's rules on InMemoryTarget images built from xendbg's own layouts."""

from __future__ import annotations

import pytest

from tests.unit.images import pack, pack_many, registers, stub
from xendbg.abi import get_abi
from xendbg.decode import (
    Callbacks,
    FastTrap,
    GuestState,
    MulticallBatch,
    StructFields,
    TableOf,
    Text,
    TrapTable,
    decode_call,
    decode_in_xen,
    decode_multicall,
    decode_pending,
    decode_trap_table,
)
from xendbg.errors import DecodeError
from xendbg.target import InMemoryTarget

TABLE = 0x10000
PC = 0x7000


def rules_of(hc) -> list[tuple[str, str]]:
    return [(f.rule, f.severity) for f in hc.all_findings()]


def pending(version: str, width: int, nr: int, *args: int, memory=()) -> object:
    abi = get_abi(version, width)
    target = InMemoryTarget(registers(width, nr, *args, pc=PC), [(PC, stub(width, nr)), *memory])
    return decode_pending(target, abi)


def trap_rows(cs: int, *, vectors=(3, 6, 13, 14, 0x80)) -> list[dict]:
    rows = [{"vector": v, "flags": 3 if v in (3, 0x80) else 0, "cs": cs, "address": 0xC0001000 + 0x10 * v}
            for v in vectors]
    return rows + [{"vector": 0, "flags": 0, "cs": 0, "address": 0}]


# --- set_trap_table and the selector rule, generation by generation ------------------------------

@pytest.mark.parametrize("version,width,cs,expected", [
    ("2.0", 32, 0x0819, []),
    ("2.0", 32, 0x0818, [("selector-rpl", "error")]),  # RPL 0: Xen 2.0 refuses with -EPERM
    ("3.0", 32, 0xE018, [("selector-rpl", "error")]),  # still refused in 3.0.0
    ("3.0.2", 32, 0xE018, [("selector-rpl", "info")]),  # from 3.0.2 raised silently
    ("4.17", 32, 0xE018, [("selector-rpl", "info")]),
    ("4.17", 32, 0xE01B, [("selector-rpl", "warning")]),  # RPL 3 for a ring-1 kernel: accepted, odd
    ("4.17", 64, 0xE030, [("selector-rpl", "info")]),  # Linux hands RPL-0 selectors: fixed up, not an error
    ("4.17", 64, 0xE033, []),
    ("3.0", 64, 0xE030, [("selector-rpl", "error")]),
])
def test_trap_table_selector_rule(version, width, cs, expected):
    abi = get_abi(version, width)
    rows = trap_rows(abi.kernel_cs)
    rows[3]["cs"] = cs  # the #PF entry carries the selector under test
    hc = pending(version, width, 0, TABLE, memory=[(TABLE, pack_many(abi, "trap_info", rows))])
    assert hc.name == "set_trap_table"
    assert isinstance(hc.detail, TrapTable)
    assert [e.vector for e in hc.detail.entries] == [3, 6, 13, 14, 0x80]
    assert hc.detail.terminated
    assert rules_of(hc) == expected
    pf = hc.detail.entries[3]
    assert (pf.vector_name, pf.cs, pf.rpl) == ("#PF", cs, cs & 3)


def test_trap_table_in_reserved_gdt_rejected_by_old_xen():
    abi = get_abi("2.0", 32)
    rows = trap_rows(abi.kernel_cs)
    rows[0]["cs"] = (260 << 3) | 1  # FLAT_RING1_DS's slot: right RPL, but a Xen-reserved entry
    table, found = decode_trap_table(InMemoryTarget(memory=[(TABLE, pack_many(abi, "trap_info", rows))]),
                                     abi, TABLE)
    assert [f.rule for f in found] == ["selector-reserved"]


def test_trap_entry_fields_dpl_and_interrupt_flag():
    abi = get_abi("4.17", 64)
    rows = [{"vector": 0x80, "flags": 3 | 4, "cs": 0xE033, "address": 0xFFFFFFFF81000000},
            {"vector": 0, "flags": 0, "cs": 0, "address": 0}]
    table, found = decode_trap_table(InMemoryTarget(memory=[(TABLE, pack_many(abi, "trap_info", rows))]), abi, TABLE)
    (entry,) = table.entries
    assert (entry.dpl, entry.interrupt_flag, entry.vector_name, entry.address) == (3, True, "int 0x80",
                                                                                  0xFFFFFFFF81000000)
    assert found == ()


def test_trap_table_unterminated_is_bounded():
    abi = get_abi("4.17", 32)
    rows = [{"vector": i % 256, "flags": 0, "cs": 0xE019, "address": 0x1000 + i} for i in range(300)]
    table, found = decode_trap_table(InMemoryTarget(memory=[(TABLE, pack_many(abi, "trap_info", rows))]), abi, TABLE)
    assert len(table.entries) == 256 and not table.terminated
    assert "trap-table-unterminated" in [f.rule for f in found]


def test_trap_table_unreadable_midway():
    abi = get_abi("4.17", 32)
    rows = trap_rows(0xE019)[:3]  # three entries, then the mapping ends before a terminator
    table, found = decode_trap_table(InMemoryTarget(memory=[(TABLE, pack_many(abi, "trap_info", rows))]), abi, TABLE)
    assert len(table.entries) == 3 and not table.terminated
    assert [f.rule for f in found] == ["unreadable-memory"]
    assert f"{TABLE + 3 * 8:#x}" in found[0].message


def test_trap_table_non_canonical_and_duplicate():
    abi = get_abi("4.17", 64)
    rows = [{"vector": 3, "flags": 3, "cs": 0xE033, "address": 0x0000900000000000},
            {"vector": 3, "flags": 3, "cs": 0xE033, "address": 0xFFFFFFFF81000000},
            {"vector": 0, "flags": 0, "cs": 0, "address": 0}]
    _, found = decode_trap_table(InMemoryTarget(memory=[(TABLE, pack_many(abi, "trap_info", rows))]), abi, TABLE)
    assert [(f.rule, f.severity) for f in found] == [("non-canonical", "error"), ("trap-duplicate", "warning")]


def test_pf_note_depends_on_generation():
    for version, needle in (("2.0", "pushes the faulting address"), ("4.17", "arch.cr2")):
        abi = get_abi(version, 32)
        table, _ = decode_trap_table(
            InMemoryTarget(memory=[(TABLE, pack_many(abi, "trap_info", trap_rows(abi.kernel_cs)))]), abi, TABLE)
        assert needle in table.note


# --- callbacks ------------------------------------------------------------------------------------

def test_set_callbacks_32bit_four_arguments_with_selectors():
    hc = pending("3.0", 32, 4, 0xE019, 0xC0100000, 0xE018, 0xC0100100)
    assert [a.name for a in hc.args] == ["event_selector", "event_address", "failsafe_selector", "failsafe_address"]
    assert isinstance(hc.detail, Callbacks)
    event, failsafe = hc.detail.entries
    assert (event.kind, event.address, event.selector, event.rpl) == ("event", 0xC0100000, 0xE019, 1)
    assert (failsafe.selector, failsafe.rpl) == (0xE018, 0)
    assert rules_of(hc) == [("selector-rpl", "error")]
    assert "FLAT_RING1_CS" in hc.args[0].text


def test_set_callbacks_64bit_three_arguments():
    hc = pending("4.17", 64, 4, 0xFFFFFFFF81001000, 0xFFFFFFFF81002000, 0x0000800000000000)
    assert [a.name for a in hc.args] == ["event_address", "failsafe_address", "syscall_address"]
    assert [c.kind for c in hc.detail.entries] == ["event", "failsafe", "syscall"]
    assert rules_of(hc) == [("non-canonical", "error")]


@pytest.mark.parametrize("width", [32, 64])
def test_callback_op_register(width):
    abi = get_abi("4.17", width)
    fields = {"type": 1, "flags": 1, "address": 0xC0102000}
    if width == 32:
        fields["cs"] = 0xE018
    hc = pending("4.17", width, 30, 0, 0x9000, memory=[(0x9000, pack(abi, "callback_register", **fields))])
    assert hc.subop == "CALLBACKOP_register"
    (cb,) = hc.detail.entries
    assert (cb.kind, cb.address, cb.flag_names) == ("failsafe", 0xC0102000, ("CALLBACKF_mask_events",))
    assert rules_of(hc) == ([("selector-rpl", "info")] if width == 32 else [])


def test_callback_op_unknown_type_and_unregister_event():
    abi = get_abi("4.17", 64)
    hc = pending("4.17", 64, 30, 0, 0x9000, memory=[(0x9000, pack(abi, "callback_register", type=6, address=1))])
    assert ("callback-type", "error") in rules_of(hc)
    hc = pending("4.17", 64, 30, 1, 0x9000, memory=[(0x9000, pack(abi, "callback_unregister", type=0))])
    assert rules_of(hc) == [("callback-unregister", "error")]


# --- fast trap (Xen 2.0 only) ---------------------------------------------------------------------

def test_fast_trap_rules_2_0():
    abi = get_abi("2.0", 32)
    state = GuestState()
    rows = trap_rows(abi.kernel_cs)
    table, _ = decode_trap_table(InMemoryTarget(memory=[(TABLE, pack_many(abi, "trap_info", rows))]), abi, TABLE)
    state.trap_table = {e.vector: e for e in table.entries}
    target = InMemoryTarget(registers(32, 11, 0x80, pc=PC), [(PC, stub(32, 11))])
    hc = decode_pending(target, abi, state=state)
    assert isinstance(hc.detail, FastTrap) and hc.detail.handler.address == rows[4]["address"]
    assert hc.findings == ()
    for vector, rule in ((0x81, "fast-trap-vector"), (0x1F, "fast-trap-vector"), (0x30, "fast-trap-vector")):
        hc = decode_call(target, abi, 11, [vector], state=state)
        assert [f.rule for f in hc.findings] == [rule, "fast-trap-handler-unknown"]
    assert decode_call(target, abi, 11, [0x2F], state=state).findings[0].rule == "fast-trap-handler-unknown"
    state.trap_table[0x80] = table.entries[4].__class__(**{**table.entries[4].__dict__, "interrupt_flag": True})
    assert [f.rule for f in decode_call(target, abi, 11, [0x80], state=state).findings] == ["fast-trap-interrupt-flag"]
    assert [f.rule for f in decode_call(target, abi, 11, [0], state=state).findings] == ["fast-trap-disable"]


def test_fast_trap_removed_in_3_0():
    hc = pending("3.0", 32, 11, 0x80)
    assert hc.name is None and [f.rule for f in hc.findings] == ["fast-trap-removed"]


# --- multicall ------------------------------------------------------------------------------------

def test_multicall_3_0_layout_results_and_nesting():
    abi = get_abi("4.17", 64)
    rows = [{"op": 24, "result": 0, "args": [3, 1, 0]},  # vcpu_op(VCPUOP_is_up, 1)
            {"op": 13, "result": (-22) & (2**64 - 1), "args": [0, 0]},  # nested multicall
            {"op": 29, "result": (-38) & (2**64 - 1), "args": [0, 0]},  # sched_op(yield)
            {"op": 77, "result": 0}]
    target = InMemoryTarget(memory=[(0x20000, pack_many(abi, "multicall_entry", rows))])
    batch, found = decode_multicall(target, abi, 0x20000, 4, results=True)
    assert [e.call.display_name for e in batch.entries] == ["vcpu_op", "multicall", "sched_op", "hypercall_77"]
    assert [e.result for e in batch.entries] == [0, -22, -38, 0]
    assert [e.result_text for e in batch.entries] == ["OK", "EINVAL", "ENOSYS", "OK"]
    assert batch.entries[0].call.subop == "VCPUOP_is_up"
    assert [f.rule for f in found] == ["multicall-nested"]
    assert [f.rule for f in batch.entries[3].call.findings] == ["unknown-hypercall"]


def test_multicall_2_0_layout_result_in_args5():
    abi = get_abi("2.0", 32)
    rows = [{"op": 6, "args": [0, 0, 0, 0, 0, 0, 0]},  # sched_op(yield)
            {"op": 11, "args": [0x80, 0, 0, 0, 0, (-1) & 0xFFFFFFFF, 0]},  # set_fast_trap, failed
            {"op": 13, "args": [0, 0, 0, 0, 0, 0, 0]}]
    assert abi.layout("multicall_entry").size == 32
    hc = pending("2.0", 32, 13, 0x30000, 3, memory=[(0x30000, pack_many(abi, "multicall_entry", rows))])
    assert isinstance(hc.detail, MulticallBatch)
    assert [e.result for e in hc.detail.entries] == [None, None, None]  # pending: Xen has not run it
    batch, _ = decode_multicall(InMemoryTarget(memory=[(0x30000, pack_many(abi, "multicall_entry", rows))]),
                                abi, 0x30000, 3)
    assert [e.result for e in batch.entries] == [0, -1, 0]
    assert len(batch.entries[1].call.args) == 1 and batch.entries[1].call.args[0].value == 0x80
    # the batch's own findings come first, then each entry's
    assert [f.rule for f in hc.all_findings()] == ["multicall-nested", "fast-trap-handler-unknown"]
    assert "skips it" in hc.all_findings()[0].message


def test_multicall_absurd_count_and_unreadable():
    abi = get_abi("4.17", 64)
    rows = [{"op": 24, "args": [3, 0]}] * 3
    target = InMemoryTarget(memory=[(0x20000, pack_many(abi, "multicall_entry", rows))])
    batch, found = decode_multicall(target, abi, 0x20000, 0xFFFFFFFF)
    assert batch.truncated and len(batch.entries) == 3
    assert [f.rule for f in found] == ["multicall-count", "unreadable-memory"]


# --- sub-operations ---------------------------------------------------------------------------------

def test_vcpu_op_initialise_decodes_context():
    abi = get_abi("4.17", 64)
    ctxt = pack(abi, "vcpu_guest_context", flags=1 << 2, user_regs={"rip": 0xFFFFFFFF81003000, "rsp": 0x8000,
                                                                     "cs": 0xE030, "ss": 0xE02B},
                kernel_sp=0x9000, ctrlreg=[0, 0, 0, 0x1234000, 0, 0, 0, 0], event_callback_eip=0xFFFFFFFF81004000)
    hc = pending("4.17", 64, 24, 0, 1, 0x40000, memory=[(0x40000, ctxt)])
    assert hc.subop == "VCPUOP_initialise"
    fields = dict(hc.detail.fields)
    assert fields["rip"] == 0xFFFFFFFF81003000 and fields["cr3"] == 0x1234000
    assert fields["event_callback_eip"] == 0xFFFFFFFF81004000
    assert rules_of(hc) == [("selector-rpl", "info")]


@pytest.mark.parametrize("version,nr,args,reason", [
    ("2.0", 6, (2 | (1 << 8),), 1),  # Xen 2.0: SCHEDOP_shutdown with the reason in bits 8-15
    ("3.0", 6, (2, 0), "SHUTDOWN_poweroff"),  # compat form: reason in the second argument
    ("4.17", 29, (2, 0x9000), "SHUTDOWN_crash"),  # new form: pointer to sched_shutdown
])
def test_sched_op_shutdown_forms(version, nr, args, reason):
    # struct sched_shutdown arrived in 3.0.2 (sched.h); older forms never read it.
    hc = pending(version, 32, nr, *args, memory=[(0x9000, pack(get_abi("4.17", 32), "sched_shutdown", reason=3))])
    assert hc.subop.startswith("SCHEDOP_shutdown")
    assert dict(hc.detail.fields)["reason"] == reason


def test_event_channel_op_compat_and_new():
    abi = get_abi("3.0", 32)
    op = pack(abi, "evtchn_op", cmd=1) + b""
    virq = pack(abi, "evtchn_bind_virq", virq=0, vcpu=1)
    data = bytearray(op)
    data[4:4 + len(virq)] = virq
    hc = pending("3.0", 32, 16, 0x9000, memory=[(0x9000, bytes(data))])
    assert hc.subop == "EVTCHNOP_bind_virq"
    assert dict(hc.detail.fields)["virq"] == "VIRQ_TIMER"
    abi = get_abi("4.17", 64)
    hc = pending("4.17", 64, 32, 4, 0x9000, memory=[(0x9000, pack(abi, "evtchn_port", port=7))])
    assert hc.subop == "EVTCHNOP_send" and dict(hc.detail.fields) == {"port": 7}


def test_console_io_text_mmu_and_mmuext():
    hc = pending("4.17", 64, 18, 0, 5, 0x9000, memory=[(0x9000, b"hello")])
    assert hc.subop == "CONSOLEIO_write" and isinstance(hc.detail, Text) and hc.detail.text == "hello"
    abi = get_abi("4.17", 32)
    reqs = pack_many(abi, "mmu_update", [{"ptr": 0x1000 | 1, "val": 5}, {"ptr": 0x2000, "val": 0x3067}])
    hc = pending("4.17", 32, 1, 0x9000, 2, 0, 0x7FF0, memory=[(0x9000, reqs)])
    assert isinstance(hc.detail, TableOf)
    assert [dict(r)["type"] for r in hc.detail.rows] == ["MMU_MACHPHYS_UPDATE", "MMU_NORMAL_PT_UPDATE"]
    assert hc.args[3].text == "DOMID_SELF"
    ops = pack_many(abi, "mmuext_op", [{"cmd": 3, "arg1": 0x42}])
    hc = pending("4.17", 32, 26, 0x9000, 1, 0, 0x7FF0, memory=[(0x9000, ops)])
    assert dict(hc.detail.rows[0])["cmd"] == "MMUEXT_PIN_L4_TABLE"


def test_update_va_mapping_arguments_per_width():
    hc = pending("4.17", 32, 14, 0xC0000000, 0x1067, 0, 2)
    assert [a.name for a in hc.args] == ["va", "val_lo", "val_hi", "flags"]
    assert hc.args[3].text == "UVMF_INVLPG|UVMF_LOCAL"
    hc = pending("4.17", 64, 14, 0xFFFF888000000000, 0x1067, 6)
    assert [a.name for a in hc.args] == ["va", "val", "flags"] and hc.args[2].text == "UVMF_INVLPG|UVMF_ALL"


IRET_FRAME = b"".join(v.to_bytes(8, "little") for v in (1, 2, 3, 0, 0x401000, 0xE033, 0x202, 0x7FF0, 0xE02B))
# Xen's iret stub (pv_ring3_init_hypercall_page, RELEASE-4.17.0): push %rcx; push %r11; push %rax;
# mov $23,%eax; syscall.
IRET_STUB = bytes.fromhex("51 4153 50 b817000000 0f05").ljust(32, b"\xcc")


def test_iret_frame_from_stack_at_the_instruction():
    abi = get_abi("4.17", 64)
    regs = registers(64, 23, pc=PC + 9) | {"rsp": 0x8000}
    hc = decode_pending(InMemoryTarget(regs, [(PC, IRET_STUB), (0x8000, IRET_FRAME)]), abi)
    assert hc.name == "iret" and isinstance(hc.detail, StructFields)
    assert dict(hc.detail.fields)["rip"] == 0x401000 and hc.detail.address == 0x8000


STALE = b"\xee" * 24  # what lies below the stack pointer before the stub's pushes


def test_iret_frame_at_the_stub_entry_is_below_the_stack_pointer():
    """At the stub's first instruction rcx, r11 and rax are not pushed yet: the frame the syscall will
    hand Xen starts 24 bytes below RSP, and its first three words are those registers, not the stale
    words in memory there."""
    abi = get_abi("4.17", 64)
    regs = registers(64, 0, pc=PC) | {"rsp": 0x8000 + 24, "rax": 0, "r11": 0x246, "rcx": 0xFFFFFFFE}
    hc = decode_pending(InMemoryTarget(regs, [(PC, IRET_STUB), (0x8000, STALE + IRET_FRAME[24:])]), abi)
    assert hc.name == "iret" and isinstance(hc.detail, StructFields)
    fields = dict(hc.detail.fields)
    assert hc.detail.address == 0x8000
    assert (fields["rax"], fields["r11"], fields["rcx"]) == (0, 0x246, 0xFFFFFFFE)
    assert (fields["rip"], fields["cs"], fields["ss"]) == (0x401000, 0xE033, 0xE02B)


def test_iret_frame_midway_through_the_stub_takes_only_the_pushes_still_to_come():
    """After `push %rcx` only r11 and rax are still to be pushed: rcx's word is in memory already."""
    abi = get_abi("4.17", 64)
    frame = bytearray(STALE + IRET_FRAME[24:])
    frame[16:24] = (0x1234).to_bytes(8, "little")  # rcx, pushed by the stub's first instruction
    regs = registers(64, 0, pc=PC + 1) | {"rsp": 0x8000 + 16, "rax": 7, "r11": 0x202}
    hc = decode_pending(InMemoryTarget(regs, [(PC, IRET_STUB), (0x8000, bytes(frame))]), abi)
    fields = dict(hc.detail.fields)
    assert (fields["rax"], fields["r11"], fields["rcx"], fields["rip"]) == (7, 0x202, 0x1234, 0x401000)


def test_iret_frame_at_the_32_bit_stub_entry_takes_eax_from_the_register():
    """Xen's 32-bit iret stub is `push %eax; mov $23,%eax; int $0x82` (pv_ring1_init_hypercall_page,
    RELEASE-4.17.0): the frame's EAX is the register, the rest is at ESP."""
    abi = get_abi("4.17", 32)
    stub = bytes.fromhex("50 b817000000 cd82").ljust(32, b"\xcc")
    rest = b"".join(v.to_bytes(4, "little") for v in (0xC0101000, 0xE019, 0x202, 0xC0400000, 0xE021))
    regs = registers(32, 0, pc=0xC0001000) | {"esp": 0x8004, "eax": 0x104010}
    hc = decode_pending(InMemoryTarget(regs, [(0xC0001000, stub), (0x8000, b"\x55\x03\x10\x00" + rest)]), abi)
    fields = dict(hc.detail.fields)
    assert hc.detail.address == 0x8000
    # Back to ring 1: compat_iret pops 16 bytes, the words above are not the frame's (no ESP/SS).
    assert fields == {"eax": 0x104010, "eip": 0xC0101000, "cs": 0xE019, "eflags": 0x202}


@pytest.mark.parametrize("cs,has_stack,finding", [(0xE019, False, None), (0xE02B, True, None),
                                                   (0xE01B, True, None), (0xE018, False, "iret-ring-0")])
def test_a_32_bit_iret_frame_has_esp_and_ss_only_on_a_ring_change(cs, has_stack, finding):
    """compat_iret (pv/iret.c, RELEASE-4.17.0): ring 1 pops EAX, EIP, CS, EFLAGS; ring 2/3 also ESP, SS;
    ring 0 crashes the domain."""
    abi = get_abi("4.17", 32)
    frame = b"".join(v.to_bytes(4, "little") for v in (7, 0xC0101000, cs, 0x202, 0xBFFF0000, 0xE02B))
    regs = registers(32, 23, pc=0xC0001006) | {"esp": 0x8000}
    stub = bytes.fromhex("50 b817000000 cd82").ljust(32, b"\xcc")
    hc = decode_pending(InMemoryTarget(regs, [(0xC0001000, stub), (0x8000, frame)]), abi)
    fields = dict(hc.detail.fields)
    assert ("esp" in fields and "ss" in fields) is has_stack
    if has_stack:
        assert (fields["esp"], fields["ss"]) == (0xBFFF0000, 0xE02B)
    assert [f.rule for f in hc.findings if f.rule.startswith("iret")] == ([finding] if finding else [])


def test_batched_iret_at_the_multicall_stub_entry_sees_the_pushes_to_come():
    """A multicall's iret entry reads its frame at the guest's stack pointer at the syscall; from the
    stub's entry that is 16 bytes lower, where rcx and r11 will be pushed."""
    abi = get_abi("4.17", 64)
    call_list = 0x9000
    entry = pack(abi, "multicall_entry", op=23, args=[0] * 6)
    stub = bytes.fromhex("514153 b80d000000 0f05").ljust(32, b"\xcc")
    regs = registers(64, 0, pc=PC) | {"rdi": call_list, "rsi": 1, "rsp": 0x8000 + 16, "rcx": 0xAA, "r11": 0xBB}
    target = InMemoryTarget(regs, [(PC, stub), (0x8000, STALE[:16] + IRET_FRAME[16:]), (call_list, entry)])
    hc = decode_pending(target, abi)
    assert hc.name == "multicall" and hc.stack is not None and hc.stack.sp == 0x8000
    (batched,) = hc.detail.entries
    fields = dict(batched.call.detail.fields)
    assert (fields["rax"], fields["r11"], fields["rcx"]) == (0xBB, 0xAA, 3)  # r11 pushed last lands lowest
    batch, _ = decode_multicall(target, abi, call_list, 1, stack=hc.stack)  # as `xen multicall` does
    assert batch.entries[0].call.detail == batched.call.detail


def test_batched_iret_inside_a_xen_handler_reads_the_guest_frame_xen_saved():
    """At do_multicall the guest's stack pointer is in guest_cpu_user_regs at the base of cpu_info, at
    the top of Xen's 32 KiB stack (asm/current.h, RELEASE-4.17.0)."""
    abi = get_abi("4.17", 64)
    call_list, stack_top, guest_sp = 0x9000, 0xFFFF830000008000, 0x7000
    cpu_info = stack_top - 264
    frame = pack(abi, "cpu_user_regs", rax=13, rsp=guest_sp, cs=0xE033, rip=0x401234, ss=0xE02B)
    entry = pack(abi, "multicall_entry", op=23, args=[0] * 6)
    regs = {"rip": 0xFFFF82D040229A90, "rdi": call_list, "rsi": 1, "rdx": 0, "rcx": 0, "r8": 0,
            "rsp": stack_top - 0x200}
    target = InMemoryTarget(regs, [(call_list, entry), (cpu_info, frame), (guest_sp, IRET_FRAME)])
    hc = decode_in_xen(target, "do_multicall", lambda w, cs=None: get_abi("4.17", w))
    (batched,) = hc.detail.entries
    assert batched.call.detail.address == guest_sp
    assert dict(batched.call.detail.fields)["rip"] == 0x401000
    # A frame that does not check out (not a guest selector, or not this call's number) is not used.
    bad = pack(abi, "cpu_user_regs", rax=13, rsp=guest_sp, cs=0xE008)
    hc = decode_in_xen(InMemoryTarget(regs, [(call_list, entry), (cpu_info, bad), (guest_sp, IRET_FRAME)]),
                       "do_multicall", lambda w, cs=None: get_abi("4.17", w))
    assert any(f.rule == "iret-frame-unknown" for f in hc.detail.entries[0].call.findings)


def test_batched_iret_inside_a_xen_handler_is_not_read_from_xens_stack():
    abi = get_abi("4.17", 64)
    call_list = 0x9000
    entry = pack(abi, "multicall_entry", op=23, args=[0] * 6)
    regs = {"rip": 0xFFFF82D040229A90, "rdi": call_list, "rsi": 1, "rdx": 0, "rcx": 0, "r8": 0,
            "rsp": 0xFFFF830000007F00}
    hc = decode_in_xen(InMemoryTarget(regs, [(call_list, entry)]), "do_multicall",
                       lambda w, cs=None: get_abi("4.17", w))
    (batched,) = hc.detail.entries
    assert batched.call.name == "iret" and batched.call.detail is None
    assert any(f.rule == "iret-frame-unknown" for f in batched.call.findings)


def test_former_names_and_renumbering():
    assert pending("3.0", 32, 6, 0).name == "sched_op"
    hc = pending("4.17", 32, 6, 0)
    assert hc.name == "sched_op_compat" and "sched_op" in hc.former_names
    assert get_abi("4.17", 64).hypercall_named("sched_op").nr == 29
    assert get_abi("3.0", 64).hypercall_named("sched_op").nr == 6
    assert get_abi("4.17", 64).hypercall_named("dom0_op").name == "platform_op"


# --- where the vCPU stands -----------------------------------------------------------------------

def test_pending_from_stub_entry_uses_the_stub_number():
    abi = get_abi("4.17", 64)
    regs = registers(64, 0xDEAD, 3, 1, 0, pc=PC)  # RAX not yet loaded: the stub says 24
    hc = decode_pending(InMemoryTarget(regs, [(PC, stub(64, 24))]), abi)
    assert hc.name == "vcpu_op" and "stub for hypercall 24" in hc.site


def test_pending_inline_stub_without_mov():
    abi = get_abi("4.17", 64)
    inline = bytes.fromhex("51 41 53 0f 05 41 5b 59 c3".replace(" ", "")).ljust(32, b"\xcc")  # xen_hypercall_pv
    hc = decode_pending(InMemoryTarget(registers(64, 24, 3, 1, pc=PC), [(PC, inline)]), abi)
    assert hc.name == "vcpu_op" and hc.site.startswith("in inline stub")


def test_pending_vmcall_and_not_a_hypercall():
    abi = get_abi("4.17", 64)
    hc = decode_pending(InMemoryTarget(registers(64, 17, 0, pc=PC), [(PC, bytes.fromhex("0f01c1c3"))]), abi)
    assert hc.name == "xen_version" and hc.site == "at vmcall"
    with pytest.raises(DecodeError, match="no hypercall pending"):
        decode_pending(InMemoryTarget(registers(64, 17, pc=PC), [(PC, bytes.fromhex("4889c3c3"))]), abi)


def test_hypercall_page_stubs_map_numbers_to_addresses():
    from xendbg.arch import hypercall_page_stubs

    for width in (32, 64):
        page = b"".join(stub(width, nr) for nr in range(4)) + b"\xcc" * 32 + stub(width, 9)
        # A stub whose number does not match its slot (here 9 at slot 5) is not a hypercall-page stub.
        assert hypercall_page_stubs(page, 0x5000, width) == {0: 0x5000, 1: 0x5020, 2: 0x5040, 3: 0x5060}


def test_cpu_mode_from_code_selector():
    from xendbg.arch import cpu_mode

    assert cpu_mode(0xE019).width == 32 and cpu_mode(0x0819).ring == 1
    assert cpu_mode(0xE033).width == 64
    assert cpu_mode(0xE008).width is None  # Xen's own ring-0 selector
    assert cpu_mode(0xE023).width == 32  # a 64-bit PV guest's compat user code


def test_decoding_a_trap_table_reads_it_once():
    abi = get_abi("4.17", 32)
    target = InMemoryTarget(registers(32, 0, TABLE, pc=PC),
                            [(PC, stub(32, 0)), (TABLE, pack_many(abi, "trap_info", trap_rows(0xE019)) + bytes(512))])
    decode_pending(target, abi)
    assert target.reads == 2  # the code at PC, then the whole table in one read

"""The structures behind the arguments, case by case: what each sub-operation decodes to, what the
argument texts say, and what happens at the edges (unreadable memory, unknown commands, limits)."""

from __future__ import annotations

import pytest

from tests.unit.images import pack, pack_many, registers, stub
from xendbg.abi import get_abi
from xendbg.decode import StructFields, Text, TrapTable, decode_call, decode_multicall, decode_trap_table
from xendbg.target import InMemoryTarget

BUF, TABLE = 0x9000, 0x10000


def call(version: str, width: int, nr: int, *args: int, memory=()):
    return decode_call(InMemoryTarget(memory=memory), get_abi(version, width), nr, args)


def fields(hc) -> dict:
    assert isinstance(hc.detail, StructFields)
    return dict(hc.detail.fields)


def messages(hc) -> list[tuple[str, str, str]]:
    return [(f.rule, f.severity, f.message) for f in hc.findings]


# --- argument texts -----------------------------------------------------------------------------------

def test_int_arguments_are_shown_signed_only_when_negative():
    hc = call("4.17", 64, 5, 2**64 - 1)  # fpu_taskswitch(set: int)
    assert (hc.args[0].value, hc.args[0].text) == (2**64 - 1, "-1")
    assert call("4.17", 64, 5, 1).args[0].text is None
    assert call("4.17", 32, 5, 0xFFFFFFFE).args[0].text == "-2"
    assert call("4.17", 32, 5, 0x7FFFFFFF).args[0].text is None


def test_command_texts():
    assert call("4.17", 64, 17, 3, 0).args[0].text == "XENVER_capabilities"
    assert call("4.17", 64, 17, 999, 0).args[0].text == "unknown XENVER 999"
    # Xen 2.0's sched_op: the command in bits 0-7, the shutdown reason in bits 8-15
    hc = call("2.0", 32, 6, 2 | 3 << 8)
    assert (hc.subop, hc.args[0].text) == ("SCHEDOP_shutdown, reason 3", "SCHEDOP_shutdown, reason 3")
    assert fields(hc) == {"reason": 3}
    assert call("2.0", 32, 6, 1).args[0].text == "SCHEDOP_block"
    assert call("2.0", 32, 6, 1).detail is None
    assert call("3.0", 32, 6, 2 | 3 << 8).args[0].text == "unknown SCHEDOP 770"  # no packing after 2.0


def test_domid_selector_and_vector_texts():
    hc = call("4.17", 64, 1, 0, 0, 0, 0x7FF2)
    assert hc.args[3].text == "DOMID_XEN"
    assert call("4.17", 64, 1, 0, 0, 0, 5).args[3].text is None
    assert call("4.17", 32, 3, 0xE021, 0x1000).args[0].text == "0xe021 (FLAT_RING1_DS, RPL 1)"
    assert call("4.17", 32, 3, 0x1E021, 0x1000).args[0].text == "0xe021 (FLAT_RING1_DS, RPL 1)"  # 16 bits count
    assert call("2.0", 32, 11, 0x80).args[0].text == "int 0x80"


# --- trap tables --------------------------------------------------------------------------------------

@pytest.mark.parametrize("version,rule,severity,message", [
    ("4.17", "trap-table-null", "info", "a NULL table clears every entry of the virtual IDT"),
    ("3.0.2", "trap-table-null", "info", "a NULL table clears every entry of the virtual IDT"),
    ("3.0", "unreadable-memory", "error", "trap table at 0x0 cannot be read: Xen would fail the call with -EFAULT"),
])
def test_null_trap_table(version, rule, severity, message):
    table, found = decode_trap_table(InMemoryTarget(), get_abi(version, 32), 0)
    assert (table.address, table.entries, table.terminated, table.note) == (0, (), True, "NULL table")
    assert [(f.rule, f.severity, f.message) for f in found] == [(rule, severity, message)]


def test_trap_table_findings_name_entries_and_group_selectors():
    abi = get_abi("3.0", 32)
    rows = [{"vector": v, "cs": 0xE018, "address": 0xC0001000 + v} for v in (0, 1, 2, 3)]
    rows += [{"vector": 14, "cs": 0xE01A, "address": 0xC0002000}, {"vector": 3, "cs": 0xE019, "address": 0xC0003000},
             {"vector": 0, "address": 0}]
    table, found = decode_trap_table(InMemoryTarget(memory=[(TABLE, pack_many(abi, "trap_info", rows))]), abi, TABLE)
    assert [f.message for f in found] == [
        "trap_info[5] (vector 0x3 #BP): vector also set by entry 3; the later entry wins",
        "4 entries from trap_info[0] (vectors 0x0-0x3): selector 0xe018 has RPL 0, but a 32-bit PV kernel runs in "
        "ring 1: Xen 3.0 rejects the call with -EPERM",
        "trap_info[4] (vector 0xe #PF): selector 0xe01a has RPL 2, but a 32-bit PV kernel runs in ring 1: Xen 3.0 "
        "rejects the call with -EPERM"]
    assert table.note == "#PF: the guest finds the faulting address in its vcpu_info (arch.cr2), not in CR2"
    no_pf, _ = decode_trap_table(InMemoryTarget(memory=[(TABLE, pack_many(abi, "trap_info", rows[:4] + rows[-1:]))]),
                                 abi, TABLE)
    assert no_pf.note == ""
    abi = get_abi("2.0", 32)
    table, _ = decode_trap_table(InMemoryTarget(memory=[(TABLE, pack_many(abi, "trap_info", rows))]), abi, TABLE)
    assert table.note == "#PF: Xen 2.0 pushes the faulting address (CR2) onto the guest frame below the error code"


def test_trap_table_limits_and_chunks():
    abi = get_abi("4.17", 64)
    rows = [{"vector": i, "cs": 0xE033, "address": 0xFFFFFFFF81000000 + i} for i in range(40)]
    data = pack_many(abi, "trap_info", rows + [{"vector": 0, "address": 0}])
    target = InMemoryTarget(memory=[(TABLE, data)])
    table, found = decode_trap_table(target, abi, TABLE)
    assert len(table.entries) == 40 and table.terminated and found == ()
    assert [e.index for e in table.entries] == list(range(40))
    table, found = decode_trap_table(target, abi, TABLE, limit=10)
    assert len(table.entries) == 10 and not table.terminated
    assert [f.message for f in found] == [f"no entry with address 0 in the first 10 entries at {TABLE:#x}: Xen keeps "
                                          "reading past the table until it finds one or faults (-EFAULT)"]


def test_trap_table_read_entry_by_entry_when_a_chunk_is_partly_mapped():
    abi = get_abi("4.17", 32)
    rows = [{"vector": v, "cs": 0xE019, "address": 0xC0001000 + v} for v in (1, 2, 3)]
    target = InMemoryTarget(memory=[(TABLE, pack_many(abi, "trap_info", rows))])
    table, found = decode_trap_table(target, abi, TABLE)
    assert [e.vector for e in table.entries] == [1, 2, 3] and table.note == "unreadable"
    assert [f.message for f in found] == [f"trap_info[3] at {TABLE + 24:#x} cannot be read: Xen would fail the call "
                                          "with -EFAULT"]


# --- multicall batches --------------------------------------------------------------------------------

def test_empty_and_oversized_batches():
    abi = get_abi("4.17", 64)
    batch, found = decode_multicall(InMemoryTarget(), abi, BUF, 0)
    assert batch.entries == () and batch.count == 0 and not batch.truncated
    assert [(f.rule, f.severity, f.message) for f in found] == [
        ("multicall-empty", "info", "the batch has no entries: Xen returns 0 at once")]
    rows = pack_many(abi, "multicall_entry", [{"op": 17, "args": [0, 0]}] * 256)
    batch, found = decode_multicall(InMemoryTarget(memory=[(BUF, rows)]), abi, BUF, 257)
    assert len(batch.entries) == 256 and batch.truncated and batch.count == 257
    assert [(f.rule, f.message) for f in found] == [
        ("multicall-count", "nr_calls is 257: xendbg decodes the first 256 entries only")]
    batch, found = decode_multicall(InMemoryTarget(memory=[(BUF, rows)]), abi, BUF, 256)
    assert found == () and not batch.truncated
    batch, _ = decode_multicall(InMemoryTarget(memory=[(BUF, rows)]), abi, BUF, 2**32 + 1)  # nr_calls is 32 bits
    assert batch.count == 1 and len(batch.entries) == 1


def test_batch_entries_are_decoded_in_full_and_read_at_once():
    abi = get_abi("4.17", 64)
    entries = pack_many(abi, "multicall_entry", [
        {"op": 32, "args": [4, BUF + 0x100]},  # event_channel_op(EVTCHNOP_send, &port)
        {"op": 18, "args": [0, 2, BUF + 0x200]}])  # console_io(CONSOLEIO_write, 2, "hi")
    target = InMemoryTarget(memory=[(BUF, entries), (BUF + 0x100, pack(abi, "evtchn_port", port=9)),
                                    (BUF + 0x200, b"hi")])
    hc = decode_call(target, abi, 13, (BUF, 2))
    send, write = hc.detail.entries
    assert (send.call.subop, dict(send.call.detail.fields)) == ("EVTCHNOP_send", {"port": 9})
    assert (write.call.subop, write.call.detail.text) == ("CONSOLEIO_write", "hi")
    assert [e.result for e in hc.detail.entries] == [None, None]
    assert hc.detail.address == BUF and hc.detail.count == 2
    assert target.reads == 3  # the batch in one read, then each entry's own struct


def test_entry_findings_carry_their_entry_and_a_batch_is_not_followed_twice():
    abi = get_abi("4.17", 64)
    inner = pack_many(abi, "multicall_entry", [{"op": 17, "args": [0, 0]}])
    outer = pack_many(abi, "multicall_entry", [{"op": 24, "args": [77, 0, 0]}, {"op": 13, "args": [BUF + 0x100, 1]}])
    hc = decode_call(InMemoryTarget(memory=[(BUF, outer), (BUF + 0x100, inner)]), abi, 13, (BUF, 2))
    assert [(f.rule, f.message) for f in hc.all_findings()] == [
        ("multicall-nested", "entry 1 is itself a multicall: Xen 4.17 refuses nested multicalls and sets its result "
                             "to -EINVAL"),
        ("unknown-subop", "multicall entry 0: vcpu_op command 77 is unknown: Xen fails the call with -ENOSYS")]
    assert hc.detail.entries[1].call.detail is None  # the nested batch is not decoded
    assert [a.value for a in hc.detail.entries[1].call.args] == [BUF + 0x100, 1]


# --- sub-operations -----------------------------------------------------------------------------------

def test_vcpu_op_other_structs_and_unreadable():
    abi = get_abi("4.17", 64)
    timer = pack(abi, "vcpu_set_singleshot_timer", timeout_abs_ns=123456789, flags=1)
    assert fields(call("4.17", 64, 24, 8, 0, BUF, memory=[(BUF, timer)])) == {"timeout_abs_ns": 123456789,
                                                                              "flags": 1}
    info = pack(abi, "vcpu_register_vcpu_info", mfn=0x1234, offset=0x40)
    assert fields(call("4.17", 64, 24, 10, 0, BUF, memory=[(BUF, info)])) == {"mfn": 0x1234, "offset": 0x40,
                                                                              "rsvd": 0}
    assert call("4.17", 64, 24, 1, 0, 0).detail is None  # VCPUOP_up takes no struct
    for cmd, struct in ((0, "vcpu_guest_context"), (8, "vcpu_set_singleshot_timer")):
        hc = call("4.17", 64, 24, cmd, 0, BUF)
        assert hc.detail is None
        assert messages(hc) == [("unreadable-memory", "error", f"{struct} at {BUF:#x} cannot be read: Xen would fail "
                                 "the call with -EFAULT")]


def test_vcpu_context_32_bit_callbacks_are_checked():
    abi = get_abi("3.0.2", 32)
    ctxt = pack(abi, "vcpu_guest_context", user_regs={"eip": 0xC0100000, "esp": 0xC0200000, "cs": 0xE019,
                                                      "ss": 0xE021}, ctrlreg=[0, 0, 0, 0x1000, 0, 0, 0, 0],
                event_callback_cs=0xE019, failsafe_callback_cs=0x1E018, kernel_ss=0xE021,
                trap_ctxt=[{"vector": 3, "cs": 0xE019, "address": 1}, {}, {"vector": 4, "cs": 0xE019, "address": 2}])
    hc = call("3.0.2", 32, 24, 0, 2, BUF, memory=[(BUF, ctxt)])
    assert [m for _, _, m in messages(hc)] == [
        "vCPU 2 failsafe callback: selector 0xe018 has RPL 0; Xen 3.0.2 silently raises it to the 32-bit PV "
        "kernel's RPL 1 (0xe019)"]
    # RELEASE-3.0.0's arch_set_info_guest checks only CS and SS, not the callback selectors
    assert messages(call("3.0", 32, 24, 0, 2, BUF, memory=[(BUF, ctxt)])) == []
    assert list(fields(hc)) == ["eip", "esp", "cs", "ss", "flags", "kernel_ss", "kernel_sp", "event_callback_cs",
                                "event_callback_eip", "failsafe_callback_cs", "failsafe_callback_eip", "vm_assist",
                                "cr3", "trap_ctxt entries"]
    assert fields(hc)["trap_ctxt entries"] == 2


@pytest.mark.parametrize("reason,text", [(0, "SHUTDOWN_poweroff"), (5, "SHUTDOWN_soft_reset"), (42, "42")])
def test_sched_op_shutdown_reasons(reason, text):
    abi = get_abi("4.17", 64)
    hc = call("4.17", 64, 29, 2, BUF, memory=[(BUF, pack(abi, "sched_shutdown", reason=reason))])
    assert hc.detail == StructFields("sched_shutdown", BUF, (("reason", text),))
    hc = call("4.17", 64, 29, 5, BUF, memory=[(BUF, pack(abi, "sched_shutdown", reason=reason))])  # shutdown_code
    assert dict(hc.detail.fields) == {"reason": text}


def test_sched_op_other_commands_and_unreadable():
    assert call("4.17", 64, 29, 0, 0).detail is None  # yield
    hc = call("4.17", 64, 29, 2, BUF)
    assert hc.detail is None and messages(hc) == [
        ("unreadable-memory", "error", f"sched_shutdown at {BUF:#x} cannot be read: Xen would fail the call with "
                                       "-EFAULT")]
    hc = call("4.17", 64, 6, 2, 1)  # sched_op_compat(SCHEDOP_shutdown, SHUTDOWN_reboot)
    assert hc.detail == StructFields("sched_op", 0, (("reason", "SHUTDOWN_reboot"),))
    assert call("4.17", 64, 6, 1, 1).detail is None


@pytest.mark.parametrize("cmd,struct,values,expected", [
    (1, "evtchn_bind_virq", {"virq": 1, "vcpu": 2, "port": 3}, {"virq": "VIRQ_DEBUG", "vcpu": 2, "port": 3}),
    (1, "evtchn_bind_virq", {"virq": 99, "vcpu": 0, "port": 0}, {"virq": 99, "vcpu": 0, "port": 0}),
    (6, "evtchn_alloc_unbound", {"dom": 0x7FF0, "remote_dom": 1, "port": 4},
     {"dom": 0x7FF0, "remote_dom": 1, "port": 4}),
    (7, "evtchn_bind_ipi", {"vcpu": 1, "port": 5}, {"vcpu": 1, "port": 5}),
    (0, "evtchn_bind_interdomain", {"remote_dom": 2, "remote_port": 6, "local_port": 7},
     {"remote_dom": 2, "remote_port": 6, "local_port": 7}),
    (3, "evtchn_close", {"port": 8}, {"port": 8}),  # EVTCHNOP_close: its own struct (2.0's has a dom first)
    (9, "evtchn_port", {"port": 9}, {"port": 9}),
])
def test_event_channel_op_structs(cmd, struct, values, expected):
    abi = get_abi("4.17", 32)
    hc = call("4.17", 32, 32, cmd, BUF, memory=[(BUF, pack(abi, struct, **values))])
    assert (hc.detail.struct, hc.detail.address, dict(hc.detail.fields)) == (struct, BUF, expected)


def test_event_channel_op_unknown_and_unreadable():
    assert call("4.17", 32, 32, 5, BUF).detail is None  # EVTCHNOP_status: no struct decoded
    hc = call("4.17", 32, 32, 4, BUF)
    assert messages(hc) == [("unreadable-memory", "error", f"evtchn_port at {BUF:#x} cannot be read: Xen would fail "
                             "the call with -EFAULT")]


@pytest.mark.parametrize("version,union", [("2.0", 8), ("3.0", 4), ("4.17", 4)])
def test_event_channel_op_compat_struct_inside_evtchn_op(version, union):
    abi = get_abi(version, 32)
    data = bytearray(pack(abi, "evtchn_op", cmd=4))
    data[union:union + 4] = (11).to_bytes(4, "little")
    hc = call(version, 32, 16, BUF, memory=[(BUF, bytes(data))])
    assert hc.subop == "EVTCHNOP_send"
    assert hc.detail == StructFields("evtchn_port", BUF + union, (("port", 11),))
    data[0:4] = (77).to_bytes(4, "little")
    hc = call(version, 32, 16, BUF, memory=[(BUF, bytes(data))])
    assert (hc.subop, hc.detail) == ("unknown EVTCHNOP 77", None)
    hc = call(version, 32, 16, BUF)
    assert (hc.subop, hc.detail) == (None, None)
    assert messages(hc) == [("unreadable-memory", "error", f"evtchn_op at {BUF:#x} cannot be read: Xen would fail "
                             "the call with -EFAULT")]


def test_console_io_limits():
    text = b"x" * 600
    hc = call("4.17", 64, 18, 0, 600, BUF, memory=[(BUF, text)])
    assert isinstance(hc.detail, Text) and len(hc.detail.text) == 512 and hc.detail.truncated
    hc = call("4.17", 64, 18, 0, 512, BUF, memory=[(BUF, text)])
    assert len(hc.detail.text) == 512 and not hc.detail.truncated
    hc = call("4.17", 64, 18, 0, 2**32 + 3, BUF, memory=[(BUF, text)])  # count is 32 bits
    assert hc.detail.text == "xxx"
    assert call("4.17", 64, 18, 1, 3, BUF, memory=[(BUF, text)]).detail is None  # CONSOLEIO_read
    hc = call("4.17", 64, 18, 0, 3, BUF)
    assert messages(hc) == [("unreadable-memory", "error", f"console buffer at {BUF:#x} cannot be read: Xen would "
                             "fail the call with -EFAULT")]
    assert call("4.17", 64, 18, 0, 2, BUF, memory=[(BUF, b"\xff!")]).detail.text == "\ufffd!"


def test_mmu_update_request_types_per_generation():
    abi = get_abi("2.0", 32)
    reqs = pack_many(abi, "mmu_update", [{"ptr": 0x1003, "val": 1}, {"ptr": 0x2001, "val": 2}])
    hc = call("2.0", 32, 1, BUF, 2, 0, 0x7FF0, memory=[(BUF, reqs)])
    assert [dict(r) for r in hc.detail.rows] == [{"ptr": 0x1000, "type": "MMU_EXTENDED_COMMAND", "val": 1},
                                                 {"ptr": 0x2000, "type": "type 1", "val": 2}]
    assert hc.detail.struct == "mmu_update" and hc.detail.address == BUF
    abi = get_abi("4.17", 64)
    ops = pack_many(abi, "mmuext_op", [{"cmd": 99, "arg1": 5, "arg2": 6}])
    hc = call("4.17", 64, 26, BUF, 1, 0, 0x7FF0, memory=[(BUF, ops)])
    assert dict(hc.detail.rows[0]) == {"cmd": "unknown 99", "arg1": 5, "arg2": 6}


@pytest.mark.parametrize("width", [32, 64])
def test_iret_frame_names_and_unreadable_stack(width):
    abi = get_abi("4.17", width)
    names = (("eax", "eip", "cs", "eflags", "esp", "ss") if width == 32 else
             ("rax", "r11", "rcx", "flags", "rip", "cs", "rflags", "rsp", "ss"))
    word = width // 8
    frame = b"".join((i + 1).to_bytes(word, "little") for i in range(len(names)))
    sp = "esp" if width == 32 else "rsp"
    regs = registers(width, 23, pc=0x7000) | {sp: 0x8000}
    target = InMemoryTarget(regs, [(0x7000, stub(width, 23)), (0x8000, frame)])
    hc = decode_call(target, abi, 23, ())
    assert hc.detail == StructFields("iret_context", 0x8000, tuple(zip(names, range(1, len(names) + 1),
                                                                     strict=True)))
    hc = decode_call(InMemoryTarget(regs), abi, 23, ())
    assert hc.detail is None and [f.message for f in hc.findings] == [
        "iret frame at 0x8000 cannot be read: Xen would fail the call with -EFAULT"]
    assert decode_call(InMemoryTarget(), abi, 23, ()).detail is None  # no stack pointer at all


def test_set_fast_trap_without_arguments_and_with_a_known_handler():
    hc = call("2.0", 32, 11)
    assert (hc.detail.vector, hc.detail.handler) == (0, None)
    assert [f.rule for f in hc.findings] == ["fast-trap-disable"]
    hc = call("2.0", 32, 11, 0x180)  # the vector is a byte
    assert hc.detail.vector == 0x80 and hc.detail.vector_name == "int 0x80"


def test_set_trap_table_detail_is_a_table():
    abi = get_abi("4.17", 64)
    hc = call("4.17", 64, 0, TABLE, memory=[(TABLE, pack_many(abi, "trap_info", [{"vector": 0, "address": 0}]))])
    assert hc.detail == TrapTable(TABLE, (), True, "")


# --- what each detail records besides its fields --------------------------------------------------------

def test_details_record_their_struct_and_address():
    hc = call("2.0", 32, 6, 2 | 3 << 8)
    assert hc.detail == StructFields("sched_op", 0, (("reason", 3),))
    abi = get_abi("4.17", 64)
    timer = pack(abi, "vcpu_set_singleshot_timer", timeout_abs_ns=5, flags=1)
    hc = call("4.17", 64, 24, 8, 0, BUF, memory=[(BUF, timer)])
    assert hc.detail == StructFields("vcpu_set_singleshot_timer", BUF, (("timeout_abs_ns", 5), ("flags", 1)))
    hc = call("4.17", 64, 18, 0, 2, BUF, memory=[(BUF, b"ok")])
    assert hc.detail == Text(BUF, "ok", False)


def test_iret_reads_the_stack_pointer_by_its_protocol_name():
    from tests.unit.test_arch import StrictTarget

    for width, sp in ((32, "esp"), (64, "rsp")):
        frame = bytes(8 * 9)
        hc = decode_call(StrictTarget({sp: 0x8000}, [(0x8000, frame)]), get_abi("4.17", width), 23, ())
        assert isinstance(hc.detail, StructFields) and hc.detail.address == 0x8000


def test_decode_in_xen_frame_entries_and_state():
    from xendbg.abi.layouts import ERA_3, layout, pack_u
    from xendbg.decode import GuestState, TrapEntry, decode_in_xen

    lay = layout("cpu_user_regs", 64, ERA_3)
    frame = bytearray(lay.size)
    for name, value in (("rax", 11), ("rbx", 0x80), ("rip", 0xC0100000), ("cs", 0x0819)):
        f = lay.field(name)
        size = {"u64": 8, "u32": 4, "u16": 2}[f.kind]
        frame[f.offset:f.offset + size] = pack_u(value, size)
    target = InMemoryTarget({"rdi": 0x1000}, [(0x1000, bytes(frame))])
    state = GuestState()
    state.trap_table[0x80] = TrapEntry(0, 0x80, "int 0x80", 3, 3, False, 0x0819, 1, 0xC0008000)
    hc = decode_in_xen(target, "do_entry_int82", lambda width, cs=None: get_abi("2.0", width), state=state)
    assert (hc.name, hc.width) == ("set_fast_trap", 32)
    assert hc.site == "in Xen at do_entry_int82(), from the guest's saved registers (guest PC 0xc0100000)"
    assert hc.detail.handler is state.trap_table[0x80]  # the state reaches the decoder
    assert hc.findings == ()


def test_unknown_hypercall_arguments_and_call_fields():
    hc = decode_call(InMemoryTarget(), get_abi("3.0.2", 32), 31, (1, 2, 3, 4, 5, 6), site="at int 0x82")
    assert [(a.name, a.kind, a.value) for a in hc.args] == [(f"arg{i}", "ulong", i + 1) for i in range(5)]
    assert (hc.name, hc.generation, hc.width, hc.site) == (None, "3.0.2", 32, "at int 0x82")
    assert [f.message for f in hc.findings] == ["hypercall number 31 does not exist in Xen 3.0.2 (32-bit PV): the "
                                                "call fails with -ENOSYS"]
    # 3.0.2's entry masks the number with 31: 77 runs multicall (13)
    hc = decode_call(InMemoryTarget(), get_abi("3.0.2", 32), 77, (1, 2, 3, 4, 5, 6))
    assert (hc.name, hc.findings[0].rule, hc.findings[0].severity) == ("multicall", "hypercall-number-wraps",
                                                                       "warning")
    assert hc.findings[0].message.endswith("number 77 runs multicall (number 13)")
    hc = call("4.17", 64, 17, 0, 0)
    assert (hc.generation, hc.width, hc.site) == ("4.17", 64, "")
    assert call("4.17", 64, 5, 0).args[0].text is None  # int 0 is not negative


def test_callback_op_details_and_messages():
    abi = get_abi("4.17", 32)
    reg = pack(abi, "callback_register", type=0, cs=0xE018, address=0xC0100000)
    hc = call("4.17", 32, 30, 0, BUF, memory=[(BUF, reg)])
    assert hc.detail.operation == "register"
    assert [f.message for f in hc.findings] == ["event callback: selector 0xe018 has RPL 0; Xen 4.17 silently raises "
                                                "it to the 32-bit PV kernel's RPL 1 (0xe019)"]
    abi = get_abi("4.17", 64)
    reg = pack(abi, "callback_register", type=2, address=0x0000800000000000)
    assert [f.message for f in call("4.17", 64, 30, 0, BUF, memory=[(BUF, reg)]).findings] == [
        "syscall callback: address 0x0000800000000000 is not canonical: Xen 4.17 rejects the call with -EINVAL"]
    unreg = pack(abi, "callback_unregister", type=4)
    hc = call("4.17", 64, 30, 1, BUF, memory=[(BUF, unreg)])
    assert hc.detail.operation == "unregister" and hc.detail.entries[0].address == 0


def test_set_callbacks_messages():
    assert [f.message for f in call("3.0", 32, 4, 0xE019, 1, 0xE01A, 2).findings] == [
        "failsafe callback: selector 0xe01a has RPL 2, but a 32-bit PV kernel runs in ring 1: Xen 3.0 rejects the "
        "call with -EPERM"]
    assert [f.message for f in call("4.17", 64, 4, 0, 0x0000800000000000, 0).findings] == [
        "failsafe callback: address 0x0000800000000000 is not canonical: Xen 4.17 rejects the call with -EINVAL"]


def test_fixed_up_ldt_selector_keeps_its_table_bit():
    assert [f.message for f in call("4.17", 32, 4, 0x000C, 1, 0xE019, 2).findings] == [
        "event callback: selector 0x000c has RPL 0; Xen 4.17 silently raises it to the 32-bit PV kernel's RPL 1 "
        "(0x000d)"]


def test_multicall_batch_edges():
    abi = get_abi("4.17", 64)
    rows = pack_many(abi, "multicall_entry", [{"op": 17, "args": [0, 0]}] * 3)
    batch, found = decode_multicall(InMemoryTarget(memory=[(BUF, rows)]), abi, BUF, 300)
    assert [(f.rule, f.severity) for f in found] == [("multicall-count", "warning"), ("unreadable-memory", "error")]
    assert found[1].message == f"multicall entry 3 at {BUF + 3 * 64:#x} cannot be read: Xen would fail the call " \
                               "with -EFAULT"
    nested = pack_many(abi, "multicall_entry", [{"op": 13, "args": [BUF, 1]}])
    batch, _ = decode_multicall(InMemoryTarget(memory=[(BUF, nested)]), abi, BUF, 1, results=False)
    call_ = batch.entries[0].call
    assert (call_.nr, call_.generation, call_.width, batch.entries[0].result_text) == (13, "4.17", 64, None)


def test_multicall_entries_see_the_registered_state():
    from xendbg.decode import GuestState, TrapEntry

    abi = get_abi("2.0", 32)
    state = GuestState()
    state.trap_table[0x80] = TrapEntry(0, 0x80, "int 0x80", 3, 3, True, 0x0819, 1, 0xC0008000)
    rows = pack_many(abi, "multicall_entry", [{"op": 11, "args": [0x80, 0, 0, 0, 0, 0, 0]}])
    batch, _ = decode_multicall(InMemoryTarget(memory=[(BUF, rows)]), abi, BUF, 1, state=state)
    assert [f.rule for f in batch.entry_findings()] == ["fast-trap-interrupt-flag"]
    assert batch.entries[0].call.detail.handler is state.trap_table[0x80]


def test_trap_table_limit_between_chunks_and_unreadable_fields():
    abi = get_abi("4.17", 64)
    rows = [{"vector": i, "cs": 0xE033, "address": 0xFFFFFFFF81000000 + i} for i in range(50)]
    target = InMemoryTarget(memory=[(TABLE, pack_many(abi, "trap_info", rows))])
    table, found = decode_trap_table(target, abi, TABLE, limit=40)
    assert len(table.entries) == 40 and table.terminated is False
    assert [f.rule for f in found] == ["trap-table-unterminated"]
    table, found = decode_trap_table(InMemoryTarget(memory=[(TABLE, pack_many(abi, "trap_info", rows[:2]))]), abi,
                                     TABLE)
    assert (table.address, table.terminated, table.note) == (TABLE, False, "unreadable")
    rows = [{"vector": 3, "cs": 0xE033, "address": 0x0000800000000000}, {"vector": 0, "address": 0}]
    _, found = decode_trap_table(InMemoryTarget(memory=[(TABLE, pack_many(abi, "trap_info", rows))]), abi, TABLE)
    assert [f.message for f in found] == ["trap_info[0] (vector 0x3 #BP): address 0x0000800000000000 is not "
                                          "canonical: Xen 4.17 rejects the call with -EINVAL"]


def test_vcpu_initialise_detail_and_message():
    abi = get_abi("4.17", 32)
    ctxt = pack(abi, "vcpu_guest_context", user_regs={"cs": 0xE018, "ss": 0xE021}, event_callback_cs=0xE019,
                failsafe_callback_cs=0xE019, ctrlreg=[0, 0, 0, 0x1000, 0, 0, 0, 0])
    hc = call("4.17", 32, 24, 0, 3, BUF, memory=[(BUF, ctxt)])
    assert (hc.detail.struct, hc.detail.address) == ("vcpu_guest_context", BUF)
    assert [f.message for f in hc.findings] == ["vCPU 3 initial CS: selector 0xe018 has RPL 0; Xen 4.17 silently "
                                                "raises it to the 32-bit PV kernel's RPL 1 (0xe019)"]


def test_decode_pending_uses_the_code_it_is_given():
    from xendbg.decode import decode_pending

    regs = registers(64, 0, pc=0x7000)
    target = InMemoryTarget(regs, [(0x7000, b"\xc3" * 32)])  # memory says ret: not a hypercall
    hc = decode_pending(target, get_abi("4.17", 64), code_at_pc=stub(64, 17))
    assert hc.name == "xen_version" and target.reads == 0


def test_decode_in_xen_reads_rdi_by_its_protocol_name():
    from tests.unit.test_arch import StrictTarget
    from xendbg.abi.layouts import ERA_3, layout
    from xendbg.decode import decode_in_xen

    frame = bytes(layout("cpu_user_regs", 64, ERA_3).size)
    hc = decode_in_xen(StrictTarget({"rdi": 0x1000}, [(0x1000, frame)]), "pv_hypercall",
                       lambda w, cs=None: get_abi("4.17", w))
    assert hc.name == "set_trap_table"

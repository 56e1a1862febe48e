"""Xen's rules one by one, each with the case that tells a right rule from a one-line wrong one
(found by mutation testing, tools/mutation.py): masks, signs, flag names, which callbacks Xen
refuses to unregister, and the exact findings and messages a user reads."""

from __future__ import annotations

import pytest

from tests.unit.images import pack, pack_many, registers, stub
from xendbg import arch
from xendbg.abi import get_abi
from xendbg.decode import Callback, GuestState, TableOf, decode_call, decode_multicall, decode_pending
from xendbg.decode.state import apply, check_state
from xendbg.target import InMemoryTarget
from xendbg.trace import Stats, TraceLog, result_text, show_lines

PC, BUF = 0x7000, 0x9000
MMU_UPDATE_PREEMPTED = 1 << 31  # xen/include/public/xen.h (RELEASE-4.17.0): a continuation's count


def pending(version: str, width: int, nr: int, *args: int, memory=()):
    abi = get_abi(version, width)
    target = InMemoryTarget(registers(width, nr, *args, pc=PC), [(PC, stub(width, nr)), *memory])
    return decode_pending(target, abi)


def rules_of(found) -> list[tuple[str, str]]:
    return [(f.rule, f.severity) for f in found]


# --- mmu_update / mmuext_op: bit 31 of the count marks a continuation -----------------------------

@pytest.mark.parametrize("width", [32, 64])
def test_mmu_update_continuation_count_drops_the_preempted_bit(width):
    abi = get_abi("4.17", width)
    reqs = pack_many(abi, "mmu_update", [{"ptr": 0x1000 | 1, "val": 5}, {"ptr": 0x2000, "val": 0x3067}])
    hc = pending("4.17", width, 1, BUF, MMU_UPDATE_PREEMPTED | 2, 0, 0x7FF0, memory=[(BUF, reqs)])
    assert isinstance(hc.detail, TableOf)
    assert len(hc.detail.rows) == 2 and not hc.detail.truncated
    assert hc.findings == ()  # two requests are mapped: nothing unreadable
    assert dict(hc.detail.rows[0]) == {"ptr": 0x1000, "type": "MMU_MACHPHYS_UPDATE", "val": 5}


def test_mmuext_op_continuation_and_truncation():
    abi = get_abi("4.17", 64)
    ops = pack_many(abi, "mmuext_op", [{"cmd": 6}] * 70)
    hc = pending("4.17", 64, 26, BUF, MMU_UPDATE_PREEMPTED | 1, 0, 0x7FF0, memory=[(BUF, ops)])
    assert [dict(r)["cmd"] for r in hc.detail.rows] == ["MMUEXT_TLB_FLUSH_LOCAL"]
    hc = pending("4.17", 64, 26, BUF, 70, 0, 0x7FF0, memory=[(BUF, ops)])
    assert len(hc.detail.rows) == 64 and hc.detail.truncated
    hc = pending("4.17", 64, 26, BUF, 64, 0, 0x7FF0, memory=[(BUF, ops)])
    assert len(hc.detail.rows) == 64 and not hc.detail.truncated


def test_request_array_unreadable_row_names_its_address():
    abi = get_abi("4.17", 32)
    reqs = pack_many(abi, "mmu_update", [{"ptr": 0x1000, "val": 1}])
    hc = pending("4.17", 32, 1, BUF, 3, 0, 0x7FF0, memory=[(BUF, reqs)])
    assert len(hc.detail.rows) == 1
    (f,) = hc.findings
    assert (f.rule, f.message) == ("unreadable-memory", f"mmu_update[1] at {BUF + 16:#x} cannot be read: "
                                   "Xen would fail the call with -EFAULT")


# --- update_va_mapping flags: Xen 2.0 names bits, later Xen a flush type, a scope or a vCPU mask -----

@pytest.mark.parametrize("version,flags,text", [
    ("2.0", 0, "0"),
    ("2.0", 1, "UVMF_FLUSH_TLB"),  # RELEASE-2.0.0 xen.h: UVMF_FLUSH_TLB 1, UVMF_INVLPG 2
    ("2.0", 2, "UVMF_INVLPG"),
    ("2.0", 3, "UVMF_FLUSH_TLB|UVMF_INVLPG"),
    ("4.17", 0, "UVMF_NONE|UVMF_LOCAL"),
    ("4.17", 1, "UVMF_TLB_FLUSH|UVMF_LOCAL"),
    ("4.17", 2 | 4, "UVMF_INVLPG|UVMF_ALL"),
    ("4.17", 3, "UVMF_FLUSHTYPE_MASK|UVMF_LOCAL"),
    ("3.0", 0xC0001000 | 2, "UVMF_INVLPG|UVMF_MULTI (vcpumask at 0xc0001000)"),
    ("3.0", 0x8 | 1, "UVMF_TLB_FLUSH|UVMF_MULTI (vcpumask at 0x8)"),
])
def test_update_va_mapping_flag_names(version, flags, text):
    hc = pending(version, 32, 14, 0xC0000000, 0x1067, flags) if version == "2.0" else \
        pending(version, 32, 14, 0xC0000000, 0x1067, 0, flags)
    assert hc.args[-1].name == "flags" and hc.args[-1].text == text


# --- the sign of a result ---------------------------------------------------------------------------

@pytest.mark.parametrize("width,raw,result", [
    (32, 0xFFFFFFEA, -22),
    (32, 0x80000000, -(1 << 31)),
    (32, 0x7FFFFFFF, 0x7FFFFFFF),
    (32, 0x40000000, 0x40000000),
    (64, 0xFFFFFFFFFFFFFFDA, -38),
    (64, 0xFFFFFFEA, 0xFFFFFFEA),  # a 32-bit pattern is positive in a 64-bit register
    (64, 0x4000000000000000, 0x4000000000000000),
])
def test_read_result_is_signed_at_the_guest_width(width, raw, result):
    reg = "eax" if width == 32 else "rax"
    assert arch.read_result(InMemoryTarget({reg: raw}), width) == result


def test_read_result_of_a_32_bit_guest_from_a_64_bit_register_file():
    # gdb shows a 32-bit PV guest under a 64-bit Xen a 64-bit register file: only EAX counts.
    assert arch.read_result(InMemoryTarget({"rax": 0x12345678FFFFFFF2}), 32) == -14


@pytest.mark.parametrize("width,raw,result,text", [
    (32, 0xFFFFFFEA, -22, "EINVAL"),
    (32, 0x40000000, 0x40000000, "OK"),  # not an error: a count, a version...
    (32, 0x80000000, -(1 << 31), None),
    (64, 0xFFFFFFEA, 0xFFFFFFEA, "OK"),
    (64, 2**64 - 38, -38, "ENOSYS"),
    (64, 0, 0, "OK"),
    (64, 7, 7, "OK"),
])
def test_multicall_results_are_signed_at_the_guest_width(width, raw, result, text):
    abi = get_abi("4.17", width)
    entry = pack(abi, "multicall_entry", op=17, result=raw, args=[0, 0])
    batch, _ = decode_multicall(InMemoryTarget(memory=[(BUF, entry)]), abi, BUF, 1, results=True)
    assert (batch.entries[0].result, batch.entries[0].result_text) == (result, text)


def test_multicall_2_0_result_slot_is_signed():
    abi = get_abi("2.0", 32)
    entry = pack(abi, "multicall_entry", op=17, args=[0, 0, 0, 0, 0, 0x80000000, 0])
    batch, _ = decode_multicall(InMemoryTarget(memory=[(BUF, entry)]), abi, BUF, 1)
    assert batch.entries[0].result == -(1 << 31)


@pytest.mark.parametrize("result,text", [
    (-22, "-22 (EINVAL)"), (-1, "-1 (EPERM)"), (-38, "-38 (ENOSYS)"),
    (0, "0"), (1, "1"), (0xFFFF, "65535"), (0x10000, "0x10000"),
    (-4096, "-4096"),  # not an errno: negative, but shown in decimal
    (-100000, "-100000"),
])
def test_trace_result_text(result, text):
    assert result_text(result) == text


def test_trace_lines_carry_the_signed_result_and_its_errno():
    log = TraceLog(None, ())
    hc = pending("4.17", 64, 17, 0, 0)
    seq = log.call(0, hc, "guest")
    log.result(0, seq, "xen_version", -38)
    (line,) = show_lines(list(log.recent)[1:])
    assert line.endswith("cpu0 xen_version(cmd=XENVER_version, arg=0x0) = -38 (ENOSYS)")
    assert list(log.recent)[-1]["errno"] == "ENOSYS"


# --- stats: 0 and positive results are not errors ----------------------------------------------------

def test_stats_count_only_negative_results_as_errors():
    stats = Stats()
    hc = pending("4.17", 64, 17, 0, 0)
    for result in (0, 1, 0x40011, -22, -22, -1):
        stats.count_call(hc)
        stats.count_result("xen_version", result)
    (row,) = stats.rows()
    assert row == {"name": "xen_version", "calls": 6, "errors": 3, "errnos": {"EINVAL": 2, "EPERM": 1},
                   "subops": {"XENVER_version": 6}, "in_multicalls": 0}
    stats.count_result("xen_version", -4096)
    assert stats.rows()[0]["errnos"]["-4096"] == 1


def test_stats_rows_list_calls_seen_only_inside_batches():
    abi = get_abi("4.17", 64)
    entry = pack(abi, "multicall_entry", op=29, args=[0, 0])
    stats = Stats()
    stats.count_call(pending("4.17", 64, 13, BUF, 2, memory=[(BUF, entry + entry)]))
    rows = stats.rows()
    assert rows == [
        {"name": "multicall", "calls": 1, "errors": 0, "errnos": {}, "subops": {}, "in_multicalls": 0},
        {"name": "sched_op", "calls": 0, "errors": 0, "errnos": {}, "subops": {}, "in_multicalls": 2}]


# --- registered state: the event callback -------------------------------------------------------------

def test_no_event_callback_warning_only_when_others_are_registered():
    abi = get_abi("4.17", 64)
    state = GuestState(history=["seen"])
    assert "no-event-callback" not in [f.rule for f in check_state(state, abi)]  # nothing registered yet
    state.callbacks["failsafe"] = Callback("failsafe", 0xFFFFFFFF81002000)
    found = [f for f in check_state(state, abi) if f.rule == "no-event-callback"]
    assert rules_of(found) == [("no-event-callback", "warning")]
    assert found[0].message == ("no event callback registered: Xen cannot deliver event-channel upcalls; Xen 4.17 "
                                "crashes the domain when it has to deliver to the event callback, whose address "
                                "is 0")  # a 64-bit guest: x86_64/entry.S checks the address, there is no CS
    state.callbacks["event"] = Callback("event", 0xFFFFFFFF81001000)
    assert check_state(state, abi) == []


def test_check_state_applies_the_rules_to_registered_callbacks():
    abi = get_abi("3.0", 32)
    state = GuestState(history=["seen"])
    state.callbacks["event"] = Callback("event", 0xC0100000, 0xE018, 0)
    assert rules_of(check_state(state, abi)) == [("selector-rpl", "error")]
    abi = get_abi("4.17", 64)
    state.callbacks["event"] = Callback("event", 0x0000800000000000)
    (f,) = check_state(state, abi)
    assert (f.rule, f.message) == ("non-canonical", "event callback: address 0x0000800000000000 is not "
                                   "canonical: Xen 4.17 rejects the call with -EINVAL")


# --- callback_op unregister ---------------------------------------------------------------------------

CALLBACKTYPE = {"event": 0, "failsafe": 1, "syscall": 2, "sysenter_deprecated": 3, "nmi": 4, "sysenter": 5,
                "syscall32": 7}  # xen/include/public/callback.h, RELEASE-4.17.0


def unregister(version: str, width: int, kind: str):
    abi = get_abi(version, width)
    return pending(version, width, 30, 1, BUF, memory=[(BUF, pack(abi, "callback_unregister",
                                                                   type=CALLBACKTYPE[kind]))])


@pytest.mark.parametrize("width,kind,errno", [
    (64, "event", "EINVAL"), (64, "failsafe", "EINVAL"), (64, "syscall", "EINVAL"),
    (64, "syscall32", "EINVAL"), (64, "sysenter", "EINVAL"), (64, "sysenter_deprecated", "ENOSYS"),
    (32, "event", "EINVAL"), (32, "failsafe", "EINVAL"), (32, "syscall32", "EINVAL"),
    (32, "sysenter", "EINVAL"),
    (32, "syscall", "ENOSYS"),  # compat_unregister_guest_callback has no case for it
    (32, "sysenter_deprecated", "ENOSYS"),
])
def test_callback_op_unregister_is_refused(width, kind, errno):
    hc = unregister("4.17", width, kind)
    assert hc.detail.operation == "unregister" and hc.detail.entries[0].kind == kind
    assert rules_of(hc.findings) == [("callback-unregister", "error")]
    assert hc.findings[0].message.endswith(f"-{errno}")
    state = GuestState()
    state.callbacks[kind] = Callback(kind, 0x1000)
    assert apply(state, get_abi("4.17", width), hc) == ["unregister refused: nothing changes"]
    assert kind in state.callbacks


@pytest.mark.parametrize("width", [32, 64])
def test_callback_op_unregister_nmi_is_allowed(width):
    hc = unregister("4.17", width, "nmi")
    assert hc.findings == ()
    state = GuestState()
    state.callbacks["nmi"] = Callback("nmi", 0x1000)
    assert apply(state, get_abi("4.17", width), hc) == ["callbacks unregistered: nmi"]
    assert "nmi" not in state.callbacks


def test_callback_op_unregister_3_0_3_refuses_every_type_but_nmi():
    abi = get_abi("3.0.3", 64)
    for kind, ctype in (("event", 0), ("syscall", 2), ("sysenter", 3)):  # 3.0.3: sysenter was type 3
        hc = pending("3.0.3", 64, 30, 1, BUF, memory=[(BUF, pack(abi, "callback_unregister", type=ctype))])
        assert [f.message for f in hc.findings] == [
            f"the {kind} callback cannot be unregistered: Xen fails the call with -EINVAL"]
    hc = pending("3.0.3", 64, 30, 1, BUF, memory=[(BUF, pack(abi, "callback_unregister", type=4))])
    assert hc.findings == ()


def test_callback_op_unknown_command_and_type():
    abi = get_abi("4.17", 64)
    hc = pending("4.17", 64, 30, 9, BUF)
    assert [(f.rule, f.message) for f in hc.findings] == [
        ("unknown-subop", "callback_op command 9 is unknown: Xen fails the call with -ENOSYS")]
    hc = pending("4.17", 64, 30, 1, BUF, memory=[(BUF, pack(abi, "callback_unregister", type=6))])
    assert [(f.rule, f.message) for f in hc.findings] == [
        ("callback-type", "callback type 6 is unknown: Xen fails the call with -ENOSYS")]
    assert hc.detail.entries[0].kind == "type 6"
    hc = pending("4.17", 64, 30, 0, BUF)  # the struct is not mapped
    assert [(f.rule, f.message) for f in hc.findings] == [
        ("unreadable-memory", f"callback_register at {BUF:#x} cannot be read: Xen would fail the call with -EFAULT")]


# --- the machine-check hypercall -----------------------------------------------------------------------

def test_mca_is_hypercall_48_on_x86():
    # xen/include/public/arch-x86/xen-mca.h (RELEASE-4.17.0): #define __HYPERVISOR_mca __HYPERVISOR_arch_0
    for width in (32, 64):
        assert get_abi("4.17", width).hypercall_named("mca").nr == 48


def test_decode_call_pads_missing_arguments_with_zero():
    hc = decode_call(InMemoryTarget(), get_abi("4.17", 64), 17, [])
    assert [(a.name, a.value) for a in hc.args] == [("cmd", 0), ("arg", 0)]


# --- the messages a user reads, word for word ------------------------------------------------------------

def test_selector_rule_messages():
    from xendbg.decode import rules

    assert rules.check_code_selector(get_abi("2.0", 32), 0x0819, "x") == []  # the flat kernel CS itself
    (f,) = rules.check_code_selector(get_abi("2.0", 32), 0x0818, "trap_info[3]")
    assert f.message == ("trap_info[3]: selector 0x0818 has RPL 0, but a 32-bit PV kernel runs in ring 1: "
                         "Xen 2.0 rejects the call with -EPERM")
    (f,) = rules.check_code_selector(get_abi("3.0", 64), 0xE030, "event callback")
    assert f.message == ("event callback: selector 0xe030 has RPL 0, but a 64-bit PV kernel runs in ring 3: "
                         "Xen 3.0 rejects the call with -EPERM")
    (f,) = rules.check_code_selector(get_abi("3.0", 32), 7168 << 3 | 1, "cs")
    assert (f.rule, f.severity, f.message) == (
        "selector-reserved", "error", "cs: selector 0xe001 names GDT entry 7168, one of Xen's reserved entries: "
        "Xen 3.0 rejects the call with -EPERM")
    assert rules.check_code_selector(get_abi("2.0", 32), 255 << 3 | 1, "cs") == []  # below the reserved entries
    assert rules_of(rules.check_code_selector(get_abi("2.0", 32), 256 << 3 | 1, "cs")) == [("selector-reserved",
                                                                                          "error")]
    assert rules_of(rules.check_code_selector(get_abi("2.0", 32), 295 << 3 | 1, "cs")) == [("selector-reserved",
                                                                                          "error")]
    assert rules.check_code_selector(get_abi("2.0", 32), 296 << 3 | 1, "cs") == []
    assert rules.check_code_selector(get_abi("2.0", 32), 260 << 3 | 4 | 1, "cs") == []  # an LDT selector
    (f,) = rules.check_code_selector(get_abi("4.17", 32), 0xE018, "vCPU 1 initial CS")
    assert f.message == ("vCPU 1 initial CS: selector 0xe018 has RPL 0; Xen 4.17 silently raises it to the 32-bit "
                         "PV kernel's RPL 1 (0xe019)")
    (f,) = rules.check_code_selector(get_abi("3.0.2", 64), 0xE031, "cs")
    assert f.message.endswith("raises it to the 64-bit PV kernel's RPL 3 (0xe033)")
    (f,) = rules.check_code_selector(get_abi("4.17", 32), 0xE01B, "failsafe callback")
    assert (f.severity, f.message) == ("warning", "failsafe callback: selector 0xe01b has RPL 3, above the 32-bit PV "
                                       "kernel's ring 1: Xen accepts it and will enter this code in ring 3")
    assert rules.check_code_selector(get_abi("4.17", 32), 0x0811, "cs") == []  # right RPL, any entry from 3.0.2


def test_canonical_address_messages():
    from xendbg.decode import rules

    assert rules.check_code_address(get_abi("4.17", 32), 0xFFFFFFFF, "x") == []  # 32-bit: nothing to check
    assert rules.check_code_address(get_abi("4.17", 64), 0x00007FFFFFFFFFFF, "x") == []
    assert rules.check_code_address(get_abi("4.17", 64), 0xFFFF800000000000, "x") == []
    (f,) = rules.check_code_address(get_abi("4.0", 64), 0x0000800000000000, "syscall callback")
    assert f.message == ("syscall callback: address 0x0000800000000000 is not canonical: Xen 4.0 rejects the "
                         "call with -EINVAL")
    (f,) = rules.check_code_address(get_abi("3.0.3", 64), 0xFFFF7FFFFFFFFFFF, "trap")
    assert f.message == ("trap: address 0xffff7fffffffffff is not canonical: Xen 3.0.3 cannot enter it: the guest "
                         "will take a fault on delivery")


def test_canonical_boundaries():
    assert arch.is_canonical(0) and arch.is_canonical(2**47 - 1) and arch.is_canonical(2**64 - 2**47)
    assert arch.is_canonical(2**64 - 1)
    assert not arch.is_canonical(2**47) and not arch.is_canonical(2**64 - 2**47 - 1)
    assert not arch.is_canonical(2**63) and not arch.is_canonical(2**48)


def test_fast_trap_messages():
    from xendbg.decode import rules

    (f,) = rules.check_fast_trap(get_abi("3.0", 32), 0x80, None)
    assert (f.rule, f.severity, f.message) == (
        "fast-trap-removed", "error", "set_fast_trap does not exist in Xen 3.0 (removed in 3.0): the call fails "
        "with -ENOSYS")
    assert [(f.rule, f.severity, f.message) for f in rules.check_fast_trap(get_abi("2.0", 32), 0, None)] == [
        ("fast-trap-disable", "info", "vector 0 disables the fast trap: Xen 2.0 zeroes its gate in the IDT, and "
                                      "that int $n goes through Xen's #GP handler again")]
    (f,) = rules.check_fast_trap(get_abi("2.0", 32), 0, None, 0x80)
    assert f.message.startswith("vector 0 disables the fast trap: Xen 2.0 zeroes the gate for vector 0x80 in the IDT")
    vector, unknown = rules.check_fast_trap(get_abi("2.0", 32), 0x81, None)
    (flag,) = rules.check_fast_trap(get_abi("2.0", 32), 0x20, True)
    assert vector.message == ("vector 0x81 cannot be a fast trap: Xen 2.0 accepts only 0x80 and 0x20-0x2f and fails "
                              "the call with -EPERM")
    assert (flag.rule, flag.severity) == ("fast-trap-interrupt-flag", "error")
    assert flag.message == ("the trap-table entry for vector 0x20 asks Xen to clear the event mask on entry, which a "
                            "fast trap cannot do: Xen 2.0 fails the call with -EPERM")
    assert (unknown.rule, unknown.severity) == ("fast-trap-handler-unknown", "info")
    (f,) = rules.check_fast_trap(get_abi("2.0", 32), 0x2F, None)
    assert f.message == ("xendbg has not seen a trap-table entry for vector 0x2f; Xen installs whatever entry the "
                         "guest registered last")
    assert rules.check_fast_trap(get_abi("2.0", 32), 0x80, False) == []
    assert rules.check_fast_trap(get_abi("2.0", 32), 0x20, False) == []


def test_multicall_and_unknown_hypercall_messages():
    from xendbg.decode import rules

    f = rules.check_nested_multicall(get_abi("2.0", 32), 2)
    assert (f.rule, f.severity, f.message) == (
        "multicall-nested", "error", "entry 2 is itself a multicall: Xen 2.0 skips it without running it and writes "
        "the address of its own multicall_return_from_call (in Xen's text, from 0xfc500000) as its result, which "
        "reads as a negative number: a failure")
    assert rules.check_nested_multicall(get_abi("4.17", 64), 0).message == (
        "entry 0 is itself a multicall: Xen 4.17 refuses nested multicalls and sets its result to -EINVAL")
    f = rules.unknown_hypercall(get_abi("3.0.2", 32), 77)
    assert (f.rule, f.severity, f.message) == (
        "unknown-hypercall", "error", "hypercall number 77 does not exist in Xen 3.0.2 (32-bit PV): the call fails "
        "with -ENOSYS")
    f = rules.unreadable("trap table", 0x1000)
    assert (f.rule, f.severity, f.message) == ("unreadable-memory", "error", "trap table at 0x1000 cannot be read: "
                                               "Xen would fail the call with -EFAULT")


def test_selector_text_and_vector_list():
    from xendbg.decode import rules

    assert get_abi("4.17", 32).selector_text(0xE019) == "0xe019 (FLAT_RING1_CS, RPL 1)"
    assert get_abi("4.17", 32).selector_text(0xE01A) == "0xe01a (RPL 2)"
    assert get_abi("2.0", 32).selector_text(0x082B) == "0x082b (FLAT_RING3_CS, RPL 3)"
    assert rules.vector_list([14]) == "vector 0xe"
    assert rules.vector_list([1, 2]) == "vectors 0x1, 0x2"
    assert rules.vector_list([0, 1, 2, 3, 5, 0x80]) == "vectors 0x0-0x3, 0x5, 0x80"
    assert rules.vector_list([3, 4, 5, 7, 8, 10, 11, 12]) == "vectors 0x3-0x5, 0x7, 0x8, 0xa-0xc"

"""Report assembly (xendbg/report.py), the subjects check_state gives its findings, and the renderers'
report functions (abi_label, callbacks_report, check_report, the xen_source and subject keys)."""

from __future__ import annotations

from tests.unit.images import pack, pack_many, registers, stub
from xendbg.abi import get_abi
from xendbg.decode import decode_pending
from xendbg.decode.model import AbiUsed, Callbacks, Finding, GuestState, Hypercall
from xendbg.decode.state import apply, check_state
from xendbg.render import json as render_json
from xendbg.render import text as render_text
from xendbg.report import CALLBACK_SUBJECTS, TRAP_SUBJECTS, check, registered_callbacks, registered_trap_table
from xendbg.target import InMemoryTarget

PC, TABLE = 0x7000, 0x10000
A20, A417_32, A417_64 = get_abi("2.0", 32), get_abi("4.17", 32), get_abi("4.17", 64)


def decoded(abi, nr, *args, memory=(), state=None):
    target = InMemoryTarget(registers(abi.width, nr, *args, pc=PC), [(PC, stub(abi.width, nr)), *memory])
    return decode_pending(target, abi, state=state)


def trap_table(abi, rows, address=TABLE):
    return decoded(abi, 0, address, memory=[(address, pack_many(abi, "trap_info", [*rows, {}]))])


def xen_2_0_state() -> GuestState:
    """A 2.0 guest: a trap table without #PF, a fast trap on 0x80, then 0x80 re-registered (stale gate),
    and callbacks with the flat selector."""
    state = GuestState()
    apply(state, A20, trap_table(A20, [{"vector": 0x80, "flags": 3, "cs": 0x0819, "address": 0xC0008000},
                                       {"vector": 3, "flags": 3, "cs": 0x0819, "address": 0xC0003000}]))
    apply(state, A20, decoded(A20, 11, 0x80, state=state))
    apply(state, A20, trap_table(A20, [{"vector": 0x80, "flags": 3, "cs": 0x0819, "address": 0xC0009000}],
                                 address=TABLE + 0x100))
    apply(state, A20, decoded(A20, 4, 0x0819, 0xC0100000, 0x0819, 0xC0100100))
    return state


def test_subjects_route_each_finding():
    assert TRAP_SUBJECTS == ("trap_table",)
    assert CALLBACK_SUBJECTS == ("callbacks", "fast_trap")
    found = {(f.rule, f.subject) for f in check_state(xen_2_0_state(), A20)}
    assert found == {("no-page-fault-handler", "trap_table"), ("fast-trap-stale", "fast_trap")}


def test_registered_trap_table_merges_renumbers_and_keeps_only_its_findings():
    state = xen_2_0_state()
    table, found = registered_trap_table(state, A20)
    assert [(e.index, e.vector, e.address) for e in table.entries] == [(0, 3, 0xC0003000), (1, 0x80, 0xC0009000)]
    assert table.address == TABLE + 0x100 and table.terminated
    assert table.note == ("registered: 2 vectors, merged from every set_trap_table xendbg saw "
                          f"(the last one's array at {TABLE + 0x100:#x})")
    assert [f.rule for f in found] == ["no-page-fault-handler"]  # the stale fast trap is not the table's


def test_registered_callbacks_show_the_fast_trap_and_its_findings():
    state = xen_2_0_state()
    callbacks, fast, found = registered_callbacks(state, A20)
    assert callbacks.operation == "registered"
    assert [(c.kind, c.address, c.selector) for c in callbacks.entries] == [
        ("event", 0xC0100000, 0x0819), ("failsafe", 0xC0100100, 0x0819)]
    assert fast is state.fast_trap and fast.vector == 0x80 and fast.handler.address == 0xC0008000
    assert [(f.rule, f.subject) for f in found] == [("fast-trap-stale", "fast_trap")]
    assert "still enters 0xc0008000; the trap table now says 0xc0009000" in found[0].message


def test_nothing_registered_yet():
    state = GuestState()
    table, found = registered_trap_table(state, A417_64)
    assert table.entries == () and table.address == 0
    assert found == ()  # "state-unknown" is about the state, shown by xen check
    callbacks, fast, found = registered_callbacks(state, A417_64)
    assert (callbacks.entries, fast, found) == ((), None, ())
    assert [(f.rule, f.severity, f.subject) for f in check(None, state, A417_64)] == [
        ("state-unknown", "info", "state")]


def test_callback_findings_and_the_missing_event_callback():
    state = GuestState()
    reg = pack(A417_32, "callback_register", type=1, flags=0, cs=0xE018, address=0xC0102000)  # failsafe only
    apply(state, A417_32, decoded(A417_32, 30, 0, 0x9000, memory=[(0x9000, reg)]))
    assert state.width == 32
    _, _, found = registered_callbacks(state, A417_32)
    assert [(f.rule, f.severity, f.subject) for f in found] == [
        ("selector-rpl", "info", "callbacks"), ("no-event-callback", "warning", "callbacks")]
    assert found[0].message.startswith("failsafe callback: selector 0xe018 has RPL 0")
    _, found = registered_trap_table(state, A417_32)
    assert found == ()  # no trap table seen: no #PF warning either


def test_an_event_callback_silences_the_warning():
    state = GuestState()
    apply(state, A417_64, decoded(A417_64, 4, 0xFFFFFFFF81001000, 0xFFFFFFFF81002000, 0))
    assert state.width == 64
    assert [f.rule for f in check_state(state, A417_64)] == []


def test_check_puts_errors_first_and_reports_each_finding_once():
    state = GuestState()
    apply(state, A417_32, trap_table(A417_32, [{"vector": 3, "cs": 0xE019, "address": 0xC0003000}]))
    same = Finding("no-page-fault-handler", "warning", check_state(state, A417_32)[0].message)
    pending = Hypercall(99, None, (), "4.17", 32, findings=(
        Finding("note", "info", "an info"), same, Finding("bad", "error", "an error"),
        Finding("bad", "error", "an error", subject="callbacks")))
    found = check(pending, state, A417_32)
    assert [(f.rule, f.severity) for f in found] == [("bad", "error"), ("no-page-fault-handler", "warning"),
                                                     ("note", "info")]


def test_check_includes_the_pending_batchs_entries():
    entry = pack(A417_64, "multicall_entry", op=4, args=[0x0000800000000000, 0, 0, 0, 0, 0])
    pending = decoded(A417_64, 13, 0x8000, 1, memory=[(0x8000, entry)])
    state = GuestState()
    apply(state, A417_64, decoded(A417_64, 4, 0xFFFFFFFF81001000, 0xFFFFFFFF81002000, 0))
    assert [f.rule for f in check(pending, state, A417_64)] == ["non-canonical"]


# --- renderers ---------------------------------------------------------------------------------------


def test_abi_label():
    assert render_text.abi_label("2.0", "from the guest's CS 0x0819") == "Xen 2.0 ABI (from the guest's CS 0x0819)"
    assert render_text.abi_label("4.17") == "Xen 4.17 ABI"


def test_hypercall_json_and_text_say_which_abi_and_why():
    hc = decoded(A417_64, 17, 0, 0)
    from dataclasses import replace

    hc = replace(hc, abi_reason="from xen_version() = 4.17, trace")
    data = render_json.hypercall(hc)
    assert (data["xen"], data["xen_source"], data["width"]) == ("4.17", "from xen_version() = 4.17, trace", 64)
    text = render_text.to_string(render_text.hypercall(hc))
    assert "[Xen 4.17 ABI (from xen_version() = 4.17, trace), 64-bit PV" in text


def test_finding_json_subject_defaults_to_the_call():
    assert render_json.finding(Finding("r", "info", "m"))["subject"] == "call"
    assert render_json.finding(Finding("r", "info", "m", subject="fast_trap")) == {
        "rule": "r", "severity": "info", "message": "m", "subject": "fast_trap"}


def test_callbacks_report_json_and_text():
    state = xen_2_0_state()
    callbacks, fast, found = registered_callbacks(state, A20)
    used = AbiUsed("2.0", 32, "set by hand")
    data = render_json.callbacks_report(callbacks, fast, found, used)
    assert data["schema"] == render_json.SCHEMA_VERSION
    assert (data["xen"], data["xen_source"], data["width"]) == ("2.0", "set by hand", 32)
    assert data["callbacks"]["operation"] == "registered"
    assert [c["kind"] for c in data["callbacks"]["callbacks"]] == ["event", "failsafe"]
    assert data["fast_trap"]["vector"] == 0x80 and data["fast_trap"]["handler"]["address"] == 0xC0008000
    assert [(f["rule"], f["subject"]) for f in data["findings"]] == [("fast-trap-stale", "fast_trap")]
    assert "xen" not in render_json.callbacks_report(callbacks, None, ())
    assert render_json.callbacks_report(callbacks, None, ())["fast_trap"] is None
    text = render_text.to_string(render_text.callbacks_report(callbacks, fast, found, used), width=200)
    lines = text.splitlines()
    assert lines[0] == "[Xen 2.0 ABI (set by hand), 32-bit PV]"
    assert lines[1] == "callbacks (registered)"
    assert "fast trap: vector 0x80 (int 0x80), handler 0xc0008000 cs 0x0819 DPL 3" in text
    assert "[fast-trap-stale]" in text
    bare = render_text.to_string(render_text.callbacks_report(Callbacks("registered", ()), None, ()))
    assert "fast trap" not in bare and "no findings" in bare and "ABI" not in bare


def test_trap_table_report_carries_the_abi_keys():
    table, found = registered_trap_table(xen_2_0_state(), A20)
    data = render_json.trap_table_report(table, found, AbiUsed("2.0", 32, "from the guest's CS 0x0819"))
    assert (data["xen"], data["xen_source"]) == ("2.0", "from the guest's CS 0x0819")
    assert [(f["rule"], f["subject"]) for f in data["findings"]] == [("no-page-fault-handler", "trap_table")]
    assert [e["index"] for e in data["entries"]] == [0, 1]


def test_check_report_json_and_text():
    found = [Finding("bad", "error", "an error"), Finding("w", "warning", "a warning", subject="callbacks")]
    pending = decoded(A417_64, 17, 0, 0)
    data = render_json.check_report(pending, found)
    assert data == {"schema": render_json.SCHEMA_VERSION, "pending": "xen_version", "findings": [
        {"rule": "bad", "severity": "error", "message": "an error", "subject": "call"},
        {"rule": "w", "severity": "warning", "message": "a warning", "subject": "callbacks"}]}
    assert render_json.check_report(None, [])["pending"] is None
    text = render_text.to_string(render_text.check_report(pending, found))
    assert text.splitlines()[0] == "pending hypercall: xen_version; 1 error, 1 warning, 0 info"
    empty = render_text.to_string(render_text.check_report(None, []))
    assert empty.splitlines() == ["no pending hypercall; 0 error, 0 warning, 0 info", "no findings"]

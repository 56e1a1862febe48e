"""Renderers: the text people read and the JSON schema (docs/json-schema.md), from decoded calls."""

from __future__ import annotations

import json

from tests.unit.images import pack, pack_many
from xendbg.abi import get_abi
from xendbg.decode import (
    Callback,
    Callbacks,
    FastTrap,
    Finding,
    StructFields,
    TableOf,
    Text,
    TrapEntry,
    decode_call,
    decode_multicall,
    decode_trap_table,
)
from xendbg.render import json as rj
from xendbg.render import text as rt
from xendbg.target import InMemoryTarget

BUF = 0x9000


def lines(renderable, width: int = 140) -> list[str]:
    return [line.rstrip() for line in rt.to_string(renderable, width=width).splitlines()]


def words(line: str) -> list[str]:
    return line.split()


def table_and_findings():
    abi = get_abi("3.0", 32)
    rows = [{"vector": 3, "flags": 3, "cs": 0xE019, "address": 0xC0101000},
            {"vector": 14, "flags": 4, "cs": 0xE018, "address": 0xC0101300}, {"vector": 0, "address": 0}]
    return decode_trap_table(InMemoryTarget(memory=[(BUF, pack_many(abi, "trap_info", rows))]), abi, BUF)


def test_trap_table_text():
    table, found = table_and_findings()
    out = lines(rt.trap_table_report(table, found))
    assert out[0] == f"trap table at {BUF:#x}: 2 entries"
    assert words(out[1]) == ["#", "vector", "name", "DPL", "IF", "cs", "RPL", "handler"]
    assert words(out[2]) == ["0", "0x3", "#BP", "3", "0xe019", "1", "0xc0101000"]
    assert words(out[3]) == ["1", "0xe", "#PF", "0", "yes", "0xe018", "0", "0xc0101300"]
    assert out[4] == "note: #PF: the guest finds the faulting address in its vcpu_info (arch.cr2), not in CR2"
    assert out[5].startswith("error   [selector-rpl] trap_info[1] (vector 0xe #PF): selector 0xe018 has RPL 0")
    unterminated = table.__class__(table.address, table.entries, False)
    assert lines(rt.trap_table(unterminated))[0] == f"trap table at {BUF:#x}: 2 entries (no terminating entry)"


def test_findings_text_and_colour():
    assert lines(rt.findings([])) == ["no findings"]
    found = [Finding("a", "warning", "w"), Finding("b", "info", "i")]
    assert lines(rt.findings(found)) == ["warning [a] w", "info    [b] i"]
    coloured = rt.to_string(rt.findings([Finding("x", "error", "boom")]), color=True)
    assert "\x1b[1;31merror  \x1b[0m" in coloured  # bold red
    assert "\x1b[" not in rt.to_string(rt.findings([Finding("x", "error", "boom")]))


def test_trap_table_json():
    table, found = table_and_findings()
    obj = json.loads(rj.dumps(rj.trap_table_report(table, found)))
    assert obj["type"] == "trap_table" and obj["address"] == BUF and obj["terminated"] is True
    assert obj["note"].startswith("#PF")
    assert obj["entries"][1] == {"index": 1, "vector": 14, "vector_name": "#PF", "flags": 4, "dpl": 0, "if": True,
                                 "cs": 0xE018, "rpl": 0, "address": 0xC0101300}
    assert obj["findings"] == [{"rule": f.rule, "severity": f.severity, "message": f.message, "subject": "call"}
                               for f in found]


def batch():
    abi = get_abi("4.17", 64)
    entries = pack_many(abi, "multicall_entry", [
        {"op": 17, "result": 0x40011, "args": [0, 0]},
        {"op": 29, "result": 2**64 - 22, "args": [2, BUF + 0x100]},
        {"op": 77, "result": 0}])
    memory = [(BUF, entries), (BUF + 0x100, pack(abi, "sched_shutdown", reason=1))]
    return decode_multicall(InMemoryTarget(memory=memory), abi, BUF, 3, results=True)


def test_multicall_text():
    b, found = batch()
    out = lines(rt.multicall_report(b, found))
    assert out[0] == f"multicall batch at {BUF:#x}: 3 entries"
    assert words(out[1]) == ["#", "op", "hypercall", "arguments", "result"]
    assert words(out[2]) == ["0", "17", "xen_version", "cmd=XENVER_version,", "arg=0x0", "0x40011"]
    assert words(out[3]) == ["1", "29", "sched_op", "cmd=SCHEDOP_shutdown,", f"arg={BUF + 0x100:#x}", "-22",
                             "(EINVAL)"]
    assert words(out[4])[:3] == ["2", "77", "hypercall_77"]
    assert out[5] == "entry 1: sched_op"
    assert out[6] == f"sched_shutdown at {BUF + 0x100:#x}"
    assert words(out[8]) == ["reason", "SHUTDOWN_reboot"]
    assert out[-1].startswith("error   [unknown-hypercall] multicall entry 2: hypercall number 77")
    assert "(truncated)" in lines(rt.multicall(b.__class__(BUF, 300, b.entries, truncated=True)))[0]


def test_multicall_json():
    b, found = batch()
    obj = json.loads(rj.dumps(rj.multicall_report(b, found)))
    assert (obj["type"], obj["address"], obj["count"], obj["truncated"], obj["findings"]) == (
        "multicall", BUF, 3, False, [])
    first, second, third = obj["entries"]
    assert first == {"index": 0, "address": BUF, "op": 17, "name": "xen_version", "subop": "XENVER_version",
                     "args": [{"name": "cmd", "value": 0, "text": "XENVER_version"},
                              {"name": "arg", "value": 0, "text": None}],
                     "result": 0x40011, "result_name": "OK", "detail": None, "findings": []}
    assert (second["result"], second["result_name"]) == (-22, "EINVAL")
    assert second["detail"] == {"type": "struct", "struct": "sched_shutdown", "address": BUF + 0x100,
                                "fields": {"reason": "SHUTDOWN_reboot"}}
    assert third["name"] is None and third["findings"][0]["rule"] == "unknown-hypercall"


def test_hypercall_text_and_json():
    abi = get_abi("4.17", 64)
    entry = pack(abi, "multicall_entry", op=24, args=[77, 0, 0])
    hc = decode_call(InMemoryTarget(memory=[(BUF, entry)]), abi, 13, (BUF, 1), site="at syscall")
    out = lines(rt.hypercall(hc))
    assert out[0] == "multicall  nr 13  [Xen 4.17 ABI, 64-bit PV, at syscall]"
    assert words(out[1]) == ["arg", "value", "meaning"]
    assert words(out[2]) == ["call_list", hex(BUF)]
    assert out[-1].startswith("error   [unknown-subop] multicall entry 0: vcpu_op command 77")
    obj = rj.hypercall(hc)
    assert (obj["schema"], obj["xen"], obj["width"], obj["site"], obj["nr"], obj["name"]) == (
        1, "4.17", 64, "at syscall", 13, "multicall")
    assert obj["args"][1] == {"name": "nr_calls", "kind": "uint", "value": 1, "text": None}
    assert [f["rule"] for f in obj["findings"]] == ["unknown-subop"]  # the batched call's findings too
    old = decode_call(InMemoryTarget(), get_abi("4.17", 32), 6, (0, 0))
    head = lines(rt.hypercall(old))[0]
    assert head.startswith("sched_op_compat (also sched_op)  nr 6  SCHEDOP_yield  [Xen 4.17 ABI, 32-bit PV]")
    assert rj.hypercall(old)["former_names"] == ["sched_op"]


def test_other_details_text_and_json():
    entry = TrapEntry(0, 0x80, "int 0x80", 3, 3, False, 0x0819, 1, 0xC0008000)
    assert lines(rt.detail(FastTrap(0x80, "int 0x80", entry))) == [
        "fast trap: vector 0x80 (int 0x80), handler 0xc0008000 cs 0x0819 DPL 3"]
    assert lines(rt.detail(FastTrap(0x21, "int 0x21", None))) == ["fast trap: vector 0x21 (int 0x21), handler not "
                                                                  "seen yet"]
    assert rj.detail(FastTrap(0x21, "int 0x21", None)) == {"type": "fast_trap", "vector": 0x21,
                                                           "vector_name": "int 0x21", "handler": None}
    assert rj.detail(FastTrap(0x80, "int 0x80", entry))["handler"]["address"] == 0xC0008000
    cbs = Callbacks("register", (Callback("event", 0xC0100000, 0xE019, 1, 1, ("CALLBACKF_mask_events",)),
                                 Callback("syscall", 0xFFFFFFFF81000000)))
    out = lines(rt.detail(cbs))
    assert out[0] == "callbacks (register)"
    assert words(out[1]) == ["callback", "address", "selector", "RPL", "flags"]
    assert words(out[2]) == ["event", "0xc0100000", "0xe019", "1", "CALLBACKF_mask_events"]
    assert words(out[3]) == ["syscall", "0xffffffff81000000"]
    assert rj.detail(cbs)["callbacks"][0] == {"kind": "event", "address": 0xC0100000, "selector": 0xE019, "rpl": 1,
                                              "flags": 1, "flag_names": ["CALLBACKF_mask_events"]}
    rows = TableOf("mmu_update", BUF, ((("ptr", 0x1000), ("type", "MMU_NORMAL_PT_UPDATE")),), truncated=True)
    out = lines(rt.detail(rows))
    assert out[0] == f"mmu_update[] at {BUF:#x} (truncated)"
    assert words(out[1]) == ["#", "ptr", "type"] and words(out[2]) == ["0", "0x1000", "MMU_NORMAL_PT_UPDATE"]
    assert words(lines(rt.detail(TableOf("mmuext_op", BUF, ())))[1]) == ["#", "(empty)"]
    assert rj.detail(rows) == {"type": "table", "struct": "mmu_update", "address": BUF, "truncated": True,
                               "rows": [{"ptr": 0x1000, "type": "MMU_NORMAL_PT_UPDATE"}]}
    assert lines(rt.detail(Text(BUF, "hi\n", truncated=True))) == ["text: 'hi\\n' (truncated)"]
    assert rj.detail(Text(BUF, "hi", False)) == {"type": "text", "address": BUF, "text": "hi", "truncated": False}
    fields = StructFields("vcpu_set_singleshot_timer", BUF, (("timeout_abs_ns", 255), ("flags", 1)))
    assert [words(x) for x in lines(rt.detail(fields))[2:]] == [["timeout_abs_ns", "0xff"], ["flags", "0x1"]]
    assert rj.detail(None) is None and lines(rt.detail(None)) == [""]


def test_abi_listing_text_and_json():
    abi = get_abi("2.0", 32)
    out = lines(rt.abi_listing(abi), width=200)
    assert out[0] == "Xen 2.0 ABI (RELEASE-2.0.0), 32-bit PV guests"
    assert words(out[2]) == ["0", "set_trap_table", "traps:", "ptr:trap_info"]
    obj = rj.abi_listing(get_abi("4.17", 64))
    assert (obj["xen"], obj["tag"], obj["width"]) == ("4.17", "RELEASE-4.17.0", 64)
    sched = next(h for h in obj["hypercalls"] if h["nr"] == 6)
    assert sched == {"nr": 6, "name": "sched_op_compat", "former_names": ["sched_op"],
                     "args": [{"name": "cmd", "kind": "cmd:SCHEDOP"}, {"name": "arg", "kind": "ulong"}]}

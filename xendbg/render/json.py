"""The JSON schema of xendbg's output (documented in docs/json-schema.md).

Every number is a JSON integer; names are strings or null when xendbg has none.
"""

from __future__ import annotations

import json
from typing import Any

from xendbg.abi import Abi
from xendbg.decode.bounce import BounceFrame
from xendbg.decode.model import (
    AbiUsed,
    Callbacks,
    Detail,
    FastTrap,
    Finding,
    Hypercall,
    MulticallBatch,
    StructFields,
    TableOf,
    Text,
    TrapEntry,
    TrapTable,
)

SCHEMA_VERSION = 1


def finding(f: Finding) -> dict[str, Any]:
    return {"rule": f.rule, "severity": f.severity, "message": f.message, "subject": f.subject or "call"}


def trap_entry(e: TrapEntry) -> dict[str, Any]:
    return {"index": e.index, "vector": e.vector, "vector_name": e.vector_name, "flags": e.flags, "dpl": e.dpl,
            "if": e.interrupt_flag, "cs": e.cs, "rpl": e.rpl, "address": e.address,
            **({"passed_cs": e.passed_cs} if e.passed_cs is not None else {})}


def detail(d: Detail) -> dict[str, Any] | None:
    if d is None:
        return None
    if isinstance(d, MulticallBatch):
        return multicall(d)
    if isinstance(d, TrapTable):
        return trap_table(d)
    if isinstance(d, Callbacks):
        return {"type": "callbacks", "operation": d.operation, "callbacks": [
            {"kind": c.kind, "address": c.address, "selector": c.selector, "rpl": c.rpl, "flags": c.flags,
             "flag_names": list(c.flag_names),
             **({"passed_selector": c.passed_selector} if c.passed_selector is not None else {})}
            for c in d.entries]}
    if isinstance(d, FastTrap):
        return {"type": "fast_trap", "vector": d.vector, "vector_name": d.vector_name,
                "handler": trap_entry(d.handler) if d.handler else None}
    if isinstance(d, StructFields):
        return {"type": "struct", "struct": d.struct, "address": d.address, "fields": dict(d.fields)}
    if isinstance(d, TableOf):
        return {"type": "table", "struct": d.struct, "address": d.address, "truncated": d.truncated,
                "rows": [dict(row) for row in d.rows]}
    if isinstance(d, Text):
        return {"type": "text", "address": d.address, "text": d.text, "truncated": d.truncated}
    raise TypeError(f"no JSON form for {type(d).__name__}")


def trap_table(t: TrapTable) -> dict[str, Any]:
    return {"type": "trap_table", "address": t.address, "terminated": t.terminated, "note": t.note,
            "entries": [trap_entry(e) for e in t.entries]}


def multicall(b: MulticallBatch) -> dict[str, Any]:
    return {"type": "multicall", "address": b.address, "count": b.count, "truncated": b.truncated,
            "entries": [{"index": e.index, "address": e.address, "op": e.call.nr, "name": e.call.name,
                         "subop": e.call.subop,
                         "args": [{"name": a.name, "value": a.value, "text": a.text} for a in e.call.args],
                         "result": e.result, "result_name": e.result_text,
                         "detail": detail(e.call.detail),
                         "findings": [finding(f) for f in e.call.findings]} for e in b.entries]}


def _abi_keys(abi: AbiUsed | None) -> dict[str, Any]:
    if abi is None:
        return {}
    return {"xen": abi.generation, "xen_source": abi.reason, "width": abi.width}


def trap_table_report(t: TrapTable, found: tuple[Finding, ...], abi: AbiUsed | None = None) -> dict[str, Any]:
    """`xen traps` / `xendbg traps`: the table and the findings about it."""
    return trap_table(t) | {"findings": [finding(f) for f in found]} | _abi_keys(abi)


def multicall_report(b: MulticallBatch, found: tuple[Finding, ...], abi: AbiUsed | None = None) -> dict[str, Any]:
    """`xen multicall` / `xendbg multicall`: the batch and the batch's own findings (entries carry theirs)."""
    return multicall(b) | {"findings": [finding(f) for f in found]} | _abi_keys(abi)


def callbacks_report(c: Callbacks, fast: FastTrap | None, found: tuple[Finding, ...],
                     abi: AbiUsed | None = None) -> dict[str, Any]:
    """`xen callbacks --registered`: what the guest registered (docs/json-schema.md)."""
    return {"schema": SCHEMA_VERSION, "callbacks": detail(c), "fast_trap": detail(fast),
            "findings": [finding(f) for f in found]} | _abi_keys(abi)


def check_report(pending: Hypercall | None, found: list[Finding]) -> dict[str, Any]:
    return {"schema": SCHEMA_VERSION, "pending": pending.display_name if pending else None,
            "findings": [finding(f) for f in found]}


def hypercall(hc: Hypercall) -> dict[str, Any]:
    """A decoded hypercall; `findings` holds its own and its batched calls' findings."""
    return {"schema": SCHEMA_VERSION, "xen": hc.generation, "xen_source": hc.abi_reason, "width": hc.width,
            "site": hc.site,
            "nr": hc.nr, "name": hc.name, "former_names": list(hc.former_names), "subop": hc.subop,
            "args": [{"name": a.name, "kind": a.kind, "value": a.value, "text": a.text} for a in hc.args],
            "detail": detail(hc.detail), "findings": [finding(f) for f in hc.all_findings()]}


def abi_listing(abi: Abi) -> dict[str, Any]:
    return {"xen": abi.generation, "tag": abi.tag, "width": abi.width, "hypercalls": [
        {"nr": h.nr, "name": h.name, "former_names": list(h.former_names),
         "args": [{"name": a.name, "kind": a.kind} for a in h.args]} for h in abi.hypercalls()]}


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2)


# --- bounce frames ------------------------------------------------------------------------------


def bounce_frame(f: BounceFrame) -> dict[str, Any]:
    """A bounce frame (docs/json-schema.md); `fields` are its slots, lowest address first."""
    return {"schema": SCHEMA_VERSION, "type": "bounce_frame", "kind": f.kind, "xen": f.generation, "tag": f.tag,
            "width": f.width, "source": f.source, "address": f.address, "size": f.size, "vector": f.vector,
            "vector_name": f.vector_name, "ip": f.ip, "cs": f.cs, "cs_name": f.cs_name, "rpl": f.rpl,
            "saved_upcall_mask": f.saved_upcall_mask, "eflags": f.eflags, "if": f.interrupt_flag,
            "events_masked": f.events_masked, "guest_mode": f.guest_mode, "from_user": f.from_user,
            "ring": f.ring, "sp": f.sp, "ss": f.ss, "error_code": f.error_code, "cr2": f.cr2, "rcx": f.rcx,
            "r11": f.r11, "ds": f.ds, "es": f.es, "fs": f.fs, "gs": f.gs,
            "fields": [{"address": a, "name": n, "value": v} for a, n, v in f.slots()], "notes": list(f.notes)}

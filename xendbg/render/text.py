"""Plain and coloured text for people, rendered with rich.

Colour follows rich's rules (none when the output is not a terminal, none when NO_COLOR is set)
unless a front end forces it.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text as RichText

from xendbg.abi import Abi, result_text, selector_text
from xendbg.decode.bounce import BounceFrame
from xendbg.decode.model import (
    SEVERITIES,
    AbiUsed,
    Arg,
    Callbacks,
    Detail,
    FastTrap,
    Finding,
    Hypercall,
    MulticallBatch,
    StructFields,
    TableOf,
    Text,
    TrapTable,
)

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def hexv(value: int) -> str:
    return f"{value:#x}"


def table(*columns: str) -> Table:
    """A borderless table with these column headings (shared by every listing, gdb's included)."""
    grid = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for column in columns:
        grid.add_column(column, overflow="fold")
    return grid


def _titled(title: str, *body: RenderableType) -> Group:
    return Group(RichText(title, style="bold"), *body)


def args_table(args: Iterable[Arg]) -> Table:
    rows = table("arg", "value", "meaning")
    for a in args:
        rows.add_row(a.name, hexv(a.value), a.text or "")
    return rows


def findings(found: Iterable[Finding]) -> RenderableType:
    lines = []
    for f in found:
        line = RichText()
        line.append(f"{f.severity:<7}", style=SEVERITY_STYLE.get(f.severity, ""))
        line.append(f" [{f.rule}] ", style="dim")
        line.append(f.message)
        lines.append(line)
    return Group(*lines) if lines else RichText("no findings", style="green")


def trap_table(t: TrapTable) -> RenderableType:
    title = f"trap table at {t.address:#x}: {len(t.entries)} entries"
    title += "" if t.terminated else " (no terminating entry)"
    rows = table("#", "vector", "name", "DPL", "IF", "cs", "RPL", "handler")
    for e in t.entries:
        rows.add_row(str(e.index), hexv(e.vector), e.vector_name, str(e.dpl), "yes" if e.interrupt_flag else "",
                      _held(e.cs, e.passed_cs), str(e.rpl), hexv(e.address))
    if t.note:
        return _titled(title, rows, RichText(f"note: {t.note}", style="dim"))
    return _titled(title, rows)


def _held(selector: int, passed: int | None) -> str:
    """A registered selector as Xen holds it, and what the guest passed when Xen changed it."""
    return f"{selector:#06x}" if passed is None else f"{selector:#06x} (passed {passed:#06x})"


def callbacks(c: Callbacks) -> RenderableType:
    rows = table("callback", "address", "selector", "RPL", "flags")
    for cb in c.entries:
        rows.add_row(cb.kind, hexv(cb.address), "" if cb.selector is None else _held(cb.selector, cb.passed_selector),
                      "" if cb.rpl is None else str(cb.rpl), "|".join(cb.flag_names) or "")
    return _titled(f"callbacks ({c.operation})", rows)


def multicall(b: MulticallBatch) -> RenderableType:
    title = f"multicall batch at {b.address:#x}: {b.count} entries" + (" (truncated)" if b.truncated else "")
    rows = table("#", "op", "hypercall", "arguments", "result")
    for e in b.entries:
        call = e.call
        args = ", ".join(f"{a.name}={a.text or hexv(a.value)}" for a in call.args)
        result = "" if e.result is None else result_text(e.result)
        rows.add_row(str(e.index), str(call.nr), call.display_name, args, result)
    parts: list[RenderableType] = [RichText(title, style="bold"), rows]
    for e in b.entries:
        if e.call.detail is not None:
            parts.append(RichText(f"entry {e.index}: {e.call.display_name}", style="bold"))
            parts.append(detail(e.call.detail))
    return Group(*parts)


def detail(d: Detail) -> RenderableType:
    if isinstance(d, MulticallBatch):
        return multicall(d)
    if isinstance(d, TrapTable):
        return trap_table(d)
    if isinstance(d, Callbacks):
        return callbacks(d)
    if isinstance(d, FastTrap):
        handler = (f"handler {d.handler.address:#x} cs {d.handler.cs:#06x} DPL {d.handler.dpl}"
                   if d.handler else "handler not seen yet")
        return RichText(f"fast trap: vector {d.vector:#x} ({d.vector_name}), {handler}")
    if isinstance(d, StructFields):
        rows = table("field", "value")
        for name, value in d.fields:
            rows.add_row(name, hexv(value) if isinstance(value, int) else value)
        return _titled(f"{d.struct} at {d.address:#x}", rows)
    if isinstance(d, TableOf):
        columns = [name for name, _ in d.rows[0]] if d.rows else ["(empty)"]
        rows = table("#", *columns)
        for i, row in enumerate(d.rows):
            rows.add_row(str(i), *(hexv(v) if isinstance(v, int) else v for _, v in row))
        return _titled(f"{d.struct}[] at {d.address:#x}" + (" (truncated)" if d.truncated else ""), rows)
    if isinstance(d, Text):
        return RichText(f"text: {d.text!r}" + (" (truncated)" if d.truncated else ""))
    return RichText("")


def abi_label(generation: str, reason: str = "") -> str:
    """'Xen 2.0 ABI (from the guest's CS 0x0819)': which generation decoded this, and why."""
    return f"Xen {generation} ABI" + (f" ({reason})" if reason else "")


def hypercall(hc: Hypercall) -> RenderableType:
    head = RichText()
    head.append(hc.display_name, style="bold")
    if hc.former_names:
        head.append(f" (also {', '.join(hc.former_names)})", style="dim")
    head.append(f"  nr {hc.nr}")
    if hc.subop:
        head.append(f"  {hc.subop}", style="bold magenta")
    head.append(f"  [{abi_label(hc.generation, hc.abi_reason)}, {hc.width}-bit PV"
                + (f", {hc.site}" if hc.site else "") + "]", style="dim")
    parts: list[RenderableType] = [head]
    if hc.args:
        parts.append(args_table(hc.args))
    if hc.detail is not None:
        parts.append(detail(hc.detail))
    parts.append(findings(hc.all_findings()))
    return Group(*parts)


def _abi_head(abi: AbiUsed | None) -> list[RenderableType]:
    if abi is None:
        return []
    return [RichText(f"[{abi_label(abi.generation, abi.reason)}, {abi.width}-bit PV]", style="dim")]


def trap_table_report(t: TrapTable, found: Iterable[Finding], abi: AbiUsed | None = None) -> RenderableType:
    return Group(*_abi_head(abi), trap_table(t), findings(found))


def multicall_report(b: MulticallBatch, found: tuple[Finding, ...], abi: AbiUsed | None = None) -> RenderableType:
    return Group(*_abi_head(abi), multicall(b), findings(found + b.entry_findings()))


def callbacks_report(c: Callbacks, fast: FastTrap | None, found: Iterable[Finding],
                     abi: AbiUsed | None = None) -> RenderableType:
    """Registered callbacks, the fast trap (Xen 2.0), and the findings about them."""
    parts: list[RenderableType] = [*_abi_head(abi), callbacks(c)]
    if fast is not None:
        parts.append(detail(fast))
    return Group(*parts, findings(found))


def check_report(pending: Hypercall | None, found: list[Finding]) -> RenderableType:
    head = f"pending hypercall: {pending.display_name}" if pending else "no pending hypercall"
    counts = ", ".join(f"{sum(f.severity == s for f in found)} {s}" for s in SEVERITIES)
    return Group(RichText(f"{head}; {counts}"), findings(found))


def stats_table(rows: list[dict[str, Any]]) -> RenderableType:
    """`xen stats` / `xendbg trace --stats`: the rows of trace.Stats.rows(), like strace -c."""
    listing = table("calls", "errors", "hypercall", "in multicalls", "errnos", "sub-operations")
    for r in rows:
        subops = ", ".join(f"{k} {v}" for k, v in sorted(r["subops"].items(), key=lambda kv: -kv[1]))
        errnos = ", ".join(f"{k} {v}" for k, v in r["errnos"].items())
        calls = str(r["calls"]) + (f" (+{r['uncertain']} uncertain)" if r.get("uncertain") else "")
        listing.add_row(calls, str(r["errors"]), str(r["name"]), str(r["in_multicalls"] or ""), errnos, subops)
    return listing


def abi_listing(abi: Abi) -> RenderableType:
    rows = table("nr", "hypercall", "arguments")
    for h in abi.hypercalls():
        name = h.name + (f" (also {', '.join(h.former_names)})" if h.former_names else "")
        rows.add_row(str(h.nr), name, ", ".join(f"{a.name}: {a.kind}" for a in h.args))
    return _titled(f"Xen {abi.generation} ABI ({abi.tag}), {abi.width}-bit PV guests", rows)


def to_string(renderable: RenderableType, *, width: int = 100, color: bool = False) -> str:
    """Render to a string (for gdb and tests): colour only when asked."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=color, color_system="standard" if color else None,
                      no_color=not color, highlight=False, soft_wrap=False)
    console.print(renderable)
    return buffer.getvalue()


def console(stderr: bool = False) -> Console:
    """A console for the CLI: rich decides colour from the terminal and NO_COLOR."""
    return Console(stderr=stderr, highlight=False)


# --- bounce frames ------------------------------------------------------------------------------


def _slot_meaning(f: BounceFrame, name: str) -> str:
    if name == "cs":
        text = selector_text(f.cs, f.cs_name)
        return text + ("" if f.saved_upcall_mask is None else f", saved_upcall_mask {f.saved_upcall_mask}")
    if name in ("eflags", "rflags"):
        text = "IF" if f.interrupt_flag else "IF clear"
        if f.events_masked is not None:
            text += ": events were masked" if f.events_masked else ": events were enabled"
        return text + (", VM" if f.guest_mode == "vm86" else "")
    if name == "ss":
        return "interrupted stack selector"
    if name in ("ds", "es", "fs", "gs"):
        return "selector to reload (failsafe)"
    if name == "error_code":
        return "error code" + (f" of {f.vector_name}" if f.vector_name else "")
    if name == "cr2":
        return "faulting address"
    if name in ("eip", "rip"):
        return "interrupted code"
    if name in ("esp", "rsp"):
        return "interrupted stack"
    if name.startswith("vm86_"):
        return "vm86 segment"
    return f"guest {name}"


def bounce_frame(f: BounceFrame) -> RenderableType:
    """A bounce frame slot by slot, lowest address first, and what it says about the interruption."""
    head = RichText()
    what = f"{f.kind} frame" + (f" for vector {f.vector:#x} ({f.vector_name})" if f.vector is not None else "")
    head.append(f"{what} at {f.address:#x}", style="bold")
    head.append(f"  [Xen {f.generation} ABI, {f.width}-bit PV; {f.source}, {f.tag}]", style="dim")
    rows = table("address", "slot", "value", "meaning")
    digits = f.width // 4
    for address, name, value in f.slots():
        rows.add_row(hexv(address), name, f"{value:#0{digits + 2}x}", _slot_meaning(f, name))
    summary = f"interrupted guest {f.guest_mode} (ring {f.ring}) at {f.cs:#06x}:{f.ip:#x}"
    if f.sp is not None and f.ss is not None:
        summary += f", stack {f.ss:#06x}:{f.sp:#x}"
    if f.events_masked is not None:
        summary += ", events were masked" if f.events_masked else ", events were enabled"
    parts: list[RenderableType] = [head, rows, RichText(summary)]
    parts += [RichText(f"note: {note}", style="dim") for note in f.notes]
    return Group(*parts)

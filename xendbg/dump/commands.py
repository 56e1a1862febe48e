"""`xendbg core FILE [SUBCOMMAND]`: the live `xen` commands over a memory dump, with the same JSON.

Each subcommand builds the same dataclasses as its live counterpart and hands them to xendbg/render.
The registered trap table and callbacks come from Xen's struct vcpu (with --xen-syms, xendbg/dump/xen.py);
where Xen's data could not be read or checked, one line says why instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from rich.console import Group, RenderableType
from rich.text import Text

from xendbg.abi import Abi, get_abi
from xendbg.decode import decode_multicall, decode_trap_table, rules
from xendbg.decode.model import AbiUsed, Callbacks, Hypercall
from xendbg.dump.api import Core, Vcpu
from xendbg.dump.target import DumpTarget
from xendbg.dump.xen import SOURCE
from xendbg.errors import XendbgError
from xendbg.render import json as render_json
from xendbg.render import text as render_text
from xendbg.report import registered_callbacks, registered_trap_table
from xendbg.session import AbiChoice
from xendbg.trace import call_line

SUBCOMMANDS = ("summary", "vcpus", "hypercall", "multicall", "traps", "callbacks", "check", "trace")
Emit = Callable[[Any, RenderableType], None]


def _unrecoverable(what: str, vcpu: Vcpu) -> XendbgError:
    return XendbgError(f"{what}: {vcpu.why_not_registered()}")


def _source(vcpu: Vcpu) -> str:
    """Where the registered state came from (the key a dump adds to the live commands' JSON)."""
    return vcpu.registered_from()


def _state_abi(core: Core, vcpu: Vcpu) -> tuple[Abi, AbiUsed]:
    """The ABI to judge registered state with: the width of the guest that registered it."""
    abi, why = core.session.abi(vcpu.state_width)
    return abi, AbiUsed(abi.generation, abi.width, why.reason)


def _selected(core: Core, index: int | None) -> Vcpu:
    """--vcpu N, else the first vCPU with a pending hypercall; none pending is an error naming why."""
    if index is not None:
        return core.vcpu(index)
    for vcpu in core.vcpus:
        if vcpu.pending() is not None:
            return vcpu
    why = "; ".join(f"vCPU {v.index}: {v.why_not_pending}" for v in core.vcpus)
    raise XendbgError(f"no vCPU of the dump has a pending hypercall ({why})")


def _pending(vcpu: Vcpu) -> Hypercall:
    hc = vcpu.pending()
    if hc is None:
        raise XendbgError(f"vCPU {vcpu.index}: {vcpu.why_not_pending}")
    return hc


def _abi_of(core: Core, hc: Hypercall) -> tuple[Abi, AbiChoice]:
    """The ABI `hc` was decoded with, so that its batch or table is decoded alike (as live)."""
    choice = core.session.choice()
    if choice.generation != hc.generation:
        choice = AbiChoice(hc.generation, hc.abi_reason, None, (hc.generation,))
    return get_abi(hc.generation, hc.width), choice


def vcpu_row(vcpu: Vcpu) -> dict[str, Any]:
    """One row of `vcpus` (the live `xen vcpus --json` keys, plus where the registers came from)."""
    pending = vcpu.pending()
    state = vcpu.core.session.states.get(vcpu.index) if vcpu.registered else None
    # Unknown registered state is null, not 0 (unknown, not none).
    return {"vcpu": vcpu.index, "thread": vcpu.index + 1, "mode": vcpu.mode, "width": vcpu.cpu_mode.width,
            "pc": vcpu.pc, "pending": pending.display_name if pending else None,
            "registered_traps": len(state.trap_table) if state else None,
            "registered_callbacks": len(state.callbacks) if state else None,
            "registers_from": vcpu.registers_source}


def vcpus(core: Core, args: Any, emit: Emit) -> None:
    rows = [vcpu_row(v) for v in core.vcpus]
    listing = render_text.table("vCPU", "thread", "mode", "pc", "pending hypercall", "registers")
    for r, v in zip(rows, core.vcpus, strict=True):
        listing.add_row(str(r["vcpu"]), str(r["thread"]), r["mode"], f"{r['pc']:#x} {v.symbol()}".strip(),
                        r["pending"] or "", r["registers_from"])
    emit({"schema": render_json.SCHEMA_VERSION, "vcpus": rows}, listing)


def hypercall(core: Core, args: Any, emit: Emit) -> None:
    hc = _pending(_selected(core, args.vcpu))
    emit(render_json.hypercall(hc), render_text.hypercall(hc))


def multicall(core: Core, args: Any, emit: Emit) -> None:
    vcpu = _selected(core, args.vcpu)
    hc = _pending(vcpu)
    if hc.name != "multicall":
        raise XendbgError(f"vCPU {vcpu.index}'s pending hypercall is {hc.display_name}, not multicall")
    abi, why = _abi_of(core, hc)
    batch, found = decode_multicall(vcpu.target, abi, hc.args[0].value, hc.args[1].value, results=args.results,
                                    state=core.session.state(vcpu.index), stack=hc.stack)
    used = AbiUsed(abi.generation, abi.width, why.reason)
    extra = why.findings()
    emit(render_json.multicall_report(batch, found + extra, used),
         render_text.multicall_report(batch, found + extra, used))


def traps(core: Core, args: Any, emit: Emit) -> None:
    vcpu = _selected_or_first(core, args.vcpu)
    hc = vcpu.pending()
    if hc is None or hc.name != "set_trap_table" or not hc.args[0].value:
        if not vcpu.registered:
            pending = f"vCPU {vcpu.index}'s pending hypercall is {hc.display_name}; " if hc else ""
            raise _unrecoverable(f"{pending}the registered trap table", vcpu)
        state = core.session.state(vcpu.index)
        abi, used = _state_abi(core, vcpu)
        table, found = registered_trap_table(state, abi)
        if state.table is not None:
            table = replace(table, note=state.table.note)
        emit(render_json.trap_table_report(table, found, used) | {"registered_from": _source(vcpu)},
             render_text.trap_table_report(table, found, used))
        return
    abi, why = _abi_of(core, hc)
    table, found = decode_trap_table(vcpu.target, abi, hc.args[0].value)
    found += why.findings()
    used = AbiUsed(abi.generation, abi.width, why.reason)
    emit(render_json.trap_table_report(table, found, used), render_text.trap_table_report(table, found, used))


def callbacks(core: Core, args: Any, emit: Emit) -> None:
    vcpu = _selected_or_first(core, args.vcpu)
    hc = vcpu.pending()
    if hc is None or not isinstance(hc.detail, Callbacks):
        if not vcpu.registered:
            pending = f"vCPU {vcpu.index}'s pending hypercall is {hc.display_name}; " if hc else ""
            raise _unrecoverable(f"{pending}the registered callbacks", vcpu)
        abi, used = _state_abi(core, vcpu)
        registered, fast, found = registered_callbacks(core.session.state(vcpu.index), abi)
        emit(render_json.callbacks_report(registered, fast, found, used) | {"registered_from": _source(vcpu)},
             render_text.callbacks_report(registered, fast, found, used))
        return
    emit(render_json.hypercall(hc), Group(render_text.callbacks(hc.detail), render_text.findings(hc.findings)))


def check(core: Core, args: Any, emit: Emit) -> None:
    vcpu = _selected_or_first(core, args.vcpu)
    hc = vcpu.pending()
    found = vcpu.findings()
    note = _source(vcpu) if vcpu.registered else vcpu.why_not_registered()
    extra = {"registered_from": note} if vcpu.registered else {}
    emit(render_json.check_report(hc, found) | extra,
         Group(render_text.check_report(hc, found), Text(f"registered state: {note}", style="dim")))


def _selected_or_first(core: Core, index: int | None) -> Vcpu:
    try:
        return _selected(core, index)
    except XendbgError:
        return core.vcpus[0]


def summary(core: Core, args: Any, emit: Emit) -> None:
    """What every vCPU was doing: mode, PC, the pending hypercall or why none, findings."""
    rows: list[dict[str, Any]] = []
    parts: list[RenderableType] = []
    parts.append(Text(f"{core.path}: {core.format} dump, {len(core.vcpus)} vCPU(s)", style="bold"))
    for vcpu in core.vcpus:
        hc = vcpu.pending()
        found = vcpu.findings()
        row = vcpu_row(vcpu) | {"domain": vcpu.xen.domain if vcpu.xen else None,
                                "physical_cpu": vcpu.physical_cpu,
                                "paging": vcpu.target.paging.describe(),
                                "hypercall": render_json.hypercall(hc) if hc else None,
                                "not_pending": None if hc else vcpu.why_not_pending,
                                "findings": [render_json.finding(f) for f in found]}
        rows.append(row)
        head = Text()
        head.append(f"vCPU {vcpu.index}", style="bold")
        head.append(f"  {vcpu.mode}, registers {vcpu.registers_source}")
        where = Text(f"  pc {vcpu.pc:#x} {vcpu.symbol()}".rstrip() + f"  ({row['paging']})")
        if hc is not None:
            call = Text(f"  pending: {call_line(hc)}")
            call.append(f"  [{render_text.abi_label(hc.generation, hc.abi_reason)}, {hc.site}]", style="dim")
        else:
            call = Text(f"  pending: none ({vcpu.why_not_pending})", style="dim")
        parts += [head, where, call]
        registered, lines = _registered(vcpu)
        row["registered"] = registered
        parts += lines
        if found:
            parts.append(render_text.findings(found))
    if core.domain is not None:
        parts.insert(1, Text(f"domain d{core.domain} (Xen's domains: "
                             f"{', '.join(f'd{d}' for d in core.xen_data.domains())}), registered state {SOURCE}"
                             if core.xen_data else ""))
    source = core.registered_source
    note = (f"registered state: {source}" if core.vcpus and all(v.registered for v in core.vcpus) else
            f"registered state: {core.why_not_registered}")
    if core.why_not_registered:
        parts.append(Text(note if not note.endswith(source) else f"{note} ({core.why_not_registered})", style="dim"))
    data = {"schema": render_json.SCHEMA_VERSION, "file": core.path, "format": core.format, "domain": core.domain,
            "vcpus": rows, "registered_state": note}
    emit(data, Group(*parts))


def _registered(vcpu: Vcpu) -> tuple[dict[str, Any] | None, list[RenderableType]]:
    """A vCPU's registered state for the summary: the trap table and callbacks Xen holds, the kernel
    stack and the guest's CR3 (JSON, and a few text lines)."""
    if not vcpu.registered:
        return None, [Text(f"  registered: unknown ({vcpu.why_not_registered()})", style="dim")]
    state = vcpu.core.session.state(vcpu.index)
    abi, _ = _state_abi(vcpu.core, vcpu)
    table, _ = registered_trap_table(state, abi)
    callbacks, _, _ = registered_callbacks(state, abi)
    kernel_ss, kernel_sp, cr3 = vcpu.registered_stack()
    data = {"registered_from": _source(vcpu), "trap_table": render_json.trap_table(table),
            "callbacks": render_json.detail(callbacks), "kernel_ss": kernel_ss, "kernel_sp": kernel_sp,
            "cr3": cr3}
    selectors = sorted({e.cs for e in table.entries})
    traps = Text(f"  registered: {len(table.entries)} trap {rules.vector_list([e.vector for e in table.entries])}"
                 if table.entries else "  registered: no trap table")
    if selectors:
        traps.append(f" (code selector{'s' if len(selectors) > 1 else ''} "
                     f"{', '.join(f'{cs:#x} RPL {cs & 3}' for cs in selectors)})")
    cbs = Text("  callbacks: " + (", ".join(f"{c.kind} {c.address:#x}{' (masks events)' if c.flags else ''}"
                                            for c in callbacks.entries) or "none"))
    stack = Text(f"  kernel stack {kernel_ss or 0:#x}:{kernel_sp or 0:#x}, CR3 {cr3 or 0:#x}",
                 style="dim")
    return data, [traps, cbs, stack]


def trace(core: Core, args: Any, emit: Emit) -> None:
    """The flight recorder: the records still in Xen's trace buffers (cons to prod on each CPU), the
    last hypercalls before the dump, decoded as the live `xen trace start --buffers` decodes them."""
    from collections import deque

    from xendbg.errors import TargetError, UsageError
    from xendbg.trace import Stats, TraceLog, show_lines
    from xendbg.xentrace.buffers import TraceBuffers
    from xendbg.xentrace.merge import BufferFeed, records_abi

    if core.xen_syms is None:
        raise UsageError("trace reads Xen's own trace buffers: give --xen-syms")
    targets = [v.target for v in core.vcpus] + [DumpTarget(core.memory, cpu) for cpu in core.memory.cpus]
    problem: XendbgError | None = None
    for target in targets:  # the first CPU whose page tables map Xen
        buffers = TraceBuffers(target, core.symbols, core.memory.read)
        try:
            per_cpu = buffers.contents()
            break
        except UsageError as exc:
            raise UsageError(f"{exc}".replace("Xen's trace buffers are not allocated",
                                              "Xen's trace buffers were never allocated in this dump")) from None
        except TargetError as exc:
            problem = exc
    else:
        raise XendbgError(f"no CPU of the dump maps Xen's trace buffers: {problem}")
    log = TraceLog(None, ())
    log.recent = deque()  # a dump is read whole: keep every record
    selectors = [(v.cs, f"vCPU {v.index}'s CS") for v in core.vcpus]
    chosen = records_abi(core.session.abi, selectors, 64)  # Xen is 64-bit: xendbg reads no 32-bit Xen's dump
    feed = BufferFeed(log, Stats(), lambda: chosen)
    feed.feed(per_cpu)
    records = [r for r in log.recent if r["event"] not in ("start", "stop")]
    lines = show_lines(records)
    head = Text(f"{sum(len(r) for r in per_cpu.values())} records in Xen's trace buffers of {len(per_cpu)} CPUs "
                f"({buffers.pages} pages each), {feed.lost} reported lost", style="bold")
    emit({"schema": render_json.SCHEMA_VERSION, "cpus": len(per_cpu), "pages": buffers.pages,
          "lost": feed.lost, "records": records},
         Group(head, Text("\n".join(lines) if lines else "(the buffers are empty)")))


COMMANDS: dict[str, Callable[[Core, Any, Emit], None]] = {
    "summary": summary, "vcpus": vcpus, "hypercall": hypercall, "multicall": multicall, "traps": traps,
    "callbacks": callbacks, "check": check, "trace": trace,
}

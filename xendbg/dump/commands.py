"""`xendbg core FILE [SUBCOMMAND]`: the live `xen` commands over a memory dump, with the same JSON.

Each subcommand builds the same dataclasses as its live counterpart and hands them to xendbg/render;
what a dump cannot tell (the registered trap table and callbacks, kept in Xen's own data) is said in
one line instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Group, RenderableType
from rich.text import Text

from xendbg.abi import Abi, get_abi
from xendbg.decode import decode_multicall, decode_trap_table
from xendbg.decode.model import AbiUsed, Callbacks, Hypercall
from xendbg.dump.api import NOT_RECOVERABLE, Core, Vcpu
from xendbg.errors import XendbgError
from xendbg.render import json as render_json
from xendbg.render import text as render_text
from xendbg.session import AbiChoice
from xendbg.trace import call_line

SUBCOMMANDS = ("summary", "vcpus", "hypercall", "multicall", "traps", "callbacks", "check")
Emit = Callable[[Any, RenderableType], None]


def _unrecoverable(what: str, core: Core) -> XendbgError:
    if core.xen_syms is None:
        return XendbgError(f"{what}: {NOT_RECOVERABLE}")
    return XendbgError(f"{what}: not recoverable yet: it lives in Xen's struct vcpu, and xendbg does not read Xen's "
                       f"data from a QEMU dump yet (xen-syms is used for symbols and the Xen version only)")


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
    # What a vCPU registered is not in a QEMU dump's guest memory: null, not 0 (unknown, not none).
    return {"vcpu": vcpu.index, "thread": vcpu.index + 1, "mode": vcpu.mode, "width": vcpu.cpu_mode.width,
            "pc": vcpu.pc, "pending": pending.display_name if pending else None,
            "registered_traps": None, "registered_callbacks": None, "registers_from": vcpu.registers_source}


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
                                    state=core.session.state(vcpu.index))
    used = AbiUsed(abi.generation, abi.width, why.reason)
    extra = why.findings()
    emit(render_json.multicall_report(batch, found + extra, used),
         render_text.multicall_report(batch, found + extra, used))


def traps(core: Core, args: Any, emit: Emit) -> None:
    vcpu = _selected_or_first(core, args.vcpu)
    hc = vcpu.pending()
    if hc is None or hc.name != "set_trap_table" or not hc.args[0].value:
        pending = f"vCPU {vcpu.index}'s pending hypercall is {hc.display_name}; " if hc else ""
        raise _unrecoverable(f"{pending}the registered trap table", core)
    abi, why = _abi_of(core, hc)
    table, found = decode_trap_table(vcpu.target, abi, hc.args[0].value)
    found += why.findings()
    used = AbiUsed(abi.generation, abi.width, why.reason)
    emit(render_json.trap_table_report(table, found, used), render_text.trap_table_report(table, found, used))


def callbacks(core: Core, args: Any, emit: Emit) -> None:
    vcpu = _selected_or_first(core, args.vcpu)
    hc = vcpu.pending()
    if hc is None or not isinstance(hc.detail, Callbacks):
        pending = f"vCPU {vcpu.index}'s pending hypercall is {hc.display_name}; " if hc else ""
        raise _unrecoverable(f"{pending}the registered callbacks", core)
    emit(render_json.hypercall(hc), Group(render_text.callbacks(hc.detail), render_text.findings(hc.findings)))


def check(core: Core, args: Any, emit: Emit) -> None:
    vcpu = _selected_or_first(core, args.vcpu)
    hc = vcpu.pending()
    found = vcpu.findings()
    emit(render_json.check_report(hc, found),
         Group(render_text.check_report(hc, found), Text(f"registered state: {NOT_RECOVERABLE}", style="dim")))


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
        row = vcpu_row(vcpu) | {"paging": vcpu.target.paging.describe(),
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
        if found:
            parts.append(render_text.findings(found))
    note = f"registered state: {NOT_RECOVERABLE}"
    parts.append(Text(note, style="dim"))
    data = {"schema": render_json.SCHEMA_VERSION, "file": core.path, "format": core.format, "vcpus": rows,
            "registered_state": note}
    emit(data, Group(*parts))


COMMANDS: dict[str, Callable[[Core, Any, Emit], None]] = {
    "summary": summary, "vcpus": vcpus, "hypercall": hypercall, "multicall": multicall, "traps": traps,
    "callbacks": callbacks, "check": check,
}

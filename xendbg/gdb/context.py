"""What every `xen` command needs from gdb: the session (settings, ABI evidence, registered state),
gdb's symbols, the loaded guest files, and output.  The policy itself lives in xendbg/session.py."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import gdb

from xendbg import arch
from xendbg.abi import Abi
from xendbg.decode import Hypercall
from xendbg.decode.model import AbiUsed
from xendbg.errors import TargetGone, XendbgError
from xendbg.gdb.target import GdbTarget
from xendbg.session import AbiChoice, Session

if TYPE_CHECKING:
    from types import ModuleType

    from xendbg.observe import GuestSite
    from xendbg.sites import HypercallSites

SESSION = Session()
SETTINGS = SESSION.settings


def text() -> ModuleType:
    """rich is imported on first output, not when gdb loads xendbg (startup stays fast)."""
    from xendbg.render import text as module

    return module


_text_sink: list[object] | None = None  # set while a caller (an MI command) renders the output itself


def write(renderable: object) -> None:
    """Render through gdb: its width, its style setting, its pager (gdb.write is paged)."""
    if _text_sink is not None:
        _text_sink.append(renderable)
        return
    width = int(gdb.parameter("width") or 0)
    color = SETTINGS.color and bool(gdb.parameter("style enabled"))
    gdb.write(text().to_string(renderable, width=width if width > 0 else 200, color=color))


_json_sink: list[object] | None = None  # set while a caller (an MI command) takes the JSON itself


def write_json(obj: object) -> None:
    if _json_sink is not None:
        _json_sink.append(obj)
        return
    from xendbg.render import json as render_json

    gdb.write(render_json.dumps(obj) + "\n")


@contextmanager
def capture_json() -> Iterator[list[object]]:
    """Collect what `xen ... --json` commands write, instead of printing it (MI commands use this)."""
    global _json_sink
    outer, _json_sink = _json_sink, []
    try:
        yield _json_sink
    finally:
        _json_sink = outer


@contextmanager
def capture_text() -> Iterator[list[object]]:
    """Collect the renderables `xen ...` commands write, instead of printing them (MI commands render
    them for their client: its width, colour)."""
    global _text_sink
    outer, _text_sink = _text_sink, []
    try:
        yield _text_sink
    finally:
        _text_sink = outer


# `info address`: "... is static storage at address 0x...", "... is a function at address 0x...", or
# for a symbol without debug info "... is at 0x... in a file compiled without debugging".
_AT_ADDRESS = re.compile(r"\bat (?:address )?(0x[0-9a-fA-F]+)")


class GdbSymbols:
    """The session's Symbols protocol over gdb's symbol tables (minimal symbols are enough)."""

    def symbol_at(self, address: int) -> tuple[str, int] | None:
        try:
            out = gdb.execute(f"info symbol {address:#x}", to_string=True).strip()
        except gdb.error:
            return None
        if out.startswith("No symbol"):
            return None
        name = out.split(" in section ")[0]
        if " + " in name:
            base, offset = name.split(" + ", 1)
            return base, int(offset)
        return name, 0

    def address_of(self, name: str) -> int | None:
        # With debug info (Debian 13's xen-syms has it) a name may be a type and a variable at once
        # (`struct t_info` and `t_info`): ask for the variable or function first, then the minimal symbol.
        for lookup in (gdb.lookup_static_symbol, gdb.lookup_global_symbol):
            try:
                symbol = lookup(name)
                if symbol is not None and (symbol.is_variable or symbol.is_function):
                    value = symbol.value()
                    address = value.address if symbol.is_variable else value
                    return int(address.cast(gdb.lookup_type("unsigned long"))) & ((1 << 64) - 1)
            except (gdb.error, RuntimeError):
                pass
        try:
            return int(gdb.parse_and_eval(f"(unsigned long)&'{name}'")) & ((1 << 64) - 1)
        except gdb.error:
            pass
        # gdb 16 reads some variables before it takes their address (Xen 4.20's `t_info`, whose type it
        # sizes from memory) and fails while Xen is not in memory yet; `info address` reads nothing.
        try:
            found = _AT_ADDRESS.search(gdb.execute(f"info address {name}", to_string=True))
        except gdb.error:
            return None
        return int(found.group(1), 16) if found else None


SYMBOLS = GdbSymbols()
symbol_at = SYMBOLS.symbol_at
address_of = SYMBOLS.address_of


def xen_symbols_loaded() -> bool:
    return address_of(arch.XEN_HYPERCALL_ENTRY) is not None


# --- the guest files gdb loaded, and what they say about the Xen version ------------------------------

_SITES_CACHE: dict[tuple[str, float], HypercallSites | None] = {}  # by (path, mtime); None: not a guest
_evidence_for: tuple[str, ...] | None = None  # the objfiles the file-based evidence was gathered from


def loaded_sites() -> list[HypercallSites]:
    """What sites.py finds in each file gdb loaded (a vmlinux takes ~0.1 s to scan: once per file)."""
    from xendbg.sites import find_hypercall_sites

    found = []
    for objfile in gdb.objfiles():
        path = objfile.filename
        if not path:
            continue
        try:
            key = (path, os.stat(path).st_mtime)
        except OSError:
            continue
        if key not in _SITES_CACHE:
            try:
                _SITES_CACHE[key] = find_hypercall_sites(path)
            except XendbgError:
                _SITES_CACHE[key] = None
        sites = _SITES_CACHE[key]
        if sites is not None:
            found.append(sites)
    return found


def _refresh_evidence() -> None:
    """Re-read the file-based evidence (Xen's image, guest notes, hypercall page) when gdb's files change."""
    global _evidence_for
    files = tuple(o.filename or "" for o in gdb.objfiles())
    if files == _evidence_for:
        return
    _evidence_for = files
    SESSION.evidence.read_files(loaded_sites())


def machine_entries() -> tuple[list[GuestSite], int | None, str]:
    """Where hypercalls can be watched when no symbol file says: the guest's hypercall page or Linux's
    stubs near the stopped PC, and Xen's int $0x82 handler from the IDT (QEMU's monitor gives its base).
    Returns (sites, gate handler or None, how they were found)."""
    import re

    from xendbg import observe

    target = GdbTarget()
    found: list[GuestSite] = []
    notes = []
    mode = arch.vcpu_mode(target)
    pc = target.read_register("pc")
    if mode.width is not None:

        def read(address: int, size: int) -> bytes | None:
            try:
                return target.read_memory(address, size)
            except XendbgError:
                return None

        found = observe.scan_memory(read, pc, mode.width)
        notes.append(f"scanned guest memory within {observe.SCAN_WINDOW >> 20} MiB of PC {pc:#x}")
    gate = None
    try:
        registers = gdb.execute("monitor info registers", to_string=True)
    except gdb.error:
        registers = ""
    idt, efer = re.search(r"IDT=\s*([0-9a-fA-F]+)", registers), re.search(r"EFER=([0-9a-fA-F]+)", registers)
    if idt is not None:
        long_mode = efer is not None and bool(int(efer.group(1), 16) & 0x400)  # EFER.LMA
        size = 16 if long_mode else 8
        try:
            gate = arch.idt_gate_handler(target.read_memory(int(idt.group(1), 16) + arch.HYPERCALL_VECTOR * size,
                                                            size), long_mode)
        except XendbgError:
            gate = None
        notes.append(f"IDT at {int(idt.group(1), 16):#x}" + ("" if gate is not None else " has no 0x82 gate"))
    if gate is not None:
        SESSION.gate_handlers.add(gate)
    return found, gate, "; ".join(notes) or "QEMU's monitor gave no IDT"


def choice(code_selector: int | None = None) -> AbiChoice:
    _refresh_evidence()
    return SESSION.choice(code_selector)


def abi_for_width(width: int) -> Abi:
    _refresh_evidence()
    return SESSION.abi_for_width(width)


def abi_for(width: int, code_selector: int | None = None) -> tuple[Abi, AbiChoice]:
    _refresh_evidence()
    return SESSION.abi(width, code_selector)


def candidate_abis(width: int) -> list[Abi]:
    """Every ABI the evidence allows for a guest of `width` bits, the chosen one first."""
    _refresh_evidence()
    return SESSION.candidate_abis(width)


def guest_width(target: GdbTarget) -> int | None:
    return SESSION.guest_width(target)


def current_abi(target: GdbTarget) -> tuple[Abi, AbiChoice]:
    """The ABI for the selected vCPU and why: `set xen width/abi`, else the guest's CS and the evidence."""
    _refresh_evidence()
    return SESSION.current_abi(target, where(target))


def used(abi: Abi, why: AbiChoice) -> AbiUsed:
    return AbiUsed(abi.generation, abi.width, why.reason)


def abi_of(hc: Hypercall) -> tuple[Abi, AbiChoice]:
    """The ABI a decoded hypercall was decoded with, so that what follows from it (its batch, its
    table) is decoded alike."""
    from xendbg.abi import get_abi

    _refresh_evidence()
    choice = SESSION.choice()
    if choice.generation != hc.generation:  # the evidence changed since: say what decoded it
        choice = AbiChoice(hc.generation, hc.abi_reason, None, (hc.generation,))
    return get_abi(hc.generation, hc.width), choice


def where(target: GdbTarget) -> str:
    from xendbg.session import where as where_in

    return where_in(target, SYMBOLS)


def cpu_index() -> int:
    """The selected vCPU, numbered from 0 (QEMU's gdbstub: thread N is CPU N-1).

    Under a real Xen these are QEMU's CPUs, which Xen schedules the guest's vCPUs on."""
    thread = gdb.selected_thread()
    if thread is None:
        from xendbg.gdb.connect import no_vcpu_reason

        raise TargetGone(no_vcpu_reason())
    return thread.num - 1


def decode_here(target: GdbTarget) -> Hypercall:
    """The hypercall the selected vCPU is about to make, or (inside Xen, with xen-syms) is serving."""
    _refresh_evidence()
    return SESSION.decode_here(target, SYMBOLS, cpu_index())

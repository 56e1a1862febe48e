"""What every `xen` command needs from gdb: settings, the ABI of the selected vCPU, symbols, output."""

from __future__ import annotations

from typing import TYPE_CHECKING

import gdb  # type: ignore[import-not-found]

from xendbg import arch
from xendbg.abi import NEWEST, Abi, get_abi
from xendbg.abi.generations import resolve_generation
from xendbg.decode import GuestState, Hypercall, decode_in_xen, decode_pending
from xendbg.errors import TargetGone, XendbgError
from xendbg.gdb.target import GdbTarget

if TYPE_CHECKING:
    from types import ModuleType


class Settings:
    abi = "auto"
    width = "auto"
    color = True
    # The Xen version the guest was told (a xen_version(XENVER_version) result xendbg saw): `abi auto`
    # decodes with that generation once known, else the newest.
    reported_version: str | None = None


SETTINGS = Settings()


def text() -> ModuleType:
    """rich is imported on first output, not when gdb loads xendbg (startup stays fast)."""
    from xendbg.render import text as module

    return module


def write(renderable: object) -> None:
    """Render through gdb: its width, its style setting, its pager (gdb.write is paged)."""
    width = int(gdb.parameter("width") or 0)
    color = SETTINGS.color and bool(gdb.parameter("style enabled"))
    gdb.write(text().to_string(renderable, width=width if width > 0 else 200, color=color))


def write_json(obj: object) -> None:
    from xendbg.render import json as render_json

    gdb.write(render_json.dumps(obj) + "\n")


def generation() -> str:
    if SETTINGS.abi != "auto":
        return SETTINGS.abi
    if SETTINGS.reported_version:
        return resolve_generation(SETTINGS.reported_version)
    return NEWEST


def abi_for_width(width: int) -> Abi:
    return get_abi(generation(), int(SETTINGS.width) if SETTINGS.width != "auto" else width)


def guest_width(target: GdbTarget) -> int | None:
    """The guest width of the selected vCPU (None when it is in Xen, ring 0)."""
    if SETTINGS.width != "auto":
        return int(SETTINGS.width)
    return arch.cpu_mode(target.read_register("cs") & 0xFFFF).width


def current_abi(target: GdbTarget) -> Abi:
    """The ABI for the selected vCPU: `set xen width/abi`, else the guest's CS."""
    width = guest_width(target)
    if width is None:
        raise XendbgError(f"the selected vCPU is in Xen ({where(target)}), not in the guest "
                          f"(set xen width 32|64 to decode its registers anyway)")
    return abi_for_width(width)


def symbol_at(address: int) -> tuple[str, int] | None:
    """(function, offset) for an address from gdb's symbols (minimal symbols are enough)."""
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


def address_of(symbol: str) -> int | None:
    """The address of a (minimal) symbol, or None when gdb has no such symbol."""
    try:
        return int(gdb.parse_and_eval(f"(unsigned long)&'{symbol}'")) & ((1 << 64) - 1)
    except gdb.error:
        return None


def where(target: GdbTarget) -> str:
    pc = target.read_register("pc")
    sym = symbol_at(pc)
    if sym is None:
        return f"at {pc:#x}"
    return f"at {pc:#x} <{sym[0]}+{sym[1]}>" if sym[1] else f"at {pc:#x} <{sym[0]}>"


def xen_symbols_loaded() -> bool:
    return address_of(arch.XEN_HYPERCALL_ENTRY) is not None


def cpu_index() -> int:
    """The selected vCPU, numbered from 0 (QEMU's gdbstub: thread N is CPU N-1).

    Under a real Xen these are QEMU's CPUs, which Xen schedules the guest's vCPUs on."""
    thread = gdb.selected_thread()
    if thread is None:
        raise TargetGone("no thread selected: is gdb connected to a stopped target?")
    return thread.num - 1


def decode_here(target: GdbTarget, state: GuestState | None = None) -> Hypercall:
    """The hypercall the selected vCPU is about to make, or (inside Xen, with xen-syms) is serving."""
    if guest_width(target) is None:
        pc = target.read_register("pc")
        sym = symbol_at(pc)
        if sym is not None and sym[1] == 0 and (sym[0] in arch.XEN_FRAME_ENTRIES or arch.handler_hypercall(sym[0])):
            return decode_in_xen(target, sym[0], abi_for_width, state=state)
        hint = "" if xen_symbols_loaded() else "; load Xen's symbols (xen-syms) to decode inside Xen"
        raise XendbgError(f"no pending hypercall: the selected vCPU is in Xen {where(target)}, not at the "
                          f"entry of a hypercall handler (do_NAME, compat_NAME) or of "
                          f"{arch.XEN_HYPERCALL_ENTRY}{hint}")
    return decode_pending(target, current_abi(target), state=state)

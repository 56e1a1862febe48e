"""The `xen` commands and `set xen ...` parameters.  Only xendbg/gdb/ imports gdb."""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING

import gdb  # type: ignore[import-not-found]

from xendbg import arch
from xendbg.abi import GENERATIONS, NEWEST, Abi, get_abi
from xendbg.decode import Callbacks, decode_multicall, decode_pending, decode_trap_table
from xendbg.errors import XendbgError
from xendbg.gdb.target import GdbTarget
from xendbg.render import json as render_json

if TYPE_CHECKING:
    from types import ModuleType


def _text() -> ModuleType:
    """rich is imported on first output, not when gdb loads xendbg (startup stays fast)."""
    from xendbg.render import text

    return text

ABI_CHOICES = ["auto", *GENERATIONS]


class _Settings:
    abi = "auto"
    width = "auto"
    color = True


SETTINGS = _Settings()


def _write(renderable: object) -> None:
    width = gdb.parameter("width") or 100
    color = SETTINGS.color and bool(gdb.parameter("style enabled"))
    gdb.write(_text().to_string(renderable, width=int(width) if int(width) > 0 else 200, color=color))


def _current_abi(target: GdbTarget) -> Abi:
    """The ABI for the selected vCPU: `set xen width/abi`, else the guest's CS, else gdb's architecture."""
    if SETTINGS.width != "auto":
        width = int(SETTINGS.width)
    else:
        mode = arch.cpu_mode(target.read_register("cs") & 0xFFFF)
        if mode.width is None:
            raise XendbgError("the selected vCPU is in Xen (ring 0), not in the guest: no guest hypercall "
                              "pending here (set xen width 32|64 to decode anyway)")
        width = mode.width
    return get_abi(NEWEST if SETTINGS.abi == "auto" else SETTINGS.abi, width)


def _options(arg: str, known: tuple[str, ...] = ("--json",)) -> tuple[set[str], list[str]]:
    words = shlex.split(arg)
    flags = {w for w in words if w.startswith("--")}
    unknown = flags - set(known)
    if unknown:
        raise XendbgError(f"unknown option {sorted(unknown)[0]} (known: {', '.join(known)})")
    return flags, [w for w in words if not w.startswith("--")]


def _number(text: str) -> int:
    try:
        return int(gdb.parse_and_eval(text))
    except gdb.error as exc:
        raise XendbgError(f"not a number or expression: {text!r}: {exc}") from None


class _XenCommand(gdb.Command):
    """Base: turns xendbg's errors into one-line gdb errors."""

    def invoke(self, arg: str, from_tty: bool) -> None:
        try:
            self.run(arg)
        except XendbgError as exc:
            raise gdb.GdbError(str(exc)) from None

    def run(self, arg: str) -> None:
        raise NotImplementedError


class XenPrefix(gdb.Command):
    """Xen PV guest debugging: decode hypercalls, multicalls, trap tables and callbacks.

Commands: xen hypercall (xen hc), xen multicall, xen traps, xen callbacks, xen vcpus.
Settings: set xen abi auto|2.0|3.0|..., set xen width auto|32|64, set xen color on|off."""

    def __init__(self) -> None:
        super().__init__("xen", gdb.COMMAND_DATA, gdb.COMPLETE_COMMAND, prefix=True)


class XenHypercall(_XenCommand):
    """Decode the hypercall the selected vCPU is about to make: xen hypercall [--json]

Works when stopped at the hypercall instruction (int $0x82, syscall, vmcall) or in a stub leading
to it (a hypercall-page stub, Linux's xen_hypercall_pv)."""

    def __init__(self, name: str = "xen hypercall") -> None:
        super().__init__(name, gdb.COMMAND_DATA)

    def run(self, arg: str) -> None:
        flags, _ = _options(arg)
        target = GdbTarget()
        hc = decode_pending(target, _current_abi(target))
        if "--json" in flags:
            gdb.write(render_json.dumps(render_json.hypercall(hc)) + "\n")
        else:
            _write(_text().hypercall(hc))


class XenMulticall(_XenCommand):
    """Show a multicall batch: xen multicall [ADDR COUNT] [--results] [--json]

Without ADDR COUNT: the batch of the pending multicall.  --results: the batch has run, show the
results Xen wrote."""

    def __init__(self) -> None:
        super().__init__("xen multicall", gdb.COMMAND_DATA)

    def run(self, arg: str) -> None:
        flags, words = _options(arg, ("--json", "--results"))
        target = GdbTarget()
        abi = _current_abi(target)
        if words:
            if len(words) != 2:
                raise XendbgError("usage: xen multicall [ADDR COUNT] [--results] [--json]")
            address, count = _number(words[0]), _number(words[1])
        else:
            hc = decode_pending(target, abi)
            if hc.name != "multicall":
                raise XendbgError(f"the pending hypercall is {hc.display_name}, not multicall: give ADDR COUNT")
            address, count = hc.args[0].value, hc.args[1].value
        batch, found = decode_multicall(target, abi, address, count, results="--results" in flags)
        if "--json" in flags:
            gdb.write(render_json.dumps(render_json.multicall_report(batch, found)) + "\n")
        else:
            _write(_text().multicall_report(batch, found))


class XenTraps(_XenCommand):
    """Show a trap table (trap_info array): xen traps [ADDR] [--json]

Without ADDR: the table of the pending set_trap_table."""

    def __init__(self) -> None:
        super().__init__("xen traps", gdb.COMMAND_DATA)

    def run(self, arg: str) -> None:
        flags, words = _options(arg)
        target = GdbTarget()
        abi = _current_abi(target)
        if words:
            address = _number(" ".join(words))
        else:
            hc = decode_pending(target, abi)
            if hc.name != "set_trap_table":
                raise XendbgError(f"the pending hypercall is {hc.display_name}, not set_trap_table: give ADDR")
            address = hc.args[0].value
        table, found = decode_trap_table(target, abi, address)
        if "--json" in flags:
            gdb.write(render_json.dumps(render_json.trap_table_report(table, found)) + "\n")
        else:
            _write(_text().trap_table_report(table, found))


class XenCallbacks(_XenCommand):
    """Show the callbacks a pending set_callbacks or callback_op registers: xen callbacks [--json]"""

    def __init__(self) -> None:
        super().__init__("xen callbacks", gdb.COMMAND_DATA)

    def run(self, arg: str) -> None:
        flags, _ = _options(arg)
        target = GdbTarget()
        hc = decode_pending(target, _current_abi(target))
        if not isinstance(hc.detail, Callbacks):
            raise XendbgError(f"the pending hypercall is {hc.display_name}: no callbacks to show "
                              f"(stop at set_callbacks or callback_op)")
        if "--json" in flags:
            gdb.write(render_json.dumps(render_json.hypercall(hc)) + "\n")
        else:
            _write(_text().Group(_text().callbacks(hc.detail), _text().findings(hc.findings)))


class XenVcpus(_XenCommand):
    """List the vCPUs (gdb threads) with their mode and pending hypercall: xen vcpus"""

    def __init__(self) -> None:
        super().__init__("xen vcpus", gdb.COMMAND_DATA)

    def run(self, arg: str) -> None:
        inferior = gdb.selected_inferior()
        selected = gdb.selected_thread()
        rows = []
        try:
            for thread in sorted(inferior.threads(), key=lambda t: t.num):
                thread.switch()
                target = GdbTarget()
                mode = arch.cpu_mode(target.read_register("cs") & 0xFFFF)
                pending = ""
                if mode.width is not None:
                    try:
                        pending = decode_pending(target, _current_abi(target)).display_name
                    except XendbgError:
                        pending = ""
                rows.append((str(thread.num - 1), str(thread.num), mode.description, pending))
        finally:
            if selected is not None:
                selected.switch()
        listing = _text().table("vCPU", "thread", "mode", "pending hypercall")
        for row in rows:
            listing.add_row(*row)
        _write(listing)


class XenParameter(gdb.Parameter):
    """One `set xen NAME` setting, mirrored into SETTINGS when the user sets it."""

    def __init__(self, name: str, what: str, kind: int, choices: list[str] | None, default: object) -> None:
        self.__doc__ = f"{what[0].upper()}{what[1:]}."
        self.set_doc = f"Set {what}."
        self.show_doc = f"Show {what}."
        self._attribute = name
        self._what = what
        extra = (choices,) if choices is not None else ()
        super().__init__(f"xen {name}", gdb.COMMAND_DATA, kind, *extra)
        self.value = default

    def get_set_string(self) -> str:
        setattr(SETTINGS, self._attribute, self.value)
        return ""

    def get_show_string(self, svalue: str) -> str:
        return f"{self._what}: {svalue}"


def register() -> None:
    gdb.Command("set xen", gdb.COMMAND_DATA, prefix=True)
    gdb.Command("show xen", gdb.COMMAND_DATA, prefix=True)
    XenPrefix()
    XenHypercall()
    XenHypercall("xen hc")
    XenMulticall()
    XenTraps()
    XenCallbacks()
    XenVcpus()
    XenParameter("abi", f"the Xen ABI generation xendbg decodes with (auto: {NEWEST}, the newest)",
                 gdb.PARAM_ENUM, ABI_CHOICES, "auto")
    XenParameter("width", "the guest width xendbg assumes (auto: from the code selector)",
                 gdb.PARAM_ENUM, ["auto", "32", "64"], "auto")
    XenParameter("color", "whether xendbg colours its output (never when gdb's style is off)",
                 gdb.PARAM_BOOLEAN, None, True)

"""The `xen` commands and `set xen ...` parameters.  Only xendbg/gdb/ imports gdb."""

from __future__ import annotations

import importlib
import shlex
import sys
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING

import gdb  # type: ignore[import-not-found]

from xendbg import arch
from xendbg.abi import GENERATIONS, NEWEST, Abi, get_abi
from xendbg.errors import XendbgError
from xendbg.gdb.target import GdbTarget

if TYPE_CHECKING:
    from xendbg.decode import Finding, GuestState, Hypercall, TrapTable


class _Lazy(ModuleType):
    """A module imported on first use: loading xendbg into gdb registers the commands without
    importing the decoders, renderers and the monitor (startup stays fast; see bench/)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._module: ModuleType | None = None

    def __getattr__(self, attribute: str) -> object:
        if self._module is None:
            self._module = importlib.import_module(self.__name__)
        return getattr(self._module, attribute)


decode = _Lazy("xendbg.decode")
state_replay = _Lazy("xendbg.decode.state")
context = _Lazy("xendbg.gdb.context")
monitor = _Lazy("xendbg.gdb.monitor")
render_json = _Lazy("xendbg.render.json")

ABI_CHOICES = ["auto", *GENERATIONS]
CALLBACK_KINDS = ("event", "failsafe", "syscall", "nmi")


def _options(arg: str, known: tuple[str, ...] = ("--json",), valued: tuple[str, ...] = ()
             ) -> tuple[dict[str, str], list[str]]:
    """--flags (and `--name VALUE` options) and the remaining words."""
    try:
        words = shlex.split(arg)
    except ValueError as exc:
        raise XendbgError(f"cannot parse the arguments: {exc}") from None
    flags: dict[str, str] = {}
    rest: list[str] = []
    it = iter(words)
    for word in it:
        if not word.startswith("--"):
            rest.append(word)
        elif word in valued:
            value = next(it, None)
            if value is None:
                raise XendbgError(f"{word} needs a value")
            flags[word] = value
        elif word in known:
            flags[word] = ""
        else:
            raise XendbgError(f"unknown option {word} (known: {', '.join(known + valued)})")
    return flags, rest


def _number(text: str) -> int:
    try:
        return int(gdb.parse_and_eval(text))
    except gdb.error as exc:
        raise XendbgError(f"not a number or expression: {text!r}: {exc}") from None


def _hypercall_names() -> list[str]:
    names = {h.name for width in (32, 64) for h in get_abi(NEWEST, width).hypercalls()}
    names |= {h.name for h in get_abi("2.0", 32).hypercalls()}
    return sorted(names)


def _hypercall_name(word: str, abi: Abi) -> str:
    """A hypercall given by name (current or former) or number, as its name in `abi`."""
    try:
        found = abi.hypercall(int(word, 0))
    except ValueError:
        found = abi.hypercall_named(word)
    if found is None:
        raise XendbgError(f"Xen {abi.generation} ({abi.width}-bit) has no hypercall {word!r} "
                          f"(`xendbg abi --xen {abi.generation} --width {abi.width}` lists them)")
    return found.name


def _complete_words(candidates: list[str], word: str) -> list[str]:
    return [c for c in candidates if c.startswith(word)]


class _XenCommand(gdb.Command):
    """Base: one-line gdb errors instead of tracebacks, and completion from `completions`."""

    completions: tuple[str, ...] | Callable[[], list[str]] = ()

    def invoke(self, arg: str, from_tty: bool) -> None:
        try:
            self.run(arg)
        except XendbgError as exc:
            raise gdb.GdbError(str(exc)) from None
        except gdb.GdbError:
            raise
        except gdb.error as exc:
            raise gdb.GdbError(f"xendbg: {exc}") from None

    def run(self, arg: str) -> None:
        raise NotImplementedError

    def complete(self, text: str, word: str | None) -> list[str] | int:
        candidates = self.completions() if callable(self.completions) else list(self.completions)
        if not candidates:
            return gdb.COMPLETE_NONE
        return _complete_words(candidates, word or "")


def _registered(cpu: int) -> GuestState:
    return monitor.MONITOR.state(cpu)


def _pending_here(target: GdbTarget) -> Hypercall:
    """The pending hypercall, replayed into the registered state as Xen will apply it."""
    cpu = context.cpu_index()
    hc = context.decode_here(target, state=_registered(cpu))
    state_replay.apply(_registered(cpu), get_abi(hc.generation, hc.width), hc)
    return hc


def _try_pending(target: GdbTarget) -> Hypercall | None:
    try:
        return context.decode_here(target, state=_registered(context.cpu_index()))
    except XendbgError:
        return None


class XenPrefix(gdb.Command):
    """Xen PV guest debugging: decode hypercalls, multicalls, trap tables and callbacks.

Decoding:  xen hypercall (xen hc), xen multicall, xen traps, xen callbacks, xen check, xen vcpus
Stopping:  xen catch hypercall [NAME|NR ...], xen break callback|trap|fasttrap
Tracing:   xen trace start|stop|show, xen stats
Settings:  set xen abi auto|2.0|3.0|..., set xen width auto|32|64, set xen color on|off
Every decoding command takes --json (the schema is in docs/json-schema.md)."""

    def __init__(self) -> None:
        super().__init__("xen", gdb.COMMAND_DATA, gdb.COMPLETE_COMMAND, prefix=True)


class XenHypercall(_XenCommand):
    """Decode the hypercall the selected vCPU is about to make: xen hypercall [--json]

Works when stopped at the hypercall instruction (int $0x82, syscall, vmcall), in a stub leading
to it (a hypercall-page stub, Linux's xen_hypercall_pv), and, with Xen's symbols loaded
(xen-syms), inside Xen at the first instruction of a handler (do_multicall, compat_vcpu_op, ...)
or of pv_hypercall."""

    completions = ("--json",)

    def __init__(self, name: str = "xen hypercall") -> None:
        super().__init__(name, gdb.COMMAND_DATA)

    def run(self, arg: str) -> None:
        flags, _ = _options(arg)
        hc = _pending_here(GdbTarget())
        if "--json" in flags:
            context.write_json(render_json.hypercall(hc))
        else:
            context.write(context.text().hypercall(hc))


class XenMulticall(_XenCommand):
    """Show a multicall batch: xen multicall [ADDR COUNT] [--results] [--json]

Without ADDR COUNT: the batch of the pending multicall.  --results: the batch has run, show the
results Xen wrote."""

    completions = ("--results", "--json")

    def __init__(self) -> None:
        super().__init__("xen multicall", gdb.COMMAND_DATA)

    def run(self, arg: str) -> None:
        flags, words = _options(arg, ("--json", "--results"))
        target = GdbTarget()
        if words:
            if len(words) != 2:
                raise XendbgError("usage: xen multicall [ADDR COUNT] [--results] [--json]")
            abi = context.current_abi(target)
            address, count = _number(words[0]), _number(words[1])
        else:
            hc = _pending_here(target)
            if hc.name != "multicall":
                raise XendbgError(f"the pending hypercall is {hc.display_name}, not multicall: give ADDR COUNT")
            abi = get_abi(hc.generation, hc.width)
            address, count = hc.args[0].value, hc.args[1].value
        batch, found = decode.decode_multicall(target, abi, address, count, results="--results" in flags,
                                        state=_registered(context.cpu_index()))
        if "--json" in flags:
            context.write_json(render_json.multicall_report(batch, found))
        else:
            context.write(context.text().multicall_report(batch, found))


def _registered_table(state: GuestState, abi: Abi) -> tuple[TrapTable, tuple[Finding, ...]]:
    """The virtual IDT as the guest's registrations left it (entries merged by vector)."""
    entries = tuple(sorted(state.trap_table.values(), key=lambda e: e.vector))
    last = state.table.address if state.table else 0
    table = decode.TrapTable(last, entries, True, note=f"registered: {len(entries)} vectors, merged from every "
                      f"set_trap_table xendbg saw (the last one's array at {last:#x})")
    found = [f for f in state_replay.check_state(state, abi)
             if "trap table" in f.message or f.rule == "no-page-fault-handler"]
    return table, tuple(found)


class XenTraps(_XenCommand):
    """Show a trap table (trap_info array): xen traps [ADDR] [--registered] [--json]

Without ADDR: the table of the pending set_trap_table, else (or with --registered) the virtual IDT
the guest has registered, as far as xendbg has seen."""

    completions = ("--registered", "--json")

    def __init__(self) -> None:
        super().__init__("xen traps", gdb.COMMAND_DATA)

    def run(self, arg: str) -> None:
        flags, words = _options(arg, ("--json", "--registered"))
        target = GdbTarget()
        if words:
            table, found = decode.decode_trap_table(target, context.current_abi(target), _number(" ".join(words)))
        else:
            hc = None if "--registered" in flags else _try_pending(target)
            if hc is not None and hc.name == "set_trap_table" and hc.args[0].value:
                table, found = decode.decode_trap_table(target, get_abi(hc.generation, hc.width), hc.args[0].value)
            else:
                state = _registered(context.cpu_index())
                if not state.trap_table:
                    pending = f"the pending hypercall is {hc.display_name}; " if hc else ""
                    raise XendbgError(f"{pending}xendbg has seen no trap table registered on this vCPU yet: "
                                      f"give ADDR, or let it watch (xen catch hypercall set_trap_table)")
                table, found = _registered_table(state, _state_abi(target))
        if "--json" in flags:
            context.write_json(render_json.trap_table_report(table, found))
        else:
            context.write(context.text().trap_table_report(table, found))


def _state_abi(target: GdbTarget) -> Abi:
    """The ABI to judge registered state with: the guest's width if it is in the guest, else 64."""
    width = context.guest_width(target)
    return context.abi_for_width(width or 64)


class XenCallbacks(_XenCommand):
    """Show the guest's callbacks and fast trap: xen callbacks [--registered] [--json]

At a pending set_callbacks or callback_op: what it registers.  Elsewhere (or with --registered):
what the guest has registered (event, failsafe, syscall, NMI callbacks with selectors and the RPL
verdict, and the fast trap), as far as xendbg has seen."""

    completions = ("--registered", "--json")

    def __init__(self) -> None:
        super().__init__("xen callbacks", gdb.COMMAND_DATA)

    def run(self, arg: str) -> None:
        flags, _ = _options(arg, ("--json", "--registered"))
        target = GdbTarget()
        hc = None if "--registered" in flags else _try_pending(target)
        text = context.text()
        if hc is not None and isinstance(hc.detail, decode.Callbacks):
            if "--json" in flags:
                context.write_json(render_json.hypercall(hc))
            else:
                context.write(text.Group(text.callbacks(hc.detail), text.findings(hc.findings)))
            return
        state = _registered(context.cpu_index())
        if not state.callbacks and state.fast_trap is None:
            pending = f"the pending hypercall is {hc.display_name}; " if hc else ""
            raise XendbgError(f"{pending}xendbg has seen no callback registration on this vCPU yet (it sees the "
                              f"hypercalls made while xen catch, xen trace or xen break is active)")
        registered = decode.Callbacks("registered", tuple(state.callbacks.values()))
        found = [f for f in state_replay.check_state(state, _state_abi(target)) if "callback" in f.message]
        fast = state.fast_trap
        if "--json" in flags:
            context.write_json({"schema": render_json.SCHEMA_VERSION, "callbacks": render_json.detail(registered),
                        "fast_trap": render_json.detail(fast), "findings": [render_json.finding(f) for f in found]})
            return
        parts = [text.callbacks(registered)]
        if fast is not None:
            parts.append(text.detail(fast))
        context.write(text.Group(*parts, text.findings(found)))


class XenCheck(_XenCommand):
    """Run Xen's own rules over the pending hypercall and what the guest registered: xen check [--json]

Findings by severity: error (Xen refuses it, or the guest will misbehave), warning (accepted but
suspicious), info (Xen silently fixes it up)."""

    completions = ("--json",)

    def __init__(self) -> None:
        super().__init__("xen check", gdb.COMMAND_DATA)

    def run(self, arg: str) -> None:
        flags, _ = _options(arg)
        target = GdbTarget()
        hc = _try_pending(target)
        found = list(hc.all_findings()) if hc else []
        found += state_replay.check_state(_registered(context.cpu_index()), _state_abi(target))
        found.sort(key=lambda f: decode.model.SEVERITIES.index(f.severity))
        if "--json" in flags:
            context.write_json({"schema": render_json.SCHEMA_VERSION, "pending": hc.display_name if hc else None,
                        "findings": [render_json.finding(f) for f in found]})
            return
        text = context.text()
        head = f"pending hypercall: {hc.display_name}" if hc else "no pending hypercall"
        counts = ", ".join(f"{sum(f.severity == s for f in found)} {s}" for s in decode.model.SEVERITIES)
        context.write(text.Group(text.RichText(f"{head}; {counts}"), text.findings(found)))


class XenVcpus(_XenCommand):
    """List the vCPUs (gdb threads) with their mode and pending hypercall: xen vcpus

Under a real Xen, gdb's threads are QEMU's CPUs: the guest's vCPUs run on them, and a CPU "in Xen"
is running the hypervisor."""

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
                pending = _try_pending(target)
                state = monitor.MONITOR.states.get(thread.num - 1)
                seen = f"{len(state.trap_table)} traps, {len(state.callbacks)} callbacks" if state else ""
                rows.append((str(thread.num - 1), str(thread.num), mode.description,
                             pending.display_name if pending else "", seen))
        finally:
            if selected is not None:
                selected.switch()
        listing = context.text().table("vCPU", "thread", "mode", "pending hypercall", "registered (seen)")
        for row in rows:
            listing.add_row(*row)
        context.write(listing)


class XenCatch(gdb.Command):
    """Stop at hypercalls: xen catch hypercall [--guest|--xen] [NAME|NR ...]; xen catch delete; xen catch

Without a subcommand: what is being caught, and where."""

    def __init__(self) -> None:
        super().__init__("xen catch", gdb.COMMAND_BREAKPOINTS, prefix=True)

    def invoke(self, arg: str, from_tty: bool) -> None:
        if arg.strip():
            raise gdb.GdbError(f"unknown xen catch subcommand {arg.split()[0]!r} (hypercall, delete)")
        if monitor.MONITOR.catch is None:
            gdb.write("xendbg catches no hypercalls\n")
            return
        names = ", ".join(sorted(monitor.MONITOR.catch.names)) or "every hypercall"
        gdb.write(f"catching {names}; observing {monitor.MONITOR.plan}\n")


class XenCatchHypercall(_XenCommand):
    """Stop only at these hypercalls (all when none given), decoded: xen catch hypercall [--guest|--xen] [NAME|NR ...]

Guest side, xendbg watches where the loaded guest issues hypercalls (its hypercall page, Linux's
xen_hypercall_pv, an int $0x82).  With Xen's symbols loaded (xen-syms) a named hypercall is caught
at its Xen handler instead (do_multicall, ...), which costs no stop for the other hypercalls.
--guest / --xen force the side.  `xen catch delete` ends it."""

    completions = staticmethod(_hypercall_names)

    def __init__(self) -> None:
        super().__init__("xen catch hypercall", gdb.COMMAND_BREAKPOINTS)

    def run(self, arg: str) -> None:
        flags, words = _options(arg, ("--guest", "--xen"))
        if "--guest" in flags and "--xen" in flags:
            raise XendbgError("--guest and --xen exclude each other")
        side = "guest" if "--guest" in flags else "xen" if "--xen" in flags else "auto"
        names = frozenset(_any_width_name(w) for w in words)
        previous = monitor.MONITOR.catch
        monitor.MONITOR.catch = monitor.Catch(names, side)
        try:
            plan = monitor.MONITOR.replan()
        except XendbgError:
            monitor.MONITOR.catch = previous
            monitor.MONITOR.replan()
            raise
        what = ", ".join(sorted(names)) or "every hypercall"
        gdb.write(f"xendbg: catching {what}, observing {plan}\n")


def _any_width_name(word: str) -> str:
    errors = []
    for width in (64, 32):
        try:
            return _hypercall_name(word, context.abi_for_width(width))
        except XendbgError as exc:
            errors.append(str(exc))
    raise XendbgError(errors[0])


class XenCatchDelete(_XenCommand):
    """Stop catching hypercalls: xen catch delete"""

    def __init__(self) -> None:
        super().__init__("xen catch delete", gdb.COMMAND_BREAKPOINTS)

    def run(self, arg: str) -> None:
        monitor.MONITOR.catch = None
        monitor.MONITOR.replan()
        gdb.write("xendbg: no longer catching hypercalls\n")


class XenBreak(gdb.Command):
    """Break on guest entry points, followed when the guest registers new ones:
  xen break callback [event|failsafe|syscall|nmi|all]
  xen break trap VECTOR          (a number, or a name such as PF, GP, int80)
  xen break fasttrap             (Xen 2.0's set_fast_trap gate)
  xen break delete
On a hit xendbg says which entry point and vCPU, and decodes the frame Xen pushed."""

    def __init__(self) -> None:
        super().__init__("xen break", gdb.COMMAND_BREAKPOINTS, prefix=True)

    def invoke(self, arg: str, from_tty: bool) -> None:
        if arg.strip():
            raise gdb.GdbError(f"unknown xen break subcommand {arg.split()[0]!r} "
                               f"(callback, trap, fasttrap, delete)")
        if not monitor.MONITOR.watches:
            gdb.write("no xen break entry points\n")
        for watch in monitor.MONITOR.watches:
            where = (f"breakpoint {watch.breakpoint.number} at {watch.address:#x}" if watch.breakpoint
                     else "not registered yet")
            gdb.write(f"{watch.describe()}: {where}\n")


class XenBreakCallback(_XenCommand):
    """Break on entry to a guest callback: xen break callback [event|failsafe|syscall|nmi|all]"""

    completions = (*CALLBACK_KINDS, "all")

    def __init__(self) -> None:
        super().__init__("xen break callback", gdb.COMMAND_BREAKPOINTS)

    def run(self, arg: str) -> None:
        _, words = _options(arg, ())
        kinds = words or ["event"]
        if kinds == ["all"]:
            kinds = list(CALLBACK_KINDS)
        for kind in kinds:
            if kind not in CALLBACK_KINDS:
                raise XendbgError(f"unknown callback {kind!r} (event, failsafe, syscall, nmi, all)")
        for kind in kinds:
            gdb.write(monitor.MONITOR.add_watch(monitor.EntryWatch("callback", kind)) + "\n")


_VECTOR_NAMES = {mnemonic.lstrip("#").lower(): vector for vector, (mnemonic, _) in arch.TRAP_VECTORS.items()
                 if mnemonic != "--"}
_VECTOR_NAMES |= {"int80": 0x80, "syscall80": 0x80}


def _vector(word: str) -> int:
    key = word.lower().lstrip("#")
    if key in _VECTOR_NAMES:
        return _VECTOR_NAMES[key]
    vector = _number(word)
    if not 0 <= vector <= 255:
        raise XendbgError(f"vector {vector} is out of range (0-255)")
    return vector


class XenBreakTrap(_XenCommand):
    """Break on entry to the guest's handler for a vector: xen break trap VECTOR

VECTOR is a number (14, 0x80) or a name (PF, GP, UD, BP, int80, ...)."""

    completions = (*sorted(_VECTOR_NAMES),)

    def __init__(self) -> None:
        super().__init__("xen break trap", gdb.COMMAND_BREAKPOINTS)

    def run(self, arg: str) -> None:
        _, words = _options(arg, ())
        if len(words) != 1:
            raise XendbgError("usage: xen break trap VECTOR")
        vector = _vector(words[0])
        gdb.write(monitor.MONITOR.add_watch(monitor.EntryWatch("trap", f"{vector:#x}", vector)) + "\n")


class XenBreakFasttrap(_XenCommand):
    """Break on entry to the fast trap (Xen 2.0's set_fast_trap): xen break fasttrap"""

    def __init__(self) -> None:
        super().__init__("xen break fasttrap", gdb.COMMAND_BREAKPOINTS)

    def run(self, arg: str) -> None:
        if context.generation() != "2.0":
            raise XendbgError(f"set_fast_trap exists only in Xen 2.0 (decoding as {context.generation()}: "
                              f"set xen abi 2.0); from 3.0 int $0x80 gets a direct gate through the trap "
                              f"table: use xen break trap 0x80")
        gdb.write(monitor.MONITOR.add_watch(monitor.EntryWatch("fasttrap", "", 0x80)) + "\n")


class XenBreakDelete(_XenCommand):
    """Delete every xen break entry-point breakpoint: xen break delete"""

    def __init__(self) -> None:
        super().__init__("xen break delete", gdb.COMMAND_BREAKPOINTS)

    def run(self, arg: str) -> None:
        gdb.write(f"xendbg: deleted {monitor.MONITOR.remove_watches()} entry-point breakpoints\n")


class XenTrace(gdb.Command):
    """Log hypercalls strace-style: xen trace start [--file F.jsonl] [NAME ...]; xen trace stop; xen trace show"""

    def __init__(self) -> None:
        super().__init__("xen trace", gdb.COMMAND_RUNNING, prefix=True)


class XenTraceStart(_XenCommand):
    """Trace every hypercall (or those named): xen trace start [--file F.jsonl] [NAME|NR ...]

Each call is logged with its decoded arguments and, when it comes back, its result (errno name).
With --file every record is appended to F as one JSON line and flushed at once: if the target dies,
the file holds every record up to its last hypercall.  The guest does not stop; `xen trace show`
lists the records, `xen stats` counts them."""

    completions = staticmethod(_hypercall_names)

    def __init__(self) -> None:
        super().__init__("xen trace start", gdb.COMMAND_RUNNING)

    def run(self, arg: str) -> None:
        from xendbg.trace import Stats, TraceLog

        flags, words = _options(arg, (), ("--file",))
        if monitor.MONITOR.trace is not None:
            raise XendbgError("a trace is already running: xen trace stop first")
        names = tuple(sorted({_any_width_name(w) for w in words}))
        monitor.MONITOR.trace = TraceLog(flags.get("--file"), names)
        monitor.MONITOR.stats = Stats()
        try:
            plan = monitor.MONITOR.replan()
        except XendbgError:
            monitor.MONITOR.trace.close()
            monitor.MONITOR.trace = None
            monitor.MONITOR.replan()
            raise
        target = f" to {flags['--file']}" if "--file" in flags else ""
        gdb.write(f"xendbg: tracing {', '.join(names) or 'every hypercall'}{target}, observing {plan}\n")


class XenTraceStop(_XenCommand):
    """Stop tracing: xen trace stop"""

    def __init__(self) -> None:
        super().__init__("xen trace stop", gdb.COMMAND_RUNNING)

    def run(self, arg: str) -> None:
        trace = monitor.MONITOR.trace
        if trace is None:
            raise XendbgError("no trace is running (xen trace start)")
        trace.close()
        monitor.MONITOR.trace = None
        monitor.MONITOR.finished_trace = trace
        try:
            monitor.MONITOR.replan()
        except XendbgError:
            pass  # the target may be gone: the trace is closed either way
        where = f"; {trace.written} records in {trace.path}" if trace.path else ""
        gdb.write(f"xendbg: trace stopped after {trace.seq} records{where}\n")


class XenTraceShow(_XenCommand):
    """Show the last traced hypercalls: xen trace show [N] [--json]  (default 20)"""

    completions = ("--json",)

    def __init__(self) -> None:
        super().__init__("xen trace show", gdb.COMMAND_RUNNING)

    def run(self, arg: str) -> None:
        from xendbg.trace import show_lines

        flags, words = _options(arg)
        trace = monitor.MONITOR.trace or monitor.MONITOR.finished_trace
        if trace is None:
            raise XendbgError("nothing traced yet (xen trace start)")
        count = _number(words[0]) if words else 20
        records = [r for r in trace.recent if r["event"] not in ("start", "stop")]
        if "--json" in flags:
            context.write_json(records[-count:])
            return
        lines = show_lines(records)
        gdb.write("\n".join(lines[-count:]) + ("\n" if lines else "(no hypercalls traced yet)\n"))


class XenStats(_XenCommand):
    """Count traced hypercalls, failures and sub-operations, like strace -c: xen stats [--json] [--reset]"""

    completions = ("--json", "--reset")

    def __init__(self) -> None:
        super().__init__("xen stats", gdb.COMMAND_STATUS)

    def run(self, arg: str) -> None:
        from xendbg.trace import Stats

        flags, _ = _options(arg, ("--json", "--reset"))
        rows = monitor.MONITOR.stats.rows()
        if "--reset" in flags:
            monitor.MONITOR.stats = Stats()
        if "--json" in flags:
            context.write_json({"schema": render_json.SCHEMA_VERSION, "hypercalls": rows})
            return
        if not rows:
            gdb.write("no hypercalls counted yet (xen trace start counts them)\n")
            return
        listing = context.text().table("calls", "errors", "hypercall", "in multicalls", "errnos", "sub-operations")
        for r in rows:
            subops = ", ".join(f"{k} {v}" for k, v in sorted(r["subops"].items(), key=lambda kv: -kv[1]))
            errnos = ", ".join(f"{k} {v}" for k, v in r["errnos"].items())
            listing.add_row(str(r["calls"]), str(r["errors"]), r["name"], str(r["in_multicalls"] or ""), errnos,
                            subops)
        context.write(listing)


class XenParameter(gdb.Parameter):
    """One `set xen NAME` setting, mirrored into context.SETTINGS when the user sets it."""

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
        setattr(context.SETTINGS, self._attribute, self.value)
        return ""

    def get_show_string(self, svalue: str) -> str:
        if self._attribute == "abi" and svalue == "auto":
            return f"{self._what}: auto (now {context.generation()})"
        return f"{self._what}: {svalue}"


def _on_stop(event: object) -> None:
    """Forward gdb's stops to the monitor, once something has loaded it (catch, trace, break, ...)."""
    loaded = sys.modules.get("xendbg.gdb.monitor")
    if loaded is not None:
        loaded.on_stop(event)


def register() -> None:
    gdb.Command("set xen", gdb.COMMAND_DATA, prefix=True)
    gdb.Command("show xen", gdb.COMMAND_DATA, prefix=True)
    XenPrefix()
    XenHypercall()
    XenHypercall("xen hc")
    XenMulticall()
    XenTraps()
    XenCallbacks()
    XenCheck()
    XenVcpus()
    XenCatch()
    XenCatchHypercall()
    XenCatchDelete()
    XenBreak()
    XenBreakCallback()
    XenBreakTrap()
    XenBreakFasttrap()
    XenBreakDelete()
    XenTrace()
    XenTraceStart()
    XenTraceStop()
    XenTraceShow()
    XenStats()
    XenParameter("abi", "the Xen ABI generation xendbg decodes with (auto: the version the guest was told, "
                 f"else {NEWEST}, the newest)", gdb.PARAM_ENUM, ABI_CHOICES, "auto")
    XenParameter("width", "the guest width xendbg assumes (auto: from the code selector)",
                 gdb.PARAM_ENUM, ["auto", "32", "64"], "auto")
    XenParameter("color", "whether xendbg colours its output (never when gdb's style is off)",
                 gdb.PARAM_BOOLEAN, None, True)
    gdb.events.stop.connect(_on_stop)

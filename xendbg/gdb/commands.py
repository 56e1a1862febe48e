"""The `xen` commands and `set xen ...` parameters.  Only xendbg/gdb/ imports gdb.

Loading registers the commands without importing the decoders, renderers, tables or the monitor: each
is imported on first use (start-up stays fast; see bench/run.py startup).  Every command takes exactly
the words and options its usage line gives, and says so in one line otherwise.
"""

from __future__ import annotations

import importlib
import shlex
import sys
from types import ModuleType

import gdb

from xendbg import names
from xendbg.errors import XendbgError
from xendbg.gdb.target import GdbTarget
from xendbg.names import GENERATIONS, NEWEST

TYPE_CHECKING = False  # not typing's: importing typing alone costs milliseconds at gdb start-up
if TYPE_CHECKING:
    from xendbg.abi import Abi
    from xendbg.decode import GuestState, Hypercall
    from xendbg.decode.model import AbiUsed


class _Lazy(ModuleType):
    """A module imported on first use."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._module: ModuleType | None = None

    def __getattr__(self, attribute: str) -> object:
        if self._module is None:
            self._module = importlib.import_module(self.__name__)
        return getattr(self._module, attribute)


if TYPE_CHECKING:  # the type checker sees the modules; gdb gets them on first use
    from xendbg import arch, decode, observe, report
    from xendbg.gdb import context, monitor
    from xendbg.render import json as render_json
else:
    decode = _Lazy("xendbg.decode")
    report = _Lazy("xendbg.report")
    context = _Lazy("xendbg.gdb.context")
    monitor = _Lazy("xendbg.gdb.monitor")
    observe = _Lazy("xendbg.observe")
    render_json = _Lazy("xendbg.render.json")
    arch = _Lazy("xendbg.arch")

ABI_CHOICES = ["auto", *GENERATIONS]
CALLBACK_KINDS = ("event", "failsafe", "syscall", "nmi")
MAX_COUNT = (1 << 32) - 1  # nr_calls is 32 bits wide


def _number(text: str) -> int:
    """A gdb expression's value; a symbol without debug info (`xen_int82`) gives its address."""
    try:
        return int(gdb.parse_and_eval(text))
    except gdb.error as exc:
        try:
            return int(gdb.parse_and_eval(f"(unsigned long)&'{text}'"))
        except gdb.error:
            raise XendbgError(f"not a number, expression or symbol: {text!r}: {exc}") from None


def _address(text: str, width: int) -> int:
    """An address: unsigned, reduced to the guest's width (gdb's `$rdi` may come out negative)."""
    return _number(text) & ((1 << width) - 1)


def _count(text: str, what: str = "COUNT") -> int:
    value = _number(text)
    if not 0 <= value <= MAX_COUNT:
        raise XendbgError(f"{what} {value} is out of range (0 to {MAX_COUNT})")
    return value


def _token(text: str) -> str:
    """The word being completed (gdb's own `word` stops at '-')."""
    return "" if not text or text[-1].isspace() else text.split()[-1]


COMMANDS: dict[str, _XenCommand] = {}  # the registered commands by name ("multicall", "trace show"), for run_json


class _XenCommand(gdb.Command):
    """Base: argument checking, one-line gdb errors instead of tracebacks, and completion."""

    def __init__(self, name: str, command_class: int, *args: object, **kwargs: object) -> None:
        super().__init__(name, command_class, *args, **kwargs)
        COMMANDS[name.removeprefix("xen ")] = self

    usage = ""
    flags: tuple[str, ...] = ()  # options without a value
    valued: tuple[str, ...] = ()  # options with a value
    nargs = (0, 0)  # how many words besides the options

    def invoke(self, arg: str, from_tty: bool) -> None:
        try:
            flags, words = self._parse(arg)
            self.run(flags, words)
        except XendbgError as exc:
            raise gdb.GdbError(str(exc)) from None
        except gdb.GdbError:
            raise
        except gdb.error as exc:
            raise gdb.GdbError(f"xendbg: {exc}") from None

    def _parse(self, arg: str) -> tuple[dict[str, str], list[str]]:
        try:
            words = shlex.split(arg)
        except ValueError as exc:
            raise XendbgError(f"cannot parse the arguments: {exc} (usage: {self.usage})") from None
        flags: dict[str, str] = {}
        rest: list[str] = []
        it = iter(words)
        for word in it:
            if not word.startswith("--"):
                rest.append(word)
            elif word in self.valued:
                value = next(it, None)
                if value is None:
                    raise XendbgError(f"{word} needs a value (usage: {self.usage})")
                flags[word] = value
            elif word in self.flags:
                flags[word] = ""
            else:
                raise XendbgError(f"unknown option {word} (usage: {self.usage})")
        low, high = self.nargs
        if not low <= len(rest) <= high:
            extra = f"unexpected {' '.join(rest[high:])!r}" if len(rest) > high else "missing arguments"
            raise XendbgError(f"{extra} (usage: {self.usage})")
        return flags, rest

    def run(self, flags: dict[str, str], words: list[str]) -> None:
        raise NotImplementedError

    def words(self) -> list[str]:
        """What completes where a word (not an option) is typed."""
        return []

    def complete(self, text: str, word: str | None) -> list[str] | int:
        token = _token(text)
        candidates = list(self.flags + self.valued) if token.startswith("-") else self.words()
        matches = names.complete(candidates, token)
        if not matches:
            return gdb.COMPLETE_NONE
        cut = len(token) - len(word or "")
        return [m[cut:] for m in matches]


def _registered(cpu: int) -> GuestState:
    return context.SESSION.state(cpu)


def _pending(target: GdbTarget) -> Hypercall:
    """The pending hypercall: decoding only reads; what it registers counts once Xen has run it."""
    return context.decode_here(target)


def _try_pending(target: GdbTarget) -> Hypercall | None:
    try:
        return _pending(target)
    except XendbgError:
        return None


def _state_abi(target: GdbTarget, state: GuestState) -> tuple[Abi, AbiUsed]:
    """The ABI to judge registered state with: the width of the calls that registered it, else the
    vCPU's, else 64."""
    if context.guest_width(target) is not None:
        abi, why = context.current_abi(target)  # the vCPU's code selector is evidence too
        if state.width in (None, abi.width):
            return abi, context.used(abi, why)
    abi, why = context.abi_for(state.width or 64)
    return abi, context.used(abi, why)


def _hypercall_words() -> list[str]:
    """Hypercall names to complete: those of every generation the evidence allows."""
    return names.hypercall_names(context.choice().candidates)


def _resolve(word: str) -> str:
    choice = context.choice()
    return names.resolve_hypercall(word, choice.candidates, choice.reason)


class XenPrefix(gdb.Command):
    """Xen PV guest debugging: decode hypercalls, multicalls, trap tables and callbacks.

Decoding:  xen hypercall (xen hc), xen multicall, xen traps, xen callbacks, xen check, xen vcpus
Stopping:  xen catch hypercall [NAME|NR ...], xen tcatch hypercall, xen break callback|trap|fasttrap
           (each a numbered gdb breakpoint: info breakpoints, delete N, disable N, condition N, ...)
Tracing:   xen trace start|stop|show|enable, xen stats (start --buffers: Xen's own trace buffers)
Dumps:     xen dump FILE [-z] (then: xendbg core FILE)
Settings:  set xen abi auto|2.0|3.0|..., set xen width auto|32|64, set xen color on|off
Every decoding command takes --json (the schema is in docs/json-schema.md)."""

    def __init__(self) -> None:
        super().__init__("xen", gdb.COMMAND_DATA, gdb.COMPLETE_COMMAND, prefix=True)

    def invoke(self, arg: str, from_tty: bool) -> None:
        if arg.strip():
            raise gdb.GdbError(f"unknown xen command {arg.split()[0]!r}: 'help xen' lists them")
        gdb.write(f"{self.__doc__}\n")


class XenHypercall(_XenCommand):
    """Decode the hypercall the selected vCPU is about to make: xen hypercall [--json]

Works when stopped at the hypercall instruction (int $0x82, syscall, vmcall), in a stub leading
to it (a hypercall-page stub, Linux's xen_hypercall_pv), and, with Xen's symbols loaded
(xen-syms), inside Xen at the first instruction of a handler (do_multicall, compat_vcpu_op, ...)
or of pv_hypercall.  The header says which Xen ABI decoded it and why (set xen abi)."""

    usage = "xen hypercall [--json]"
    flags = ("--json",)

    def __init__(self, name: str = "xen hypercall") -> None:
        super().__init__(name, gdb.COMMAND_DATA)

    def run(self, flags: dict[str, str], words: list[str]) -> None:
        hc = _pending(GdbTarget())
        if "--json" in flags:
            context.write_json(render_json.hypercall(hc))
        else:
            context.write(context.text().hypercall(hc))


class XenMulticall(_XenCommand):
    """Show a multicall batch: xen multicall [ADDR COUNT] [--results] [--json]

Without ADDR COUNT: the batch of the pending multicall.  ADDR is any gdb expression or symbol;
COUNT is at most 2^32-1 (nr_calls), and xendbg decodes the first 256 entries.  --results: the batch
has run, show the results Xen wrote."""

    usage = "xen multicall [ADDR COUNT] [--results] [--json]"
    flags = ("--results", "--json")
    nargs = (0, 2)

    def __init__(self) -> None:
        super().__init__("xen multicall", gdb.COMMAND_DATA)

    def run(self, flags: dict[str, str], words: list[str]) -> None:
        target = GdbTarget()
        if len(words) == 1:
            raise XendbgError(f"give both ADDR and COUNT (usage: {self.usage})")
        if words:
            abi, why = context.current_abi(target)
            address, count = _address(words[0], abi.width), _count(words[1])
        stack = None
        if not words:
            hc = _pending(target)
            if hc.name != "multicall":
                raise XendbgError(f"the pending hypercall is {hc.display_name}, not multicall: give ADDR COUNT")
            abi, why = context.abi_of(hc)
            address, count, stack = hc.args[0].value, hc.args[1].value, hc.stack
        batch, found = decode.decode_multicall(target, abi, address, count, results="--results" in flags,
                                               state=_registered(context.cpu_index()), stack=stack)
        used = context.used(abi, why)
        extra = why.findings()
        if "--json" in flags:
            context.write_json(render_json.multicall_report(batch, found + extra, used))
        else:
            context.write(context.text().multicall_report(batch, found + extra, used))


class XenTraps(_XenCommand):
    """Show a trap table (trap_info array): xen traps [ADDR] [--registered] [--json]

Without ADDR: the table of the pending set_trap_table, else (or with --registered) the virtual IDT
the guest has registered, as far as xendbg has seen."""

    usage = "xen traps [ADDR] [--registered] [--json]"
    flags = ("--registered", "--json")
    nargs = (0, 1)

    def __init__(self) -> None:
        super().__init__("xen traps", gdb.COMMAND_DATA)

    def run(self, flags: dict[str, str], words: list[str]) -> None:
        target = GdbTarget()
        if words and "--registered" in flags:
            raise XendbgError("give ADDR or --registered, not both")
        if words:
            abi, why = context.current_abi(target)
            table, found = decode.decode_trap_table(target, abi, _address(words[0], abi.width))
            used = context.used(abi, why)
            found += why.findings()
        else:
            hc = None if "--registered" in flags else _try_pending(target)
            if hc is not None and hc.name == "set_trap_table" and hc.args[0].value:
                abi, why = context.abi_of(hc)
                table, found = decode.decode_trap_table(target, abi, hc.args[0].value)
                used = context.used(abi, why)
                found += why.findings()
            else:
                state = _registered(context.cpu_index())
                if not state.trap_table and state.table is None:  # a NULL table that cleared it shows empty
                    pending = f"the pending hypercall is {hc.display_name}; " if hc else ""
                    raise XendbgError(f"{pending}xendbg has seen no trap table registered on this vCPU yet: "
                                      f"give ADDR, or let it watch (xen catch hypercall set_trap_table)")
                abi, used = _state_abi(target, state)
                table, found = report.registered_trap_table(state, abi)
        if "--json" in flags:
            context.write_json(render_json.trap_table_report(table, found, used))
        else:
            context.write(context.text().trap_table_report(table, found, used))


class XenCallbacks(_XenCommand):
    """Show the guest's callbacks and fast trap: xen callbacks [--registered] [--json]

At a pending set_callbacks or callback_op: what it registers.  Elsewhere (or with --registered):
what the guest has registered (event, failsafe, syscall, NMI callbacks with selectors and the RPL
verdict, and the fast trap), as far as xendbg has seen."""

    usage = "xen callbacks [--registered] [--json]"
    flags = ("--registered", "--json")

    def __init__(self) -> None:
        super().__init__("xen callbacks", gdb.COMMAND_DATA)

    def run(self, flags: dict[str, str], words: list[str]) -> None:
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
        abi, used = _state_abi(target, state)
        registered, fast, found = report.registered_callbacks(state, abi)
        if "--json" in flags:
            context.write_json(render_json.callbacks_report(registered, fast, found, used))
        else:
            context.write(text.callbacks_report(registered, fast, found, used))


class XenCheck(_XenCommand):
    """Run Xen's own rules over the pending hypercall and what the guest registered: xen check [--json]

Findings by severity: error (Xen refuses it, or the guest will misbehave), warning (accepted but
suspicious), info (Xen silently fixes it up)."""

    usage = "xen check [--json]"
    flags = ("--json",)

    def __init__(self) -> None:
        super().__init__("xen check", gdb.COMMAND_DATA)

    def run(self, flags: dict[str, str], words: list[str]) -> None:
        target = GdbTarget()
        hc = _try_pending(target)
        state = _registered(context.cpu_index())
        abi, _ = _state_abi(target, state)
        found = report.check(hc, state, abi)
        if "--json" in flags:
            context.write_json(render_json.check_report(hc, found))
        else:
            context.write(context.text().check_report(hc, found))


class XenVcpus(_XenCommand):
    """List the vCPUs (gdb threads) with their mode and pending hypercall: xen vcpus [--json]

Under a real Xen, gdb's threads are QEMU's CPUs: the guest's vCPUs run on them, and a CPU "in Xen"
is running the hypervisor.  The mode comes from CS and, where gdb has them, CR0 and EFER: at reset a CPU
is in real mode, paging off, neither in Xen nor in a guest."""

    usage = "xen vcpus [--json]"
    flags = ("--json",)

    def __init__(self) -> None:
        super().__init__("xen vcpus", gdb.COMMAND_DATA)

    def run(self, flags: dict[str, str], words: list[str]) -> None:
        inferior = gdb.selected_inferior()
        threads = sorted(inferior.threads(), key=lambda t: t.num) if inferior.pid else []
        if not threads:
            from xendbg.gdb.connect import no_vcpu_reason

            raise XendbgError(no_vcpu_reason())
        selected = gdb.selected_thread()
        rows = []
        try:
            for thread in threads:
                thread.switch()
                target = GdbTarget()
                mode = arch.vcpu_mode(target)
                pending = _try_pending(target)
                state = context.SESSION.states.get(thread.num - 1)
                rows.append({"vcpu": thread.num - 1, "thread": thread.num, "mode": mode.description,
                             "width": mode.width, "pc": target.read_register("pc"),
                             "pending": pending.display_name if pending else None,
                             "registered_traps": len(state.trap_table) if state else 0,
                             "registered_callbacks": len(state.callbacks) if state else 0})
        finally:
            if selected is not None and selected.is_valid():
                selected.switch()
        if "--json" in flags:
            context.write_json({"schema": render_json.SCHEMA_VERSION, "vcpus": rows})
            return
        listing = context.text().table("vCPU", "thread", "mode", "pc", "pending hypercall", "registered (seen)")
        for r in rows:
            seen = (f"{r['registered_traps']} traps, {r['registered_callbacks']} callbacks"
                    if r["registered_traps"] or r["registered_callbacks"] else "")
            listing.add_row(str(r["vcpu"]), str(r["thread"]), r["mode"], f"{r['pc']:#x}", r["pending"] or "", seen)
        context.write(listing)


class XenCatch(_XenCommand):
    """Stop at hypercalls: xen catch hypercall [--guest|--xen] [NAME|NR ...]; xen catch delete [NAME ...]

Each catch is a numbered gdb breakpoint: `info breakpoints` lists it with what it catches and where
xendbg observes it, and gdb's delete, disable, enable, condition, ignore and commands act on it.  A
condition is tested where the hypercall stops (guest side: the guest's registers at its hypercall
instruction; Xen side: Xen's, at the handler), and commands run there.  xen tcatch hypercall: a
one-shot catch, deleted at its first stop, as gdb's tcatch.
Without a subcommand: what is being caught, where, and each catch with its hits."""

    usage = "xen catch"

    def __init__(self) -> None:
        super().__init__("xen catch", gdb.COMMAND_BREAKPOINTS, prefix=True)

    def invoke(self, arg: str, from_tty: bool) -> None:
        if arg.strip():
            raise gdb.GdbError(f"unknown xen catch subcommand {arg.split()[0]!r} (hypercall, delete)")
        loaded = sys.modules.get("xendbg.gdb.monitor")
        if loaded is None or not loaded.MONITOR.catches:
            gdb.write("xendbg catches no hypercalls\n")
            return
        loaded.MONITOR.tidy()
        caught = loaded.MONITOR.catch
        gdb.write(f"catching {', '.join(sorted(caught.names)) or 'every hypercall'}; observing "
                  f"{loaded.MONITOR.plan}\n")
        for catch in loaded.MONITOR.catches:
            one_shot = ", once" if catch.temporary else ""
            gdb.write(f"  {catch.describe()}: {catch.point.listing() if catch.point else ''}{one_shot}\n")


class XenTcatch(_XenCommand):
    """Stop at the next of these hypercalls, once: xen tcatch hypercall [--guest|--xen] [NAME|NR ...]"""

    usage = "xen tcatch hypercall [--guest|--xen] [NAME|NR ...]"

    def __init__(self) -> None:
        super().__init__("xen tcatch", gdb.COMMAND_BREAKPOINTS, prefix=True)

    def invoke(self, arg: str, from_tty: bool) -> None:
        raise gdb.GdbError(f"usage: {self.usage}")


class XenCatchHypercall(_XenCommand):
    """Stop at these hypercalls, decoded: xen catch hypercall [--guest|--xen] [NAME|NR ...]

Each command adds a catch, numbered as gdb's breakpoints are (delete N, disable N, condition N,
ignore N, commands N act on it); without names it catches every hypercall.  Guest side, xendbg
watches where the loaded guest issues hypercalls (its hypercall page, Linux's xen_hypercall_pv, an
int $0x82).  With Xen's symbols loaded (xen-syms) a named hypercall is caught at its Xen handler
instead (do_multicall, ...), which costs no stop for the other hypercalls.  --guest / --xen force
the side (the side asked last applies to every catch).  `xen catch delete` or gdb's `delete` ends it."""

    usage = "xen catch hypercall [--guest|--xen] [NAME|NR ...]"
    flags = ("--guest", "--xen")
    nargs = (0, 1000)
    temporary = False

    def __init__(self, name: str = "xen catch hypercall") -> None:
        self.temporary = name.startswith("xen tcatch")
        if self.temporary:  # gdb reads the help text when the command is registered
            self.usage = self.usage.replace("xen catch", "xen tcatch")
            self.__doc__ = (f"Stop at the next of these hypercalls, once: {self.usage}\n\nAs xen catch hypercall, "
                            f"but the catch is deleted at its first stop, as gdb's tcatch.")
        super().__init__(name, gdb.COMMAND_BREAKPOINTS)

    def words(self) -> list[str]:
        return _hypercall_words()

    def run(self, flags: dict[str, str], words: list[str]) -> None:
        if "--guest" in flags and "--xen" in flags:
            raise XendbgError("--guest and --xen exclude each other")
        side = "guest" if "--guest" in flags else "xen" if "--xen" in flags else "auto"
        added = frozenset(_resolve(w) for w in words)
        monitor.MONITOR.tidy()
        catch, plan = monitor.MONITOR.add_catch(added, side, self.temporary)
        caught = monitor.MONITOR.catch
        what = ", ".join(sorted(caught.names)) if caught and caught.names else "every hypercall"
        point = catch.point
        if point is not None:
            gdb.write(f"{point.label} {point.number} ({point.what})\n")
        gdb.write(f"xendbg: catching {what}, observing {plan}\n")


class XenCatchDelete(_XenCommand):
    """Stop catching hypercalls: xen catch delete [NAME|NR ...]

Without names every catch ends; with names, each catch stops catching them (one left with other
names is made anew, with a new number and the same settings).  gdb's delete N ends catch N."""

    usage = "xen catch delete [NAME|NR ...]"
    nargs = (0, 1000)

    def __init__(self) -> None:
        super().__init__("xen catch delete", gdb.COMMAND_BREAKPOINTS)

    def words(self) -> list[str]:
        catch = monitor.MONITOR.catch
        return sorted(catch.names) if catch else []

    def run(self, flags: dict[str, str], words: list[str]) -> None:
        monitor.MONITOR.tidy()
        catch = monitor.MONITOR.catch
        if catch is None:
            raise XendbgError("xendbg catches no hypercalls")
        if not words:
            monitor.MONITOR.delete_catches(None)
            gdb.write("xendbg: no longer catching hypercalls\n")
            return
        removed = frozenset(_resolve(w) for w in words)
        unknown = removed - catch.names
        if unknown:
            caught = ", ".join(sorted(catch.names)) or "every hypercall"
            raise XendbgError(f"not caught: {', '.join(sorted(unknown))} (catching {caught})")
        left = monitor.MONITOR.delete_catches(removed)
        names = monitor.MONITOR.catch.names if monitor.MONITOR.catch else frozenset()
        if not left:
            gdb.write("xendbg: no longer catching hypercalls\n")
            return
        listed = "; ".join(f"{c.describe()} ({c.point.listing() if c.point else ''})" for c in left)
        gdb.write(f"xendbg: catching {', '.join(sorted(names)) or 'every hypercall'}: {listed}\n")


class XenBreak(_XenCommand):
    """Break on guest entry points, followed when the guest registers new ones:
  xen break callback [event|failsafe|syscall|nmi|all]
  xen break trap VECTOR          (a number, or a name such as PF, GP, int80)
  xen break fasttrap             (Xen 2.0's set_fast_trap gate)
  xen break delete
On a hit xendbg says which entry point and vCPU, and decodes the frame Xen pushed.  Each is a numbered
gdb breakpoint (`info breakpoints` says what it watches; delete N, disable N, condition N, ignore N
and commands N act on it), and keeps its number when the guest moves the entry point."""

    usage = "xen break [callback|trap|fasttrap|delete]"

    def __init__(self) -> None:
        super().__init__("xen break", gdb.COMMAND_BREAKPOINTS, prefix=True)

    def invoke(self, arg: str, from_tty: bool) -> None:
        if arg.strip():
            raise gdb.GdbError(f"unknown xen break subcommand {arg.split()[0]!r} "
                               f"(callback, trap, fasttrap, delete)")
        loaded = sys.modules.get("xendbg.gdb.monitor")
        if loaded is None or not loaded.MONITOR.watches:
            gdb.write("no xen break entry points\n")
            return
        loaded.MONITOR.tidy()
        for watch in loaded.MONITOR.watches:
            point = loaded.MONITOR.point_of(watch)
            where = f"at {watch.address:#x}" if watch.address else "not registered yet"
            gdb.write(f"{watch.describe()}: {point.listing() if point else 'breakpoint'} {where}\n")


class XenBreakCallback(_XenCommand):
    """Break on entry to a guest callback: xen break callback [event|failsafe|syscall|nmi|all]"""

    usage = "xen break callback [event|failsafe|syscall|nmi|all]"
    nargs = (0, len(CALLBACK_KINDS))

    def __init__(self) -> None:
        super().__init__("xen break callback", gdb.COMMAND_BREAKPOINTS)

    def words(self) -> list[str]:
        return [*CALLBACK_KINDS, "all"]

    def run(self, flags: dict[str, str], words: list[str]) -> None:
        kinds = words or ["event"]
        if kinds == ["all"]:
            kinds = list(CALLBACK_KINDS)
        for kind in kinds:
            if kind not in CALLBACK_KINDS:
                raise XendbgError(f"unknown callback {kind!r} (event, failsafe, syscall, nmi, all)")
        for kind in kinds:
            gdb.write(monitor.MONITOR.add_watch(observe.EntryWatch("callback", kind)) + "\n")


class XenBreakTrap(_XenCommand):
    """Break on entry to the guest's handler for a vector: xen break trap VECTOR

VECTOR is a number (14, 0x80) or a name (PF, GP, UD, BP, int80, ...)."""

    usage = "xen break trap VECTOR"
    nargs = (1, 1)

    def __init__(self) -> None:
        super().__init__("xen break trap", gdb.COMMAND_BREAKPOINTS)

    def words(self) -> list[str]:
        return sorted(names.VECTOR_NAMES)

    def run(self, flags: dict[str, str], words: list[str]) -> None:
        vector = names.parse_vector(words[0], _number)
        gdb.write(monitor.MONITOR.add_watch(observe.EntryWatch("trap", f"{vector:#x}", vector)) + "\n")


class XenBreakFasttrap(_XenCommand):
    """Break on entry to the fast trap (Xen 2.0's set_fast_trap): xen break fasttrap"""

    usage = "xen break fasttrap"

    def __init__(self) -> None:
        super().__init__("xen break fasttrap", gdb.COMMAND_BREAKPOINTS)

    def run(self, flags: dict[str, str], words: list[str]) -> None:
        choice = context.choice()
        if "2.0" not in choice.candidates:
            raise XendbgError(f"set_fast_trap exists only in Xen 2.0 (decoding as Xen {choice.generation}, "
                              f"{choice.reason}: set xen abi 2.0); from 3.0 int $0x80 gets a direct gate "
                              f"through the trap table: use xen break trap 0x80")
        gdb.write(monitor.MONITOR.add_watch(observe.EntryWatch("fasttrap", "", 0x80)) + "\n")


class XenBreakDelete(_XenCommand):
    """Delete every xen break entry-point breakpoint: xen break delete"""

    usage = "xen break delete"

    def __init__(self) -> None:
        super().__init__("xen break delete", gdb.COMMAND_BREAKPOINTS)

    def run(self, flags: dict[str, str], words: list[str]) -> None:
        gdb.write(f"xendbg: deleted {monitor.MONITOR.remove_watches()} entry-point breakpoints\n")


class XenTrace(gdb.Command):
    """Log hypercalls strace-style:
  xen trace start [--file F.jsonl] [NAME|NR ...]
  xen trace start --buffers [--only hypercalls] [--detail NAMES]   (Xen's own trace buffers)
  xen trace enable [--pages N] [--mask M]
  xen trace stop
  xen trace show [N] [--json]
Without a subcommand: whether a trace is running."""

    def __init__(self) -> None:
        super().__init__("xen trace", gdb.COMMAND_RUNNING, prefix=True)

    def invoke(self, arg: str, from_tty: bool) -> None:
        if arg.strip():
            raise gdb.GdbError(f"unknown xen trace subcommand {arg.split()[0]!r} (start, stop, show, enable)")
        loaded = sys.modules.get("xendbg.gdb.monitor")
        trace = loaded.MONITOR.trace if loaded is not None else None
        buffers = sys.modules.get("xendbg.gdb.xentrace")
        if buffers is not None and buffers.ACTIVE.trace is not None:
            gdb.write(f"tracing from Xen's buffers: {buffers.summary(buffers.ACTIVE.trace)}\n")
            return
        if trace is None:
            gdb.write("no trace is running (xen trace start)\n")
            return
        gdb.write(f"tracing {', '.join(trace.names) or 'every hypercall'}: {trace.summary()}\n")


class XenTraceStart(_XenCommand):
    """Trace every hypercall (or those named): xen trace start [--file F.jsonl] [NAME|NR ...]
  or from Xen's own trace buffers: xen trace start --buffers [--only hypercalls] [--detail NAMES]
                                   [--file F.jsonl] [--xentrace-out F.bin]

Each call is logged with its decoded arguments and, when it comes back, its result (errno name).
With --file every record is appended to F as one JSON line and flushed at once: if the target dies,
the file holds every record up to its last hypercall; if the file cannot be written, the trace
stops with one line and keeps its records in memory.  The guest does not stop; `xen trace show`
lists the records, `xen stats` counts them.

--buffers (xen-syms loaded, Xen booted with tbuf_size=PAGES tevt_mask=0x0020f000 or `xen trace
enable`): every hypercall and multicall subcall Xen records, read at each stop and on a timer that
interrupts the guest briefly (set xen trace-interval, default 0.5 s), with the few arguments Xen
records; --detail NAMES adds probes for full decodes of those calls; --xentrace-out writes the raw
records in xentrace's file format.  Writes to target memory: xendbg advances each buffer's
consumer index (cons) as it reads, and nothing else."""

    usage = "xen trace start [--file F.jsonl] [NAME|NR ...] | --buffers [--only hypercalls] [--detail NAMES] ..."
    flags = ("--buffers",)
    valued = ("--file", "--only", "--detail", "--xentrace-out")
    nargs = (0, 1000)

    def __init__(self) -> None:
        super().__init__("xen trace start", gdb.COMMAND_RUNNING)

    def words(self) -> list[str]:
        return _hypercall_words()

    def run(self, flags: dict[str, str], words: list[str]) -> None:
        from xendbg.trace import Stats, TraceLog

        if "--buffers" in flags:  # Xen's own trace buffers (xendbg/gdb/xentrace.py)
            from xendbg.gdb import xentrace

            gdb.write(f"xendbg: {xentrace.start_command(flags, words, _resolve)}\n")
            return
        if set(flags) & {"--only", "--detail", "--xentrace-out"}:
            raise XendbgError(f"{', '.join(sorted(set(flags) - {'--file'}))} go with --buffers (usage: {self.usage})")
        if monitor.MONITOR.trace is not None:
            raise XendbgError("a trace is already running: xen trace stop first")
        traced = tuple(sorted({_resolve(w) for w in words}))
        monitor.MONITOR.trace = TraceLog(flags.get("--file"), traced)
        monitor.MONITOR.stats = Stats()
        try:
            plan = monitor.MONITOR.replan()
        except XendbgError:
            monitor.MONITOR.trace.close()
            monitor.MONITOR.trace = None
            monitor.MONITOR.replan()
            raise
        target = f" to {flags['--file']}" if "--file" in flags else ""
        gdb.write(f"xendbg: tracing {', '.join(traced) or 'every hypercall'}{target}, observing {plan}\n")


class XenTraceStop(_XenCommand):
    """Stop tracing: xen trace stop"""

    usage = "xen trace stop"

    def __init__(self) -> None:
        super().__init__("xen trace stop", gdb.COMMAND_RUNNING)

    def run(self, flags: dict[str, str], words: list[str]) -> None:
        if "xendbg.gdb.xentrace" in sys.modules:  # a trace from Xen's buffers
            line = sys.modules["xendbg.gdb.xentrace"].stop_command()
            if line is not None:
                gdb.write(f"xendbg: trace stopped: {line}\n")
                return
        trace = monitor.MONITOR.stop_trace()
        if trace is None:
            raise XendbgError("no trace is running (xen trace start)")
        gdb.write(f"xendbg: trace stopped: {trace.summary()}\n")


class XenTraceEnable(_XenCommand):
    """Turn Xen's own trace buffers on at boot: xen trace enable [--pages N] [--mask M]

Sets Xen's boot options opt_tbuf_size (N pages per CPU, default 1024) and opt_tevt_mask (default
0x0020f000, the PV class) at init_trace_bufs: now when stopped there, else when Xen reaches it.
Past it, xendbg says which Xen command-line options to add.  These two words are the only target
memory it writes besides the buffers' consumer index (xen trace start --buffers)."""

    usage = "xen trace enable [--pages N] [--mask M]"
    valued = ("--pages", "--mask")

    def __init__(self) -> None:
        super().__init__("xen trace enable", gdb.COMMAND_RUNNING)

    def run(self, flags: dict[str, str], words: list[str]) -> None:
        from xendbg.gdb import xentrace

        pages, mask = _number(flags.get("--pages", "1024")), _number(flags.get("--mask", "0x0020f000"))
        gdb.write(f"xendbg: {xentrace.enable(pages, mask)}\n")


class XenTraceInterval(gdb.Parameter):
    """How often xen trace start --buffers interrupts the running guest to read Xen's buffers (seconds)."""

    set_doc = "Set how often (seconds) xen trace start --buffers reads Xen's trace buffers while the guest runs."
    show_doc = "Show how often xen trace start --buffers reads Xen's trace buffers while the guest runs."

    def __init__(self) -> None:
        super().__init__("xen trace-interval", gdb.COMMAND_RUNNING, gdb.PARAM_STRING)
        self.value = "0.5"

    def get_set_string(self) -> str:
        try:
            seconds = float(self.value)
        except ValueError:
            seconds = 0.0
        if not 0.01 <= seconds <= 3600:
            self.value = "0.5"
            raise gdb.GdbError("xen trace-interval is in seconds, 0.01 to 3600")
        from xendbg.gdb import xentrace

        xentrace.ACTIVE.interval = seconds
        if xentrace.ACTIVE.trace is not None:
            xentrace.ACTIVE.trace.interval = seconds
        return ""

    def get_show_string(self, svalue: str) -> str:
        return f"xendbg reads Xen's trace buffers every {svalue} s while the guest runs"


class XenTraceShow(_XenCommand):
    """Show the last traced hypercalls: xen trace show [N] [--json]  (N >= 1, default 20)"""

    usage = "xen trace show [N] [--json]"
    flags = ("--json",)
    nargs = (0, 1)

    def __init__(self) -> None:
        super().__init__("xen trace show", gdb.COMMAND_RUNNING)

    def run(self, flags: dict[str, str], words: list[str]) -> None:
        from xendbg.trace import show_lines

        trace = monitor.MONITOR.trace or monitor.MONITOR.finished_trace
        if trace is None:
            raise XendbgError("nothing traced yet (xen trace start)")
        count = _number(words[0]) if words else 20
        if count < 1:
            raise XendbgError(f"N must be 1 or more, not {count} (usage: {self.usage})")
        records = [r for r in trace.recent if r["event"] not in ("start", "stop")]
        if "--json" in flags:
            context.write_json(records[-count:])
            return
        lines = show_lines(records)
        gdb.write("\n".join(lines[-count:]) + ("\n" if lines else "(no hypercalls traced yet)\n"))


class XenStats(_XenCommand):
    """Count traced hypercalls, failures and sub-operations, like strace -c: xen stats [--json] [--reset]"""

    usage = "xen stats [--json] [--reset]"
    flags = ("--json", "--reset")

    def __init__(self) -> None:
        super().__init__("xen stats", gdb.COMMAND_STATUS)

    def run(self, flags: dict[str, str], words: list[str]) -> None:
        from xendbg.trace import Stats

        rows = monitor.MONITOR.stats.rows()
        if "--reset" in flags:
            monitor.MONITOR.stats = Stats()
        if "--json" in flags:
            context.write_json({"schema": render_json.SCHEMA_VERSION, "hypercalls": rows})
            return
        if not rows:
            gdb.write("no hypercalls counted yet (xen trace start counts them)\n")
            return
        context.write(context.text().stats_table(rows))


class XenSettings(gdb.Command):
    """Settings of xendbg, the Xen PV guest debugger:
  abi     the Xen ABI generation to decode with (auto: from the evidence, see 'show xen abi')
  width   the guest width (auto: from the code selector)
  color   whether xendbg colours its output"""

    def __init__(self, verb: str) -> None:
        self.__doc__ = f"{verb.capitalize()} xendbg's settings.\n" + (XenSettings.__doc__ or "").split("\n", 1)[1]
        self.verb = verb
        super().__init__(f"{verb} xen", gdb.COMMAND_DATA, prefix=True)

    def invoke(self, arg: str, from_tty: bool) -> None:
        if self.verb == "show":
            for name in ("abi", "width", "color"):
                gdb.execute(f"show xen {name}")
            return
        gdb.write("set xen abi auto|2.0|..., set xen width auto|32|64, set xen color on|off "
                  "('help set xen' explains them)\n")


class XenParameter(gdb.Parameter):
    """One `set xen NAME` setting, mirrored into the session's settings when the user sets it."""

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
            try:
                cs = GdbTarget().read_register("cs") & 0xFFFF
            except XendbgError:
                cs = None
            choice = context.choice(cs if cs is not None and cs & 3 else None)
            return f"{self._what}: auto (now Xen {choice.generation}: {choice.reason})"
        return f"{self._what}: {svalue}"


def run_json(name: str, arg: str = "") -> object:
    """Run `xen NAME ARG --json` and return its JSON object instead of printing it (MI commands, the
    TUI): one command, one home for its data."""
    command = COMMANDS.get(name)
    if command is None or "--json" not in command.flags:
        raise XendbgError(f"xen {name} has no JSON form")
    with context.capture_json() as out:
        command.invoke(f"{arg} --json".strip(), False)
    if not out:
        raise XendbgError(f"xen {name} printed no JSON")
    return out[-1]


def _on_stop(event: object) -> None:
    """Forward gdb's stops to the monitor, once something has loaded it (catch, trace, break, ...)."""
    loaded = sys.modules.get("xendbg.gdb.monitor")
    if loaded is not None:
        loaded.on_stop(event)


def register() -> None:
    XenSettings("set")
    XenSettings("show")
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
    XenTcatch()
    XenCatchHypercall("xen tcatch hypercall")
    XenBreak()
    XenBreakCallback()
    XenBreakTrap()
    XenBreakFasttrap()
    XenBreakDelete()
    XenTrace()
    XenTraceStart()
    XenTraceStop()
    XenTraceShow()
    XenTraceEnable()
    XenTraceInterval()
    XenStats()
    from xendbg.gdb.dump import XenDump

    XenDump()
    XenParameter("abi", f"the Xen ABI generation xendbg decodes with (auto: from the evidence, in this order: a "
                 f"xen_version result seen, Xen's own image, the guest's Xen ELF note, its code selector, its "
                 f"hypercall page; else {NEWEST}, the newest, with a warning)", gdb.PARAM_ENUM, ABI_CHOICES, "auto")
    XenParameter("width", "the guest width xendbg assumes (auto: from the code selector)",
                 gdb.PARAM_ENUM, ["auto", "32", "64"], "auto")
    XenParameter("color", "whether xendbg colours its output (never when gdb's style is off)",
                 gdb.PARAM_BOOLEAN, None, True)
    gdb.events.stop.connect(_on_stop)
    from xendbg.gdb import connect

    connect.register()  # gdb's architecture against the target's registers, at each connection
    from xendbg.gdb import mi_commands

    mi_commands.register()  # -xen-* MI commands (gdb 13's gdb.MICommand); loads nothing heavy

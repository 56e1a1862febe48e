"""xendbg watching a running guest through gdb: the probes the plan of xendbg/observe.py asks for, as
internal gdb breakpoints, and the `xen catch`, `xen trace`, `xen stats` and `xen break` machinery.

A probe's `stop()` decodes the call and returns False unless the user asked to stop there, so gdb
resumes without a visible stop.  What a hit means (a new call, the same call reported twice, Xen's
continuation of a preempted call) and where calls come back is decided in observe.py; this module only
reads gdb.

What the guest registered changes only when a call has completed: at its return probe, with Xen's
result (a refused call changes nothing).  Xen-side handler probes see no return, so there a call is
replayed when the same CPU's next call arrives, by Xen's own acceptance rules.

gdb forbids adding or deleting breakpoints inside `stop()`: when a registration moves an entry point a
`xen break` is watching, or a trace file fails, the probe stops the guest and the stop handler acts.
A `xen break` set while the registering call is still pending is planted at once where that call
registers the entry point, so its return moves nothing.

Each catch and each `xen break` is a numbered gdb breakpoint the user sees (UserPoint), which gdb's
own delete, disable, enable, condition, ignore and commands act on; the probes ask it at each hit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import cast

import gdb

from xendbg import arch, observe
from xendbg.abi import Abi, get_abi
from xendbg.abi.hypercalls import CONTINUED_BY_XEN, NEVER_RETURN
from xendbg.abi.layouts import ERA_3, layout
from xendbg.decode import Hypercall, decode_call, decode_in_xen, decode_multicall, decode_pending
from xendbg.decode.model import GuestState, MulticallBatch
from xendbg.decode.state import apply, seed_initialised_vcpu
from xendbg.errors import TargetGone, XendbgError
from xendbg.gdb import context
from xendbg.gdb.target import GdbTarget
from xendbg.observe import Catch, EntryWatch, PendingCall, ProbeSpec
from xendbg.session import AbiChoice, annotate
from xendbg.trace import Stats, TraceLog

_WAITING = "_xendbg_waiting"  # gdb convenience variable: calls awaiting their return (a return probe's condition)


class _Probe(gdb.Breakpoint):
    """An internal breakpoint where a hypercall is observed (a ProbeSpec placed)."""

    def __init__(self, monitor: Monitor, spec: ProbeSpec) -> None:
        super().__init__(f"*{spec.address:#x}", gdb.BP_BREAKPOINT, internal=True)
        self.silent = True
        self.monitor = monitor
        self.spec = spec
        if spec.numbers:
            if spec.kind == "frame":  # the guest's RAX in the frame pv_hypercall gets in RDI
                number = f"*(unsigned long *)($rdi + {_FRAME_RAX})"
            else:
                number = "$eax" if spec.width == 32 else "$rax"
            tests = [f"{number} == {n}" for n in spec.numbers]
            if spec.wrap_mask is not None:  # an old Xen runs number n + 32k as n
                tests += [f"({number} & {spec.wrap_mask}) == {n}" for n in spec.numbers if n <= spec.wrap_mask]
            self.condition = " || ".join(tests)

    def stop(self) -> bool:
        return self.monitor.stopping(self, self.monitor.on_probe(self.spec))


class _ReturnProbe(gdb.Breakpoint):
    """Where guest-side calls come back (the instruction after `syscall` / `int $0x82`).  Its condition
    keeps Python out of the way while no call is awaited."""

    def __init__(self, monitor: Monitor, address: int) -> None:
        super().__init__(f"*{address:#x}", gdb.BP_BREAKPOINT, internal=True)
        self.silent = True
        self.monitor = monitor
        self.address = address
        self.condition = f"${_WAITING} > 0"

    def stop(self) -> bool:
        return self.monitor.stopping(self, self.monitor.on_return(self.address))


class _EntryBreakpoint(gdb.Breakpoint):
    """The internal breakpoint on a guest entry point (`xen break`); one per address, however many
    watches (vectors sharing a handler, say) lead there.  Each watch's UserPoint says whether to stop."""

    def __init__(self, monitor: Monitor, address: int) -> None:
        super().__init__(f"*{address:#x}", gdb.BP_BREAKPOINT, internal=True)
        self.silent = True
        self.monitor = monitor
        self.address = address

    def stop(self) -> bool:
        return self.monitor.stopping(self, self.monitor.on_entry(self.address))


class UserPoint:
    """The numbered gdb breakpoint that stands for a catch or a `xen break` entry point.

    gdb's Python API has no catchpoint type, and `info breakpoints` shows what a breakpoint is for only
    as the location of a pending one: so this is a pending breakpoint whose location, quoted, says what
    it stands for ('catch hypercall multicall (guest side, 7 stubs)'); no symbol has such a name, so it
    never resolves and is never hit itself.  The internal probes do the work and, at each hit, ask it
    what gdb asks a breakpoint: enabled, then its condition, then its ignore count; when it says stop,
    its commands go on the probe that stops.  So gdb's own delete, disable, enable, condition, ignore
    and commands act on it.  Its hit count in `info breakpoints` stays 0 (gdb's Python API can only
    reset one): `xen catch` and `xen break` list the hits."""

    def __init__(self, what: str, temporary: bool = False, label: str = "Breakpoint") -> None:
        what = what.replace("'", "")  # the quotes around it
        # Quietly: gdb says "Function ... not defined" and "Breakpoint N (...) pending" otherwise.
        gdb.execute(f"with breakpoint pending on -- {'tbreak' if temporary else 'break'} '{what}'",
                    to_string=True)
        self.breakpoint = max(gdb.breakpoints(), key=lambda b: b.number)
        self.what = what
        self.label = label  # how a stop names it: "Catchpoint 2 (catch hypercall multicall (...))"
        self.hits = 0

    def settings(self) -> dict[str, object]:
        """What the user set on it with gdb's commands, and its hits."""
        bp = self.breakpoint
        if not bp.is_valid():
            return {"hits": self.hits}
        return {"enabled": bp.enabled, "condition": bp.condition, "ignore_count": bp.ignore_count,
                "commands": bp.commands, "hits": self.hits}

    def take_settings(self, settings: dict[str, object]) -> None:
        """Those of a UserPoint this one replaces (made anew, it stands for less now)."""
        for name, value in settings.items():
            if name == "hits":
                self.hits = cast(int, value)
            elif value is not None:
                setattr(self.breakpoint, name, value)

    @property
    def number(self) -> int:
        return self.breakpoint.number if self.breakpoint.is_valid() else 0

    @property
    def enabled(self) -> bool:
        return self.breakpoint.is_valid() and self.breakpoint.enabled

    def says_stop(self, notes: list[str]) -> bool:
        """At a hit of what this stands for: whether to stop for it, counting the hit as gdb does (a hit
        its ignore count skips counts; a false condition does not)."""
        bp = self.breakpoint
        if not bp.is_valid() or not bp.enabled:
            return False
        if bp.condition:
            try:
                if not bool(gdb.parse_and_eval(bp.condition)):
                    return False
            except gdb.error as exc:  # as gdb does with a condition it cannot test: say so, and stop
                notes.append(f"Error in testing condition for breakpoint {bp.number}:\n{exc}")
                self.hits += 1
                return True
        self.hits += 1
        if bp.ignore_count > 0:
            bp.ignore_count -= 1
            return False
        return True

    def commands(self) -> str:
        return (self.breakpoint.commands or "") if self.breakpoint.is_valid() else ""

    def listing(self) -> str:
        state = "" if self.enabled else ", disabled"
        hits = f", hit {self.hits} time{'s' if self.hits != 1 else ''}" if self.hits else ""
        return f"{self.label.lower()} {self.number}{state}{hits}"

    def delete(self) -> None:
        if self.breakpoint.is_valid():
            self.breakpoint.delete()


@dataclass(eq=False)
class CatchPoint:
    """One `xen catch hypercall` (or `xen tcatch hypercall`): what it catches, and its UserPoint."""

    names: frozenset[str]  # empty: every hypercall
    side: str  # "auto", "guest", "xen"
    temporary: bool = False
    point: UserPoint | None = None

    def matches(self, name: str) -> bool:
        return not self.names or name in self.names

    def describe(self) -> str:
        return f"hypercall {', '.join(sorted(self.names))}" if self.names else "every hypercall"


def _set_commands(breakpoint: gdb.Breakpoint, commands: str) -> None:
    """Give a stopping probe the commands of what it stops for (gdb runs a stopping breakpoint's own)."""
    if (breakpoint.commands or "") != commands:
        breakpoint.commands = commands


@dataclass
class Monitor:
    catches: list[CatchPoint] = field(default_factory=list)
    trace: TraceLog | None = None
    finished_trace: TraceLog | None = None  # the last trace stopped, for `xen trace show`
    stats: Stats = field(default_factory=Stats)
    watches: list[EntryWatch] = field(default_factory=list)
    entry_breakpoints: dict[int, _EntryBreakpoint] = field(default_factory=dict)
    watch_points: dict[int, UserPoint] = field(default_factory=dict)  # by id() of the watch
    probes: list[_Probe] = field(default_factory=list)
    returns: dict[int, _ReturnProbe] = field(default_factory=dict)
    calls: observe.CallTracker = field(default_factory=observe.CallTracker)
    # The last call each Xen handler served on each CPU: Xen-side there is no return to match, so a
    # continuation is told from the call before it (its arguments advanced).
    handler_calls: dict[tuple[int, str], PendingCall] = field(default_factory=dict)
    # The last call each CPU made into a Xen-side probe with no return to see: it has completed when the
    # CPU's next call arrives, and is replayed into the registered state then.
    unapplied: dict[int, PendingCall] = field(default_factory=dict)
    reports: list[tuple[str, object]] = field(default_factory=list)
    plan: str = ""  # one line: where and how xendbg observes hypercalls now
    moves_due: bool = False
    trace_failed: bool = False  # the trace file failed: stop the trace at the next stop
    events: EventLog = field(default_factory=lambda: EventLog())  # for MI clients (-xen-events)
    before_probe: Callable[[], None] | None = None  # xen trace start --buffers --detail: drain Xen's buffers first
    # Xen's stack_base[] (xen-syms loaded) and, per CPU, where Xen saves the guest frame (None: unknown);
    # looked up at each replan, since stop() may not run gdb commands.
    stack_base: int | None = None
    frame_addresses: dict[int, int | None] = field(default_factory=dict)
    stop_commands: str = ""  # the commands of the UserPoints the probe being hit stops for
    # A UserPoint was deleted with gdb's `delete`: its probes go at the next stop or xen command (gdb's
    # breakpoint events come while gdb walks its breakpoints, where none may be deleted).
    replan_due: bool = False

    # --- what to observe, and where ---------------------------------------------------------------

    @property
    def catch(self) -> Catch | None:
        """What every catch together catches, and the side asked last (it applies to every name)."""
        if not self.catches:
            return None
        every = any(not c.names for c in self.catches)
        return Catch(frozenset() if every else frozenset().union(*(c.names for c in self.catches)),
                     self.catches[-1].side)

    @property
    def active(self) -> bool:
        return bool(self.catches) or self.trace is not None or bool(self.watches)

    def wanted(self) -> frozenset[str] | None:
        """The hypercall names the probes must see (None: all of them)."""
        names = ([self.catch.names] if self.catch else []) + ([frozenset(self.trace.names)] if self.trace else [])
        return observe.wanted_calls(names, self.active)

    def replan(self) -> str:
        """Recreate the probes for what is wanted now; returns the one-line plan."""
        self._delete_probes()
        wanted = self.wanted()
        if wanted is not None and not wanted:
            self.plan = "xendbg observes no hypercalls (no catch, trace or break is active)"
            return self.plan
        requested = self.catch.side if self.catch else "auto"
        xen = context.xen_symbols_loaded()
        if requested == "xen" and not xen:
            raise XendbgError("Xen's symbols are not loaded: add-symbol-file xen-syms (from "
                              "xen-hypervisor-*-dbg) to catch inside Xen")
        sites = observe.guest_sites(context.loaded_sites()) if requested != "xen" else []
        gate, how = None, ""
        if not sites and not (xen and requested != "guest"):
            # No symbol file says where: ask the machine (memory near PC, the IDT).
            sites, gate, how = context.machine_entries()
            if not sites and (gate is None or requested == "guest"):
                raise XendbgError(f"{_NO_SITES}, and the machine says nowhere either ({how}): let the guest "
                                  f"run into its kernel first, or load Xen's symbols (xen-syms)")
        use_xen = requested == "xen" or (requested == "auto" and xen and (wanted is not None or not sites))
        if use_xen:
            plan = observe.plan_xen(wanted, context.candidate_abis(64), context.address_of)
        elif sites:
            plan = observe.plan_guest(sites, wanted, context.candidate_abis)
            if how:
                plan.description += f" ({how})"
        else:
            plan = observe.plan_gate(gate or 0, wanted, context.candidate_abis(32), how)
        self.stack_base = context.address_of("stack_base") if xen else None
        self.probes = [_Probe(self, spec) for spec in plan.probes]
        # Results (and so completed registrations and the xen_version answer) are read where calls come
        # back to the guest; placed now, since stop() may not add breakpoints.
        returns = plan.returns if not use_xen else observe.plan_guest(sites, wanted, context.candidate_abis).returns
        for place in returns:
            if place not in self.returns:
                self.returns[place] = _ReturnProbe(self, place)
        self.plan = plan.description
        return self.plan

    def _delete_probes(self) -> None:
        self.frame_addresses.clear()  # symbols may have changed since
        for probe in self.probes:
            if probe.is_valid():
                probe.delete()
        self.probes = []
        for ret in self.returns.values():
            if ret.is_valid():
                ret.delete()
        self.returns.clear()
        for _, place, _ in self.calls.pending:  # calls under way still come back, and then count
            self.returns[place] = _ReturnProbe(self, place)
        self._publish_waiting()

    def _publish_waiting(self) -> None:
        gdb.set_convenience_variable(_WAITING, len(self.calls.pending))

    # --- a probe was hit --------------------------------------------------------------------------

    def _decode_at(self, spec: ProbeSpec, target: GdbTarget, cpu: int) -> tuple[Hypercall, Abi]:
        state = context.SESSION.state(cpu)
        if spec.kind in ("handler", "frame", "gate"):
            chosen: list[tuple[Abi, AbiChoice]] = []

            def pick(width: int, code_selector: int | None = None) -> Abi:
                chosen.append(context.abi_for(width, code_selector))
                return chosen[-1][0]

            hc = decode_in_xen(target, spec.function or "", pick, state=state)
            abi, why = chosen[-1]
        else:
            abi, why = context.abi_for(spec.width, target.read_register("cs") & 0xFFFF)
            if spec.kind == "stub":
                hc = decode_call(target, abi, spec.nr or 0, arch.pv_args(target, spec.width), state=state,
                                 site=f"at the hypercall-page stub for hypercall {spec.nr}")
            else:  # on the instruction itself: no need to read the code at PC again
                hc = decode_pending(target, abi, state=state, code_at_pc=_INSTRUCTION_BYTES[spec.width])
        return annotate(hc, why), abi

    def on_probe(self, spec: ProbeSpec) -> bool:
        """Called by gdb at each probe hit; True makes gdb stop and show it."""
        if self.before_probe is not None:
            self.before_probe()
        try:
            cpu = context.cpu_index()
            target = GdbTarget()
            hc, abi = self._decode_at(spec, target, cpu)
            key = self._return_key(spec, target, cpu)
        except (XendbgError, gdb.error) as exc:
            where = f"probe at {spec.address:#x}"
            if self.trace is not None:  # logged, not lost: the record says what could not be read
                self.trace.error(_cpu_or_unknown(), where, str(exc))
            if isinstance(exc, (TargetGone, gdb.error)):
                return True  # the target is going away: resuming it makes gdb 13 fail an assertion
            if self.catch is not None:
                self.reports.append(("error", f"xendbg: cannot decode the hypercall at the {where}: {exc}"))
                return True
            return self._trace_file_stop()
        pending = PendingCall(hc, abi, registers=self._registers(spec, target, hc),
                              xen_frame=self._xen_frame(spec, target, cpu, hc))
        if key is not None:
            entered = self.calls.enter(key, pending)
        else:
            earlier_call = self.handler_calls.get((cpu, spec.function or ""))
            self.handler_calls[(cpu, spec.function or "")] = pending
            entered = observe.Entered("new")
            if earlier_call is not None and observe.is_continuation(earlier_call.call, hc, abi):
                entered = observe.Entered("continuation", earlier_call)
        if entered.kind == "repeat":
            if entered.certain:
                return False  # the same call reported again: it was already counted and shown
            return self._uncertain_repeat(cpu, hc, entered)
        continues = None
        earlier = entered.earlier if entered.kind == "continuation" else None
        if key is None:  # Xen side: the CPU's previous call has completed now
            previous = self.unapplied.pop(cpu, None)
            if previous is not None and previous is not earlier:
                self._apply(cpu, previous.call, previous.abi)
            if not (spec.kind == "handler" and hc.name == "multicall"):  # its entries reach their handlers
                self.unapplied[cpu] = pending
        if earlier is not None:
            self._apply(cpu, observe.completed_part(earlier.call, hc, abi), abi)
            continues = earlier.seq
            if earlier.seq is not None and self.trace is not None:
                self.trace.preempted(cpu, earlier.seq, earlier.call.display_name)
        name = hc.display_name
        if self.trace is not None and (not self.trace.names or name in self.trace.names):
            self.stats.count_call(hc)
            pending.seq = self.trace.call(cpu, hc, "xen" if spec.kind in ("handler", "frame", "gate") else "guest",
                                          continues)
        self._publish_waiting()
        if self._catch_stops(name, ("catch", (cpu, hc, entered.kind == "continuation"))):
            return True
        if self.moves_due:
            self.reports.append(("moved", None))
            return True
        return self._trace_file_stop()

    def stopping(self, breakpoint: gdb.Breakpoint, stop: bool) -> bool:
        """What a probe's stop() returns; a probe that stops carries the commands of the UserPoints it
        stops for (gdb runs the stopping breakpoint's), none when it stops for xendbg's own reasons."""
        if stop:
            _set_commands(breakpoint, self.stop_commands)
        self.stop_commands = ""
        return stop

    def on_entry(self, address: int) -> bool:
        """Called by gdb at a `xen break` entry point; True when one of the watches there says stop."""
        notes: list[str] = []
        stopping = [p for w in self.watches_at(address) if (p := self.watch_points.get(id(w))) is not None
                    and p.says_stop(notes)]
        if not stopping and not notes:
            return False
        self.reports.append(("points", (stopping, notes)))
        self.reports.append(("entry", address))
        self.stop_commands = "".join(p.commands() for p in stopping)
        return True

    def _uncertain_repeat(self, cpu: int, hc: Hypercall, entered: observe.Entered) -> bool:
        """A hit identical to the call before it at the same place, which Xen could be continuing without
        visible progress: neither counted again nor dropped without a word."""
        earlier, name = entered.earlier, hc.display_name
        if self.trace is not None and (not self.trace.names or name in self.trace.names):
            self.stats.count_uncertain(name)
            self.trace.uncertain(cpu, earlier.seq if earlier else None, name)
        return self._catch_stops(name, ("uncertain", (cpu, name))) or self._trace_file_stop()

    def _catch_stops(self, name: str, report: tuple[str, object]) -> bool:
        """Whether a catch stops at hypercall `name`: every matching catch is asked (each counts its hit),
        as gdb asks each breakpoint; the stop's report follows the catchpoints' own line."""
        notes: list[str] = []
        stopping = [c.point for c in self.catches if c.matches(name) and c.point is not None
                    and c.point.says_stop(notes)]
        if not stopping and not notes:
            return False
        self.reports.append(("points", (stopping, notes)))
        self.reports.append(report)
        self.stop_commands = "".join(p.commands() for p in stopping)
        return True

    def _registers(self, spec: ProbeSpec, target: GdbTarget, hc: Hypercall) -> tuple[int, ...]:
        """What identifies a guest-side hit (a repeat report has the same); Xen-side hits are never repeats.
        On 64-bit, RCX and R11 too: Xen returns from a syscall-entered hypercall with sysret, which loads
        RCX from the saved RIP, so after Xen rewound a continuation onto the syscall RCX holds its address
        (restore_all_guest, xen/arch/x86/x86_64/entry.S at RELEASE-4.17.0)."""
        if spec.kind in ("handler", "frame", "gate"):
            return ()
        extra = (target.read_register("rcx"), target.read_register("r11")) if spec.width == 64 else ()
        return (target.read_register("pc"), target.read_register("sp"), hc.nr, *(a.value for a in hc.args), *extra)

    def _xen_frame(self, spec: ProbeSpec, target: GdbTarget, cpu: int, hc: Hypercall) -> bytes | None:
        """For a guest-side hit on a call whose repeat could be a continuation, the guest frame Xen saved
        on this CPU, when Xen's symbols say where (observe.CallTracker weighs it)."""
        if spec.kind not in ("instruction", "stub") or not (hc.name in CONTINUED_BY_XEN or hc.name in NEVER_RETURN):
            return None
        if self.stack_base is None:
            return None
        if cpu not in self.frame_addresses:
            self.frame_addresses[cpu] = arch.cpu_guest_frame_address(target, self.stack_base, cpu)
        address = self.frame_addresses[cpu]
        if address is None:
            return None
        try:
            return target.read_memory(address, arch.xen_frame_size())
        except XendbgError:
            return None

    def _return_key(self, spec: ProbeSpec, target: GdbTarget, cpu: int) -> tuple[int, int, int] | None:
        """(vCPU, where the call comes back to the guest, the guest's stack pointer then)."""
        if spec.kind in ("instruction", "stub"):  # the probe is on the instruction: it returns 2 bytes on
            return cpu, spec.address + 2, target.read_register("sp")
        if spec.kind == "frame":
            frame = target.read_register("rdi")
            data = target.read_memory(frame + _FRAME_RIP, _FRAME_RSP + 8 - _FRAME_RIP)
            rip = int.from_bytes(data[:8], "little")
            rsp = int.from_bytes(data[_FRAME_RSP - _FRAME_RIP:], "little")
            return cpu, rip, rsp
        return None  # a handler: called from Xen's dispatcher or a multicall; no guest frame at hand

    def _apply(self, cpu: int, hc: Hypercall, abi: Abi, result: int | None = None) -> None:
        if apply(context.SESSION.state(cpu), get_abi(hc.generation, hc.width), hc, result):
            self.moves_due = self.moves_due or self._entries_moved()

    def on_return(self, address: int) -> bool:
        """Called by gdb where guest-side calls come back; stops only to report a failed trace file."""
        try:
            cpu = context.cpu_index()
            target = GdbTarget()
            call = self.calls.returned((cpu, address, target.read_register("sp")))
            if call is None:
                return False
            self._publish_waiting()
            hc = call.call
            result = arch.read_result(target, hc.width)
            if observe.is_version_query(hc):
                context.SESSION.saw_version(result, f"returned on cpu {cpu}")
            if isinstance(hc.detail, MulticallBatch) and hc.detail.entries:
                # The batch has run: its entries' results say which registrations Xen accepted.
                batch, _ = decode_multicall(target, call.abi, hc.detail.address, hc.detail.count,
                                            state=context.SESSION.state(cpu))
                hc = replace(hc, detail=batch)
            self._apply(cpu, hc, call.abi, result)
            # A vCPU that Xen started with VCPUOP_initialise registered what its context held.
            seed_initialised_vcpu(context.SESSION.state, target, call.abi, hc, result)
            if call.seq is not None and self.trace is not None:
                self.trace.result(cpu, call.seq, hc.display_name, result)
                self.stats.count_result(hc.display_name, result)
        except (XendbgError, gdb.error) as exc:
            if self.trace is not None:
                self.trace.error(_cpu_or_unknown(), f"return probe at {address:#x}", str(exc))
            return isinstance(exc, (TargetGone, gdb.error)) or self._trace_file_stop()  # as in on_probe
        if self.moves_due:
            self.reports.append(("moved", None))
            return True
        return self._trace_file_stop()

    def _trace_file_stop(self) -> bool:
        """True (stop the guest) once when the trace file failed, so that the stop handler ends the trace."""
        if self.trace is None or self.trace.file_error is None or self.trace_failed:
            return False
        self.trace_failed = True
        self.reports.append(("trace-failed", None))
        return True

    def stop_trace(self) -> TraceLog | None:
        """End the trace (its records stay for `xen trace show`); None when none was running."""
        trace = self.trace
        if trace is None:
            return None
        trace.close()
        self.trace, self.finished_trace, self.trace_failed = None, trace, False
        try:
            self.replan()
        except XendbgError:
            pass  # the target may be gone: the trace is closed either way
        return trace

    # --- catches -------------------------------------------------------------------------------------

    def add_catch(self, names: frozenset[str], side: str, temporary: bool = False) -> tuple[CatchPoint, str]:
        """A new catch (catches add up; the side asked last applies to every name); returns it and the
        one-line plan.  Nothing is left behind when the probes cannot be placed."""
        catch = CatchPoint(names, side, temporary)
        self.catches.append(catch)
        try:
            plan = self.replan()
        except XendbgError:
            self.catches.remove(catch)
            self.replan()
            raise
        what = f"catch {catch.describe()} ({_plan_summary(self.probes, names)})"
        catch.point = UserPoint(what, temporary, "Catchpoint")
        return catch, plan

    def delete_catches(self, names: frozenset[str] | None) -> list[CatchPoint]:
        """End the catches (None: all), or stop catching `names` in them: a catch left with other names is
        made anew with the same settings (its number changes, its description must); returns those left."""
        narrowed: list[tuple[dict[str, object], CatchPoint]] = []
        for catch in list(self.catches):
            if names is None or (catch.names and catch.names <= names):
                self._drop_catch(catch)
            elif catch.names & names:
                settings = catch.point.settings() if catch.point is not None else {}
                self._drop_catch(catch)
                narrowed.append((settings, CatchPoint(catch.names - names, catch.side, catch.temporary)))
        self.catches += [catch for _, catch in narrowed]
        self.replan()
        for settings, new in narrowed:
            new.point = UserPoint(f"catch {new.describe()} ({_plan_summary(self.probes, new.names)})", new.temporary,
                                  "Catchpoint")
            new.point.take_settings(settings)
        return list(self.catches)

    def _drop_catch(self, catch: CatchPoint) -> None:
        self.catches.remove(catch)
        if catch.point is not None:
            catch.point.delete()  # forget() finds nothing left to do

    def forget(self, breakpoint: gdb.Breakpoint) -> None:
        """gdb is deleting `breakpoint` (gdb's delete, or a temporary one that stopped): if it is a
        UserPoint, what it stands for ends.  Its probes go at the next stop or xen command."""
        for catch in self.catches:
            if catch.point is not None and catch.point.breakpoint is breakpoint:
                self.catches.remove(catch)
                self.replan_due = True
                break
        for watch in self.watches:
            point = self.watch_points.get(id(watch))
            if point is not None and point.breakpoint is breakpoint:
                self.watches.remove(watch)
                del self.watch_points[id(watch)]
                self.replan_due = True
                break
        self.sync_enabled()

    def sync_enabled(self) -> None:
        """Switch probes off while nothing enabled needs them, and back on: this, unlike deleting them,
        gdb allows inside its breakpoint events.  Following registrations needs them for any watch."""
        needed = self.trace is not None or bool(self.watches) or any(
            c.point is not None and c.point.enabled for c in self.catches)
        for probe in self.probes:
            if probe.is_valid() and probe.enabled != needed:
                probe.enabled = needed
        for address, entry in self.entry_breakpoints.items():
            wanted = any((p := self.point_of(w)) is not None and p.enabled for w in self.watches_at(address))
            if entry.is_valid() and entry.enabled != wanted:
                entry.enabled = wanted

    def tidy(self, replan: bool = True) -> list[str]:
        """Where breakpoints may be deleted again (a stop, a xen command): drop the probes of UserPoints
        gdb deleted, and put the `xen break` breakpoints where their entry points are now.  Not the
        probes at a stop whose commands gdb is about to run: gdb then runs none of them."""
        if self.replan_due and replan:
            self.replan_due = False
            try:
                self.replan()
            except XendbgError:
                pass  # the target may be gone; the next catch or break says so
        return self.move_entries() if self.watches or self.entry_breakpoints else []

    # --- entry points followed across registrations ------------------------------------------------

    def _states_with_pending(self) -> list[GuestState]:
        """Every vCPU's registered state as it will be when the registering calls under way complete and
        Xen accepts them: where a `xen break` goes before its registration has come back."""
        states = dict(context.SESSION.states)
        under_way = [(key[0], c) for key, c in self.calls.pending.items()] + list(self.unapplied.items())
        for cpu, call in under_way:
            hc = call.call
            if hc.name in observe.REGISTERING or (isinstance(hc.detail, MulticallBatch) and hc.detail.entries):
                if states.get(cpu) is context.SESSION.states.get(cpu):
                    states[cpu] = copy.deepcopy(states.get(cpu) or GuestState())
                apply(states[cpu], get_abi(hc.generation, hc.width), hc)
        return list(states.values())

    def _entries_moved(self) -> bool:
        """Whether a `xen break` must be planted somewhere new now.  One whose entry point is no longer
        registered (Xen refused the call it was planted for) is taken away at the next stop."""
        if not self.watches:
            return False
        states = self._states_with_pending()
        return any((a := w.current_address(states)) is not None and a != w.address for w in self.watches)

    def move_entries(self) -> list[str]:
        """Put the `xen break` breakpoints where their entry points now are (outside stop())."""
        notes = []
        states = self._states_with_pending()
        done = list(context.SESSION.states.values())
        for watch in self.watches:
            address = watch.current_address(states)
            if address != watch.address:
                watch.address = address
                number = self.watch_points[id(watch)].number if id(watch) in self.watch_points else 0
                if address:
                    self._entry_breakpoint(address)
                    pending = "" if watch.current_address(done) == address else \
                        " (where the call under way registers it)"
                    notes.append(f"xendbg: breakpoint {number} now on {watch.describe()} at {address:#x}{pending}")
                else:
                    notes.append(f"xendbg: breakpoint {number}: {watch.describe()} is not registered (Xen did "
                                 f"not accept the call); it is set again when the guest registers it")
        for address in [a for a in self.entry_breakpoints if all(w.address != a for w in self.watches)]:
            breakpoint = self.entry_breakpoints.pop(address)
            if breakpoint.is_valid():
                breakpoint.delete()
        self.moves_due = False
        self.sync_enabled()
        return notes

    def _entry_breakpoint(self, address: int) -> _EntryBreakpoint:
        breakpoint = self.entry_breakpoints.get(address)
        if breakpoint is None or not breakpoint.is_valid():
            breakpoint = self.entry_breakpoints[address] = _EntryBreakpoint(self, address)
        return breakpoint

    def watches_at(self, address: int) -> list[EntryWatch]:
        return [w for w in self.watches if w.address == address]

    def point_of(self, watch: EntryWatch) -> UserPoint | None:
        return self.watch_points.get(id(watch))

    def add_watch(self, watch: EntryWatch) -> str:
        for existing in self.watches:
            if existing.same_as(watch):
                point = self.point_of(existing)
                where = f" (breakpoint {point.number})" if point is not None else ""
                return f"xendbg already breaks on {watch.describe()}{where}"
        self.watches.append(watch)
        try:
            self.replan()
        except XendbgError:
            self.watches.remove(watch)  # no phantom watch: the break is not set
            self.replan()
            raise
        point = self.watch_points[id(watch)] = UserPoint(f"break on {watch.describe()}")
        self.move_entries()
        if watch.address:
            done = watch.current_address(context.SESSION.states.values()) == watch.address
            where = "" if done else ", where the call under way registers it"
            return (f"Breakpoint {point.number} on {watch.describe()} at {watch.address:#x}{where}; it follows "
                    f"re-registrations")
        return (f"Breakpoint {point.number} on {watch.describe()}: xendbg has not seen the guest register "
                f"{watch.describe()} yet: the breakpoint is set when it does (observing {self.plan})")

    def remove_watches(self) -> int:
        count = len(self.watches)
        watches, self.watches = self.watches, []
        for watch in watches:
            point = self.watch_points.pop(id(watch), None)
            if point is not None:
                point.delete()
        for breakpoint in self.entry_breakpoints.values():
            if breakpoint.is_valid():
                breakpoint.delete()
        self.entry_breakpoints.clear()
        self.replan()
        return count


def _plan_summary(probes: Iterable[_Probe], names: frozenset[str]) -> str:
    """Where the probes for these hypercalls (empty: all) are, in a few words, for `info breakpoints`:
    'guest side, 7 stubs', 'Xen side, at do_multicall'."""
    specs = [p.spec for p in probes]
    kinds = {s.kind for s in specs}
    parts = []
    if "stub" in kinds:
        def numbers(width: int) -> set[int]:
            return {h.nr for abi in context.candidate_abis(width) for n in names
                    if (h := abi.hypercall_named(n)) is not None}
        stubs = sum(s.kind == "stub" and (not names or s.nr in numbers(s.width)) for s in specs)
        parts.append(f"{stubs} stub{'s' if stubs != 1 else ''}")
    if "instruction" in kinds:
        count = sum(s.kind == "instruction" for s in specs)
        parts.append(f"{count} hypercall instruction{'s' if count != 1 else ''}")
    in_xen = [s for s in specs if s.kind in ("handler", "frame", "gate") and s.function]
    handlers = {arch.handler_symbol(n, width) for n in names for width in (64, 32)}
    functions = sorted({s.function or "" for s in in_xen if s.function in handlers}) or sorted(
        {s.function or "" for s in in_xen if s.kind != "handler" or not names})
    if functions:
        parts.append("at " + ", ".join(functions))
    side = "Xen side" if kinds & {"handler", "frame", "gate"} else "guest side"
    return ", ".join([side, *parts])


_INSTRUCTION_BYTES = {32: b"\xcd\x82", 64: b"\x0f\x05"}  # int $0x82, syscall

# Xen's saved guest frame is the 64-bit struct cpu_user_regs (abi/layouts.py): Xen itself is 64-bit.
_FRAME = layout("cpu_user_regs", 64, ERA_3)
_FRAME_RAX, _FRAME_RIP, _FRAME_RSP = (_FRAME.field(name).offset for name in ("rax", "rip", "rsp"))

_NO_SITES = ("xendbg found nowhere in the loaded symbol files that the guest issues hypercalls (no "
             "hypercall page, xen_hypercall_pv or int $0x82 site; load the guest kernel with `file`)")


def _cpu_or_unknown() -> int:
    try:
        return context.cpu_index()
    except XendbgError:
        return -1


# --- events for MI clients (-xen-events) ---------------------------------------------------------


@dataclass
class EventLog:
    """What an MI client has not been told yet: the stop reports (catch, entry, error), kept as on_stop
    handles them, and the trace's records, taken from the trace itself (a cursor per trace log: the
    last record handed out).  `take` hands out each once, in order."""

    reports: list[tuple[str, object]] = field(default_factory=list)
    cursors: dict[int, tuple[TraceLog, dict | None]] = field(default_factory=dict)

    def add(self, kind: str, payload: object) -> None:
        self.reports.append((kind, payload))

    def take(self, logs: list[TraceLog | None]) -> list[tuple[str, object]]:
        """("record", dict) for each trace record not handed out yet (of `logs`, oldest log first; a
        ("lost", n) when the trace's memory overflowed in between), then the reports."""
        out: list[tuple[str, object]] = []
        kept: dict[int, tuple[TraceLog, dict | None]] = {}
        for log in logs:
            if log is None or id(log) in kept:
                continue
            _, last = self.cursors.get(id(log), (log, None))
            records = list(log.recent)
            start = 0
            if last is not None:
                start = next((i + 1 for i in range(len(records) - 1, -1, -1) if records[i] is last), 0)
                if start == 0 and len(records) == log.recent.maxlen:
                    out.append(("lost", log.path))  # its memory rolled over: the file, if any, has them
            out += [("record", r) for r in records[start:]]
            kept[id(log)] = (log, records[-1] if records else last)
        self.cursors = kept
        out += self.reports
        self.reports = []
        return out


MONITOR = Monitor()


def _on_breakpoint_deleted(breakpoint: gdb.Breakpoint) -> None:
    MONITOR.forget(breakpoint)


def _on_breakpoint_modified(breakpoint: gdb.Breakpoint) -> None:
    if any(c.point is not None and c.point.breakpoint is breakpoint for c in MONITOR.catches) or any(
            p.breakpoint is breakpoint for p in MONITOR.watch_points.values()):
        MONITOR.sync_enabled()  # disable N / enable N


gdb.events.breakpoint_deleted.connect(_on_breakpoint_deleted)
gdb.events.breakpoint_modified.connect(_on_breakpoint_modified)


def on_stop(event: object) -> None:
    """Print what the probes and entry breakpoints saved for the user, move entry breakpoints, and end
    a trace whose file failed."""
    reports, MONITOR.reports = MONITOR.reports, []
    kinds = {kind for kind, _ in reports}
    temporary: list[UserPoint] = []
    with_commands = False
    try:
        for kind, payload in reports:
            if kind in ("catch", "error"):
                MONITOR.events.add(kind, payload)
            if kind == "points":  # first, as gdb names the breakpoint that stopped before the rest
                points, condition_errors = cast("tuple[list[UserPoint], list[str]]", payload)
                for point in points:
                    with_commands = with_commands or bool(point.commands())
                    gdb.write(f"{point.label} {point.number} ({point.what})\n")
                    if point.breakpoint.is_valid() and point.breakpoint.temporary:
                        temporary.append(point)
                for message in condition_errors:
                    gdb.write(message + "\n")
            elif kind == "uncertain":
                cpu, name = cast("tuple[int, str]", payload)
                gdb.write(f"xendbg: cpu {cpu} stopped at {name} again with the same registers and memory: gdb "
                          f"reporting the same stop twice, or Xen continuing the call without progress (xendbg "
                          f"cannot tell which; counted once, as uncertain in xen stats)\n")
            elif kind == "catch":
                cpu, hc, continuation = cast("tuple[int, Hypercall, bool]", payload)
                what = ", Xen's continuation of the preempted call" if continuation else ""
                gdb.write(f"xendbg: cpu {cpu} caught hypercall {hc.display_name} ({hc.site}{what})\n")
                # An MI front end could also be told here as an async record: gdb.notify_mi (gdb 14 and
                # later, e.g. Debian 13's gdb 16; absent from Debian 12's gdb 13) with the hypercall's
                # JSON object, where hasattr(gdb, "notify_mi").
                context.write(context.text().hypercall(hc))
            elif kind == "entry":
                entry = _report_entry(cast(int, payload))
                if entry is not None:
                    MONITOR.events.add("entry", entry)
            elif kind == "error":
                gdb.write(f"{payload}\n")
        if "trace-failed" in kinds and MONITOR.trace is not None:
            error = MONITOR.trace.file_error
            trace = MONITOR.stop_trace()
            gdb.write(f"xendbg: trace stopped: {error}; {trace.calls if trace else 0} hypercalls in memory "
                      f"(xen trace show)\n")
        for point in temporary:  # a one-shot catch (xen tcatch) ends at its first stop, as gdb's tcatch
            point.delete()
        notes = MONITOR.tidy(replan=not with_commands)
        for note in notes:
            gdb.write(note + "\n")
        if "moved" in kinds:
            gdb.write("xendbg: stopped so that gdb could move the breakpoint; continue to go on\n")
    except (XendbgError, gdb.error) as exc:
        gdb.write(f"xendbg: {exc}\n")


# Vectors whose exception pushes an error code (Intel SDM vol. 3, 6.13): the bounce frame has the slot.
_ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21})


def _report_entry(address: int) -> tuple[int, int, str, object] | None:
    """Say which entry point was entered and decode its bounce frame; (cpu, address, what, frame)."""
    from xendbg.decode.bounce import decode_bounce_frame

    watches = MONITOR.watches_at(address)
    if not watches:
        return None
    target = GdbTarget()
    cpu = context.cpu_index()
    abi, _ = context.current_abi(target)
    watch = watches[0]
    vector = watch.vector if watch.kind != "callback" else None
    if watch.kind == "trap":
        vectors = observe.vectors_entering(address, context.SESSION.states.values())
        if len(vectors) > 1:
            listed = ", ".join(f"{v:#x} ({arch.vector_name(v)})" for v in vectors)
            shapes = {v in _ERROR_CODE_VECTORS for v in vectors}
            how = ("the frame has the same shape for all of them: xendbg cannot tell which one fired"
                   if len(shapes) == 1 else "their frames differ (error code or not): xendbg cannot tell which "
                   f"fired and reads the frame as vector {vector:#x}'s")
            gdb.write(f"xendbg: cpu {cpu} entered the trap handler at {address:#x}, registered for vectors "
                      f"{listed}; {how}\n")
        else:
            gdb.write(f"xendbg: cpu {cpu} entered {watch.describe()} at {address:#x}\n")
    else:
        gdb.write(f"xendbg: cpu {cpu} entered {', '.join(w.describe() for w in watches)} at {address:#x}\n")
    # Xen bounces NMIs like events (create_bounce_frame with TBF_INTERRUPT); syscall has its own kind.
    kind = watch.kind if watch.kind != "callback" else {"nmi": "event"}.get(watch.which, watch.which)
    frame = decode_bounce_frame(target, abi, kind, target.read_register("sp"), vector=vector)
    context.write(context.text().bounce_frame(frame))
    return cpu, address, ", ".join(w.describe() for w in watches), frame

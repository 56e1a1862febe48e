"""xendbg watching a running guest: where it observes hypercalls, what the guest registered, and the
`xen catch`, `xen trace`, `xen stats` and `xen break` machinery built on that.

Hypercalls are observed by *probes*, internal gdb breakpoints whose `stop()` decodes the call and
returns False unless the user asked to stop there, so gdb resumes without a visible stop:
- guest side: at a hypercall instruction the guest issues its calls from (Linux's
  `xen_hypercall_pv`, our 32-bit guest's `xen_int82`; the number is in a register, so a gdb
  condition filters by number before Python runs), or at the entry of a hypercall-page stub (one
  probe per wanted number);
- Xen side (Xen's symbols loaded): at a handler's first instruction (`do_multicall`,
  `compat_vcpu_op`, ...), or at `pv_hypercall`, which every PV hypercall passes.
A call's result is read by a return probe where the call comes back (after the instruction, or at
the return address of a function-entry probe), matched by vCPU and stack pointer.

gdb forbids adding or deleting breakpoints inside `stop()`: when a registration moves an entry
point a `xen break` is watching, the probe stops the guest and the stop handler moves the breakpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import gdb  # type: ignore[import-not-found]

from xendbg import arch
from xendbg.abi import get_abi
from xendbg.abi.layouts import ERA_3, layout
from xendbg.decode import GuestState, Hypercall, decode_call, decode_in_xen, decode_pending
from xendbg.decode.state import apply
from xendbg.errors import TargetGone, XendbgError
from xendbg.gdb import context
from xendbg.gdb.target import GdbTarget
from xendbg.trace import Stats, TraceLog

if TYPE_CHECKING:
    from xendbg.sites import HypercallSites

# The calls that change what the guest has registered (replayed into GuestState).  Guest-side
# probes also need multicall, whose batch may register; Xen-side handler probes see batched calls
# at their own handlers, since Xen's do_multicall calls the handlers directly.
REGISTERING = ("set_trap_table", "set_callbacks", "callback_op", "set_fast_trap")
VERSION_CALL = "xen_version"  # its XENVER_version result tells `set xen abi auto` which Xen this is


@dataclass
class _Pending:
    """A call awaiting its return probe."""

    seq: int | None  # its trace record, None when only its result matters (xen_version)
    name: str
    subop: str | None
    width: int


@dataclass
class EntryWatch:
    """One `xen break`: a guest entry point, followed across re-registrations."""

    kind: str  # "callback", "trap", "fasttrap"
    which: str  # callback kind ("event", ...), vector as text, or "" for the fast trap
    vector: int | None = None
    address: int | None = None
    breakpoint: gdb.Breakpoint | None = None

    def describe(self) -> str:
        if self.kind == "callback":
            return f"the {self.which} callback"
        if self.kind == "trap":
            return f"the trap handler for vector {self.vector:#x} ({arch.vector_name(self.vector or 0)})"
        return "the fast trap"


class _Probe(gdb.Breakpoint):
    """An internal breakpoint where a hypercall is observed; see the module docstring."""

    def __init__(self, monitor: Monitor, address: int, kind: str, width: int = 64, *, nr: int | None = None,
                 function: str | None = None) -> None:
        super().__init__(f"*{address:#x}", gdb.BP_BREAKPOINT, internal=True)
        self.silent = True
        self.monitor = monitor
        self.address = address
        self.kind = kind  # "instruction", "stub", "handler", "frame"
        self.width = width  # of the guest, for guest-side probes
        self.nr = nr  # a stub's hypercall number
        self.function = function  # a Xen-side probe's function

    def stop(self) -> bool:
        return self.monitor.on_probe(self)


class _ReturnProbe(gdb.Breakpoint):
    """Where guest-side calls come back (the instruction after `syscall` / `int $0x82`)."""

    def __init__(self, monitor: Monitor, address: int) -> None:
        super().__init__(f"*{address:#x}", gdb.BP_BREAKPOINT, internal=True)
        self.silent = True
        self.monitor = monitor
        self.address = address

    def stop(self) -> bool:
        return self.monitor.on_return(self)


class _EntryBreakpoint(gdb.Breakpoint):
    """A user-visible breakpoint on a guest entry point (`xen break`)."""

    def __init__(self, monitor: Monitor, watch: EntryWatch, address: int) -> None:
        super().__init__(f"*{address:#x}", gdb.BP_BREAKPOINT)
        self.monitor = monitor
        self.watch = watch

    def stop(self) -> bool:
        self.monitor.reports.append(("entry", self.watch))
        return True


@dataclass
class Catch:
    names: frozenset[str] = frozenset()  # empty: every hypercall
    side: str = "auto"  # "auto", "guest", "xen"

    def matches(self, name: str) -> bool:
        return not self.names or name in self.names


@dataclass
class Monitor:
    states: dict[int, GuestState] = field(default_factory=dict)
    catch: Catch | None = None
    trace: TraceLog | None = None
    finished_trace: TraceLog | None = None  # the last trace stopped, for `xen trace show`
    stats: Stats = field(default_factory=Stats)
    watches: list[EntryWatch] = field(default_factory=list)
    probes: list[_Probe] = field(default_factory=list)
    returns: dict[int, _ReturnProbe] = field(default_factory=dict)
    pending: dict[tuple[int, int, int], _Pending] = field(default_factory=dict)
    reports: list[tuple[str, object]] = field(default_factory=list)
    plan: str = ""  # one line: where and how xendbg observes hypercalls now
    moves_due: bool = False

    # --- what to observe, and where ---------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.catch is not None or self.trace is not None or bool(self.watches)

    def wanted(self) -> frozenset[str] | None:
        """The hypercall names the probes must see (None: all of them)."""
        if not self.active:
            return frozenset()
        names: set[str] = set(REGISTERING) | {VERSION_CALL}
        for wanted in ([self.catch.names] if self.catch else []) + ([frozenset(self.trace.names)]
                                                                     if self.trace else []):
            if not wanted:
                return None
            names |= wanted
        return frozenset(names)

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
        sites = _guest_sites() if requested != "xen" else []
        if requested == "guest" and not sites:
            raise XendbgError(_NO_SITES)
        use_xen = requested == "xen" or (requested == "auto" and xen and (wanted is not None or not sites))
        if use_xen:
            self._plan_xen(wanted)
        elif sites:
            self._plan_guest(sites, wanted)
        else:
            raise XendbgError(_NO_SITES + " (or load Xen's symbols, xen-syms, to observe inside Xen)")
        if self.trace is not None:
            self._place_return_probes(sites or _guest_sites(), wanted)
        return self.plan

    def _place_return_probes(self, sites: list[_Site], wanted: frozenset[str] | None) -> None:
        """Results are read where calls come back to the guest (placed now: not allowed in stop())."""
        for site in sites:
            abi = context.abi_for_width(site.width)
            iret = abi.hypercall_named("iret")
            if site.kind == "page":
                shape = arch.PAGE_STUB_SHAPE[site.width]
                places = [site.address + h.nr * arch.HYPERCALL_STUB_SIZE + shape.return_offset
                          for h in abi.hypercalls() if (wanted is None or h.name in wanted) and h is not iret]
            else:  # iret never comes back
                places = [] if iret is not None and site.fixed_nr == iret.nr else [site.address + 2]
            for place in places:
                if place not in self.returns:
                    self.returns[place] = _ReturnProbe(self, place)

    def _plan_xen(self, wanted: frozenset[str] | None) -> None:
        abi = context.abi_for_width(64)
        if wanted is not None:
            placed, missing = [], []
            for name in sorted(wanted):
                found = False
                for width in (64, 32):
                    function = arch.handler_symbol(name, width)
                    address = context.address_of(function)
                    if address is not None:
                        self.probes.append(_Probe(self, address, "handler", function=function))
                        found = True
                if found:
                    placed.append(name)
                elif abi.hypercall_named(name) is not None:
                    missing.append(name)
            if missing:  # no handler symbol of its own: filter at pv_hypercall by number instead
                self._frame_probe([abi.hypercall_named(n).nr for n in missing])  # type: ignore[union-attr]
            self.plan = (f"in Xen at the handlers of {', '.join(placed)}"
                         + (f", and at {arch.XEN_HYPERCALL_ENTRY} for {', '.join(missing)}" if missing else ""))
        else:
            self._frame_probe(None)
            self.plan = f"in Xen at {arch.XEN_HYPERCALL_ENTRY} (every PV hypercall)"

    def _frame_probe(self, numbers: list[int] | None) -> None:
        address = context.address_of(arch.XEN_HYPERCALL_ENTRY)
        probe = _Probe(self, address or 0, "frame", function=arch.XEN_HYPERCALL_ENTRY)
        if numbers:
            rax = f"*(unsigned long *)($rdi + {_FRAME_RAX})"  # the guest's RAX in the frame at RDI
            probe.condition = " || ".join(f"{rax} == {n}" for n in numbers)
        self.probes.append(probe)

    def _plan_guest(self, sites: list[_Site], wanted: frozenset[str] | None) -> None:
        described = []
        for site in sites:
            abi = context.abi_for_width(site.width)
            names = wanted if wanted is not None else frozenset(h.name for h in abi.hypercalls())
            numbers = sorted(h.nr for n in names if (h := abi.hypercall_named(n)) is not None)
            if site.kind == "page":
                for nr in numbers:
                    stub = site.address + nr * arch.HYPERCALL_STUB_SIZE
                    self.probes.append(_Probe(self, stub, "stub", site.width, nr=nr))
                described.append(f"{len(numbers)} stubs of the hypercall page at {site.address:#x} ({site.label})")
                continue
            if site.fixed_nr is not None and site.fixed_nr not in numbers:
                continue  # a stub for one unwanted call (xen_iret)
            probe = _Probe(self, site.address, "instruction", site.width)
            if wanted is not None and site.fixed_nr is None:  # the number is in a register: filter in gdb
                reg = "$eax" if site.width == 32 else "$rax"
                probe.condition = " || ".join(f"{reg} == {n}" for n in numbers)
            self.probes.append(probe)
            described.append(f"the hypercall instruction at {site.address:#x} ({site.label})")
        self.plan = "in the guest at " + "; ".join(described)

    def _delete_probes(self) -> None:
        for probe in self.probes:
            if probe.is_valid():
                probe.delete()
        self.probes = []
        if self.trace is None:
            for probe in self.returns.values():
                if probe.is_valid():
                    probe.delete()
            self.returns.clear()
            self.pending.clear()

    # --- a probe was hit --------------------------------------------------------------------------

    def state(self, cpu: int) -> GuestState:
        return self.states.setdefault(cpu, GuestState())

    def _decode_at(self, probe: _Probe, target: GdbTarget, state: GuestState) -> Hypercall:
        if probe.kind in ("handler", "frame"):
            return decode_in_xen(target, probe.function or "", context.abi_for_width, state=state)
        abi = context.abi_for_width(probe.width)
        if probe.kind == "stub":
            return decode_call(target, abi, probe.nr or 0, arch.pv_args(target, probe.width), state=state,
                               site=f"at the hypercall-page stub for hypercall {probe.nr}")
        # The probe is on the instruction itself: no need to read the code at PC again.
        return decode_pending(target, abi, state=state, code_at_pc=_INSTRUCTION_BYTES[probe.width])

    def on_probe(self, probe: _Probe) -> bool:
        """Called by gdb at each probe hit; True makes gdb stop and show it."""
        try:
            cpu = context.cpu_index()
            target = GdbTarget()
            state = self.state(cpu)
            hc = self._decode_at(probe, target, state)
        except (XendbgError, gdb.error) as exc:
            where = f"probe at {probe.address:#x}"
            if self.trace is not None:  # logged, not lost: the record says what could not be read
                self.trace.error(_cpu_or_unknown(), where, str(exc))
            if isinstance(exc, (TargetGone, gdb.error)):
                return True  # the target is going away: resuming it makes gdb 13 fail an assertion
            if self.catch is not None:
                self.reports.append(("error", f"xendbg: cannot decode the hypercall at the {where}: {exc}"))
                return True
            return False
        name = hc.display_name
        traced = self.trace is not None and (not self.trace.names or name in self.trace.names)
        if not (probe.kind == "handler" and hc.name == "multicall"):
            # Xen-side, a batch's calls reach their own handler probes: replay them there, not twice.
            if apply(state, get_abi(hc.generation, hc.width), hc):
                self.moves_due = self.moves_due or self._entries_moved()
        if self.trace is not None and traced:
            self.stats.count_call(hc)
            seq = self.trace.call(cpu, hc, "xen" if probe.kind in ("handler", "frame") else "guest")
            self._await_return(probe, target, cpu, hc, seq)
        elif hc.name == VERSION_CALL and hc.subop == "XENVER_version":
            self._await_return(probe, target, cpu, hc, None)
        stop = self.catch is not None and self.catch.matches(name)
        if stop:
            self.reports.append(("catch", (cpu, hc)))
        if self.moves_due and not stop:
            self.reports.append(("moved", None))
            stop = True
        return stop

    def _return_key(self, probe: _Probe, target: GdbTarget, cpu: int) -> tuple[int, int, int] | None:
        """(vCPU, where the call comes back to the guest, the guest's stack pointer then)."""
        if probe.kind == "instruction":
            return cpu, probe.address + 2, target.read_register("sp")
        if probe.kind == "stub":
            shape = arch.PAGE_STUB_SHAPE[probe.width]
            return cpu, probe.address + shape.return_offset, target.read_register("sp") - shape.pushed
        if probe.kind == "frame":
            frame = target.read_register("rdi")
            data = target.read_memory(frame + _FRAME_RIP, _FRAME_RSP + 8 - _FRAME_RIP)
            rip = int.from_bytes(data[:8], "little")
            rsp = int.from_bytes(data[_FRAME_RSP - _FRAME_RIP:], "little")
            return cpu, rip, rsp
        return None  # a handler: called from Xen's dispatcher or a multicall; no guest frame at hand

    def _await_return(self, probe: _Probe, target: GdbTarget, cpu: int, hc: Hypercall, seq: int | None) -> None:
        key = self._return_key(probe, target, cpu)
        if key is None or key[1] not in self.returns:
            return
        earlier = self.pending.pop(key, None)
        if earlier is not None and earlier.seq is not None and self.trace is not None:
            # Entered again from the same place before coming back: Xen preempted the call and the
            # guest re-issues it as a continuation (with its arguments advanced).
            self.trace.preempted(cpu, earlier.seq, earlier.name)
        self.pending[key] = _Pending(seq, hc.display_name, hc.subop, hc.width)

    def on_return(self, probe: _ReturnProbe) -> bool:
        """Called by gdb where guest-side calls come back; never stops."""
        try:
            cpu = context.cpu_index()
            target = GdbTarget()
            call = self.pending.pop((cpu, probe.address, target.read_register("sp")), None)
            if call is None:
                return False
            result = arch.read_result(target, call.width)
            if call.name == VERSION_CALL and call.subop == "XENVER_version" and result > 0:
                context.SETTINGS.reported_version = f"{result >> 16}.{result & 0xFFFF}"
            if call.seq is not None and self.trace is not None:
                self.trace.result(cpu, call.seq, call.name, result)
                self.stats.count_result(call.name, result)
        except (XendbgError, gdb.error) as exc:
            if self.trace is not None:
                self.trace.error(_cpu_or_unknown(), f"return probe at {probe.address:#x}", str(exc))
            return isinstance(exc, (TargetGone, gdb.error))  # as in on_probe
        return False

    # --- entry points followed across registrations ------------------------------------------------

    def _entry_address(self, watch: EntryWatch) -> int | None:
        """Where `watch` points now: the most recent registration on any vCPU (Linux registers the
        same handlers on each)."""
        found = None
        for state in self.states.values():
            if watch.kind == "callback" and watch.which in state.callbacks:
                found = state.callbacks[watch.which].address or found
            elif watch.kind == "trap" and watch.vector in state.trap_table:
                found = state.trap_table[watch.vector].address or found
            elif watch.kind == "fasttrap" and state.fast_trap and state.fast_trap.handler:
                found = state.fast_trap.handler.address
        return found

    def _entries_moved(self) -> bool:
        return any(self._entry_address(w) != w.address for w in self.watches)

    def move_entries(self) -> list[str]:
        """Put each `xen break` breakpoint where its entry point now is (outside stop())."""
        notes = []
        for watch in self.watches:
            address = self._entry_address(watch)
            if address == watch.address:
                continue
            if watch.breakpoint is not None and watch.breakpoint.is_valid():
                watch.breakpoint.delete()
            watch.breakpoint = _EntryBreakpoint(self, watch, address) if address else None
            watch.address = address
            if watch.breakpoint is not None:
                notes.append(f"xendbg: breakpoint {watch.breakpoint.number} now on {watch.describe()} "
                             f"at {address:#x}")
        self.moves_due = False
        return notes

    def add_watch(self, watch: EntryWatch) -> str:
        self.watches.append(watch)
        self.replan()
        self.move_entries()
        if watch.breakpoint is not None:
            return (f"Breakpoint {watch.breakpoint.number} on {watch.describe()} at {watch.address:#x}; "
                    f"it follows re-registrations")
        return (f"xendbg has not seen the guest register {watch.describe()} yet: the breakpoint is set "
                f"when it does (observing {self.plan})")

    def remove_watches(self) -> int:
        count = len(self.watches)
        for watch in self.watches:
            if watch.breakpoint is not None and watch.breakpoint.is_valid():
                watch.breakpoint.delete()
        self.watches.clear()
        self.replan()
        return count


_INSTRUCTION_BYTES = {32: b"\xcd\x82", 64: b"\x0f\x05"}  # int $0x82, syscall

# Xen's saved guest frame is the 64-bit struct cpu_user_regs (abi/layouts.py): Xen itself is 64-bit.
_FRAME = layout("cpu_user_regs", 64, ERA_3)
_FRAME_RAX, _FRAME_RIP, _FRAME_RSP = (_FRAME.field(name).offset for name in ("rax", "rip", "rsp"))

_NO_SITES = ("xendbg found nowhere in the loaded symbol files that the guest issues hypercalls (no "
             "hypercall page, xen_hypercall_pv or int $0x82 site): load the guest kernel with `file`")


def _cpu_or_unknown() -> int:
    try:
        return context.cpu_index()
    except XendbgError:
        return -1


_SITES_CACHE: dict[tuple[str, float], HypercallSites] = {}  # by (path, mtime)


@dataclass(frozen=True)
class _Site:
    """A place the loaded guest issues hypercalls from."""

    kind: str  # "page" (a hypercall page: one stub per number) or "instruction"
    address: int
    width: int
    label: str  # how xendbg found it, for the user
    fixed_nr: int | None = None  # a stub that only ever makes this hypercall (Linux's xen_iret)


def _guest_sites() -> list[_Site]:
    """Every place the guest files gdb has loaded issue hypercalls from."""
    import os

    from xendbg.sites import find_hypercall_sites

    found = []
    for objfile in gdb.objfiles():
        path = objfile.filename
        if not path:
            continue
        try:
            key = (path, os.stat(path).st_mtime)
            if key not in _SITES_CACHE:  # a vmlinux takes ~0.1 s to scan: once per file
                _SITES_CACHE[key] = find_hypercall_sites(path)
        except (OSError, XendbgError):
            continue
        sites = _SITES_CACHE[key]
        if sites.hypercall_page is not None:
            found.append(_Site("page", sites.hypercall_page, sites.width, f"by {sites.page_source}"))
        for site in sites.inline:
            found.append(_Site("instruction", site.instruction, sites.width, f"{site.name}, by {site.source}",
                               site.nr))
    return found


MONITOR = Monitor()


def on_stop(event: object) -> None:
    """Print what the probes and entry breakpoints saved for the user, and move entry breakpoints."""
    reports, MONITOR.reports = MONITOR.reports, []
    notes = MONITOR.move_entries() if MONITOR.moves_due or any(k == "moved" for k, _ in reports) else []
    try:
        for kind, payload in reports:
            if kind == "catch":
                cpu, hc = payload  # type: ignore[misc]
                gdb.write(f"xendbg: cpu {cpu} caught hypercall {hc.display_name} ({hc.site})\n")
                context.write(context.text().hypercall(hc))
            elif kind == "entry":
                _report_entry(payload)  # type: ignore[arg-type]
            elif kind == "error":
                gdb.write(f"{payload}\n")
        for note in notes:
            gdb.write(note + "\n")
        if any(k == "moved" for k, _ in reports):
            gdb.write("xendbg: stopped so that gdb could move the breakpoint; continue to go on\n")
    except (XendbgError, gdb.error) as exc:
        gdb.write(f"xendbg: {exc}\n")


def _report_entry(watch: EntryWatch) -> None:
    from xendbg.decode.bounce import decode_bounce_frame

    target = GdbTarget()
    cpu = context.cpu_index()
    abi = context.current_abi(target)
    gdb.write(f"xendbg: cpu {cpu} entered {watch.describe()} at {watch.address:#x}\n")
    # Xen bounces NMIs like events (create_bounce_frame with TBF_INTERRUPT); syscall has its own kind.
    kind = watch.kind if watch.kind != "callback" else {"nmi": "event"}.get(watch.which, watch.which)
    frame = decode_bounce_frame(target, abi, kind, target.read_register("sp"),
                                vector=watch.vector if watch.kind != "callback" else None)
    context.write(context.text().bounce_frame(frame))

"""`xen trace start --buffers` and `xen trace enable`: Xen's own trace buffers read through gdb.

The buffers are drained (xendbg/xentrace) at every stop the user sees and, while the guest runs, on a
timer (`set xen trace-interval`, default 0.5 s) that interrupts the target briefly: a `catch signal
SIGINT` whose condition drains the buffers and says "go on" when the interrupt was the timer's, so
gdb resumes the guest without a visible stop (a Ctrl-C of the user's still stops).  No breakpoint is
ever placed on Xen's trace code (a breakpoint sharing a page with `__insert_record` slows QEMU down).

xendbg's only writes to target memory: the consumer index `cons` of each CPU's buffer (so that Xen
can reuse the space it read), and with `xen trace enable` Xen's boot options opt_tbuf_size and
opt_tevt_mask.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import gdb

from xendbg import arch
from xendbg.abi import Abi
from xendbg.errors import TargetError, UsageError, XendbgError
from xendbg.gdb import context
from xendbg.gdb.target import GdbTarget
from xendbg.session import AbiChoice
from xendbg.trace import Stats, TraceLog
from xendbg.xentrace import events as ev
from xendbg.xentrace.buffers import TraceBuffers
from xendbg.xentrace.merge import BufferFeed, records_abi
from xendbg.xentrace.xtfile import XentraceWriter

DEFAULT_INTERVAL = 0.5
SYS_STATE_ACTIVE = 3  # enum system_state (xen/include/xen/kernel.h, RELEASE-4.17.0): boot is over
_FUNCTION = "_xendbg_xentrace_tick"


def _physical(address: int, size: int) -> bytes:
    """Machine memory through QEMU's gdbstub (Qqemu.PhyMemMode): for a direct map not mapped now (XPTI)."""
    gdb.execute("maintenance packet Qqemu.PhyMemMode:1", to_string=True)
    try:
        return bytes(gdb.selected_inferior().read_memory(address, size))
    except gdb.MemoryError:
        from xendbg.errors import UnreadableMemory

        raise UnreadableMemory(address, size, "machine memory") from None
    finally:
        gdb.execute("maintenance packet Qqemu.PhyMemMode:0", to_string=True)


def _write(address: int, data: bytes) -> None:
    gdb.selected_inferior().write_memory(address, data)


def xen_width() -> int:
    """Xen's word size in bits, from the architecture gdb debugs it with: 64 for x86_64 Xen, 32 for a
    32-bit one (shim32)."""
    return 64 if "64" in gdb.selected_inferior().architecture().name() else 32


_stack_base: list[int | None] = [None]  # Xen's stack_base[], looked up when the trace starts


def guest_selectors() -> list[tuple[int, str]]:
    """The code selectors the vCPUs show now, read without switching threads (a drain may run inside a
    breakpoint's stop() or condition): the selected vCPU's CS, then per CPU the CS of the guest frame Xen
    saved there (cpu_info's guest_cpu_user_regs, xen-syms loaded)."""
    found: list[tuple[int, str]] = []
    target = GdbTarget()
    try:
        found.append((int(gdb.parse_and_eval("$cs")) & 0xFFFF, "the selected vCPU's CS"))
        stack_base = _stack_base[0]
        for cpu in range(len(gdb.selected_inferior().threads()) if stack_base is not None else 0):
            frame = arch.cpu_guest_frame_address(target, stack_base or 0, cpu)
            if frame is not None:
                saved = arch.frame_code_selector(target.read_memory(frame, arch.xen_frame_size()))
                found.append((saved, f"the guest frame Xen saved on CPU {cpu}"))
    except (gdb.error, XendbgError):
        pass  # a running target, an unreadable frame: what was found stands
    return found


def _abi_at_drain() -> tuple[Abi, AbiChoice]:
    """The ABI that names a drain's records, of the guest's width as the vCPUs show it now."""
    return records_abi(context.abi_for, guest_selectors(), xen_width())


def _buffers(physical: Callable[[int, int], bytes] | None = None) -> TraceBuffers:
    return TraceBuffers(GdbTarget(), context.SYMBOLS, physical, xen_width())


@dataclass
class BufferTrace:
    """One `xen trace start --buffers`: the buffers, the feed into the trace log, the timer."""

    log: TraceLog
    feed: BufferFeed
    out: XentraceWriter | None = None
    interval: float = DEFAULT_INTERVAL
    buffers: TraceBuffers | None = None
    waiting: str = ""  # why the buffers could not be read yet (not allocated: Xen has not booted that far)
    drains: int = 0
    catchpoint: gdb.Breakpoint | None = None
    tick_pending: bool = False
    # The timer posts an event to gdb only while the target runs, and one at a time: an event still
    # queued when gdb exits is destroyed after Python is finalized, and gdb 13 crashes at exit.
    running: bool = False
    posted: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def drain(self) -> int:
        """Read what Xen wrote since the last drain (the target is stopped); returns records logged."""
        if self.buffers is None:
            self.buffers = _buffers(_physical)
        try:
            if not self.buffers.cpus:
                if not self.buffers.allocated():
                    size, mask = self.buffers.options()
                    self.waiting = (f"Xen's trace buffers are not allocated (yet): opt_tbuf_size={size}, "
                                    f"tevt_mask={mask:#x}")
                    return 0
                self.buffers.locate()
                self.waiting = ""
            per_cpu = self.buffers.drain(_write)
        except TargetError as exc:
            self.waiting = f"cannot read Xen's trace buffers now: {exc}"
            return 0
        self.drains += 1
        if self.out is not None:
            self.out.write(per_cpu)
        return self.feed.feed(per_cpu)

    # --- the timer ------------------------------------------------------------------------------

    def _catch(self) -> None:
        """The SIGINT catchpoint, (re)created: a user's `delete` removes it like any other."""
        if self.catchpoint is not None and self.catchpoint.is_valid():
            return
        gdb.execute("catch signal SIGINT", to_string=True)
        self.catchpoint = gdb.breakpoints()[-1]
        self.catchpoint.silent = True
        self.catchpoint.condition = f"${_FUNCTION}()"

    def start_timer(self) -> None:
        self._catch()
        try:
            thread = gdb.selected_thread()
            self.running = thread is not None and thread.is_running()
        except gdb.error:
            self.running = False
        self._thread = threading.Thread(target=self._tick_loop, name="xendbg-xentrace", daemon=True)
        self._thread.start()

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.interval):
            if self.running and not self.posted:
                self.posted = True
                gdb.post_event(self._tick)

    def _tick(self) -> None:
        """In gdb's thread: interrupt a running target, so the catchpoint's condition drains."""
        self.posted = False
        try:
            thread = gdb.selected_thread()
            if thread is None or not thread.is_running() or self.tick_pending:
                return
            self._catch()
            self.tick_pending = True
            gdb.execute("interrupt", to_string=True)
        except gdb.error:
            self.tick_pending = False

    def on_interrupt(self) -> bool:
        """The SIGINT catchpoint's condition: drain; stop only for an interrupt that was not the timer's."""
        ours, self.tick_pending = self.tick_pending, False
        try:
            self.drain()
        except XendbgError as exc:
            gdb.write(f"xendbg: trace buffers: {exc}\n")
        return not ours

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)  # no thread may post to gdb once it is exiting
        if self.catchpoint is not None and self.catchpoint.is_valid():
            self.catchpoint.delete()
        self.catchpoint = None
        if self.out is not None:
            self.out.close()


class _TickFunction(gdb.Function):
    """$_xendbg_xentrace_tick(): the timer's catchpoint condition (1: stop, 0: resume)."""

    def __init__(self) -> None:
        super().__init__(_FUNCTION)

    def invoke(self) -> int:
        trace = ACTIVE.trace
        return int(trace.on_interrupt()) if trace is not None else 1


@dataclass
class Active:
    trace: BufferTrace | None = None
    interval: float = DEFAULT_INTERVAL


ACTIVE = Active()
_registered = False


def _on_continue(event: object) -> None:
    if ACTIVE.trace is not None:
        ACTIVE.trace.running = True


def _on_stop(event: object) -> None:
    trace = ACTIVE.trace
    if trace is None:
        return
    trace.running = False
    try:
        trace.drain()
    except XendbgError as exc:
        gdb.write(f"xendbg: trace buffers: {exc}\n")


def start(log: TraceLog, stats: Stats, only_hypercalls: bool, detail: frozenset[str], out_file: str | None) -> str:
    """Start draining; returns the line to print."""
    global _registered
    if ACTIVE.trace is not None:
        raise UsageError("a buffer trace is already running: xen trace stop first")
    buffers = _buffers(_physical)  # a one-line error naming the symbols when xen-syms is not loaded
    # The records do not say the guest's width: it comes from the vCPUs at each drain (guest_selectors),
    # as the generation does from its evidence.
    _stack_base[0] = context.address_of("stack_base")
    feed = BufferFeed(log, stats, _abi_at_drain, only_hypercalls, detail)
    trace = BufferTrace(log, feed, XentraceWriter(out_file) if out_file else None, ACTIVE.interval)
    trace.buffers = buffers
    if not _registered:
        _TickFunction()
        gdb.events.stop.connect(_on_stop)
        gdb.events.cont.connect(_on_continue)
        gdb.events.gdb_exiting.connect(lambda event: stop())
        _registered = True
    ACTIVE.trace = trace
    try:
        trace.drain()
    except XendbgError:
        pass  # not stopped, or Xen not booted: the next drain tries again
    trace.start_timer()
    state = trace.waiting or f"{len(trace.buffers.cpus)} CPUs' buffers of {trace.buffers.pages} pages"
    return (f"reading Xen's trace buffers ({state}) at every stop and every {trace.interval:g} s; "
            f"xendbg advances each buffer's consumer index as it reads")


def stop() -> BufferTrace | None:
    trace, ACTIVE.trace = ACTIVE.trace, None
    if trace is None:
        return None
    try:
        trace.drain()
    except XendbgError:
        pass
    trace.stop()
    return trace


# --- xen trace enable ---------------------------------------------------------------------------


class _EnableAtInit(gdb.Breakpoint):
    """At init_trace_bufs: set the boot options and go on (it runs once, at boot)."""

    def __init__(self, address: int, pages: int, mask: int) -> None:
        super().__init__(f"*{address:#x}", gdb.BP_BREAKPOINT, internal=True)
        self.silent = True
        self.pages, self.mask = pages, mask

    def stop(self) -> bool:
        try:
            _set_options(self.pages, self.mask)
        except (XendbgError, gdb.error) as exc:
            gdb.write(f"xendbg: could not set Xen's trace options at init_trace_bufs: {exc}\n")
        self.enabled = False
        return False


def _set_options(pages: int, mask: int) -> None:
    syms = _buffers().syms
    _write(syms["opt_tbuf_size"], struct.pack("<I", pages))
    _write(syms["opt_tevt_mask"], struct.pack("<I", mask))


def enable(pages: int, mask: int) -> str:
    """`xen trace enable`: set opt_tbuf_size/opt_tevt_mask at init_trace_bufs (now when stopped there,
    else when Xen gets there); when Xen is past it, say which command-line options to add."""
    if not 1 <= pages <= 0xFFFF:
        raise UsageError(f"--pages {pages}: give 1 to 65535 pages per CPU")
    if not 0 < mask <= ev.TRC_ALL | 0xFFF:
        raise UsageError(f"--mask {mask:#x} is not a trace event mask (e.g. {ev.TRC_PV:#010x}, the PV class)")
    buffers = _buffers()
    hint = f"tbuf_size={pages} tevt_mask={mask:#010x}"
    init = buffers.syms["init_trace_bufs"]
    try:
        if buffers.allocated():
            size, current = buffers.options()
            return f"Xen's trace buffers are allocated already ({size} pages per CPU, mask {current:#x})"
        state = context.address_of("system_state")
        if state is not None and buffers._u(state, 4) >= SYS_STATE_ACTIVE:
            raise UsageError(f"Xen has booted past init_trace_bufs without trace buffers: boot it with {hint} "
                             f"on its command line (or `xen trace enable` before it boots)")
    except TargetError:
        pass  # Xen is not in memory yet (stopped at reset): set the options when it gets there
    try:
        pc = int(gdb.parse_and_eval("$pc")) & (1 << 64) - 1
    except gdb.error:
        pc = None
    if pc == init:
        _set_options(pages, mask)
        return f"Xen's trace options set ({hint}): init_trace_bufs allocates the buffers now"
    _EnableAtInit(init, pages, mask)
    return (f"xendbg sets Xen's trace options ({hint}) when Xen reaches init_trace_bufs; if Xen is past it "
            f"already, boot Xen with {hint} instead")


# --- what the xen trace commands call -------------------------------------------------------------


def start_command(flags: dict[str, str], words: list[str], resolve: Callable[[str], str]) -> str:
    """`xen trace start --buffers [--only hypercalls] [--detail NAMES] [--file F] [--xentrace-out F]`."""
    from xendbg.gdb import monitor

    if words:
        raise UsageError("xen trace start --buffers traces every call Xen records; name calls for full "
                         "decodes with --detail NAMES")
    only = flags.get("--only")
    if only not in (None, "hypercalls"):
        raise UsageError(f"--only {only}: the one filter is --only hypercalls (drops trap, fault and privop records)")
    detail = tuple(sorted({resolve(w) for w in flags.get("--detail", "").replace(",", " ").split()}))
    if monitor.MONITOR.trace is not None or ACTIVE.trace is not None:
        raise UsageError("a trace is already running: xen trace stop first")
    log = TraceLog(flags.get("--file"), detail)
    stats = Stats()
    line = start(log, stats, only == "hypercalls", frozenset(detail), flags.get("--xentrace-out"))
    monitor.MONITOR.stats = stats
    if detail:
        monitor.MONITOR.trace = log
        monitor.MONITOR.before_probe = _drain_quietly
        try:
            plan = monitor.MONITOR.replan()
        except XendbgError:
            monitor.MONITOR.trace = monitor.MONITOR.before_probe = None
            stop()
            log.close()
            monitor.MONITOR.replan()
            raise
        line += f"; full decodes of {', '.join(detail)} from {plan}"
    else:
        monitor.MONITOR.finished_trace = log  # `xen trace show` reads it; no probe is placed
    return line


def _drain_quietly() -> None:
    """Before a --detail probe's record: the records Xen wrote before the call (CPU and TSC order)."""
    trace = ACTIVE.trace
    if trace is not None:
        try:
            trace.drain()
        except XendbgError:
            pass


def stop_command() -> str | None:
    """`xen trace stop` for a buffer trace: the last drain, then the summary line (None: none running)."""
    from xendbg.gdb import monitor

    trace = stop()
    if trace is None:
        return None
    monitor.MONITOR.before_probe = None
    if monitor.MONITOR.trace is trace.log:
        monitor.MONITOR.stop_trace()
    else:
        trace.log.close()
        monitor.MONITOR.finished_trace = trace.log
    return summary(trace)


def summary(trace: BufferTrace) -> str:
    feed = trace.feed
    out = (f"{trace.log.summary()}; {feed.records} hypercall and subcall records from Xen's buffers in "
           f"{trace.drains} drains, {feed.lost} records lost")
    if trace.out is not None:
        out += f"; {trace.out.records} records in xentrace format to {trace.out.path}"
    if trace.waiting:
        out += f" ({trace.waiting})"
    return out

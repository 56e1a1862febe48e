"""From per-CPU records to one trace: CPUs merged by TSC, preempted calls folded into the calls Xen
continues, lost records as gaps, and the trace log / `xen stats` fed as the probe trace feeds them.

A call Xen preempts comes back as a new HYPERCALL_V2 record with its arguments advanced (Xen re-enters
it through the guest: hypercall_create_continuation, xen/arch/x86/hypercall.c at RELEASE-4.17.0).  The
buffers hold no pointers, so a record continues the same CPU's previous call only when what Xen records
says so: mmu_update/mmuext_op with the preempted bit in the count (as observe.is_continuation), or a
multicall whose count went down by at most the subcalls run since.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from xendbg import arch
from xendbg.abi import Abi
from xendbg.decode.model import Hypercall
from xendbg.observe import PREEMPTED_COUNT_BIT
from xendbg.session import AbiChoice, annotate
from xendbg.trace import Stats, TraceLog
from xendbg.xentrace import events as ev
from xendbg.xentrace.records import CallRecord, Lost, Record, call_of, hypercall_of, lost_of

SOURCE = "xen-buffers"
_COUNTED = {"mmu_update", "mmuext_op"}


def merge(per_cpu: dict[int, list[Record]]) -> list[Record]:
    """One sequence ordered by TSC (ties by CPU); a record without a TSC keeps its CPU's last TSC."""
    streams = []
    for cpu, records in sorted(per_cpu.items()):
        last = 0
        keyed = []
        for i, record in enumerate(records):
            last = record.tsc if record.tsc is not None else last
            keyed.append((last, cpu, i, record))
        streams.append(keyed)
    return [item[3] for item in heapq.merge(*streams)]


_DECODED_CACHE = 4096  # distinct calls remembered decoded
LOOKAHEAD = 1 << 17  # records a stream merge holds at most (about 25 MiB)


class StreamMerge:
    """merge() over a stream of (cpu, records) as a xentrace file delivers them, in bounded memory.

    A record is let out once every CPU seen has written a later TSC (Xen's TSCs grow on each CPU), and
    only after xentrace's first pass over the CPUs (a CPU's second window, or the end of the file),
    so that every CPU of the trace has been seen; at the end of the stream the rest follow as merge()
    orders them.  No more than LOOKAHEAD records wait: beyond that the earliest is let out anyway,
    and a record that then comes after a later one is counted in `late` (the caller says so)."""

    def __init__(self, chunks: Iterable[tuple[int, list[Record]]], lookahead: int = LOOKAHEAD) -> None:
        self.chunks = chunks
        self.lookahead = lookahead
        self.late = 0

    def __iter__(self) -> Iterator[Record]:
        queues: dict[int, deque[tuple[tuple[int, int, int], Record]]] = {}
        heads: list[tuple[tuple[int, int, int], int]] = []  # the key of each non-empty queue's first record
        last: dict[int, int] = {}  # each CPU's latest TSC
        count: dict[int, int] = {}  # records seen per CPU (merge()'s tie-break)
        waiting = 0
        first_pass, previous_cpu = True, None
        shown: tuple[int, int, int] | None = None

        def pop() -> Record:
            nonlocal waiting, shown
            key, cpu = heapq.heappop(heads)
            queue = queues[cpu]
            _, record = queue.popleft()
            if queue:
                heapq.heappush(heads, (queue[0][0], cpu))
            waiting -= 1
            if shown is not None and key < shown:
                self.late += 1
            else:
                shown = key
            return record

        for cpu, records in self.chunks:
            if cpu != previous_cpu and cpu in queues:
                first_pass = False  # a CPU comes round again: xentrace's first pass is over
            previous_cpu = cpu
            queue = queues.setdefault(cpu, deque())
            was_empty = not queue
            tsc, i = last.get(cpu, 0), count.get(cpu, 0)
            for record in records:
                tsc = record.tsc if record.tsc is not None else tsc
                queue.append(((tsc, cpu, i), record))
                i += 1
            last[cpu], count[cpu] = tsc, i
            waiting += len(records)
            if was_empty and queue:
                heapq.heappush(heads, (queue[0][0], cpu))
            horizon = None if first_pass else min(last.values())
            while heads and (waiting > self.lookahead or (horizon is not None and heads[0][0][0] < horizon)):
                yield pop()
        while heads:
            yield pop()

    def warning(self, name: str) -> str | None:
        if not self.late:
            return None
        return (f"{name}: {self.late} records came after records with a later TSC had been shown: xendbg orders "
                f"the CPUs' records by TSC over at most {self.lookahead} records at a time")


@dataclass
class Event:
    """A record of the merged trace, interpreted."""

    record: Record
    kind: str  # "call", "subcall", "gap", "pv", "sched", "other" (wrap and CPU-change records are dropped)
    call: CallRecord | None = None
    lost: Lost | None = None
    continues: bool = False  # a call: Xen's continuation of the CPU's previous call


@dataclass
class Folder:
    """Tells continuations from new calls, per CPU, across drains."""

    last: dict[int, CallRecord] = field(default_factory=dict)
    subcalls: dict[int, int] = field(default_factory=dict)  # subcalls since the CPU's last call

    def events(self, records: Iterable[Record], abi: Abi) -> list[Event]:
        out: list[Event] = []
        for record in records:
            if record.event in (ev.WRAP_BUFFER, ev.CPU_CHANGE):
                continue
            call = call_of(record)
            if call is not None and call.subcall:
                self.subcalls[record.cpu] = self.subcalls.get(record.cpu, 0) + 1
                out.append(Event(record, "subcall", call))
            elif call is not None:
                earlier = self.last.get(record.cpu)
                continues = earlier is not None and self._continues(earlier, call, record.cpu, abi)
                self.last[record.cpu] = call
                self.subcalls[record.cpu] = 0
                out.append(Event(record, "call", call, continues=continues))
            elif record.event == ev.LOST_RECORDS:
                out.append(Event(record, "gap", lost=lost_of(record)))
                self.last.pop(record.cpu, None)  # what came before the gap is unknown
            else:
                out.append(Event(record, {"pv": "pv", "sched": "sched"}.get(ev.event_class(record.event), "other")))
        return out

    def _continues(self, earlier: CallRecord, now: CallRecord, cpu: int, abi: Abi) -> bool:
        if earlier.op != now.op:
            return False
        name = hypercall_of(now, abi).name
        if name in _COUNTED:
            return bool((now.arg(1) or 0) & PREEMPTED_COUNT_BIT)
        if name == "multicall":
            before, after = earlier.arg(1), now.arg(1)
            done = self.subcalls.get(cpu, 0)
            return before is not None and after is not None and 0 < before - after <= done
        return False


def describe(event: Event, abi: Abi) -> dict[str, Any]:
    """The JSON of a non-call record: its name, class, TSC and fields (docs/json-schema.md)."""
    r = event.record
    out: dict[str, Any] = {"event": "xen", "source": SOURCE, "cpu": r.cpu, "tsc": r.tsc, "name": r.name,
                           "class": ev.event_class(r.event), "id": r.event}
    fields = ev.pv_fields(r.event, r.words)
    if fields:
        out["fields"] = fields
    elif r.words:
        out["words"] = list(r.words)
    return out


def records_abi(abi_for: Callable[[int], tuple[Abi, AbiChoice]], selectors: Iterable[tuple[int, str]],
                xen_width: int) -> tuple[Abi, AbiChoice]:
    """The ABI that names buffer records, whose hypercall records do not say the guest's width: the width
    of the first PV guest code selector among `selectors` ((selector, where it was read)), else Xen's own
    width, said as a guess in each record."""
    for selector, _where in selectors:
        width = arch.cpu_mode(selector).width
        if width is not None and selector & 3:
            return abi_for(width)
    abi, choice = abi_for(xen_width)
    guess = f"no vCPU shows a PV guest's code selector: the guest's width is a guess ({abi.width}-bit, Xen's)"
    return abi, replace(choice, warning=f"{choice.warning}; {guess}" if choice.warning else guess)


class BufferFeed:
    """Feeds merged records into a TraceLog and Stats as the probe trace does: a `call` record per
    hypercall (source "xen-buffers", with its TSC; `continues` for a continuation), subcalls counted as
    batched calls and logged as `subcall` records, LOST_RECORDS as `gap` records; other PV and scheduler
    records as `xen` records unless `only_hypercalls`.  Calls named in `skip` are left to probes
    (`--detail`).  `abi()` gives the ABI to name the calls with and why (each call says so, and carries
    the warning when it is a guess)."""

    def __init__(self, log: TraceLog, stats: Stats, abi: Callable[[], tuple[Abi, AbiChoice]],
                 only_hypercalls: bool = False, skip: frozenset[str] = frozenset()) -> None:
        self.log = log
        self.stats = stats
        self.abi = abi
        self.only_hypercalls = only_hypercalls
        self.skip = skip
        self.folder = Folder()
        self.records = 0  # hypercall and subcall records read
        self.lost = 0  # records Xen reported lost
        self.open: dict[int, int] = {}  # CPU -> seq of its last call, for continuations
        self._cache: dict[CallRecord, tuple[Hypercall, str, dict[str, Any]]] = {}
        self._cache_for: tuple[Abi, AbiChoice] | None = None

    def feed(self, per_cpu: dict[int, list[Record]]) -> int:
        """Log the records of one drain; returns how many trace records it wrote."""
        abi, choice = self.abi()
        written = 0
        for event in self.folder.events(merge(per_cpu), abi):
            written += self._one(event, abi, choice)
        return written

    def feed_stream(self, records: Iterable[Record]) -> Iterator[None]:
        """Log merged records one at a time (a xentrace file read as a stream), yielding after each so
        that the caller can take what was logged."""
        abi, choice = self.abi()
        for record in records:
            for event in self.folder.events((record,), abi):
                self._one(event, abi, choice)
            yield

    def _one(self, event: Event, abi: Abi, choice: AbiChoice) -> int:
        r = event.record
        if event.kind == "gap":
            lost = event.lost
            count = lost.count if lost else 0
            self.lost += count
            self.open.pop(r.cpu, None)
            self.log.add({"event": "gap", "source": SOURCE, "cpu": r.cpu, "tsc": r.tsc, "lost": count,
                            "first_tsc": lost.first_tsc if lost else None})
            return 1
        if event.call is None:
            if self.only_hypercalls:
                return 0
            self.log.add(describe(event, abi))
            return 1
        self.records += 1
        hc, line, as_json = self._decoded(event.call, abi, choice)
        if hc.display_name in self.skip:
            return 0
        if event.kind == "subcall":
            self.stats.batched[hc.display_name] += 1
            self.log.add({"event": "subcall", "source": SOURCE, "cpu": r.cpu, "tsc": r.tsc, "name": hc.name,
                            "nr": hc.nr, "line": line, "in": self.open.get(r.cpu),
                            "recorded": [list(a) for a in event.call.args]})
            return 1
        earlier = self.open.get(r.cpu) if event.continues else None
        if earlier is not None:
            self.log.preempted(r.cpu, earlier, hc.display_name)
        else:
            self.stats.count_call(hc)
        seq = _call(self.log, r, hc, earlier, event.call, line, as_json)
        self.open[r.cpu] = seq
        return 1

    def _decoded(self, call: CallRecord, abi: Abi, choice: AbiChoice) -> tuple[Hypercall, str, dict[str, Any]]:
        """The call named, its strace line and its JSON, once per distinct record: a trace repeats the same
        few calls millions of times.  The JSON is shared by the records of equal calls (never changed)."""
        if self._cache_for != (abi, choice) or len(self._cache) > _DECODED_CACHE:
            self._cache, self._cache_for = {}, (abi, choice)
        found = self._cache.get(call)
        if found is None:
            from xendbg.render import json as render_json

            hc = annotate(hypercall_of(call, abi), choice)
            found = self._cache[call] = (hc, _line(hc), render_json.hypercall(hc))
        return found


def _line(hc: Hypercall) -> str:
    from xendbg.trace import call_line

    return call_line(hc)


def _call(log: TraceLog, record: Record, hc: Hypercall, continues: int | None, call: CallRecord, line: str,
          as_json: dict[str, Any]) -> int:
    """A `call` record with the buffer's source and TSC (the probe trace's keys, plus these two)."""
    log.seq += 1
    log.calls += 1 if continues is None else 0
    out: dict[str, Any] = {"event": "call", "seq": log.seq, "cpu": record.cpu, "where": "xen", "name": hc.name,
                           "nr": hc.nr, "line": line, "hypercall": as_json,
                           "source": SOURCE, "tsc": record.tsc, "recorded": [list(a) for a in call.args]}
    if continues is not None:
        out["continues"] = continues
    log.add(out)
    return log.seq

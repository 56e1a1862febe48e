"""Hypercall tracing, front-end independent: records, the JSONL log, strace-style lines, `xen stats`.

A call is logged twice: a `call` record when the vCPU enters the hypercall (decoded arguments) and a
`return` record when it comes back (result and errno name), or `preempted` when Xen interrupted it
and will re-enter it as a continuation.  Each record is written and flushed as it happens, so a
target that dies mid-run loses nothing that was seen.  The record format is in docs/json-schema.md.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from xendbg.abi import errno_name, result_text
from xendbg.decode.model import Hypercall, MulticallBatch
from xendbg.errors import UsageError
from xendbg.render import json as render_json

TRACE_SCHEMA = 1
RECENT_RECORDS = 1000  # what `xen trace show` can list without a file


def call_line(hc: Hypercall) -> str:
    """`multicall(call_list=0xffff8880..., nr_calls=3)`: the call as strace would print it."""
    args = ", ".join(f"{a.name}={a.text or hex(a.value)}" for a in hc.args)
    return f"{hc.display_name}({args})"


@dataclass
class Stats:
    """Counts like `strace -c`: calls, failed calls and sub-operations per hypercall."""

    calls: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    errnos: dict[str, Counter[str]] = field(default_factory=dict)
    subops: dict[str, Counter[str]] = field(default_factory=dict)
    batched: Counter[str] = field(default_factory=Counter)  # calls made inside multicall batches
    # Hits identical to the call before them at the same place: gdb's repeated report of one stop, or
    # Xen continuing the call without visible progress; not in `calls`, since xendbg cannot tell.
    uncertain: Counter[str] = field(default_factory=Counter)

    def count_call(self, hc: Hypercall) -> None:
        self.calls[hc.display_name] += 1
        if hc.subop:
            self.subops.setdefault(hc.display_name, Counter())[hc.subop] += 1
        if isinstance(hc.detail, MulticallBatch):
            for entry in hc.detail.entries:
                self.batched[entry.call.display_name] += 1

    def count_record(self, record: dict[str, Any]) -> None:
        """A `call` or `return` record read back from a trace file (`xendbg trace --stats`)."""
        if record.get("event") == "return":
            self.count_result(record["name"], record["result"])
            return
        hc = record["hypercall"]
        name = hc["name"] or f"hypercall_{hc['nr']}"
        self.calls[name] += 1
        if hc.get("subop"):
            self.subops.setdefault(name, Counter())[hc["subop"]] += 1
        detail = hc.get("detail") or {}
        if detail.get("type") == "multicall":
            for entry in detail["entries"]:
                self.batched[entry["name"] or f"hypercall_{entry['op']}"] += 1

    def count_uncertain(self, name: str) -> None:
        self.uncertain[name] += 1

    def count_result(self, name: str, result: int) -> None:
        if result < 0:
            self.errors[name] += 1
            self.errnos.setdefault(name, Counter())[errno_name(result) or str(result)] += 1

    def rows(self) -> list[dict[str, Any]]:
        """One row per hypercall, most called first (the `xen stats --json` form)."""
        rows = [{"name": name, "calls": n, "errors": self.errors[name],
                 "errnos": dict(self.errnos.get(name, {})), "subops": dict(self.subops.get(name, {})),
                 "in_multicalls": self.batched[name]}
                for name, n in self.calls.most_common()] + [
                {"name": name, "calls": 0, "errors": 0, "errnos": {}, "subops": {}, "in_multicalls": n}
                for name, n in self.batched.most_common() if name not in self.calls]
        for row in rows:
            if self.uncertain[str(row["name"])]:
                row["uncertain"] = self.uncertain[str(row["name"])]
        return rows


class TraceLog:
    """The records of one `xen trace start` .. `xen trace stop`, in memory and optionally in a file.

    A file that cannot be written (a full disk, a size limit) ends the file, not the trace's records in
    memory: `file_error` then says why, once, and the front end stops the trace."""

    def __init__(self, path: str | None, names: tuple[str, ...]) -> None:
        self.path = path
        self.names = names
        self.started = time.monotonic()
        self.seq = 0
        self.calls = 0
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_RECORDS)
        self.written = 0
        self.file_error: str | None = None
        self._file: IO[str] | None = None
        self._whole = 0  # where the file's last whole record ends
        if path:
            try:
                self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole trace
            except OSError as exc:
                raise UsageError(f"cannot open trace file {path}: {exc.strerror}") from None
            self._whole = os.fstat(self._file.fileno()).st_size  # an earlier trace in the file is kept
        self._emit({"event": "start", "schema": TRACE_SCHEMA, "names": list(names), "pid": os.getpid()})

    def _emit(self, record: dict[str, Any]) -> dict[str, Any]:
        record["t"] = round(time.monotonic() - self.started, 6)
        self.recent.append(record)
        if self._file is not None:
            # One line per record, flushed at once: a dying target must not cost a record.
            line = json.dumps(record, separators=(",", ":")) + "\n"
            try:
                self._file.write(line)
                self._file.flush()
                self.written += 1
                self._whole += len(line.encode())
            except OSError as exc:
                self.file_error = (f"cannot write trace file {self.path}: {exc.strerror or exc} (after "
                                   f"{self.written} records; every record stays in memory)")
                self._close_file()
                self._cut_partial_record()
        return record

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass  # the error that brought us here is already in file_error

    def _cut_partial_record(self) -> None:
        """A write cut short (a size limit) leaves part of a record: the file keeps one record per line."""
        try:
            os.truncate(self.path or "", self._whole)
        except OSError:
            pass  # not a regular file (/dev/full, a pipe): nothing to cut

    def add(self, record: dict[str, Any]) -> dict[str, Any]:
        """Log a record another source built (Xen's trace buffers: xendbg/xentrace/merge.py)."""
        return self._emit(record)

    def call(self, cpu: int, hc: Hypercall, where: str, continues: int | None = None) -> int:
        """A call entering; `continues` is the seq of the preempted call Xen is continuing with it."""
        self.seq += 1
        self.calls += 1
        record = {"event": "call", "seq": self.seq, "cpu": cpu, "where": where, "name": hc.name, "nr": hc.nr,
                  "line": call_line(hc), "hypercall": render_json.hypercall(hc)}
        if continues is not None:
            record["continues"] = continues
        self._emit(record)
        return self.seq

    def result(self, cpu: int, seq: int, name: str, result: int) -> None:
        self._emit({"event": "return", "seq": seq, "cpu": cpu, "name": name, "result": result,
                    "errno": errno_name(result)})

    def preempted(self, cpu: int, seq: int, name: str) -> None:
        self._emit({"event": "preempted", "seq": seq, "cpu": cpu, "name": name})

    def uncertain(self, cpu: int, seq: int | None, name: str) -> None:
        """The call `seq` was hit again with nothing changed: a repeated stop report or a continuation
        without progress, which xendbg cannot tell apart."""
        self._emit({"event": "uncertain", "seq": seq, "cpu": cpu, "name": name,
                    "why": "hit again with the same registers and memory: gdb's repeated stop report, or Xen "
                           "continuing it without progress"})

    def error(self, cpu: int, where: str, message: str) -> None:
        self.seq += 1
        self._emit({"event": "error", "seq": self.seq, "cpu": cpu, "where": where, "error": message})

    def close(self) -> None:
        if self._file is not None:
            self._emit({"event": "stop"})
            self._close_file()

    def summary(self) -> str:
        """'1820 hypercalls traced; 3642 records written to F' (what `xen trace stop` says)."""
        text = f"{self.calls} hypercall{'s' if self.calls != 1 else ''} traced"
        if self.path:
            text += f"; {self.written} records written to {self.path}"
        if self.file_error:
            text += f"; {self.file_error}"
        return text


def show_lines(records: Iterable[dict[str, Any]]) -> list[str]:
    """strace-style lines: a call and its result on one line when the result followed at once."""
    return list(iter_lines(records))


def iter_lines(records: Iterable[dict[str, Any]]) -> Iterator[str]:
    """show_lines as the records come (a trace of any length): only the last line is held back, for a
    result that may follow it."""
    held: str | None = None  # the last line, not yet given out
    held_call: int | None = None  # the seq of the call on it, while its result may follow
    for r in records:
        event = r.get("event")
        stamp = f"{r.get('t', 0):10.6f} cpu{r.get('cpu', '?')} "
        line: str | None = None
        call: int | None = None
        if event == "call":
            resumed = f" <continues #{r['continues']}>" if r.get("continues") is not None else ""
            line, call = f"{stamp}{r['line']}{resumed}", r["seq"]
        elif event in ("return", "preempted"):
            tail = " = " + result_text(r["result"]) if event == "return" else " = <preempted: Xen continues it>"
            if held is not None and held_call is not None and held_call == r["seq"]:
                held, held_call = held + tail, None
                continue
            line = f"{stamp}<... {r['name']} resumed>{tail}"
        elif event == "error":
            line = f"{stamp}xendbg could not decode {r['where']}: {r['error']}"
        elif event == "uncertain":
            line = (f"{stamp}<{r.get('name')} #{r.get('seq')} hit again unchanged: a repeated stop report or "
                    f"a continuation without progress, xendbg cannot tell>")
        elif event == "gap":  # Xen's trace buffer was full (xendbg/xentrace)
            line = f"{stamp}<gap: Xen lost {r['lost']} trace records on this CPU>"
        elif event == "subcall":
            line = f"{stamp}  | {r['line']}"
        elif event == "xen":
            line = f"{stamp}[{r['name']}] {r.get('fields') or r.get('words') or ''}".rstrip()
        if line is None:
            continue
        if held is not None:
            yield held
        held, held_call = line, call
    if held is not None:
        yield held

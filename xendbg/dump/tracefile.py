"""`xendbg trace FILE.jsonl`: a recorded trace (`xen trace start --file`) read back, filtered and counted.

A trace written up to a kill ends in a cut-off line: it is dropped with one warning, the rest kept.
The record format is in xendbg/trace.py and docs/json-schema.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from xendbg.errors import DecodeError
from xendbg.files import limit_text
from xendbg.trace import Stats

MAX_LINE = 16 << 20  # far above any record xendbg writes (a multicall's 512 entries take under 1 MiB)
_SHOWN_PROBLEMS = 5  # the warnings listed one by one; more are counted


@dataclass
class TraceFile:
    path: str
    records: list[dict[str, Any]] = field(default_factory=list)
    cut_off: str | None = None  # the warning when the last line was cut off
    skipped: list[str] = field(default_factory=list)  # "FILE:N: why" of each record left out

    def warnings(self) -> list[str]:
        """What was left out, each a line: a cut-off end, and records that are not what xendbg writes."""
        out = self.skipped[:_SHOWN_PROBLEMS]
        if len(self.skipped) > _SHOWN_PROBLEMS:
            out.append(f"{self.path}: and {len(self.skipped) - _SHOWN_PROBLEMS} more records skipped for the same "
                       f"reasons ({len(self.skipped)} in all)")
        return out + ([self.cut_off] if self.cut_off else [])


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_name(value: object) -> bool:
    return value is None or isinstance(value, str)


# What each event xendbg writes must hold for the readers (show_lines, select, stats) to use it:
# key -> (check, what it must be).  Events not listed are kept and shown as nothing.
_INT, _STR, _NAME = (_is_int, "an integer"), (lambda v: isinstance(v, str), "a string"), (_is_name, "a name or null")
_ANY = (lambda v: True, "anything")
_KEYS: dict[str, dict[str, tuple[Any, str]]] = {
    "call": {"seq": _INT, "line": _STR, "name": _NAME, "hypercall": (lambda v: isinstance(v, dict), "an object")},
    "return": {"seq": _INT, "name": _STR, "result": _INT},
    "preempted": {"seq": _INT, "name": _STR},
    "uncertain": {"name": _STR},
    "error": {"seq": _INT, "where": _ANY, "error": _ANY},
    "gap": {"lost": _INT},
    "subcall": {"line": _STR},
    "xen": {"name": _STR},
}


def _hypercall_problem(hc: dict[str, Any]) -> str | None:
    if not _is_name(hc.get("name")) or not _is_int(hc.get("nr")):
        return "its hypercall has no name and number"
    if not _is_name(hc.get("subop")):
        return "its hypercall's subop is not a name"
    detail = hc.get("detail")
    if detail is not None and not isinstance(detail, dict):
        return "its hypercall's detail is not an object"
    if isinstance(detail, dict) and detail.get("type") == "multicall":
        entries = detail.get("entries")
        if not isinstance(entries, list) or not all(isinstance(e, dict) and _is_name(e.get("name")) and
                                                    _is_int(e.get("op")) for e in entries):
            return "its multicall entries are not a list of calls with a name and an op"
    return None


def record_problem(record: object) -> str | None:
    """Why `record` is not a trace record as xendbg writes it (docs/json-schema.md), None when it is."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not a trace record (an object)"
    event = record.get("event")
    if not isinstance(event, str):
        return "a JSON object without a string \"event\""
    t = record.get("t", 0)
    if not isinstance(t, int | float) or isinstance(t, bool):
        return f"a {event!r} record whose \"t\" is not a number of seconds"
    for key, (check, what) in _KEYS.get(event, {}).items():
        if key not in record or not check(record[key]):
            return f"a {event!r} record whose {key!r} is {'missing' if key not in record else 'not ' + what}"
    if "continues" in record and record["continues"] is not None and not _is_int(record["continues"]):
        return f"a {event!r} record whose 'continues' is not a seq"
    if event == "call":
        problem = _hypercall_problem(record["hypercall"])
        if problem:
            return f"a 'call' record: {problem}"
    return None


def _lines(path: str, stream: IO[bytes] | None) -> Iterator[tuple[int, str, bool]]:
    """(number, text, whether it is the last line) of each line; a line over MAX_LINE is an error."""
    try:
        with stream if stream is not None else open(path, "rb") as file:
            number, line = 0, file.readline(MAX_LINE + 1)
            while line:
                number += 1
                if len(line) > MAX_LINE:
                    raise DecodeError(f"{path}:{number}: a line of more than {limit_text(MAX_LINE)} (the longest "
                                      f"xendbg reads): not a JSONL trace")
                after = file.readline(MAX_LINE + 1)
                yield number, line.decode("utf-8", errors="replace"), not after
                line = after
    except OSError as exc:
        raise DecodeError(f"{path}: cannot read: {exc.strerror or exc}") from None


def read_trace(path: str, stream: IO[bytes] | None = None) -> TraceFile:
    """Every record of a JSONL trace.  A cut-off last line is dropped with a warning; a record that is
    JSON but not what xendbg writes is skipped with a warning naming its line; any other bad line, or
    a file with no record at all, is an error naming its line.  `stream`: `path` already opened (a
    pipe can be opened only once)."""
    trace = TraceFile(path)
    seen = 0  # lines with text
    for number, line, last in _lines(path, stream):
        if not line.strip():
            continue
        seen += 1
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as exc:
            why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            if seen == 1:
                raise DecodeError(f"{path}:{number}: not a JSONL trace: the line is not JSON ({why})") from None
            if last:  # a kill mid-write leaves the last line short
                trace.cut_off = (f"{path}: the last line ({number}) is cut off (the trace was ended by a kill?); "
                                 f"kept the {len(trace.records)} records before it")
                break
            raise DecodeError(f"{path}:{number}: not a trace record ({why})") from None
        problem = record_problem(record)
        if problem is not None:
            if seen == 1 and last:
                raise DecodeError(f"{path}:{number}: not a JSONL trace: its one line is {problem}")
            trace.skipped.append(f"{path}:{number}: skipped {problem}")
            continue
        trace.records.append(record)
    if not seen:
        raise DecodeError(f"{path}: empty: no trace records (and not a xentrace file)")
    return trace


def select(records: Iterable[dict[str, Any]], names: Iterable[str] = (), errors: bool = False) -> list[dict[str, Any]]:
    """The calls (with their results) of the hypercalls named (names or numbers), or that failed."""
    wanted = {n.lower() for n in names}
    records = [r for r in records if r.get("event") not in ("start", "stop")]
    results = {r["seq"]: r.get("result") for r in records if r.get("event") == "return"}
    kept: set[int] = set()
    for r in records:
        if r.get("event") != "call":
            continue
        named = not wanted or str(r.get("name", "")).lower() in wanted or str(r.get("nr")) in wanted
        result = results.get(r["seq"])
        failed = not errors or (result is not None and result < 0)
        if named and failed:
            kept.add(r["seq"])
    def keep(r: dict[str, Any]) -> bool:
        if r.get("event") == "error":  # a call xendbg could not decode: shown unless filtering
            return not wanted and not errors
        return r.get("seq") in kept

    return [r for r in records if keep(r)]


def select_stream(records: Iterable[dict[str, Any]], names: Iterable[str] = (),
                  errors: bool = False) -> Iterator[dict[str, Any]]:
    """select() over records that come in order from Xen's trace buffers (a xentrace file of any
    length), keeping one call per CPU in mind: such a trace has no results (Xen's buffers record
    none), so --errors keeps nothing, and a `preempted` record is of its CPU's last call."""
    if errors:
        return
    wanted = {n.lower() for n in names}
    kept: dict[Any, Any] = {}  # CPU -> seq of its last call, when that call is kept
    for r in records:
        event = r.get("event")
        if event == "call":
            named = not wanted or str(r.get("name", "")).lower() in wanted or str(r.get("nr")) in wanted
            kept[r.get("cpu")] = r.get("seq") if named else None
            if named:
                yield r
        elif event in ("return", "preempted", "uncertain"):
            if r.get("seq") is not None and kept.get(r.get("cpu")) == r.get("seq"):
                yield r
        elif event == "error" and not wanted:
            yield r


def stats(records: Iterable[dict[str, Any]]) -> Stats:
    counted = Stats()
    for r in records:
        if r.get("event") in ("call", "return"):
            counted.count_record(r)
        elif r.get("event") == "uncertain":
            counted.count_uncertain(r["name"])
    return counted

"""`xendbg trace FILE.jsonl`: a recorded trace (`xen trace start --file`) read back, filtered and counted.

A trace written up to a kill ends in a cut-off line: it is dropped with one warning, the rest kept.
The record format is in xendbg/trace.py and docs/json-schema.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from xendbg.errors import DecodeError
from xendbg.trace import Stats


@dataclass
class TraceFile:
    path: str
    records: list[dict[str, Any]] = field(default_factory=list)
    cut_off: str | None = None  # the warning when the last line was cut off


def read_trace(path: str) -> TraceFile:
    """Every record of a JSONL trace; a cut-off last line is dropped with a warning, any other bad line
    is an error naming its line."""
    trace = TraceFile(path)
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            lines = file.read().split("\n")
    except OSError as exc:
        raise DecodeError(f"{path}: cannot read: {exc.strerror or exc}") from None
    last = len(lines) - 1 if lines[-1] else len(lines) - 2  # the last line that has text
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "event" not in record:
                raise ValueError("not a trace record")
        except ValueError as exc:
            if number - 1 == last:  # a kill mid-write leaves the last line short
                trace.cut_off = (f"{path}: the last line ({number}) is cut off (the trace was ended by a kill?); "
                                 f"kept the {len(trace.records)} records before it")
                break
            raise DecodeError(f"{path}:{number}: not a trace record ({exc})") from None
        trace.records.append(record)
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


def stats(records: Iterable[dict[str, Any]]) -> Stats:
    counted = Stats()
    for r in records:
        if r.get("event") in ("call", "return"):
            counted.count_record(r)
    return counted

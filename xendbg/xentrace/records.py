"""Xen trace records (struct t_rec) parsed from bytes, and the hypercall records named per ABI.

A record is a header word (event, extra-word count, TSC flag: xendbg/xentrace/events.py), the TSC
when flagged, then up to 7 extra words.  HYPERCALL_V2 and SUBCALL records carry the op and the few
arguments Xen records (xen/common/trace.c __trace_hypercall, RELEASE-4.17.0: mmu_update, multicall and
mmuext_op their count; grant_table_op cmd and count; vcpu_op cmd and vcpuid; sched_op cmd), each
truncated to 32 bits; nothing else of the call is in the buffers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from functools import lru_cache

from xendbg.abi import Abi, get_abi
from xendbg.decode.model import Hypercall
from xendbg.errors import XendbgError
from xendbg.xentrace import events as ev


@dataclass(frozen=True, slots=True)
class Record:
    """One trace record as Xen wrote it on one physical CPU."""

    cpu: int
    event: int
    tsc: int | None
    words: tuple[int, ...]

    @property
    def size(self) -> int:
        return 4 + (8 if self.tsc is not None else 0) + 4 * len(self.words)

    @property
    def name(self) -> str:
        return ev.event_name(self.event)

    def to_bytes(self) -> bytes:
        header = self.event | len(self.words) << ev.EXTRA_SHIFT | (ev.CYCLES_FLAG if self.tsc is not None else 0)
        tsc = struct.pack("<Q", self.tsc) if self.tsc is not None else b""
        return struct.pack("<I", header) + tsc + struct.pack(f"<{len(self.words)}I", *self.words)


def parse(data: bytes, cpu: int) -> tuple[list[Record], int]:
    """The whole records at the start of `data`; returns them and how many bytes they take (a record
    cut off at the end is left for the caller)."""
    out: list[Record] = []
    at, end = 0, len(data)
    unpack = struct.unpack_from
    while at + 4 <= end:
        (header,) = unpack("<I", data, at)
        count = (header >> ev.EXTRA_SHIFT) & ev.EXTRA_MAX
        cycles = bool(header & ev.CYCLES_FLAG)
        size = 4 + (8 if cycles else 0) + 4 * count
        if at + size > end:
            break
        tsc = unpack("<Q", data, at + 4)[0] if cycles else None
        first = at + (12 if cycles else 4)
        out.append(Record(cpu, header & ev.EVENT_MASK, tsc, unpack(f"<{count}I", data, first)))
        at += size
    return out, at


@dataclass(frozen=True, slots=True)
class CallRecord:
    """A HYPERCALL_V2 or SUBCALL record: the op and the recorded arguments (index, value)."""

    op: int
    args: tuple[tuple[int, int], ...]
    subcall: bool

    def arg(self, index: int) -> int | None:
        for i, value in self.args:
            if i == index:
                return value
        return None


def call_of(record: Record) -> CallRecord | None:
    """The hypercall a HYPERCALL_V2 / SUBCALL record describes; None for other records."""
    if record.event not in (ev.HYPERCALL_V2, ev.SUBCALL) or not record.words:
        return None
    return _call_of(record.event, record.words)


@lru_cache(maxsize=4096)  # a trace repeats the same few calls: decode each once
def _call_of(event: int, words: tuple[int, ...]) -> CallRecord:
    record = Record(0, event, None, words)
    first = record.words[0]
    args: list[tuple[int, int]] = []
    at = 1
    for index in range(ev.MAX_ARGS):
        kind = (first >> (ev.ARG_SHIFT + 2 * index)) & 3
        if kind == ev.ARG_32 and at < len(record.words):
            args.append((index, record.words[at]))
            at += 1
        elif kind == ev.ARG_64 and at + 1 < len(record.words):
            args.append((index, record.words[at] | record.words[at + 1] << 32))
            at += 2
    return CallRecord(first & ev.OP_MASK, tuple(args), record.event == ev.SUBCALL)


class _NoMemory:
    """A target with no memory: the recorded arguments are numbers, never pointers to follow."""

    def read_register(self, name: str) -> int:
        raise XendbgError("no registers in a trace record")

    def read_memory(self, address: int, size: int) -> bytes:
        from xendbg.errors import UnreadableMemory

        raise UnreadableMemory(address, size, "a trace record holds no guest memory")


@lru_cache(maxsize=4096)
def _named(generation: str, width: int, op: int, args: tuple[tuple[int, int], ...]) -> Hypercall:
    abi = get_abi(generation, width)
    spec = abi.hypercall(op)
    count = len(spec.args) if spec is not None else 0
    values = [0] * max(count, max((i + 1 for i, _ in args), default=0))
    for index, value in args:
        values[index] = value
    try:
        from xendbg.decode import decode_call

        hc = decode_call(_NoMemory(), abi, op, values)
    except XendbgError:
        hc = Hypercall(op, spec.name if spec else None, (), generation, width)
    kept = tuple(a for i, a in enumerate(hc.args) if any(i == j for j, _ in args))
    subop = next((a.text for a in kept if a.kind.startswith("cmd:")), None)
    return replace(hc, args=kept, subop=subop, detail=None, findings=(), site="Xen's trace buffer")


def hypercall_of(call: CallRecord, abi: Abi) -> Hypercall:
    """The call as xendbg's model: named per `abi`, with only the arguments Xen recorded (named and
    their sub-op named: vcpu_op, sched_op, grant_table_op, ...)."""
    return _named(abi.generation, abi.width, call.op, call.args)


@dataclass(frozen=True, slots=True)
class Lost:
    """A LOST_RECORDS record: Xen dropped `count` records on this CPU (its buffer was full)."""

    count: int
    domain: int
    vcpu: int
    first_tsc: int


def lost_of(record: Record) -> Lost | None:
    if record.event != ev.LOST_RECORDS or len(record.words) < 4:
        return None
    w = record.words
    return Lost(w[0], w[1] & 0xFFFF, w[1] >> 16, w[2] | w[3] << 32)

"""xentrace's binary file format: what `xentrace` writes on a real host and `xentrace_format` reads.

The file is a sequence of windows, one per drain of one CPU's buffer: a CPU-change record
(TRC_TRACE_CPU_CHANGE with two extra words, `int cpu` and `unsigned window_size`: struct
cpu_change_record, tools/xentrace/xentrace.c at RELEASE-4.17.0), then `window_size` bytes of that CPU's
records exactly as Xen wrote them.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import IO

from xendbg.errors import DecodeError, UsageError
from xendbg.xentrace import events as ev
from xendbg.xentrace.records import Record, parse

CPU_CHANGE_HEADER = ev.CPU_CHANGE | 2 << ev.EXTRA_SHIFT


def window(cpu: int, records: Iterable[Record]) -> bytes:
    """One CPU's records as a window of the file."""
    body = b"".join(r.to_bytes() for r in records)
    return struct.pack("<IiI", CPU_CHANGE_HEADER, cpu, len(body)) + body


class XentraceWriter:
    """Appends windows to a xentrace file as the drains deliver records."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._file: IO[bytes] | None = open(path, "wb")  # noqa: SIM115 - open for the whole trace
        except OSError as exc:
            raise UsageError(f"cannot open xentrace file {path}: {exc.strerror}") from None
        self.records = 0

    def write(self, per_cpu: dict[int, list[Record]]) -> None:
        """Append one window per CPU; a write that fails (a full disk, /dev/full) is a one-line error."""
        if self._file is None:
            return
        try:
            for cpu, records in sorted(per_cpu.items()):
                if records:
                    self._file.write(window(cpu, records))
                    self.records += len(records)
            self._file.flush()
        except OSError as exc:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError:
                pass  # the write's error is the one to tell
            raise DecodeError(f"cannot write xentrace file {self.path}: {exc.strerror or exc} (after "
                              f"{self.records} records)") from None

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError as exc:
                raise DecodeError(f"cannot write xentrace file {self.path}: {exc.strerror or exc}") from None


_CHUNK = 1 << 20  # a window's records are parsed this many bytes at a time


def read_windows(stream: IO[bytes], name: str) -> Iterator[tuple[int, list[Record]]]:
    """(cpu, records) as they come in a xentrace stream (a file or a pipe), a window at most _CHUNK
    bytes at a time: memory stays bounded whatever the size of the file or of a window."""
    at = 0
    while True:
        head = _read_up_to(stream, 12)
        if not head:
            return
        if len(head) < 4:
            raise DecodeError(f"{name}: {len(head)} stray bytes at offset {at}: not a xentrace file")
        (header,) = struct.unpack_from("<I", head)
        if header != CPU_CHANGE_HEADER:
            raise DecodeError(f"{name}: {header:#010x} at offset {at} where a CPU-change record belongs: not a "
                              f"xentrace file")
        if len(head) < 12:
            raise DecodeError(f"{name}: a CPU-change record cut off at offset {at}")
        cpu, size = struct.unpack_from("<iI", head, 4)
        left, carry, used = size, b"", 0
        while left:
            piece = stream.read(min(left, _CHUNK))
            if not piece:
                break
            left -= len(piece)
            data = carry + piece
            records, whole = parse(data, cpu)
            used += whole
            carry = data[whole:]
            if records:
                yield cpu, records
        if left or carry:
            raise DecodeError(f"{name}: the window of CPU {cpu} at offset {at} holds {size} bytes, {used} of them "
                              f"whole records{' before the file ends' if left else ''}: not a xentrace file")
        at += 12 + size


def _read_up_to(stream: IO[bytes], size: int) -> bytes:
    """`size` bytes, fewer only at the end of the stream (a pipe may deliver them piecemeal)."""
    data = stream.read(size)
    while data and len(data) < size:
        more = stream.read(size - len(data))
        if not more:
            break
        data += more
    return data


def read_file(path: str) -> dict[int, list[Record]]:
    """The records of a xentrace file, per CPU in file order (the CPU-change records taken as windows)."""
    out: dict[int, list[Record]] = {}
    try:
        with open(path, "rb") as file:
            for cpu, records in read_windows(file, path):
                out.setdefault(cpu, []).extend(records)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    return out


def read_bytes(data: bytes, name: str = "the file") -> dict[int, list[Record]]:
    out: dict[int, list[Record]] = {}
    at = 0
    cpu = 0
    while at < len(data):
        if len(data) - at < 4:
            raise DecodeError(f"{name}: {len(data) - at} stray bytes at offset {at}: not a xentrace file")
        (header,) = struct.unpack_from("<I", data, at)
        if header == CPU_CHANGE_HEADER:
            if at + 12 > len(data):
                raise DecodeError(f"{name}: a CPU-change record cut off at offset {at}")
            cpu, size = struct.unpack_from("<iI", data, at + 4)
            body = data[at + 12:at + 12 + size]
            records, used = parse(body, cpu)
            if used != size or len(body) != size:
                raise DecodeError(f"{name}: the window of CPU {cpu} at offset {at} holds {size} bytes, "
                                  f"{used} of them whole records: not a xentrace file")
            out.setdefault(cpu, []).extend(records)
            at += 12 + size
            continue
        raise DecodeError(f"{name}: {header:#010x} at offset {at} where a CPU-change record belongs: not a "
                          f"xentrace file")
    return out

"""Opening the files a user names: the one home of what xendbg accepts where.

Two kinds of input:
- a file xendbg maps (a memory dump, a guest ELF, xen-syms): it must be a regular file with a size;
  a FIFO, a device or a directory is refused in one line before open() could wait on it, and a
  file that reports 0 bytes is told apart from one that has data (/proc files report 0).
- a stream (an @FILE of arguments, --mem ADDR@FILE, a trace): anything that can be read, a pipe or
  FIFO included (open() then waits for its writer, as in any Unix tool), read up to a stated limit.
"""

from __future__ import annotations

import io
import mmap
import os
import stat
from typing import Any

from xendbg.errors import DecodeError


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO or pipe"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def map_regular(path: str, what: str) -> mmap.mmap:
    """`path` mapped read-only; DecodeError (one line) when it cannot be read or is not a regular file
    with data.  `what` names what the file should be ("a memory dump", "an ELF file")."""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise DecodeError(f"{path}: {_kind(mode)}, not {what}: xendbg maps it, so it must be a regular file")
        with open(path, "rb") as file:
            if os.fstat(file.fileno()).st_size == 0:
                if file.read(1):
                    raise DecodeError(f"{path}: reports a size of 0 bytes but has data (a /proc or /sys file?), "
                                      f"not {what}")
                raise DecodeError(f"{path}: empty file (0 bytes), not {what}")
            return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise DecodeError(f"{path}: cannot read: {exc.strerror or exc}") from None


def read_limited(path: str, limit: int, what: str) -> bytes:
    """The whole of `path`, a regular file or a stream, when it holds at most `limit` bytes; DecodeError
    saying the limit when it holds more (/dev/zero never ends), and OSError as raised."""
    with open(path, "rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise DecodeError(f"{path}: more than {limit_text(limit)}, the most xendbg reads as {what}")
    return data


def limit_text(size: int) -> str:
    """'16 MiB', '4 KiB', '100 bytes'."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} bytes"


class _Prefixed(io.RawIOBase):
    """A stream whose first bytes were already read (to tell its format), given back in front."""

    def __init__(self, head: bytes, raw: io.RawIOBase | io.FileIO) -> None:
        self.head, self.raw = head, raw

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        return self.raw.readinto(buffer)

    def close(self) -> None:
        self.raw.close()
        super().close()


def open_stream(path: str, sniff: int) -> tuple[bytes, io.BufferedReader]:
    """`path` opened once for reading as a stream (a pipe or FIFO too: open() waits for its writer),
    with its first `sniff` bytes (fewer when it is shorter) to tell its format; the stream still
    starts at byte 0.  OSError as raised."""
    raw = open(path, "rb", buffering=0)  # noqa: SIM115 - the caller closes the stream
    try:
        head = b""
        while len(head) < sniff:
            more = raw.read(sniff - len(head))
            if not more:
                break
            head += more
    except BaseException:
        raw.close()
        raise
    return head, io.BufferedReader(_Prefixed(head, raw), buffer_size=1 << 20)

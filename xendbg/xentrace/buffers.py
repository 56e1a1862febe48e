"""Xen's per-CPU trace buffers read through a Target, and Xen's symbols that find them.

The layout (xen/include/public/trace.h and xen/common/trace.c, RELEASE-4.17.0):
- `t_info` points at `struct t_info`: `u16 tbuf_size` (pages per CPU), `u16 mfn_offset[NR_CPUS]`, then
  per-CPU lists of `u32` MFNs, CPU n's at `(u32 *)t_info + mfn_offset[n]`.
- `per_cpu(t_bufs, cpu)` is the CPU's `struct t_buf` (`u32 cons, prod`) at the start of its first
  page; the data starts right after it and continues page by page through the MFN list (the pages are
  not contiguous).  `cons` and `prod` are byte offsets modulo `2 * data_size`, where
  `data_size = tbuf_size * 4096 - 8`; a position is `offset mod data_size`.
- Xen writes whole records and then advances `prod`; a full buffer drops the newest records (it never
  overwrites) and, once there is room again, says how many in a LOST_RECORDS record.
The pages are read through Xen's direct map: its base is the t_buf pointer minus its first MFN's
address, so no build-specific constant is assumed.  Pointers and `__per_cpu_offset` entries are Xen's
word size: 8 bytes for x86_64 Xen, 4 for a 32-bit one (shim32's buffers, which follow the same layout).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from xendbg.errors import DecodeError, TargetError, UsageError
from xendbg.session import Symbols
from xendbg.target import Target
from xendbg.xentrace.records import Record, parse

PAGE = 4096
T_BUF_SIZE = 8  # struct t_buf: u32 cons, prod
MAX_CPUS = 256  # NR_CPUS of Debian's Xen 4.17: the size of mfn_offset[]
# What xendbg needs from xen-syms: the buffers, the per-CPU areas, the boot options and where they apply.
SYMBOLS = ("t_info", "per_cpu__t_bufs", "__per_cpu_offset", "opt_tbuf_size", "opt_tevt_mask", "init_trace_bufs")
ENABLE_HINT = "tbuf_size=PAGES tevt_mask=0x0020f000"

Writer = Callable[[int, bytes], None]


def xen_symbols(symbols: Symbols) -> dict[str, int]:
    """The addresses of SYMBOLS; a one-line error naming the missing ones."""
    found = {name: symbols.address_of(name) for name in SYMBOLS}
    missing = [name for name, address in found.items() if address is None]
    if missing:
        raise UsageError(f"Xen's trace buffers need xen-syms loaded (no symbol {', '.join(missing)}): "
                         f"add-symbol-file xen-syms, or a Xen built without CONFIG_TRACEBUFFER")
    return {name: int(address) for name, address in found.items() if address is not None}


@dataclass
class CpuBuffer:
    """One physical CPU's buffer: its t_buf, its pages, and how far xendbg has read it."""

    cpu: int
    t_buf: int  # the struct t_buf (virtual)
    mfns: tuple[int, ...]
    data_size: int
    cursor: int  # xendbg's read position, like cons (modulo 2 * data_size)


class TraceBuffers:
    """Every CPU's trace buffer of a Xen, located through its symbols and read through `target`.

    `physical(address, size)`, when given, reads machine memory: used when Xen's direct map is not
    mapped by the CPU's current page tables (XPTI)."""

    def __init__(self, target: Target, symbols: Symbols,
                 physical: Callable[[int, int], bytes] | None = None, width: int = 64) -> None:
        self.target = target
        self.physical = physical
        self.word = width // 8  # Xen's pointer size
        self.mask = (1 << width) - 1
        self.syms = xen_symbols(symbols)
        self.cpus: list[CpuBuffer] = []
        self.pages = 0
        self.directmap: int | None = None

    # --- reading -------------------------------------------------------------------------------

    def _read(self, address: int, size: int) -> bytes:
        return self.target.read_memory(address, size)

    def _u(self, address: int, size: int) -> int:
        return int.from_bytes(self._read(address, size), "little")

    def _page(self, mfn: int, offset: int, size: int) -> bytes:
        if self.directmap is not None:
            try:
                return self._read(self.directmap + (mfn << 12) + offset, size)
            except TargetError:
                if self.physical is None:
                    raise
        if self.physical is None:
            raise DecodeError("Xen's direct map is unknown: the trace buffers cannot be read")
        return self.physical((mfn << 12) + offset, size)

    def allocated(self) -> bool:
        return self._u(self.syms["t_info"], self.word) != 0

    def options(self) -> tuple[int, int]:
        """(opt_tbuf_size, opt_tevt_mask): the boot options as Xen holds them now."""
        return self._u(self.syms["opt_tbuf_size"], 4), self._u(self.syms["opt_tevt_mask"], 4)

    def locate(self) -> None:
        """Read t_info and each CPU's t_buf; raises a one-line error when the buffers are not allocated."""
        info = self._u(self.syms["t_info"], self.word)
        if info == 0:
            size, mask = self.options()
            raise UsageError(f"Xen's trace buffers are not allocated (opt_tbuf_size={size}, tevt_mask={mask:#x}): "
                             f"boot Xen with {ENABLE_HINT}, or use `xen trace enable` at or before "
                             f"init_trace_bufs")
        self.pages = self._u(info, 2)
        if not 0 < self.pages < 1 << 16:
            raise DecodeError(f"t_info at {info:#x} says {self.pages} pages per CPU: not Xen's t_info")
        offsets = struct.unpack(f"<{MAX_CPUS}H", self._read(info + 2, 2 * MAX_CPUS))
        data_size = self.pages * PAGE - T_BUF_SIZE
        self.cpus = []
        for cpu, offset in enumerate(offsets):
            if offset == 0:
                break
            mfns = struct.unpack(f"<{self.pages}I", self._read(info + 4 * offset, 4 * self.pages))
            per_cpu = self._u(self.syms["__per_cpu_offset"] + self.word * cpu, self.word)
            t_buf = self._u((self.syms["per_cpu__t_bufs"] + per_cpu) & self.mask, self.word)
            if t_buf == 0 or t_buf & (PAGE - 1):
                raise DecodeError(f"CPU {cpu}'s t_buf pointer is {t_buf:#x}: not a buffer's first page")
            if self.directmap is None:
                self.directmap = (t_buf - (mfns[0] << 12)) & self.mask
            cons, _ = self.positions_at(t_buf)
            self.cpus.append(CpuBuffer(cpu, t_buf, mfns, data_size, cons))
        if not self.cpus:
            raise DecodeError("t_info lists no CPU's buffer")

    def positions_at(self, t_buf: int) -> tuple[int, int]:
        cons, prod = struct.unpack("<II", self._read(t_buf, 8))
        return cons, prod

    def read_range(self, buf: CpuBuffer, start: int, end: int) -> bytes:
        """The data bytes between two offsets (each in [0, 2 * data_size)), across the page list."""
        size = (end - start) % (2 * buf.data_size)
        if size > buf.data_size:
            raise DecodeError(f"CPU {buf.cpu}: {size} bytes between {start:#x} and {end:#x}, more than the "
                              f"buffer's {buf.data_size}: its cons/prod are not Xen's")
        out = bytearray()
        at = start % buf.data_size
        while size > 0:
            chunk = min(size, buf.data_size - at)  # up to the wrap point
            pos = at + T_BUF_SIZE
            left = chunk
            while left > 0:
                page, offset = divmod(pos, PAGE)
                n = min(left, PAGE - offset)
                out += self._page(buf.mfns[page], offset, n)
                pos, left = pos + n, left - n
            size -= chunk
            at = 0
        return bytes(out)

    def drain(self, advance: Writer | None = None) -> dict[int, list[Record]]:
        """The records each CPU wrote since the last drain.  With `advance`, the consumer index `cons`
        is written back (the prod read, as a consumer must) so that Xen can reuse the space: xendbg's
        only write to Xen's memory."""
        if not self.cpus:
            self.locate()
        out: dict[int, list[Record]] = {}
        for buf in self.cpus:
            _, prod = self.positions_at(buf.t_buf)
            if prod == buf.cursor:
                continue
            data = self.read_range(buf, buf.cursor, prod)
            records, used = parse(data, buf.cpu)
            buf.cursor = (buf.cursor + used) % (2 * buf.data_size)
            if advance is not None:
                advance(buf.t_buf, struct.pack("<I", buf.cursor))
            out[buf.cpu] = records
        return out

    def contents(self) -> dict[int, list[Record]]:
        """Every record still in the buffers, from each CPU's cons to its prod (the flight recorder)."""
        if not self.cpus:
            self.locate()
        out: dict[int, list[Record]] = {}
        for buf in self.cpus:
            cons, prod = self.positions_at(buf.t_buf)
            out[buf.cpu] = parse(self.read_range(buf, cons, prod), buf.cpu)[0]
        return out

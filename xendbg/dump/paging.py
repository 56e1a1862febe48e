"""xendbg's own x86 page-table walk over guest-physical memory: no paging, 2-level (32-bit, with 4M
pages under CR4.PSE), PAE and 4-level (2M and 1G pages).

QEMU's own walk (`dump-guest-memory -p`) masks only bit 63 of an entry; a 64-bit PV guest's entries
carry Xen's software bits above the address (bit 52 is _PAGE_GUEST_KERNEL: "bit 12 of a 24-bit flag
mask corresponds to bit 52 of a pte", xen/arch/x86/include/asm/x86_64/page.h, RELEASE-4.17.0), so
the frame is taken from bits 12-51 only, which also drops NX (bit 63).

Each vCPU walks its own CR3.  A walk that comes back to a table it already used (a loop) or leads
outside the dump's RAM is one UnreadableMemory line saying where.
"""

from __future__ import annotations

import bisect
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from xendbg.arch import CR0_PG
from xendbg.dump.cpus import CR4_LA57, CR4_PAE, CR4_PSE, CpuState
from xendbg.errors import DecodeError, UnreadableMemory

PAGE_SIZE = 4096
FRAME_MASK = 0x000F_FFFF_FFFF_F000  # bits 12-51: the frame, without NX (63) and Xen's bits 52-62
_PRESENT, _USER, _LARGE = 0x1, 0x4, 0x80

OFF, TWO_LEVEL, PAE, FOUR_LEVEL = "off", "2-level", "PAE", "4-level"


class PhysicalMemory(Protocol):
    def read(self, address: int, size: int) -> bytes: ...

    def has(self, address: int) -> bool: ...

    def ranges(self) -> list[tuple[int, int]]: ...


@dataclass(frozen=True)
class _Level:
    shift: int  # the address bits this level's index starts at
    bits: int  # index width
    entry: int  # entry size in bytes
    large: bool  # whether PS makes a leaf here


_LEVELS = {
    FOUR_LEVEL: (_Level(39, 9, 8, False), _Level(30, 9, 8, True), _Level(21, 9, 8, True), _Level(12, 9, 8, False)),
    PAE: (_Level(30, 2, 8, False), _Level(21, 9, 8, True), _Level(12, 9, 8, False)),
    TWO_LEVEL: (_Level(22, 10, 4, True), _Level(12, 10, 4, False)),
}


@dataclass(frozen=True)
class Paging:
    """How one vCPU translates addresses: the mode and the physical address of its top table."""

    mode: str
    root: int
    pse: bool = False  # CR4.PSE: 4M pages in 2-level paging

    @classmethod
    def of(cls, cpu: CpuState) -> Paging:
        cr0, _, _, cr3, cr4 = cpu.cr
        if not cr0 & CR0_PG:
            return cls(OFF, 0)
        if cr4 & CR4_PAE:
            if cpu.long_mode:
                if cr4 & CR4_LA57:
                    raise DecodeError(f"CPU {cpu.index} uses 5-level paging (CR4.LA57), which xendbg does not walk")
                return cls(FOUR_LEVEL, cr3 & FRAME_MASK)
            return cls(PAE, cr3 & 0xFFFFFFE0)
        return cls(TWO_LEVEL, cr3 & 0xFFFFF000, bool(cr4 & CR4_PSE))

    def describe(self) -> str:
        return "paging off (virtual = physical)" if self.mode == OFF else f"{self.mode} paging, CR3 {self.root:#x}"

    @property
    def width(self) -> int:
        return 64 if self.mode == FOUR_LEVEL else 32


def _frame(entry: int, level: _Level, mode: str, pse: bool, leaf: bool) -> int:
    if mode == TWO_LEVEL:
        if leaf and level.large:  # a 4M page: bits 22-31, and bits 32-39 from entry bits 13-20 (PSE-36)
            return (entry & 0xFFC00000) | ((entry >> 13) & 0xFF) << 32
        return entry & 0xFFFFF000
    if leaf and level.large:
        return entry & FRAME_MASK & ~((1 << level.shift) - 1)  # bit 12 of a large entry is PAT, not address
    return entry & FRAME_MASK


def translate(memory: PhysicalMemory, paging: Paging, address: int, size: int = 1) -> tuple[int, int]:
    """(physical address, bytes left in its page) for virtual `address`; UnreadableMemory when not mapped."""
    if paging.mode == OFF:
        return address, PAGE_SIZE - address % PAGE_SIZE
    levels = _LEVELS[paging.mode]
    if paging.mode == FOUR_LEVEL:
        top = address >> 47
        if top not in (0, (1 << 17) - 1):
            raise UnreadableMemory(address, size, "not a canonical address")
    elif address >> 32:
        raise UnreadableMemory(address, size, f"beyond 32 bits under {paging.mode} paging")
    table, used = paging.root, [paging.root]
    for depth, level in enumerate(levels):
        index = (address >> level.shift) & ((1 << level.bits) - 1)
        where = f"level-{len(levels) - depth} entry {index} of the table at physical {table:#x}"
        if not memory.has(table):
            raise UnreadableMemory(address, size, f"page table outside the dump's RAM: {where} ({paging.describe()})")
        raw = memory.read(table + index * level.entry, level.entry)
        entry = int.from_bytes(raw, "little")
        if not entry & _PRESENT:
            raise UnreadableMemory(address, size, f"not mapped: {where} is not present ({paging.describe()})")
        leaf = depth == len(levels) - 1 or (level.large and bool(entry & _LARGE)
                                            and (paging.mode != TWO_LEVEL or paging.pse))
        frame = _frame(entry, level, paging.mode, paging.pse, leaf)
        if leaf:
            offset = address & ((1 << level.shift) - 1)
            physical = frame + offset
            if not memory.has(physical):
                raise UnreadableMemory(address, size, f"maps physical {physical:#x}, which is not in the dump's "
                                                      f"RAM ({where})")
            return physical, PAGE_SIZE - physical % PAGE_SIZE
        if frame in used:
            raise UnreadableMemory(address, size, f"page-table walk loops: {where} points back to the table at "
                                                  f"physical {frame:#x} ({paging.describe()})")
        used.append(frame)
        table = frame
    raise AssertionError("unreachable")  # pragma: no cover - the last level is always a leaf


# How many times a page table may be walked, or a page mapped, before further aliases are left out of
# a walk: page tables shared across entries (Linux PV shares the L1s Xen built between its direct map
# and its kernel map) alias a page a few times; a table whose every entry points to one table is no
# address space but a multiplier.
ALIAS_LIMIT = 8


@dataclass
class Aliases:
    """What a walk left out: tables walked and pages mapped more than ALIAS_LIMIT times."""

    tables: int = 0
    pages: int = 0

    def describe(self) -> str:
        parts = [f"{n} {what}" for n, what in ((self.tables, "page-table entries leading to a table already "
                                                "walked"), (self.pages, "mappings of a page already mapped"))
                 if n]
        return (f"left out {' and '.join(parts)} {ALIAS_LIMIT} times (aliases; xendbg keeps at most "
                f"{ALIAS_LIMIT} of each)") if parts else ""


def mappings(memory: PhysicalMemory, paging: Paging, *, user_only: bool = False,
             limit: int = 1 << 22, aliases: Aliases | None = None) -> Iterator[tuple[int, int, int]]:
    """(virtual, physical, size) of every page or large page `paging` maps to RAM, in address order; the
    part of a large page beyond RAM is left out.  Tables outside RAM and entries that loop back are
    skipped; `user_only` keeps pages every level of which allows ring 3 (a 64-bit PV guest kernel runs
    in ring 3: Xen's own mappings are not).  A table or page reached more than ALIAS_LIMIT times is
    left out, counted in `aliases`."""
    if paging.mode == OFF:
        raise DecodeError("paging is off on this vCPU: its virtual addresses are physical ones")
    levels = _LEVELS[paging.mode]
    ram = memory.ranges()
    starts = [start for start, _ in ram]
    count = 0
    left_out = aliases if aliases is not None else Aliases()
    walked: Counter[int] = Counter()
    mapped: Counter[tuple[int, int]] = Counter()

    def in_ram(virtual: int, physical: int, size: int) -> Iterator[tuple[int, int, int]]:
        i = max(bisect.bisect_right(starts, physical) - 1, 0)
        while i < len(ram) and ram[i][0] < physical + size:
            lo, hi = max(ram[i][0], physical), min(ram[i][1], physical + size)
            if lo < hi:
                yield virtual + lo - physical, lo, hi - lo
            i += 1

    def walk(table: int, depth: int, base: int, used: tuple[int, ...]) -> Iterator[tuple[int, int, int]]:
        nonlocal count
        level = levels[depth]
        if not memory.has(table):
            return
        entries = 1 << level.bits
        fmt = f"<{entries}{'Q' if level.entry == 8 else 'I'}"
        for index, entry in enumerate(struct.unpack(fmt, memory.read(table, entries * level.entry))):
            if not entry & _PRESENT or (user_only and not entry & _USER):
                continue
            virtual = base | index << level.shift
            if paging.mode == FOUR_LEVEL and depth == 0 and index >= 256:
                virtual |= 0xFFFF << 48  # canonical upper half
            leaf = depth == len(levels) - 1 or (level.large and bool(entry & _LARGE)
                                                and (paging.mode != TWO_LEVEL or paging.pse))
            frame = _frame(entry, level, paging.mode, paging.pse, leaf)
            if leaf:
                count += 1
                if count > limit:
                    raise DecodeError(f"more than {limit} mappings under {paging.describe()}: not a page table")
                page = (frame, level.shift)
                if mapped[page] == ALIAS_LIMIT:
                    left_out.pages += 1
                    continue
                mapped[page] += 1
                yield from in_ram(virtual, frame, 1 << level.shift)
            elif frame not in used:
                if walked[frame] == ALIAS_LIMIT:
                    left_out.tables += 1
                    continue
                walked[frame] += 1
                yield from walk(frame, depth + 1, virtual, (*used, frame))

    yield from walk(paging.root, 0, 0, (paging.root,))

"""Guest-physical memory and CPU notes of a kdump-compressed dump (`dump-guest-memory -z FILE`).

QEMU writes it in makedumpfile's *flattened* format (dump/dump.c create_kdump_vmcore, include/sysemu/
dump.h, QEMU 7.2): a 4096-byte header starting "makedumpfile" with big-endian type 1 and version 1,
then chunks, each a big-endian (offset, size) pair and `size` bytes that belong at `offset` of the
kdump file, ended by offset = size = -1.  xendbg indexes the chunks (logical offset -> file offset)
and reads through that index; it never rewrites the file.  A kdump file that is not flattened
(makedumpfile's own output) is read directly.

The kdump file itself (header version 6):
    block 0                    disk_dump_header: "KDUMP   ", header_version, utsname (6 x 65), timestamp
                               (10 bytes for ELF32 dumps, 22 for ELF64), then u32 status (compression),
                               block_size, sub_hdr_size, bitmap_blocks, max_mapnr, ..., nr_cpus
    block 1                    kdump_sub_header (ELF32: 80 bytes, ELF64: 104, both packed), then the
                               ELF notes at its offset_note (right after it)
    block 1 + sub_hdr_size     two dump bitmaps of bitmap_blocks / 2 blocks each; bit N (LSB first)
                               says whether page frame N is in the dump
    after them                 one page_desc {u64 offset, u32 size, u32 flags, u64 page_flags} per page
                               in the bitmap, in frame order; flags 1 = zlib, 2 = lzo, 4 = snappy, 0 = raw
"""

from __future__ import annotations

import bisect
import mmap
import re
import struct
import zlib
from collections import OrderedDict

from xendbg.dump.cpus import MAX_NOTE_BYTES, CpuState, cpus_from_notes
from xendbg.errors import DecodeError, UnreadableMemory
from xendbg.files import limit_text
from xendbg.sites import parse_notes

FLAT_SIGNATURE = b"makedumpfile"
FLAT_HEADER_SIZE = 4096
KDUMP_SIGNATURE = b"KDUMP   "
COMPRESSED_ZLIB, COMPRESSED_LZO, COMPRESSED_SNAPPY = 0x1, 0x2, 0x4
_CHUNK = struct.Struct(">qq")
_DESC = struct.Struct("<QIIQ")
# (offset of status in disk_dump_header, sub header format, its size, where offset_note/note_size sit in it)
_CLASSES = {
    64: (424, "<QIIQQQQQQQQQQQ", 104, (7, 8)),
    32: (412, "<IIIIIQIQIQIQQQ", 80, (7, 8)),
}
_BITMAP_CHUNK = 64  # bytes per precomputed population count (rank of a frame in the bitmap)
_PAGE_CACHE = 64


def is_flattened(data: mmap.mmap) -> bool:
    return data[:len(FLAT_SIGNATURE)] == FLAT_SIGNATURE


def is_kdump(data: mmap.mmap) -> bool:
    return data[:len(KDUMP_SIGNATURE)] == KDUMP_SIGNATURE


class _Flat:
    """The kdump file a flattened file describes, read through an index of its chunks."""

    def __init__(self, path: str, data: mmap.mmap) -> None:
        self.path, self.data = path, data
        size = len(data)
        if size < FLAT_HEADER_SIZE:
            raise DecodeError(f"{path}: flattened dump header is {size} bytes, not {FLAT_HEADER_SIZE}: truncated")
        kind, version = struct.unpack_from(">qq", data, 16)
        if (kind, version) != (1, 1):
            raise DecodeError(f"{path}: flattened format type {kind} version {version}; xendbg reads type 1 version 1")
        chunks: list[tuple[int, int, int]] = []
        at = FLAT_HEADER_SIZE
        while True:
            if at + _CHUNK.size > size:
                raise DecodeError(f"{path}: truncated: the flattened dump ends at {size} bytes without its end marker")
            offset, length = _CHUNK.unpack_from(data, at)
            if offset == -1 and length == -1:
                break
            if offset < 0 or length < 0:
                raise DecodeError(f"{path}: chunk header at {at:#x} says offset {offset}, size {length}: corrupt")
            if at + _CHUNK.size + length > size:
                raise DecodeError(f"{path}: truncated: the chunk at {at:#x} ({length} bytes) runs past the end "
                                  f"of the file ({size} bytes)")
            if length:
                chunks.append((offset, offset + length, at + _CHUNK.size))
            at += _CHUNK.size + length
        chunks.sort()
        for (_, end, _), (start, _, where) in zip(chunks, chunks[1:], strict=False):
            if start < end:
                raise DecodeError(f"{path}: chunks overlap at kdump offset {start:#x} (chunk at {where:#x}): corrupt")
        self._starts = [c[0] for c in chunks]
        self._chunks = chunks

    def read(self, offset: int, size: int, what: str) -> bytes:
        out = bytearray()
        at, left = offset, size
        while left > 0:
            i = bisect.bisect_right(self._starts, at) - 1
            if i < 0 or at >= self._chunks[i][1]:
                raise DecodeError(f"{self.path}: {what}: nothing was written at kdump offset {at:#x}: "
                                  f"truncated or corrupt")
            start, end, file_offset = self._chunks[i]
            n = min(left, end - at)
            out += self.data[file_offset + at - start:file_offset + at - start + n]
            at, left = at + n, left - n
        return bytes(out)


class _Plain:
    """A kdump file as makedumpfile writes it to disk: offsets are file offsets."""

    def __init__(self, path: str, data: mmap.mmap) -> None:
        self.path, self.data = path, data

    def read(self, offset: int, size: int, what: str) -> bytes:
        if offset < 0 or size < 0 or offset + size > len(self.data):
            raise DecodeError(f"{self.path}: {what} ({size} bytes at {offset:#x}) lies beyond the end of the file "
                              f"({len(self.data)} bytes): truncated or corrupt")
        return self.data[offset:offset + size]


class KdumpDump:
    """A kdump-compressed dump: `read(paddr, size)` page by page, and its CPUs."""

    def __init__(self, path: str, data: mmap.mmap) -> None:
        self.path = path
        self.data = data
        self.file = _Flat(path, data) if is_flattened(data) else _Plain(path, data)
        flat = isinstance(self.file, _Flat)
        self.format = "kdump-compressed, flattened (zlib)" if flat else "kdump-compressed (zlib)"
        if self.file.read(0, len(KDUMP_SIGNATURE), "disk_dump_header") != KDUMP_SIGNATURE:
            raise DecodeError(f"{path}: no \"KDUMP   \" signature at the start of the kdump file")
        header_version, = struct.unpack("<I", self.file.read(8, 4, "disk_dump_header"))
        if header_version < 4:
            raise DecodeError(f"{path}: kdump header version {header_version}; xendbg reads version 4 and later "
                              f"(notes in the sub header)")
        self._header(path)
        if self.note_size > MAX_NOTE_BYTES:
            raise DecodeError(f"{path}: the kdump sub header says {self.note_size} bytes of notes, more than the "
                              f"{limit_text(MAX_NOTE_BYTES)} xendbg reads (QEMU writes under 1 KiB per CPU): corrupt")
        notes = self.file.read(self.offset_note, self.note_size, "ELF notes")
        self.notes = notes
        space = "kdump offset" if flat else "file offset"
        self.cpus: list[CpuState] = cpus_from_notes(parse_notes(notes, path, self.offset_note, space), path, None)
        bitmap_at = (1 + self.sub_hdr_size) * self.block_size
        self.bitmap = self.file.read(bitmap_at, self.bitmap_blocks // 2 * self.block_size, "dump bitmap")
        self.offset_page = (1 + self.sub_hdr_size + self.bitmap_blocks) * self.block_size
        self._ranks = [0]
        for at in range(0, len(self.bitmap), _BITMAP_CHUNK):
            chunk = self.bitmap[at:at + _BITMAP_CHUNK]
            self._ranks.append(self._ranks[-1] + int.from_bytes(chunk, "little").bit_count())
        self._pages: OrderedDict[int, bytes] = OrderedDict()
        self._ranges: list[tuple[int, int]] | None = None

    def _header(self, path: str) -> None:
        """Find which of the two header layouts the file uses: the one whose notes follow its sub header."""
        for status_at, sub_format, sub_size, (note_at, size_at) in _CLASSES.values():
            fields = struct.unpack("<5I", self.file.read(status_at, 20, "disk_dump_header"))
            status, block_size, sub_hdr_size, bitmap_blocks, _ = fields
            if block_size < 512 or block_size > 1 << 16 or block_size & (block_size - 1):
                continue
            try:
                sub = struct.unpack(sub_format, self.file.read(block_size, sub_size, "kdump_sub_header"))
            except DecodeError:
                continue
            if sub[note_at] != block_size + sub_size:
                continue
            if status & (COMPRESSED_LZO | COMPRESSED_SNAPPY):
                name = "lzo" if status & COMPRESSED_LZO else "snappy"
                raise DecodeError(f"{path}: pages compressed with {name} are not supported (xendbg reads plain and "
                                  f"zlib dumps: dump-guest-memory FILE or -z FILE)")
            if bitmap_blocks == 0 or bitmap_blocks % 2:
                raise DecodeError(f"{path}: kdump header says {bitmap_blocks} bitmap blocks (two equal bitmaps "
                                  f"expected): corrupt")
            self.block_size, self.sub_hdr_size, self.bitmap_blocks = block_size, sub_hdr_size, bitmap_blocks
            self.offset_note, self.note_size = sub[note_at], sub[size_at]
            return
        raise DecodeError(f"{path}: the kdump header's block size and sub header do not fit either layout "
                          f"(ELF32 or ELF64 QEMU dumps): corrupt")

    def ranges(self) -> list[tuple[int, int]]:
        """(start, end) of each run of page frames the dump holds."""
        if self._ranges is None:
            self._ranges = self._runs()
        return self._ranges

    def _runs(self) -> list[tuple[int, int]]:
        # Linear in the bitmap, whatever its pattern: its bits as text, frame 0 first, and the runs of 1s.
        bits = format(int.from_bytes(self.bitmap, "little"), "b")[::-1]
        return [(m.start() * self.block_size, m.end() * self.block_size) for m in re.finditer("1+", bits)]

    def _present(self, frame: int) -> bool:
        byte = frame >> 3
        return 0 <= byte < len(self.bitmap) and bool(self.bitmap[byte] >> (frame & 7) & 1)

    def has(self, address: int) -> bool:
        return address >= 0 and self._present(address // self.block_size)

    def _rank(self, frame: int) -> int:
        """How many frames below `frame` the dump holds: the index of its page descriptor."""
        byte = frame >> 3
        chunk = byte // _BITMAP_CHUNK
        start = chunk * _BITMAP_CHUNK
        below = int.from_bytes(self.bitmap[start:byte], "little").bit_count()
        return self._ranks[chunk] + below + (self.bitmap[byte] & ((1 << (frame & 7)) - 1)).bit_count()

    def _page(self, frame: int, address: int, size: int) -> bytes:
        page = self._pages.get(frame)
        if page is not None:
            self._pages.move_to_end(frame)
            return page
        if not self._present(frame):
            raise UnreadableMemory(address, size, f"guest-physical page {frame * self.block_size:#x} is not in the "
                                                  f"dump (not RAM)")
        at = self.offset_page + self._rank(frame) * _DESC.size
        try:
            offset, length, flags, _ = _DESC.unpack(self.file.read(at, _DESC.size, "page descriptor"))
            raw = self.file.read(offset, length, f"page {frame:#x}") if length <= self.block_size else None
        except DecodeError as exc:
            raise UnreadableMemory(address, size, str(exc)) from None
        if raw is None or flags not in (0, COMPRESSED_ZLIB):
            why = (f"pages compressed with flags {flags:#x} (lzo or snappy) are not supported"
                   if raw is not None else f"its descriptor says {length} bytes, more than a page: corrupt")
            raise UnreadableMemory(address, size, f"page frame {frame:#x}: {why}")
        if flags == COMPRESSED_ZLIB:
            try:  # bounded: a corrupt stream must not inflate to more than a page
                page = zlib.decompressobj().decompress(raw, self.block_size + 1)
            except zlib.error as exc:
                raise UnreadableMemory(address, size, f"page frame {frame:#x} does not inflate: {exc}") from None
        else:
            page = raw
        if len(page) != self.block_size:
            raise UnreadableMemory(address, size, f"page frame {frame:#x} holds {len(page)} bytes, not "
                                                  f"{self.block_size}: corrupt")
        self._pages[frame] = page
        if len(self._pages) > _PAGE_CACHE:
            self._pages.popitem(last=False)
        return page

    def read(self, address: int, size: int) -> bytes:
        if address < 0 or size < 0:
            raise UnreadableMemory(address, max(size, 0), "negative address or size")
        out = bytearray()
        at, left = address, size
        while left > 0:
            frame, inside = divmod(at, self.block_size)
            n = min(left, self.block_size - inside)
            out += self._page(frame, address, size)[inside:inside + n]
            at, left = at + n, left - n
        return bytes(out)

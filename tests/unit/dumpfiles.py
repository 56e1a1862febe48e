"""Build small QEMU-style memory dumps from the published layouts (QEMU 7.2 dump/dump.c,
target/i386/arch_dump.c, include/sysemu/dump.h), with page tables the tests lay out themselves."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

PAGE = 4096
P, RW, US, PS = 0x1, 0x2, 0x4, 0x80
XEN_GUEST_KERNEL, NX = 1 << 52, 1 << 63  # Xen's software bit 52 and NX, set on 64-bit PV entries

# (shift, index bits, entry size) per level, top first
FOUR_LEVEL = ((39, 9, 8), (30, 9, 8), (21, 9, 8), (12, 9, 8))
PAE = ((30, 2, 8), (21, 9, 8), (12, 9, 8))
TWO_LEVEL = ((22, 10, 4), (12, 10, 4))

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")


@dataclass
class Ram:
    """Guest-physical memory from 0, with a bump allocator for page tables."""

    size: int
    data: bytearray = field(init=False)
    next_free: int = field(init=False)

    def __post_init__(self) -> None:
        self.data = bytearray(self.size)
        self.next_free = self.size // 2  # tables in the upper half

    def alloc(self, size: int = PAGE, align: int = PAGE) -> int:
        at = -(-self.next_free // align) * align
        self.next_free = at + size
        return at

    def write(self, address: int, data: bytes) -> None:
        self.data[address:address + len(data)] = data

    def entry(self, table: int, index: int, size: int) -> int:
        return int.from_bytes(self.data[table + index * size:table + (index + 1) * size], "little")

    def set_entry(self, table: int, index: int, size: int, value: int) -> None:
        self.data[table + index * size:table + (index + 1) * size] = value.to_bytes(size, "little")


def map_page(ram: Ram, root: int, levels: tuple, virtual: int, physical: int, *, leaf_level: int | None = None,
             extra: int = 0) -> None:
    """Map `virtual` to `physical`, a leaf at levels[leaf_level] (a large page above the last level).
    `extra` is or'ed into every entry (Xen's bit 52, NX) of 8-byte tables."""
    leaf = len(levels) - 1 if leaf_level is None else leaf_level
    table = root
    for depth, (shift, bits, size) in enumerate(levels):
        index = (virtual >> shift) & ((1 << bits) - 1)
        more = extra if size == 8 else 0
        if depth == leaf:
            flags = P | RW | US | (PS if depth != len(levels) - 1 else 0)
            ram.set_entry(table, index, size, physical | flags | more)
            return
        entry = ram.entry(table, index, size)
        if not entry & P:
            child = ram.alloc()
            # a PAE PDPTE has no RW/US bits
            ram.set_entry(table, index, size, child | (P if levels is PAE and depth == 0 else P | RW | US) | more)
            entry = ram.entry(table, index, size)
        table = entry & 0x000FFFFFFFFFF000 if size == 8 else entry & 0xFFFFF000


def note(name: bytes, kind: int, desc: bytes) -> bytes:
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name) + 1, len(desc), kind) + pad(name + b"\0") + pad(desc)


def qemu_state(regs: dict[str, int], cr: tuple[int, ...], selectors: dict[str, int] | None = None,
               size: int = 440) -> bytes:
    selectors = selectors or {}
    out = struct.pack("<II", 1, size) + struct.pack("<18Q", *(regs.get(r, 0) for r in GPRS))
    for seg in SEGMENTS:
        out += struct.pack("<IIIIQ", selectors.get(seg, 0), 0xFFFFFFFF, 0, 0, 0)
    out += struct.pack("<5Q", *cr)
    return out.ljust(size, b"\0")


@dataclass
class Cpu:
    regs: dict[str, int]
    cr: tuple[int, int, int, int, int]
    cs: int
    ss: int = 0


def notes(cpus: list[Cpu], long_mode: bool, qemu_size: int = 440) -> bytes:
    pr = 336 if long_mode else 144
    out = b""
    for i, _ in enumerate(cpus):
        desc = bytearray(pr)
        struct.pack_into("<I", desc, 32 if long_mode else 24, i + 1)  # pr_pid
        out += note(b"CORE", 1, bytes(desc))
    for cpu in cpus:
        out += note(b"QEMU", 0, qemu_state(cpu.regs, cpu.cr, {"cs": cpu.cs, "ss": cpu.ss}, qemu_size))
    return out


def elf_core(ram: bytes, cpus: list[Cpu], long_mode: bool, *, machine: int | None = None, etype: int = 4,
             vaddr_shift: int = 0, note_area: bytes | None = None,
             ranges: list[tuple[int, int]] | None = None) -> bytes:
    """An ET_CORE as QEMU writes it: header, PT_NOTE, PT_LOADs (p_paddr physical), notes, memory."""
    wide = long_mode
    machine = machine if machine is not None else (62 if long_mode else 3)
    ehdr, phdr = ("<16sHHIQQQIHHHHHH", "<IIQQQQQQ") if wide else ("<16sHHIIIIIHHHHHH", "<IIIIIIII")
    ranges = ranges or [(0, len(ram))]
    area = note_area if note_area is not None else notes(cpus, long_mode)
    count = 1 + len(ranges)
    offset = struct.calcsize(ehdr) + count * struct.calcsize(phdr)
    heads = [(4, 0, offset, 0, 0, len(area), len(area))]
    offset += len(area)
    for start, end in ranges:
        heads.append((1, 7, offset, start + vaddr_shift, start, end - start, end - start))
        offset += end - start
    ident = b"\x7fELF" + bytes([2 if wide else 1, 1, 1]) + bytes(9)
    out = struct.pack(ehdr, ident, etype, machine, 1, 0, struct.calcsize(ehdr), 0, 0, struct.calcsize(ehdr),
                      struct.calcsize(phdr), count, 0, 0, 0)
    for kind, flags, at, vaddr, paddr, filesz, memsz in heads:
        if wide:
            out += struct.pack(phdr, kind, flags, at, vaddr, paddr, filesz, memsz, 0)
        else:
            out += struct.pack(phdr, kind, at, vaddr, paddr, filesz, memsz, flags, 0)
    out += area
    for start, end in ranges:
        out += ram[start:end]
    return out


def kdump(ram: bytes, cpus: list[Cpu], long_mode: bool, *, flattened: bool = True, status: int = 1,
          page_flags: int | None = None) -> bytes:
    """A kdump-compressed file as QEMU's create_kdump_vmcore writes it (header version 6), in makedumpfile's
    flattened format unless `flattened` is False.  Zero pages share one zero page; others are zlib."""
    block = PAGE
    area = notes(cpus, long_mode)
    frames = len(ram) // block
    sub_fmt, sub_size = ("<QIIQQQQQQQQQQQ", 104) if long_mode else ("<IIIIIQIQIQIQQQ", 80)
    status_at = 424 if long_mode else 412
    sub_hdr_size = -(-(sub_size + len(area)) // block)
    bitmap_bytes = (frames + 7) // 8
    bitmap_len = (bitmap_bytes + block - 1) // block * block
    bitmap_blocks = bitmap_len // block * 2
    header = bytearray(status_at + 40)
    header[:8] = b"KDUMP   "
    struct.pack_into("<I", header, 8, 6)
    struct.pack_into("<10I", header, status_at, status, block, sub_hdr_size, bitmap_blocks, frames, 0, 0, 0, 0,
                     len(cpus))
    offset_note = block + sub_size
    if long_mode:
        sub = struct.pack(sub_fmt, 0, 1, 0, 0, 0, 0, 0, offset_note, len(area), 0, 0, 0, 0, frames)
    else:
        sub = struct.pack(sub_fmt, 0, 1, 0, 0, 0, 0, 0, offset_note, len(area), 0, 0, 0, 0, frames)
    bitmap = bytearray(bitmap_len)
    for f in range(frames):
        bitmap[f // 8] |= 1 << (f % 8)
    offset_page = (1 + sub_hdr_size + bitmap_blocks) * block
    descs, data = b"", b""
    data_at = offset_page + 24 * frames
    zero_at = data_at
    data += bytes(block)
    for f in range(frames):
        page = bytes(ram[f * block:(f + 1) * block])
        if page == bytes(block):
            descs += struct.pack("<QIIQ", zero_at, block, 0, 0)
            continue
        packed = zlib.compress(page, 1)
        flags = 1 if page_flags is None else page_flags
        if len(packed) >= block:
            packed, flags = page, 0
        descs += struct.pack("<QIIQ", data_at + len(data), len(packed), flags, 0)
        data += packed
    chunks = [(0, bytes(header)), (block, sub), (offset_note, area), ((1 + sub_hdr_size) * block, bytes(bitmap)),
              ((1 + sub_hdr_size) * block + bitmap_len, bytes(bitmap)), (offset_page, descs), (data_at, data)]
    if not flattened:
        out = bytearray(data_at + len(data))
        for at, chunk in chunks:
            out[at:at + len(chunk)] = chunk
        return bytes(out)
    out = b"makedumpfile".ljust(16, b"\0") + struct.pack(">qq", 1, 1)
    out = out.ljust(4096, b"\0")
    for at, chunk in chunks:
        out += struct.pack(">qq", at, len(chunk)) + chunk
    return out + struct.pack(">qq", -1, -1)

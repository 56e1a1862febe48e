"""Guest-physical memory and CPU notes of a plain ELF dump from QEMU's `dump-guest-memory FILE`.

QEMU writes an ET_CORE file (dump/dump.c dump_begin, QEMU 7.2): the ELF header, one PT_NOTE, one
PT_LOAD per block of guest RAM whose p_paddr is the block's guest-physical address (p_vaddr repeats
it when the dump was taken without paging, `-p`), the notes, then the memory.  With more than 0xfffe
program headers e_phnum is PN_XNUM and the count is in section 0's sh_info.  Memory is read through
the file's mmap, one range at a time.
"""

from __future__ import annotations

import bisect
import mmap

from xendbg.dump.cpus import MAX_NOTE_BYTES, CpuState, cpus_from_notes
from xendbg.errors import DecodeError, UnreadableMemory
from xendbg.files import limit_text
from xendbg.sites import ElfFile, parse_notes

ET_CORE = 4
EM_X86_64 = 62
PT_LOAD, PT_NOTE = 1, 4
_ELF_TYPES = {0: "an ELF file of no type", 1: "a relocatable object (ET_REL)", 2: "an executable (ET_EXEC)",
              3: "a shared object or PIE (ET_DYN)"}


class ElfDump:
    """A QEMU ELF dump: `read(paddr, size)` over its PT_LOADs, and its CPUs."""

    format = "ELF"

    def __init__(self, path: str, data: mmap.mmap) -> None:
        self.path = path
        self.data = data
        elf = ElfFile(path, data)
        if elf.type != ET_CORE:
            what = _ELF_TYPES.get(elf.type, f"an ELF file of type {elf.type}")
            raise DecodeError(f"{path}: {what}, not a memory dump (ET_CORE from dump-guest-memory)")
        loads = [s for s in elf.segments if s.type == PT_LOAD and s.filesz]
        if not loads:
            raise DecodeError(f"{path}: a core file with no memory (no PT_LOAD with data)")
        paging = [s for s in loads if s.vaddr != s.paddr]
        if paging:
            raise DecodeError(f"{path}: a paging dump (dump-guest-memory -p: PT_LOAD at virtual {paging[0].vaddr:#x} "
                              f"for physical {paging[0].paddr:#x}); QEMU's page walk drops Xen PV mappings, so "
                              f"xendbg reads dumps taken without -p")
        runs = []
        for seg in loads:
            elf.check(seg.offset, seg.filesz, f"memory at physical {seg.paddr:#x}")
            runs.append((seg.paddr, seg.paddr + seg.filesz, seg.offset))
        runs.sort()
        for (_, end, _), (start, _, _) in zip(runs, runs[1:], strict=False):
            if start < end:
                raise DecodeError(f"{path}: PT_LOADs overlap at physical {start:#x}: corrupt program headers")
        self._starts = [r[0] for r in runs]
        self._runs = runs
        areas = [s for s in elf.segments if s.type == PT_NOTE]
        total = sum(s.filesz for s in areas)
        if total > MAX_NOTE_BYTES:
            raise DecodeError(f"{path}: {len(areas)} note segments of {total} bytes, more than the "
                              f"{limit_text(MAX_NOTE_BYTES)} of notes xendbg reads (QEMU writes one, under 1 KiB per "
                              f"CPU): corrupt program headers")
        notes = []
        for seg in areas:
            notes += parse_notes(elf.read(seg.offset, seg.filesz, "note segment"), path, seg.offset)
        self.notes = b"".join(elf.read(s.offset, s.filesz, "note segment") for s in areas)
        self.cpus: list[CpuState] = cpus_from_notes(notes, path, elf.machine == EM_X86_64)

    def ranges(self) -> list[tuple[int, int]]:
        """(start, end) of each range of guest-physical memory the dump holds."""
        return [(start, end) for start, end, _ in self._runs]

    def has(self, address: int) -> bool:
        i = bisect.bisect_right(self._starts, address) - 1
        return i >= 0 and address < self._runs[i][1]

    def read(self, address: int, size: int) -> bytes:
        out = bytearray()
        at, left = address, size
        while left > 0:
            i = bisect.bisect_right(self._starts, at) - 1
            if i < 0 or at >= self._runs[i][1]:
                raise UnreadableMemory(address, size, f"guest-physical {at:#x} is not in the dump (not RAM)")
            start, end, offset = self._runs[i]
            n = min(left, end - at)
            out += self.data[offset + at - start:offset + at - start + n]
            at, left = at + n, left - n
        return bytes(out)

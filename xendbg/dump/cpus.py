"""Per-CPU registers from the notes QEMU's `dump-guest-memory` writes, in a plain ELF dump and in the
kdump-compressed format alike.

QEMU writes, for every CPU in order, a `CORE` note of type NT_PRSTATUS, then for every CPU in the same
order a `QEMU` note of type 0 holding a `QEMUCPUState` (dump/dump.c write_elf64_notes/write_elf32_notes,
target/i386/arch_dump.c, QEMU 7.2; QEMUCPUSTATE_VERSION 1):

    u32 version, size
    u64 rax rbx rcx rdx rsi rdi rsp rbp r8 .. r15 rip rflags
    segment cs ds es fs gs ss ldt tr gdt idt     (each: u32 selector, limit, flags, pad; u64 base)
    u64 cr[5]                                    (CR0 .. CR4; CR1 is 0)
    u64 kernel_gs_base                           (appended in QEMU 6.1 with the same version: 440
                                                  bytes in 7.2's dumps, 432 before)

The prstatus note is Linux's `elf_prstatus`: 336 bytes with the x86_64 `user_regs_struct` at offset 112
when the first CPU was in long mode (the dump is then EM_X86_64), else 144 bytes with the i386 one at
offset 72.  The QEMU note has every register the prstatus has and more, so the registers come from it;
the prstatus notes only say how many CPUs there are and which width QEMU saw.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from xendbg.errors import DecodeError

NT_PRSTATUS = 1
PRSTATUS_SIZE = {True: 336, False: 144}  # by long mode (target/i386/arch_dump.c x86_64_elf_prstatus / x86_elf_prstatus)
QEMU_NOTE_TYPE = 0
QEMU_STATE_VERSION = 1
_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")
_HEAD = struct.Struct("<II18Q")
_SEGMENT = struct.Struct("<IIIIQ")
QEMU_STATE_SIZE = _HEAD.size + len(_SEGMENTS) * _SEGMENT.size + 5 * 8  # 432, without kernel_gs_base
QEMU_STATE_SIZES = (QEMU_STATE_SIZE, QEMU_STATE_SIZE + 8)
_LEGACY = {"eax": "rax", "ebx": "rbx", "ecx": "rcx", "edx": "rdx", "esi": "rsi", "edi": "rdi", "esp": "rsp",
           "ebp": "rbp", "eip": "rip", "eflags": "rflags"}

# The most CPUs a dump may have: far above the 288 of QEMU 7.2's q35 machine (hw/i386/pc_q35.c) and
# Xen's default NR_CPUS of 256; the notes of this many CPUs take 3.3 MiB.
MAX_CPUS = 4096
MAX_NOTE_BYTES = 16 << 20  # the note area xendbg reads: room for MAX_CPUS CPUs' notes and more

CR4_PSE, CR4_PAE, CR4_LA57 = 1 << 4, 1 << 5, 1 << 12


@dataclass(frozen=True)
class Segment:
    selector: int
    limit: int
    flags: int
    base: int


@dataclass(frozen=True)
class CpuState:
    """One CPU as QEMU saw it when it took the dump."""

    index: int  # 0-based, in QEMU's CPU order (gdb's thread index + 1)
    long_mode: bool  # whether the dump says long mode (EM_X86_64, the 336-byte prstatus)
    gprs: dict[str, int]
    segments: dict[str, Segment]
    cr: tuple[int, int, int, int, int]

    def registers(self) -> dict[str, int]:
        """The register file a debugger shows: 64-bit names in long mode, 32-bit ones otherwise, with
        segment selectors, CR0-CR4, `pc` and `sp`."""
        regs: dict[str, int] = {}
        if self.long_mode:
            regs |= self.gprs
            regs |= {low: self.gprs[wide] & 0xFFFFFFFF for low, wide in _LEGACY.items()}
            regs["fs_base"], regs["gs_base"] = self.segments["fs"].base, self.segments["gs"].base
        else:
            regs |= {low: self.gprs[wide] & 0xFFFFFFFF for low, wide in _LEGACY.items()}
        regs |= {name: self.segments[name].selector & 0xFFFF for name in ("cs", "ss", "ds", "es", "fs", "gs")}
        regs |= {f"cr{n}": value for n, value in enumerate(self.cr) if n != 1}
        regs["pc"] = regs["rip"] if self.long_mode else regs["eip"]
        regs["sp"] = regs["rsp"] if self.long_mode else regs["esp"]
        return regs


def _qemu_state(desc: memoryview, index: int, long_mode: bool, where: str) -> CpuState:
    sizes = " or ".join(map(str, QEMU_STATE_SIZES))
    if len(desc) not in QEMU_STATE_SIZES:
        raise DecodeError(f"{where}: CPU {index}'s QEMU note has {len(desc)} bytes, not {sizes}: corrupt notes")
    version, size, *values = _HEAD.unpack_from(desc)
    if version != QEMU_STATE_VERSION or size != len(desc):
        raise DecodeError(f"{where}: CPU {index}'s QEMU note says version {version} of {size} bytes in a {len(desc)}-"
                          f"byte note; xendbg reads version {QEMU_STATE_VERSION} of {sizes} bytes: corrupt notes")
    segments = {}
    at = _HEAD.size
    for name in _SEGMENTS:
        selector, limit, flags, _, base = _SEGMENT.unpack_from(desc, at)
        segments[name] = Segment(selector, limit, flags, base)
        at += _SEGMENT.size
    cr = struct.unpack_from("<5Q", desc, at)
    return CpuState(index, long_mode, dict(zip(_GPRS, values, strict=True)), segments, cr)


def cpus_from_notes(notes: list[tuple[bytes, int, memoryview]], where: str, long_mode: bool | None) -> list[CpuState]:
    """The CPUs in a QEMU dump's notes (sites.parse_notes of its note areas).  `long_mode` is what the
    ELF header says (None for a kdump file, which says it only through the prstatus size)."""
    prstatus = [desc for name, kind, desc in notes if name == b"CORE" and kind == NT_PRSTATUS]
    states = [desc for name, kind, desc in notes if name == b"QEMU" and kind == QEMU_NOTE_TYPE]
    if not prstatus and not states:
        raise DecodeError(f"{where}: no CPU notes (NT_PRSTATUS, QEMU): not a QEMU dump-guest-memory file")
    if not states:
        raise DecodeError(f"{where}: NT_PRSTATUS notes but no QEMU CPU notes: not written by QEMU's "
                          f"dump-guest-memory (control registers unknown)")
    if len(states) > MAX_CPUS:
        raise DecodeError(f"{where}: {len(states)} QEMU CPU notes, more than the {MAX_CPUS} CPUs xendbg reads: "
                          f"corrupt notes")
    if len(prstatus) != len(states):
        raise DecodeError(f"{where}: {len(prstatus)} NT_PRSTATUS notes but {len(states)} QEMU notes: corrupt notes")
    sizes = {len(desc) for desc in prstatus}
    if len(sizes) != 1 or sizes.pop() not in PRSTATUS_SIZE.values():
        raise DecodeError(f"{where}: NT_PRSTATUS notes of {sorted({len(d) for d in prstatus})} bytes (QEMU writes "
                          f"{PRSTATUS_SIZE[True]} or {PRSTATUS_SIZE[False]}): corrupt notes")
    wide = len(prstatus[0]) == PRSTATUS_SIZE[True]
    if long_mode is not None and wide != long_mode:
        raise DecodeError(f"{where}: the ELF header says {'x86_64' if long_mode else 'i386'} but the NT_PRSTATUS "
                          f"notes are {len(prstatus[0])} bytes: corrupt notes")
    return [_qemu_state(desc, i, wide, where) for i, desc in enumerate(states)]

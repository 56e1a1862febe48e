"""`xendbg core FILE --to-gdb OUT`: an ELF core of one vCPU's *virtual* address space, for gdb.

A QEMU dump's PT_LOADs are physical; gdb takes p_vaddr as the address, so on a guest whose virtual
addresses differ from physical ones (every 64-bit PV guest) it reads stale bytes from the ELF file
instead.  This core has one PT_LOAD per run of virtually contiguous pages the vCPU's page tables map
(walked by xendbg, Xen's PTE bits masked), and QEMU's CPU notes as they were, so `gdb GUEST_ELF OUT`
and the `xen` commands read guest memory as they would live.
"""

from __future__ import annotations

import os
import struct

from xendbg.dump.api import Core, Vcpu
from xendbg.dump.paging import OFF, Aliases, mappings
from xendbg.errors import DecodeError, UsageError

ET_CORE, EM_386, EM_X86_64 = 4, 3, 62
PT_LOAD, PT_NOTE, PF_RWX = 1, 4, 7
_COPY = 1 << 20


def _vcpu(core: Core, index: int | None) -> Vcpu:
    if index is not None:
        return core.vcpu(index)
    for vcpu in core.vcpus:
        if vcpu.width is not None and vcpu.target.paging.mode != OFF:
            return vcpu
    raise UsageError("no vCPU of the dump runs the guest with paging on: give --vcpu N")


def runs(core: Core, vcpu: Vcpu, aliases: Aliases | None = None) -> list[tuple[int, list[tuple[int, int]]]]:
    """(virtual start, [(physical, size), ...]) for each run of virtually contiguous mapped pages.  A 64-bit
    PV kernel runs in ring 3, so only ring-3 mappings are its own (Xen's are supervisor-only)."""
    paging = vcpu.target.paging
    user_only = vcpu.target.cpu.long_mode and vcpu.cs & 3 == 3
    out: list[tuple[int, list[tuple[int, int]]]] = []
    end = None
    for virtual, physical, size in mappings(core.memory, paging, user_only=user_only, aliases=aliases):
        if virtual == end:
            out[-1][1].append((physical, size))
        else:
            out.append((virtual, [(physical, size)]))
        end = virtual + size
    return out


def write_gdb_core(core: Core, index: int | None, out: str) -> str:
    vcpu = _vcpu(core, index)
    if vcpu.target.paging.mode == OFF:
        raise UsageError(f"vCPU {vcpu.index} runs with paging off: its virtual addresses are physical, and gdb "
                         f"reads the dump itself (gdb GUEST_ELF {core.path})")
    aliases = Aliases()
    segments = runs(core, vcpu, aliases)
    if not segments:
        raise DecodeError(f"vCPU {vcpu.index}'s page tables ({vcpu.target.paging.describe()}) map nothing in the dump")
    wide = vcpu.target.cpu.long_mode
    ehdr, phdr = ("<16sHHIQQQIHHHHHH", "<IIQQQQQQ") if wide else ("<16sHHIIIIIHHHHHH", "<IIIIIIII")
    ehsize, phentsize = struct.calcsize(ehdr), struct.calcsize(phdr)
    count = 1 + len(segments)
    if count >= 0xFFFF:
        raise DecodeError(f"{len(segments)} separate mapped ranges: more than an ELF core without extended numbering "
                          f"holds")
    notes = bytes(core.memory.notes)
    offset = ehsize + phentsize * count
    headers = [(PT_NOTE, 0, offset, 0, 0, len(notes), len(notes), 4)]
    offset += len(notes)
    for virtual, pages in segments:
        size = sum(n for _, n in pages)
        headers.append((PT_LOAD, PF_RWX, offset, virtual, pages[0][0], size, size, 0x1000))
        offset += size
    ident = b"\x7fELF" + bytes([2 if wide else 1, 1, 1]) + bytes(9)
    total = 0
    try:
        with open(out, "wb") as file:
            file.write(struct.pack(ehdr, ident, ET_CORE, EM_X86_64 if wide else EM_386, 1, 0, ehsize, 0, 0, ehsize,
                                   phentsize, count, 0, 0, 0))
            for kind, flags, at, vaddr, paddr, filesz, memsz, align in headers:
                if wide:
                    file.write(struct.pack(phdr, kind, flags, at, vaddr, paddr, filesz, memsz, align))
                else:  # p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags, p_align
                    file.write(struct.pack(phdr, kind, at, vaddr, paddr & 0xFFFFFFFF, filesz, memsz, flags, align))
            file.write(notes)
            for _, pages in segments:
                for physical, size in pages:
                    for at in range(0, size, _COPY):
                        file.write(core.memory.read(physical + at, min(_COPY, size - at)))
                    total += size
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from None
    left_out = aliases.describe()
    return (f"wrote {out}: {len(segments)} PT_LOADs, {total >> 10} KiB of vCPU {vcpu.index}'s virtual address space "
            f"({vcpu.target.paging.describe()}{'; ' + left_out if left_out else ''}); open it with: "
            f"gdb GUEST_ELF {os.path.basename(out)}")

"""Build `xl dump-core` files laid out exactly as libxenguest writes them (tools/libs/guest/xg_core.c
xc_domain_dumpcore_via_callback, xg_core.h, xg_core_x86.h; docs/misc/dump-core-format.txt;
RELEASE-4.17.0), and the vcpu_guest_contexts in them from xendbg's public layouts.

    ELF64 header (e_phnum 0, e_shoff 64), the section headers
        [null, .shstrtab, .note.Xen, .xen_prstatus, .xen_shared_info (optional), .xen_pages, .xen_p2m|.xen_pfn]
    .note.Xen: DUMPCORE_NONE, DUMPCORE_HEADER, DUMPCORE_XEN_VERSION, DUMPCORE_FORMAT_VERSION (notes named
               "Xen": 16-byte header then the descriptor)
    .xen_prstatus: nr_vcpus vcpu_guest_context_any_t (5168 bytes each), .xen_shared_info: one page,
    zero padding to a page boundary, .xen_pages, then .xen_p2m {pfn, gmfn} or .xen_pfn, then .shstrtab.
"""

from __future__ import annotations

import struct

from tests.unit.images import pack
from xendbg.abi import get_abi

PAGE = 4096
EHDR = "<16sHHIQQQIHHHHHH"
SHDR = "<IIQQQQIIQQ"
SHT_PROGBITS, SHT_STRTAB, SHT_NOTE = 1, 3, 7
ANY_CONTEXT = 5168  # sizeof(vcpu_guest_context_any_t), checked against libxen-dev in test_xc_core.py
XEN_VERSION_DESC = 8 + 8 + 16 + 144 + 1024 + 64 + 8 + 8  # u64 x2, extraversion, compile_info, caps, ...
VGCF_IN_KERNEL, VGCF_FAILSAFE_DISABLES_EVENTS, VGCF_SYSCALL_DISABLES_EVENTS, VGCF_ONLINE = 4, 8, 16, 32
INVALID = (1 << 64) - 1


def pfn_to_cr3(pfn: int, width: int) -> int:
    """xen_pfn_to_cr3 (public/arch-x86/xen-x86_64.h and xen-x86_32.h, RELEASE-4.17.0)."""
    return pfn << 12 if width == 64 else ((pfn << 12) | (pfn >> 20)) & 0xFFFFFFFF


def context(width: int, regs: dict[str, int], cr3_frame: int, *, traps: list[dict] = (),  # type: ignore[assignment]
            callbacks: dict[str, tuple[int, int]] | None = None, flags: int = VGCF_ONLINE | VGCF_IN_KERNEL,
            kernel_ss: int = 0, kernel_sp: int = 0, cr3: int | None = None) -> bytes:
    """A vcpu_guest_context as arch_get_info_guest fills it: `regs` into user_regs (64- or 32-bit names),
    `traps` stored at their vector, callbacks {kind: (cs, address)}, ctrlreg[3] = xen_pfn_to_cr3."""
    abi = get_abi("4.17", width)
    table = [{} for _ in range(256)]
    for entry in traps:
        table[int(entry["vector"])] = entry
    ctrlreg = [0x80050033 if width == 64 else 0x8005003B, 0, 0, 0, 0x6F0, 0, 0, 0]
    ctrlreg[3] = cr3 if cr3 is not None else pfn_to_cr3(cr3_frame, width)
    values: dict[str, object] = {"flags": flags, "user_regs": regs, "trap_ctxt": table, "kernel_ss": kernel_ss,
                                 "kernel_sp": kernel_sp, "ctrlreg": ctrlreg}
    for kind, (cs, address) in (callbacks or {}).items():
        values[f"{kind}_callback_eip"] = address
        if width == 32:
            values[f"{kind}_callback_cs"] = cs
    return pack(abi, "vcpu_guest_context", **values).ljust(ANY_CONTEXT, b"\0")


def _note(kind: int, desc: bytes) -> bytes:
    return struct.pack("<III4s", 4, len(desc), kind, b"Xen\0") + desc


def xc_core(contexts: list[bytes], pages: list[tuple[int, int, bytes]], *, width: int = 64, hvm: bool = False,
            shared_info: bytes | None = bytes(PAGE), version: tuple[int, int] = (4, 17),
            magic: int | None = None, nr_vcpus: int | None = None, nr_pages: int | None = None,
            format_version: int = 1, p2m_extra: bytes = b"") -> bytes:
    """The file xc_domain_dumpcore writes for these vCPU contexts and (pfn, gmfn, page) triples (sorted
    by pfn, as xg_core.c writes them; gmfn is ignored for HVM).  The keyword overrides corrupt it."""
    pages = sorted(pages)
    count = len(pages) if nr_pages is None else nr_pages
    header = struct.pack("<4Q", magic if magic is not None else (0xF00FEBEE if hvm else 0xF00FEBED),
                         len(contexts) if nr_vcpus is None else nr_vcpus, count, PAGE)
    xen_version = struct.pack("<QQ", *version).ljust(XEN_VERSION_DESC, b"\0")
    notes = (_note(0x2000000, b"") + _note(0x2000001, header) + _note(0x2000002, xen_version)
             + _note(0x2000003, struct.pack("<Q", format_version)))
    prstatus = b"".join(contexts)
    names = [".shstrtab", ".note.Xen", ".xen_prstatus"] + ([".xen_shared_info"] if shared_info is not None else []) \
        + [".xen_pages", ".xen_pfn" if hvm else ".xen_p2m"]
    strtab = b"\0" + b"".join(n.encode() + b"\0" for n in names)
    name_at = {n: strtab.index(b"\0" + n.encode() + b"\0") + 1 for n in names}
    # (name, type, size, addralign, entsize), offsets fixed up as xg_core.c does
    sections = [(".note.Xen", SHT_NOTE, len(notes), 0, 0),
                (".xen_prstatus", SHT_PROGBITS, len(prstatus), 8, ANY_CONTEXT)]
    if shared_info is not None:
        sections.append((".xen_shared_info", SHT_PROGBITS, PAGE, 8, PAGE))
    nsections = 2 + len(sections) + 2
    offset = 64 + nsections * 64
    headers = [(0, 0, 0, 0, 0, 0), (name_at[".shstrtab"], SHT_STRTAB, 0, 0, 0, 0)]  # .shstrtab's offset later
    for name, kind, size, align, entsize in sections:
        headers.append((name_at[name], kind, offset, size, align, entsize))
        offset += size
    padding = -offset % PAGE
    offset += padding
    data = b"".join(page for _, _, page in pages)
    headers.append((name_at[".xen_pages"], SHT_PROGBITS, offset, count * PAGE, PAGE, PAGE))
    offset += len(data)
    if hvm:
        table = b"".join(struct.pack("<Q", pfn) for pfn, _, _ in pages)
        headers.append((name_at[".xen_pfn"], SHT_PROGBITS, offset, len(table) + len(p2m_extra), 8, 8))
    else:
        table = b"".join(struct.pack("<QQ", pfn, gmfn) for pfn, gmfn, _ in pages)
        headers.append((name_at[".xen_p2m"], SHT_PROGBITS, offset, len(table) + len(p2m_extra), 8, 16))
    table += p2m_extra
    offset += len(table)
    headers[1] = (name_at[".shstrtab"], SHT_STRTAB, offset, len(strtab), 0, 0)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0, 1]) + bytes(7)
    out = struct.pack(EHDR, ident, 4, 62 if width == 64 else 3, 1, 0, 0, 64, 0, 64, 56, 0, 64, len(headers), 1)
    for name, kind, at, size, align, entsize in headers:
        out += struct.pack(SHDR, name, kind, 0, 0, at, size, 0, 0, align, entsize)
    out += notes + prstatus + (shared_info or b"") + bytes(padding) + data + table + strtab
    return out

"""Hypercall sites of a guest kernel, found in synthetic ELF32/ELF64 images built here."""

from __future__ import annotations

import re
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from tests.unit.budget import budget
from xendbg.abi import get_abi
from xendbg.errors import DecodeError
from xendbg.sites import (
    SOURCE_NONE,
    SOURCE_NOTE,
    SOURCE_SIGNATURE,
    SOURCE_SYMBOL,
    SOURCE_XEN_GUEST,
    HypercallSites,
    find_hypercall_sites,
)

XEN_ELFNOTE_HYPERCALL_PAGE = get_abi("4.17", 64).enum("ELFNOTE").values["XEN_ELFNOTE_HYPERCALL_PAGE"]
XEN_ELFNOTE_VIRT_BASE = get_abi("4.17", 64).enum("ELFNOTE").values["XEN_ELFNOTE_VIRT_BASE"]
IRET = 23  # __HYPERVISOR_iret, xen/include/public/xen.h since 3.0.2-branched

# Code as the stubs are assembled (bytes checked against objdump of Debian's 6.1 vmlinux and the test guest).
INT82_STUB = bytes.fromhex("cd82 5f 5e 5b c3")  # int $0x82; pop %edi; pop %esi; pop %ebx; ret
PV_STUB_RET = bytes.fromhex("51 4153 0f05 415b 59 c3 cc")  # push %rcx; push %r11; syscall; pop; pop; ret; int3
PV_STUB_THUNK = bytes.fromhex("51 4153 0f05 415b 59 e9 73da3b00")  # ...; jmp __x86_return_thunk
IRET_STUB = bytes.fromhex("6a00 51 4153 50 b8 17000000 0f05 cc")  # pushq $0; push rcx/r11/rax; mov $23,%eax; syscall
OLD_IRET_STUB = bytes.fromhex("6a00 e9 00000000")  # pushq $0; jmp hypercall_iret (Linux before XSA-466)
NOT_A_STUB = bytes.fromhex("31c0 c3")  # xor %eax,%eax; ret

PF_X, PF_W, PF_R = 1, 2, 4
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 1, 2, 4
EM = {32: 3, 64: 62}


@dataclass
class Image:
    """A little-endian ELF executable: PT_LOAD segments, Xen notes, optional symbols and __xen_guest."""

    width: int
    segments: list[tuple[int, bytes, int]] = field(default_factory=list)  # (vaddr, bytes, p_flags)
    symbols: dict[str, int] | None = None  # None: no symbol table at all
    raw_symbols: tuple[bytes, list[tuple[int, ...]]] | None = None  # (strtab, [(st_name, value, shndx[, size])])
    notes: list[tuple[bytes, int, bytes]] = field(default_factory=list)  # (name, type, desc)
    note_segment: bool = True  # a PT_NOTE segment over the notes (else only the SHT_NOTE section)
    xen_guest: bytes | None = None
    machine: int | None = None
    ident: bytes | None = None

    def build(self) -> bytes:
        w = self.width
        ehsize, phentsize, shentsize = (52, 32, 40) if w == 32 else (64, 56, 64)
        blobs: list[bytes] = []

        def place(data: bytes) -> int:
            offset = ehsize + phentsize * nphdr + sum(len(b) for b in blobs)
            pad = -offset % 16
            blobs.append(b"\0" * pad + data)
            return offset + pad

        note_bytes = b"".join(_note(*n) for n in self.notes)
        nphdr = len(self.segments) + (1 if self.notes and self.note_segment else 0)
        # (name, type, flags, addr, offset, size, link, info, entsize)
        phdrs, sections = [], [(0, 0, 0, 0, 0, 0, 0, 0, 0)]
        shstr = bytearray(b"\0")

        def section(name: str, sh_type: int, addr: int, offset: int, size: int, link: int = 0,
                    entsize: int = 0, flags: int = 0, info: int = 0) -> None:
            sections.append((len(shstr), sh_type, flags, addr, offset, size, link, info, entsize))
            shstr.extend(name.encode() + b"\0")

        for vaddr, data, flags in self.segments:
            offset = place(data)
            phdrs.append((1, flags, offset, vaddr, len(data)))
            section(".text" if flags & PF_X else ".data", 1, vaddr, offset, len(data),
                    flags=SHF_ALLOC | (SHF_EXECINSTR if flags & PF_X else 0) | (SHF_WRITE if flags & PF_W else 0))
        if self.notes:
            offset = place(note_bytes)
            if self.note_segment:
                phdrs.append((4, PF_R, offset, 0, len(note_bytes)))
            section(".note.Xen", 7, 0, offset, len(note_bytes))
        if self.xen_guest is not None:
            section("__xen_guest", 1, 0, place(self.xen_guest + b"\0"), len(self.xen_guest) + 1)
        symtab = self.raw_symbols
        if self.symbols is not None:
            strtab, rows = bytearray(b"\0"), []
            for name, value in self.symbols.items():
                rows.append((len(strtab), value, 1))
                strtab.extend(name.encode() + b"\0")
            symtab = (bytes(strtab), rows)
        if symtab is not None:
            strtab, rows = symtab
            entries = [_sym(w, 0, 0, 0)] + [_sym(w, *row) for row in rows]
            sym_offset = place(b"".join(entries))
            strtab_index = len(sections) + 1
            # sh_info: the index of the first global symbol (entry 0 is the only local one)
            section(".symtab", 2, 0, sym_offset, sum(map(len, entries)), strtab_index, len(entries[0]), info=1)
            section(".strtab", 3, 0, place(strtab), len(strtab))
        shstrndx = len(sections)
        section(".shstrtab", 3, 0, 0, 0)
        sections[-1] = sections[-1][:4] + (place(bytes(shstr)), len(shstr)) + sections[-1][6:]
        shoff = ehsize + phentsize * nphdr + sum(len(b) for b in blobs)

        ident = self.ident or (b"\x7fELF" + bytes([1 if w == 32 else 2, 1, 1]) + b"\0" * 9)
        machine = self.machine or EM[w]
        if w == 32:
            ehdr = struct.pack("<HHIIIIIHHHHHH", 2, machine, 1, 0, ehsize, shoff, 0, ehsize, phentsize, nphdr,
                               shentsize, len(sections), shstrndx)
            ph = [struct.pack("<IIIIIIII", t, off, va, va, sz, sz, fl, 16) for t, fl, off, va, sz in phdrs]
            sh = [struct.pack("<IIIIIIIIII", n, t, fl, a, off, sz, ln, inf, 1, es)
                  for n, t, fl, a, off, sz, ln, inf, es in sections]
        else:
            ehdr = struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, 0, ehsize, shoff, 0, ehsize, phentsize, nphdr,
                               shentsize, len(sections), shstrndx)
            ph = [struct.pack("<IIQQQQQQ", t, fl, off, va, va, sz, sz, 16) for t, fl, off, va, sz in phdrs]
            sh = [struct.pack("<IIQQQQIIQQ", n, t, fl, a, off, sz, ln, inf, 1, es)
                  for n, t, fl, a, off, sz, ln, inf, es in sections]
        return ident + ehdr + b"".join(ph) + b"".join(blobs) + b"".join(sh)


def _note(name: bytes, kind: int, desc: bytes) -> bytes:
    name += b"\0"
    return (struct.pack("<III", len(name), len(desc), kind) + name + b"\0" * (-len(name) % 4)
            + desc + b"\0" * (-len(desc) % 4))


def _sym(width: int, st_name: int, value: int, shndx: int, size: int = 0) -> bytes:
    info = 0x12 if st_name else 0  # STB_GLOBAL, STT_FUNC
    if width == 32:
        return struct.pack("<IIIBBH", st_name, value, size, info, 0, shndx)
    return struct.pack("<IBBHQQ", st_name, info, 0, shndx, value, size)


def sites_of(tmp_path: Path, image: Image | bytes, name: str = "guest.elf") -> HypercallSites:
    path = tmp_path / name
    path.write_bytes(image.build() if isinstance(image, Image) else image)
    return find_hypercall_sites(path)


TEXT64, PAGE64 = 0xFFFFFFFF81000000, 0xFFFFFFFF81001000
TEXT32, PAGE32 = 0xC0100000, 0xC0101000


def linux64(code: bytes, **kw) -> Image:
    """A 64-bit kernel with `code` at TEXT64 + 0x100, after padding that matches nothing."""
    return Image(64, segments=[(TEXT64, b"\xcc" * 0x100 + code + b"\xcc" * 0x40, PF_R | PF_X)], **kw)


# --- the images themselves, as binutils reads them ------------------------------------------------
# The builder and the reader under test are written by the same hands: readelf checks once that each
# kind of image is the ELF file it is meant to be, so both cannot share a mistake about the format.

def readelf(path: Path) -> str:
    out = subprocess.run(["readelf", "-W", "-h", "-l", "-S", "-s", "-n", str(path)], capture_output=True,
                         text=True, check=False)
    assert out.returncode == 0 and out.stderr == "", out.stderr  # no error, and no warning either
    return out.stdout


READELF_IMAGES = {
    "64-symbols-note-legacy": linux64(PV_STUB_RET,
                                      symbols={"hypercall_page": PAGE64, "xen_hypercall_pv": TEXT64 + 0x100},
                                      notes=[(b"Xen", XEN_ELFNOTE_HYPERCALL_PAGE, struct.pack("<Q", PAGE64))],
                                      xen_guest=b"GUEST_OS=linux,HYPERCALL_PAGE=0x1"),
    "32-symbols": Image(32, segments=[(TEXT32, b"\x53\x56\x57" + INT82_STUB, PF_R | PF_X)],
                        symbols={"hypercall_page": PAGE32, "xen_int82": TEXT32 + 3, "hypercall": TEXT32}),
    "32-notes-in-section-only": Image(
        32, segments=[(0xC0000000, b"\x90" * 16, PF_R | PF_X), (PAGE32, b"\0" * 64, PF_R | PF_W)],
        notes=[(b"GNU", XEN_ELFNOTE_HYPERCALL_PAGE, b"\x01" * 8), (b"Xen", XEN_ELFNOTE_VIRT_BASE, b"\0" * 4),
               (b"Xen", XEN_ELFNOTE_HYPERCALL_PAGE, struct.pack("<I", PAGE32))], note_segment=False),
    "64-several-segments": Image(64, segments=[(TEXT64, b"\xcc" * 8 + PV_STUB_RET, PF_R | PF_X),
                                               (PAGE64, b"\0" * 64, PF_R | PF_W),
                                               (0xFFFFFFFF83000000, IRET_STUB, PF_R | PF_W | PF_X)]),
    "32-shared-suffix-symbols": Image(32, segments=[(TEXT32, INT82_STUB + b"\x90" * 16, PF_R | PF_X)],
                                      raw_symbols=(b"\0my_xen_int82\0", [(1, TEXT32 + 0x10, 1), (4, TEXT32, 1)])),
}


def _symbols_of(image: Image) -> dict[str, int]:
    if image.symbols is not None:
        return image.symbols
    if image.raw_symbols is None:
        return {}
    strtab, rows = image.raw_symbols
    return {strtab[row[0]:strtab.index(b"\0", row[0])].decode(): row[1] for row in rows}


@pytest.mark.parametrize("name", READELF_IMAGES)
def test_readelf_reads_each_kind_of_image_as_intended(tmp_path, name):
    image = READELF_IMAGES[name]
    path = tmp_path / f"{name}.elf"
    path.write_bytes(image.build())
    text = readelf(path)
    w = image.width
    assert re.search(rf"^\s+Class:\s+ELF{w}$", text, re.M)
    assert re.search(r"^\s+Data:\s+2's complement, little endian$", text, re.M)
    assert re.search(r"^\s+Type:\s+EXEC ", text, re.M)
    assert re.search(r"^\s+Machine:\s+" + ("Intel 80386" if w == 32 else "Advanced Micro Devices X86-64") + "$",
                     text, re.M)
    # Program headers: one PT_LOAD per segment at its address with its permissions, then the PT_NOTE.
    loads = re.findall(r"^\s+LOAD\s+0x[0-9a-f]+ 0x([0-9a-f]+) 0x[0-9a-f]+ 0x([0-9a-f]+) 0x[0-9a-f]+ (...) ",
                       text, re.M)
    flags = lambda f: ("R" if f & PF_R else " ") + ("W" if f & PF_W else " ") + ("E" if f & PF_X else " ")  # noqa: E731
    assert [(int(va, 16), int(size, 16), fl) for va, size, fl in loads] == [
        (va, len(data), flags(f)) for va, data, f in image.segments]
    assert len(re.findall(r"^\s+NOTE\s", text, re.M)) == (1 if image.notes and image.note_segment else 0)
    # Sections, in order, and each code or data section mapped into its own segment.
    names = re.findall(r"^\s+\[\s*[1-9]\d*\]\s+(\S+)", text, re.M)
    expected = [".text" if f & PF_X else ".data" for _, _, f in image.segments]
    expected += [".note.Xen"] * bool(image.notes) + ["__xen_guest"] * (image.xen_guest is not None)
    expected += [".symtab", ".strtab"] * (image.symbols is not None or image.raw_symbols is not None)
    assert names == expected + [".shstrtab"]
    mapping = re.findall(r"^\s+(\d\d)\s+(\S.*?)\s*$", text.split("Section to Segment mapping:")[1], re.M)
    assert [sections for _, sections in mapping[:len(image.segments)]] == expected[:len(image.segments)]
    # Symbols: every name at its value, global functions in section 1.
    symbols = _symbols_of(image)
    if symbols:
        assert f"Symbol table '.symtab' contains {len(symbols) + 1} entries:" in text
    digits = 8 if w == 32 else 16
    for symbol, value in symbols.items():
        assert re.search(rf"^\s+\d+: {value:0{digits}x}\s+0 FUNC\s+GLOBAL DEFAULT\s+1 {symbol}$", text, re.M), symbol
    # Notes: owner, size and, for Xen's, the value (readelf has no names for Xen's note types).
    shown = re.findall(r"^\s+(\S+)\s+0x([0-9a-f]{8})\s(.*)$", text.split("Displaying notes found in:")[-1], re.M)
    assert [(owner, int(size, 16)) for owner, size, _ in shown] == [(n.decode(), len(d)) for n, _, d in image.notes]
    for (owner, _, rest), (_, _, desc) in zip(shown, image.notes, strict=True):
        if owner == "Xen":
            assert rest.rstrip().endswith("description data: " + " ".join(f"{b:02x}" for b in desc))


@pytest.mark.parametrize("build", ["32", "64"])
def test_readelf_reads_the_images_the_corruption_tests_start_from(tmp_path, build):
    data = full_image_32() if build == "32" else full_image_64()
    path = tmp_path / "full.elf"
    path.write_bytes(data)
    text = readelf(path)
    assert "Displaying notes found in: .note.Xen" in text
    page = PAGE32 if build == "32" else PAGE64
    assert "description data: " + " ".join(f"{b:02x}" for b in page.to_bytes(int(build) // 8, "little")) in text
    assert ("xen_int82" in text) == (build == "32")
    assert ("__xen_guest" in text) == (build == "64")


# --- the hypercall page ----------------------------------------------------------------------------

def test_page_and_stub_from_symbols_64(tmp_path):
    image = linux64(PV_STUB_RET, symbols={"hypercall_page": PAGE64, "xen_hypercall_pv": TEXT64 + 0x100},
                    notes=[(b"Xen", XEN_ELFNOTE_HYPERCALL_PAGE, struct.pack("<Q", 0x1234000))])
    sites = sites_of(tmp_path, image)
    assert (sites.width, sites.symbols) == (64, True)
    assert (sites.hypercall_page, sites.page_source) == (PAGE64, SOURCE_SYMBOL)  # the symbol wins over the note
    (site,) = sites.inline
    assert (site.name, site.entry, site.instruction) == ("xen_hypercall_pv", TEXT64 + 0x100, TEXT64 + 0x103)
    assert (site.convention, site.source, site.nr) == ("x86_64-pv", SOURCE_SYMBOL, None)
    assert sites.path == str(tmp_path / "guest.elf")


def test_page_and_int82_from_symbols_32(tmp_path):
    code = bytes.fromhex("53 56 57") + INT82_STUB
    image = Image(32, segments=[(TEXT32, code, PF_R | PF_X)],
                  symbols={"hypercall_page": PAGE32, "xen_int82": TEXT32 + 3, "hypercall": TEXT32})
    sites = sites_of(tmp_path, image)
    assert (sites.width, sites.hypercall_page, sites.page_source) == (32, PAGE32, SOURCE_SYMBOL)
    (site,) = sites.inline
    assert (site.name, site.entry, site.instruction, site.convention) == ("xen_int82", TEXT32 + 3, TEXT32 + 3,
                                                                          "x86_32-pv")


@pytest.mark.parametrize("width,desc", [(64, struct.pack("<Q", PAGE64)), (32, struct.pack("<I", PAGE32))])
@pytest.mark.parametrize("note_segment", [True, False])
def test_page_from_xen_note(tmp_path, width, desc, note_segment):
    notes = [(b"GNU", XEN_ELFNOTE_HYPERCALL_PAGE, b"\x01" * 8),  # another owner's type 2: not Xen's
             (b"Xen", XEN_ELFNOTE_VIRT_BASE, b"\0" * len(desc)),
             (b"Xen", XEN_ELFNOTE_HYPERCALL_PAGE, desc)]
    image = Image(width, segments=[(0xC0000000, b"\x90" * 16, PF_R | PF_X)], notes=notes, note_segment=note_segment)
    sites = sites_of(tmp_path, image)
    assert sites.symbols is False
    assert (sites.hypercall_page, sites.page_source) == (int.from_bytes(desc, "little"), SOURCE_NOTE)
    assert sites.inline == ()


def test_note_lookup_falls_back_to_sections_as_libelf_does(tmp_path):
    # A PT_NOTE segment with only GNU notes, and the Xen notes in a section outside it.
    data = Image(64, segments=[(TEXT64, b"\x90" * 16, PF_R | PF_X)],
                 notes=[(b"Xen", XEN_ELFNOTE_HYPERCALL_PAGE, struct.pack("<Q", PAGE64))],
                 note_segment=False).build()
    gnu = _note(b"GNU", 3, b"\xab" * 20)
    image = bytearray(data + gnu)
    # Add a PT_NOTE over the GNU note by turning the PT_LOAD into it would lose the code; instead rewrite
    # the (only) program header as PT_NOTE: the page still comes from the section.
    struct.pack_into("<IIQQQQQQ", image, 64, 4, PF_R, len(data), 0, 0, len(gnu), len(gnu), 4)
    sites = sites_of(tmp_path, bytes(image))
    assert (sites.hypercall_page, sites.page_source) == (PAGE64, SOURCE_NOTE)


def test_undefined_symbol_is_not_the_page(tmp_path):
    strtab = b"\0hypercall_page\0"
    image = Image(64, segments=[(TEXT64, b"\x90" * 16, PF_R | PF_X)], raw_symbols=(strtab, [(1, 0, 0)]),
                  notes=[(b"Xen", XEN_ELFNOTE_HYPERCALL_PAGE, struct.pack("<Q", PAGE64))])
    sites = sites_of(tmp_path, image)
    assert (sites.symbols, sites.hypercall_page, sites.page_source) == (True, PAGE64, SOURCE_NOTE)


@pytest.mark.parametrize("text,page", [
    (b"GUEST_OS=linux,XEN_VER=xen-3.0,VIRT_BASE=0xC0000000,HYPERCALL_PAGE=0x104,LOADER=generic", 0xC0104000),
    (b"GUEST_OS=linux,HYPERCALL_PAGE=0x2,VIRT_BASE=0xC0000000", 0xC0002000),  # order does not matter
    (b"LOADER=generic,HYPERCALL_PAGE=0x12", 0x12000),  # no VIRT_BASE: libelf 4.x adds nothing
    (b"VIRT_BASE=0xC0000000,HYPERCALL_PAGE=12", 0xC000C000),  # strtoull base 0: decimal
    (b"VIRT_BASE=0xC0000000,HYPERCALL_PAGE=010", 0xC0008000),  # ... and octal
])
def test_page_from_legacy_xen_guest_section(tmp_path, text, page):
    sites = sites_of(tmp_path, Image(32, segments=[(0xC0000000, b"\x90" * 16, PF_R | PF_X)], xen_guest=text))
    assert (sites.hypercall_page, sites.page_source) == (page, SOURCE_XEN_GUEST)


def test_no_page_anywhere(tmp_path):
    sites = sites_of(tmp_path, Image(32, segments=[(TEXT32, INT82_STUB, PF_R | PF_X)],
                                     xen_guest=b"GUEST_OS=linux,VIRT_BASE=0xC0000000"))
    assert (sites.hypercall_page, sites.page_source, sites.inline) == (None, SOURCE_NONE, ())
    assert sites.describe() == ["no hypercall page"]


# --- inline stubs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("stub", [PV_STUB_RET, PV_STUB_THUNK], ids=["ret", "return-thunk"])
def test_linux_signatures_without_symbols(tmp_path, stub):
    code = b"\xcc" * 0x100 + IRET_STUB + b"\xcc" * 0x31 + stub + b"\xcc" * 0x20
    sites = sites_of(tmp_path, Image(64, segments=[(TEXT64, code, PF_R | PF_X)]))
    assert (sites.symbols, sites.hypercall_page) == (False, None)
    iret, pv = sites.inline
    assert (iret.name, iret.entry, iret.instruction, iret.nr) == ("xen_iret", TEXT64 + 0x100, TEXT64 + 0x10B, IRET)
    entry = TEXT64 + 0x100 + len(IRET_STUB) + 0x31
    assert (pv.name, pv.entry, pv.instruction, pv.nr) == ("xen_hypercall_pv", entry, entry + 3, None)
    assert {s.source for s in sites.inline} == {SOURCE_SIGNATURE}
    assert {s.convention for s in sites.inline} == {"x86_64-pv"}
    assert sites.describe()[2] == (f"xen_hypercall_pv at {entry:#x} (hypercall instruction at {entry + 3:#x}), "
                                   "found by its instruction sequence (the file has no symbols)")


def test_signature_needs_the_return(tmp_path):
    stub = PV_STUB_RET.replace(b"\xc3", b"\x90")  # pop %rcx; nop: not Linux's stub
    assert sites_of(tmp_path, linux64(stub)).inline == ()


def test_signature_only_in_executable_segments_of_64_bit_files(tmp_path):
    data_only = Image(64, segments=[(TEXT64, b"\x90" * 16, PF_R | PF_X), (PAGE64, PV_STUB_RET, PF_R | PF_W)])
    assert sites_of(tmp_path, data_only).inline == ()
    in_32_bit = Image(32, segments=[(TEXT32, PV_STUB_RET + IRET_STUB, PF_R | PF_X)])
    assert sites_of(tmp_path, in_32_bit).inline == ()


def test_signature_across_several_segments(tmp_path):
    image = Image(64, segments=[(TEXT64, b"\xcc" * 8 + PV_STUB_RET, PF_R | PF_X),
                                (PAGE64, b"\0" * 64, PF_R | PF_W),
                                (0xFFFFFFFF83000000, b"\xcc" * 4 + IRET_STUB, PF_R | PF_W | PF_X)])
    sites = sites_of(tmp_path, image)
    assert [(s.name, s.entry) for s in sites.inline] == [("xen_hypercall_pv", TEXT64 + 8),
                                                        ("xen_iret", 0xFFFFFFFF83000004)]


def test_with_symbols_the_names_decide(tmp_path):
    # The signatures are for stripped files: a file with symbols is believed.
    assert sites_of(tmp_path, linux64(PV_STUB_RET, symbols={"_start": TEXT64})).inline == ()
    old = linux64(OLD_IRET_STUB + NOT_A_STUB, symbols={"xen_iret": TEXT64 + 0x100,
                                                       "xen_hypercall_pv": TEXT64 + 0x100 + len(OLD_IRET_STUB)})
    assert sites_of(tmp_path, old).inline == ()  # pre-XSA-466 xen_iret jumps into the page; no syscall
    iret = sites_of(tmp_path, linux64(IRET_STUB, symbols={"xen_iret": TEXT64 + 0x100})).inline
    assert [(s.name, s.instruction, s.nr, s.source) for s in iret] == [("xen_iret", TEXT64 + 0x10B, IRET,
                                                                         SOURCE_SYMBOL)]


def test_stub_symbol_outside_the_file_contents(tmp_path):
    # xen_int82 in .bss-like memory (not in any PT_LOAD's file bytes): nothing to confirm, not reported.
    image = Image(32, segments=[(TEXT32, INT82_STUB, PF_R | PF_X)], symbols={"xen_int82": TEXT32 + 0x8000})
    assert sites_of(tmp_path, image).inline == ()


def test_symbol_names_shared_as_suffixes(tmp_path):
    # Linkers share string-table suffixes: "xen_int82" may be the tail of "my_xen_int82".
    strtab = b"\0my_xen_int82\0"
    rows = [(1, TEXT32 + 0x10, 1), (4, TEXT32, 1)]  # my_xen_int82 (not a stub), xen_int82
    sites = sites_of(tmp_path, Image(32, segments=[(TEXT32, INT82_STUB + b"\x90" * 16, PF_R | PF_X)],
                                     raw_symbols=(strtab, rows)))
    assert [(s.name, s.entry) for s in sites.inline] == [("xen_int82", TEXT32)]


def test_symbol_lookup_reads_whole_entries_only(tmp_path):
    # An undefined xen_int82 comes first; then "decoy", whose st_size equals xen_int82's st_name: read
    # from there, the bytes would make a defined xen_int82 at 0x10012.
    strtab = b"\0decoy\0xen_int82\0"
    rows = [(7, 0, 0), (1, 0, 1, 7), (7, TEXT32, 1)]
    sites = sites_of(tmp_path, Image(32, segments=[(TEXT32, INT82_STUB, PF_R | PF_X)], raw_symbols=(strtab, rows)))
    assert [(s.name, s.entry) for s in sites.inline] == [("xen_int82", TEXT32)]


def test_many_symbols(tmp_path):
    names = {f"function_{i}": TEXT64 + i for i in range(20000)}
    image = linux64(PV_STUB_RET, symbols={**names, "xen_hypercall_pv": TEXT64 + 0x100, "hypercall_page": PAGE64})
    sites = sites_of(tmp_path, image)
    assert (sites.hypercall_page, [s.entry for s in sites.inline]) == (PAGE64, [TEXT64 + 0x100])


# --- corrupt and foreign files ---------------------------------------------------------------------

def full_image_64() -> bytes:
    return linux64(PV_STUB_THUNK + IRET_STUB, symbols=None,
                   notes=[(b"Xen", XEN_ELFNOTE_HYPERCALL_PAGE, struct.pack("<Q", PAGE64))],
                   xen_guest=b"HYPERCALL_PAGE=0x1").build()


def full_image_32() -> bytes:
    return Image(32, segments=[(TEXT32, INT82_STUB, PF_R | PF_X)], symbols={"xen_int82": TEXT32},
                 notes=[(b"Xen", XEN_ELFNOTE_HYPERCALL_PAGE, struct.pack("<I", PAGE32))]).build()


def expect_error(tmp_path: Path, data: bytes, *fragments: str) -> str:
    with pytest.raises(DecodeError) as info:
        sites_of(tmp_path, data, "bad.elf")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'bad.elf'}: ") and "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


@pytest.mark.parametrize("data,fragment", [
    (b"", "empty file"),
    (b"MZ\x90\x00" + b"\0" * 60, "not an ELF file"),
    (b"\x7fELF", "ELF identification"),
    (b"\x7fELF\x03\x01\x01" + b"\0" * 100, "unknown ELF class 3"),
    (b"\x7fELF\x02\x02\x01" + b"\0" * 100, "not a little-endian ELF file"),
])
def test_not_an_elf_file(tmp_path, data, fragment):
    expect_error(tmp_path, data, fragment)


def test_foreign_machine(tmp_path):
    expect_error(tmp_path, Image(64, segments=[(0, b"\0", PF_X)], machine=183).build(), "ELF machine 183")


@pytest.mark.parametrize("build", [full_image_32, full_image_64])
def test_every_truncation_is_a_decode_error(tmp_path, build):
    data = build()
    find_hypercall_sites_ok = sites_of(tmp_path, data)  # the whole image is fine
    assert find_hypercall_sites_ok.page_source in (SOURCE_SYMBOL, SOURCE_NOTE)
    for cut in range(len(data)):
        expect_error(tmp_path, data[:cut])


def test_bad_xen_note_values(tmp_path):
    odd = linux64(b"", notes=[(b"Xen", XEN_ELFNOTE_HYPERCALL_PAGE, b"\0\x10\0")]).build()
    expect_error(tmp_path, odd, "XEN_ELFNOTE_HYPERCALL_PAGE has a 3-byte value")
    data = bytearray(linux64(b"", notes=[(b"Xen", XEN_ELFNOTE_HYPERCALL_PAGE, b"\0" * 8)]).build())
    note_at = data.find(b"Xen\0") - 12
    struct.pack_into("<I", data, note_at + 4, 0x1000)  # descsz far past the note area
    expect_error(tmp_path, bytes(data), "ELF note at file offset", "runs past the end of its note area")


def test_bad_legacy_string(tmp_path):
    image = Image(32, segments=[(TEXT32, b"\x90", PF_X)], xen_guest=b"VIRT_BASE=0xC0000000,HYPERCALL_PAGE=zz")
    expect_error(tmp_path, image.build(), "HYPERCALL_PAGE='zz', not a number")


def test_bad_section_links(tmp_path):
    legacy = Image(32, segments=[(TEXT32, b"\x90", PF_X)], xen_guest=b"HYPERCALL_PAGE=0x1").build()
    data = bytearray(legacy)
    shnum = struct.unpack_from("<H", data, 48)[0]
    struct.pack_into("<H", data, 50, shnum + 5)  # e_shstrndx out of range
    expect_error(tmp_path, bytes(data), "section-name table index")
    data = bytearray(full_image_32())
    shoff, shnum = struct.unpack_from("<I12xH", data, 32)
    symtab = next(i for i in range(shnum) if struct.unpack_from("<I", data, shoff + 40 * i + 4)[0] == 2)
    struct.pack_into("<I", data, shoff + 40 * symtab + 24, 99)  # sh_link to a missing string table
    expect_error(tmp_path, bytes(data), "string table 99, which does not exist")


def test_unreadable_paths(tmp_path):
    with pytest.raises(DecodeError, match="cannot read"):
        find_hypercall_sites(tmp_path / "missing.elf")
    with pytest.raises(DecodeError, match="a directory, not an ELF file"):
        find_hypercall_sites(tmp_path)


@budget(300, HealthCheck.function_scoped_fixture)
@given(data=st.data())
def test_corruption_gives_a_result_or_a_decode_error(tmp_path, data):
    image = bytearray(data.draw(st.sampled_from([full_image_32, full_image_64]))())
    shoff = image.rfind(b".shstrtab\0") + len(b".shstrtab\0")  # the section headers follow their names
    headers = st.integers(0, 0x100) | st.integers(shoff, len(image) - 1)  # where corruption hurts most
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(headers | st.integers(0, len(image) - 1))
        image[at] = data.draw(st.integers(0, 255))
    try:
        sites_of(tmp_path, bytes(image))
    except DecodeError as error:
        assert "\n" not in str(error)

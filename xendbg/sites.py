"""Where a guest kernel issues hypercalls, read from its ELF file (the one gdb loaded with `file`).

The gdb front end puts breakpoints at what this finds:

- the hypercall page, whose 32-byte stubs Xen writes at boot (arch.hypercall_page_stubs maps them at
  run time, from guest memory).  Its address comes from the symbol `hypercall_page`; in a file
  without symbols, from the Xen ELF note XEN_ELFNOTE_HYPERCALL_PAGE or, in kernels older than the
  notes (Xen 3.0.2 and before), from the `__xen_guest` section's `HYPERCALL_PAGE=` entry.
- inline stubs that issue the hypercall instruction themselves: Linux's `xen_hypercall_pv` (Linux
  after XSA-466, December 2024, which dropped the hypercall page; the stable lines, 6.1 among them,
  took the change) and `xen_iret` (which issues `iret` with its own `syscall`, so a breakpoint on
  xen_hypercall_pv alone misses it), and `xen_int82` (the 32-bit test guest in fixtures/guest).
  A file without symbols (Debian's vmlinux) is searched for Linux's exact instruction sequences.

Only the standard library reads the ELF file (little-endian ELF32 and ELF64), through mmap, so a
60 MB vmlinux costs a few bytes.find calls.  Capstone (via arch.find_hypercall_site, imported
lazily) only confirms the few candidates.  A corrupt or truncated file raises DecodeError with one
line naming the file and what is wrong.
"""

from __future__ import annotations

import bisect
import mmap
import os
import re
import struct
from dataclasses import dataclass

from xendbg.abi import NEWEST, get_abi
from xendbg.arch import find_hypercall_site
from xendbg.errors import DecodeError
from xendbg.files import map_regular
from xendbg.session import XEN_VERSION_FUNCTIONS, xen_image_version

SOURCE_SYMBOL = "symbol"
SOURCE_NOTE = "note"
SOURCE_XEN_GUEST = "__xen_guest"
SOURCE_SIGNATURE = "signature"
SOURCE_SCAN = "scan"
SOURCE_NONE = "none"

_SOURCE_TEXT = {
    SOURCE_SYMBOL: "from its symbol",
    SOURCE_NOTE: "from the Xen ELF note XEN_ELFNOTE_HYPERCALL_PAGE",
    SOURCE_XEN_GUEST: "from the __xen_guest section's HYPERCALL_PAGE",
    SOURCE_SIGNATURE: "by its instruction sequence (the file has no symbols)",
    SOURCE_SCAN: "by disassembling the function that holds it",
}


@dataclass(frozen=True)
class InlineSite:
    """A stub outside the hypercall page that issues the hypercall instruction itself."""

    name: str  # its symbol, or the Linux function whose instruction sequence matched
    entry: int  # the stub's first instruction: a breakpoint here sees the caller's registers
    instruction: int  # the hypercall instruction itself (`syscall`, `int $0x82`)
    convention: str  # key into arch.CONVENTIONS
    source: str  # SOURCE_SYMBOL or SOURCE_SIGNATURE
    nr: int | None = None  # the number the stub always loads (xen_iret), None when the caller's EAX/RAX

    def describe(self) -> str:
        fixed = f", always hypercall {self.nr}" if self.nr is not None else ""
        return (f"{self.name} at {self.entry:#x} (hypercall instruction at {self.instruction:#x}{fixed}), "
                f"found {_SOURCE_TEXT[self.source]}")


@dataclass(frozen=True)
class HypercallSites:
    path: str
    width: int  # 32 or 64, from the ELF machine
    symbols: bool  # whether the file has a symbol table
    hypercall_page: int | None
    page_source: str  # SOURCE_SYMBOL, SOURCE_NOTE, SOURCE_XEN_GUEST or SOURCE_NONE
    inline: tuple[InlineSite, ...]
    xen_version: tuple[str, str] | None = None  # (text, where) of the Xen version the guest was built for
    xen_image_version: str | None = None  # when the file is Xen itself (xen-syms): its version, "4.17"

    def describe(self) -> list[str]:
        lines = []
        if self.hypercall_page is not None:
            lines.append(f"hypercall page at {self.hypercall_page:#x}, found {_SOURCE_TEXT[self.page_source]}")
        else:
            lines.append("no hypercall page")
        lines += [site.describe() for site in self.inline]
        return lines


# Xen's ELF note types are fixed since 3.0.3 (xen/include/public/elfnote.h); the number lives in abi.
_NOTE_HYPERCALL_PAGE = get_abi(NEWEST, 64).enum("ELFNOTE").values["XEN_ELFNOTE_HYPERCALL_PAGE"]
_NOTE_XEN_VERSION = get_abi(NEWEST, 64).enum("ELFNOTE").values["XEN_ELFNOTE_XEN_VERSION"]
IRET_NR = get_abi(NEWEST, 64).number_of("iret")  # __HYPERVISOR_iret, 23 since 3.0.2

# Symbols of inline stubs: Linux's arch/x86/xen/xen-asm.S after XSA-466, and the test guest's
# fixtures/guest/entry.S.  Before XSA-466 Linux's xen_iret jumped into the hypercall page: capstone
# then finds no hypercall instruction in it and it is not reported.
_STUB_SYMBOLS = ("xen_hypercall_pv", "xen_iret", "xen_int82")


@dataclass(frozen=True)
class _Signature:
    name: str
    code: bytes  # the stub's bytes from its entry
    offset: int  # where the hypercall instruction starts in `code`
    followers: bytes = b""  # the byte after `code` must be one of these (any when empty)


# Linux's stubs as Debian's 6.1 vmlinux has them (objdump), from arch/x86/xen/xen-asm.S after XSA-466:
#   xen_hypercall_pv: push %rcx; push %r11; syscall; pop %r11; pop %rcx; RET, where RET is `ret`
#                     (c3, then int3 with SLS mitigation) or `jmp __x86_return_thunk` (e9 rel32).
#   xen_iret:         pushq $0; push %rcx; push %r11; push %rax; mov $__HYPERVISOR_iret, %eax; syscall
_LINUX_SIGNATURES = (
    _Signature("xen_hypercall_pv", bytes.fromhex("51 4153 0f05 415b 59"), 3, b"\xc3\xe9"),
    _Signature("xen_iret", bytes.fromhex("6a00 51 4153 50 b8") + struct.pack("<I", IRET_NR) + b"\x0f\x05", 11),
)

_CODE_BYTES = 64  # enough for a stub of 8 instructions (arch.find_hypercall_site's walk)

_EM_386, _EM_X86_64 = 3, 62
_PT_LOAD, _PT_NOTE, _PF_X = 1, 4, 1
_SHT_SYMTAB, _SHT_NOTE, _SHT_DYNSYM = 2, 7, 11
_SHN_UNDEF, _SHN_XINDEX = 0, 0xFFFF
_MAX_SECTION_NAME = 256
_PN_XNUM = 0xFFFF  # more program headers than e_phnum holds: the count is in section 0's sh_info (gABI)
_STT_FUNC, _STT_SECTION, _STT_FILE = 2, 3, 4


@dataclass(frozen=True)
class _Formats:
    ehdr: str  # e_type .. e_shstrndx, after e_ident
    phdr: str  # type, flags, offset, vaddr, filesz in a common order (see _segments)
    shdr: str
    sym: str


_FORMATS = {
    32: _Formats("<HHIIIIIHHHHHH", "<IIIIIIII", "<IIIIIIIIII", "<IIIBBH"),
    64: _Formats("<HHIQQQIHHHHHH", "<IIQQQQQQ", "<IIQQQQIIQQ", "<IBBHQQ"),
}


@dataclass(frozen=True)
class _Segment:
    type: int
    flags: int
    offset: int
    vaddr: int
    filesz: int
    paddr: int = 0
    memsz: int = 0


@dataclass(frozen=True)
class _Section:
    name: int
    type: int
    offset: int
    size: int
    link: int
    entsize: int
    info: int = 0


@dataclass(frozen=True)
class ElfSymbol:
    name: str
    value: int
    size: int
    type: int  # STT_NOTYPE 0, STT_OBJECT 1, STT_FUNC 2, ...


class _Elf:
    """Just enough of an ELF file, every read bounds-checked against the file's size."""

    def __init__(self, path: str, data: mmap.mmap | bytes) -> None:
        self.path = path
        self.data = data
        self.size = len(data)
        ident = self.read(0, 16, "ELF identification")
        if ident[:4] != b"\x7fELF":
            raise self.error("not an ELF file")
        if ident[4] not in (1, 2):
            raise self.error(f"unknown ELF class {ident[4]}")
        if ident[5] != 1:
            raise self.error("not a little-endian ELF file")
        self.cls = 32 if ident[4] == 1 else 64
        self.fmt = _FORMATS[self.cls]
        (self.type, machine, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum,
         shstrndx) = self.unpack(self.fmt.ehdr, 16, "ELF header")
        if machine not in (_EM_386, _EM_X86_64):
            raise self.error(f"ELF machine {machine} is not x86 (xendbg reads x86 guests, Xen and their dumps)")
        self.machine = machine
        self.width = 32 if machine == _EM_386 else 64
        self.shstrndx = shstrndx
        self._by_name: dict[bytes, _Section] | None = None
        self.sections = self._sections(shoff, shentsize, shnum, shstrndx)
        if phnum == _PN_XNUM and self.sections:  # QEMU writes this for dumps of many memory ranges
            phnum = self.sections[0].info
        self.segments = self._segments(phoff, phentsize, phnum)

    def error(self, what: str) -> DecodeError:
        return DecodeError(f"{self.path}: {what}")

    def check(self, offset: int, size: int, what: str) -> None:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise self.error(f"{what} ({size} bytes at offset {offset:#x}) lies beyond the end of the file "
                             f"({self.size} bytes): truncated or corrupt")

    def read(self, offset: int, size: int, what: str) -> bytes:
        self.check(offset, size, what)
        return self.data[offset:offset + size]

    def unpack(self, fmt: str, offset: int, what: str) -> tuple[int, ...]:
        return struct.unpack(fmt, self.read(offset, struct.calcsize(fmt), what))

    def table(self, offset: int, entsize: int, count: int, fmt: str, what: str) -> list[tuple[int, ...]]:
        if count == 0:
            return []
        if entsize < struct.calcsize(fmt):
            raise self.error(f"{what} entries are {entsize} bytes, too small for ELF{self.cls}")
        self.check(offset, entsize * count, what)
        return [struct.unpack_from(fmt, self.data, offset + i * entsize) for i in range(count)]

    def _segments(self, phoff: int, phentsize: int, phnum: int) -> tuple[_Segment, ...]:
        rows = self.table(phoff, phentsize, phnum, self.fmt.phdr, "program header table")
        if self.cls == 32:  # p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags, p_align
            return tuple(_Segment(r[0], r[6], r[1], r[2], r[4], r[3], r[5]) for r in rows)
        # p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
        return tuple(_Segment(r[0], r[1], r[2], r[3], r[5], r[4], r[6]) for r in rows)

    def _sections(self, shoff: int, shentsize: int, shnum: int, shstrndx: int) -> tuple[_Section, ...]:
        if shoff == 0:
            return ()
        # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, sh_info, sh_addralign, sh_entsize
        rows = self.table(shoff, shentsize, max(shnum, 1), self.fmt.shdr, "section header table")
        if shnum == 0:  # more than 0xff00 sections: the count is in section 0's sh_size (ELF gABI)
            rows = self.table(shoff, shentsize, rows[0][5], self.fmt.shdr, "section header table")
        if shstrndx == _SHN_XINDEX:  # likewise the section-name table's index, in section 0's sh_link
            self.shstrndx = rows[0][6]
        return tuple(_Section(r[0], r[1], r[4], r[5], r[6], r[9], r[7]) for r in rows)

    def section_named(self, name: bytes) -> _Section | None:
        """The first section called `name` (the names are read once: a file may have 10^5 sections)."""
        if not self.sections or self.shstrndx == _SHN_UNDEF:
            return None
        if self._by_name is None:
            if self.shstrndx >= len(self.sections):
                raise self.error(f"section-name table index {self.shstrndx} is out of range")
            names = self.sections[self.shstrndx]
            table = self.read(names.offset, names.size, "section-name table")
            ends = [m.start() for m in re.finditer(b"\0", table)] + [len(table)]
            by_name: dict[bytes, _Section] = {}
            for section in self.sections:
                if section.name < len(table):
                    end = ends[bisect.bisect_left(ends, section.name)]
                    if end - section.name <= _MAX_SECTION_NAME:  # longer is no name xendbg looks for
                        by_name.setdefault(table[section.name:end], section)
            self._by_name = by_name
        return self._by_name.get(name)

    def file_offset(self, address: int) -> tuple[int, int] | None:
        """File offset of a virtual address and how many bytes of its segment follow, if in the file."""
        for seg in self.segments:
            if seg.type == _PT_LOAD and seg.vaddr <= address < seg.vaddr + seg.filesz:
                return seg.offset + address - seg.vaddr, seg.vaddr + seg.filesz - address
        return None

    def code_at(self, address: int) -> bytes:
        where = self.file_offset(address)
        if where is None:
            return b""
        offset, available = where
        return self.read(offset, min(available, _CODE_BYTES), f"code at {address:#x}")

    def symbols(self, wanted: tuple[str, ...]) -> dict[str, int] | None:
        """Addresses of the wanted defined symbols; None when the file has no symbol table."""
        tables = [s for s in self.sections if s.type == _SHT_SYMTAB] or \
                 [s for s in self.sections if s.type == _SHT_DYNSYM]
        if not tables:
            return None
        found: dict[str, int] = {}
        size = struct.calcsize(self.fmt.sym)
        for table in tables:
            if table.link >= len(self.sections):
                raise self.error(f"symbol table links to string table {table.link}, which does not exist")
            strtab = self.sections[table.link]
            entsize = table.entsize or size
            if entsize < size:
                raise self.error(f"symbol table entries are {entsize} bytes, too small for ELF{self.cls}")
            self.check(strtab.offset, strtab.size, "symbol string table")
            self.check(table.offset, table.size, "symbol table")
            # A few names in a table of maybe 10^5 symbols: search bytes rather than unpack every entry.
            # A symbol's st_name may point into the middle of a longer string (suffix sharing), so take
            # every place a wanted name ends in NUL, then the entries whose st_name (their first word,
            # in ELF32 and ELF64 alike) is one of those places.
            for name in wanted:
                key = name.encode() + b"\0"
                at = self.data.find(key, strtab.offset, strtab.offset + strtab.size)
                while at >= 0 and name not in found:
                    value = self._defined(table, entsize, at - strtab.offset)
                    if value is not None:
                        found[name] = value
                    at = self.data.find(key, at + 1, strtab.offset + strtab.size)
        return found

    def functions(self) -> list[tuple[int, int, str]]:
        """Every function symbol with a size, as (start, size, name), sorted by start."""
        return sorted((sym.value, sym.size, sym.name) for sym in self.symbol_table()
                      if sym.type == _STT_FUNC and sym.size)

    def _defined(self, table: _Section, entsize: int, st_name: int) -> int | None:
        """The value of the first defined symbol in `table` whose name is at `st_name`, if any."""
        key = struct.pack("<I", st_name)
        stop = table.offset + table.size - entsize + len(key)  # the last whole entry's st_name ends here
        at = self.data.find(key, table.offset, stop)
        while at >= 0:
            if (at - table.offset) % entsize == 0:
                fields = struct.unpack_from(self.fmt.sym, self.data, at)
                if self.cls == 32:  # st_name, st_value, st_size, st_info, st_other, st_shndx
                    value, info, shndx = fields[1], fields[3], fields[5]
                else:  # st_name, st_info, st_other, st_shndx, st_value, st_size
                    value, info, shndx = fields[4], fields[1], fields[3]
                if shndx != _SHN_UNDEF and info & 0xF not in (_STT_SECTION, _STT_FILE):
                    return value
            at = self.data.find(key, at + 1, stop)
        return None

    def xen_notes(self, note_type: int) -> list[bytes]:
        """Descriptors of the Xen notes of one type, found as Xen's libelf finds them."""
        # xen/common/libelf/libelf-dominfo.c elf_xen_parse (RELEASE-4.17.0): PT_NOTE segments first
        # (skipping p_offset 0, which some binutils write), SHT_NOTE sections only when no segment
        # holds a Xen note.
        for areas in ([(s.offset, s.filesz) for s in self.segments if s.type == _PT_NOTE and s.offset],
                      [(s.offset, s.size) for s in self.sections if s.type == _SHT_NOTE]):
            xen_notes = [(kind, desc) for offset, size in areas for kind, desc in self._notes(offset, size)]
            if xen_notes:
                return [desc for kind, desc in xen_notes if kind == note_type]
        return []

    def _notes(self, offset: int, size: int) -> list[tuple[int, bytes]]:
        return [(kind, desc) for name, kind, desc in self.notes(offset, size) if name == b"Xen"]

    def notes(self, offset: int, size: int) -> list[tuple[bytes, int, bytes]]:
        """(name, type, descriptor) of each note in a note area of the file."""
        area = self.read(offset, size, "note area")
        return [(name, kind, bytes(desc)) for name, kind, desc in parse_notes(area, self.path, offset)]

    def symbol_table(self) -> list[ElfSymbol]:
        """Every defined function, object or untyped symbol (SHT_SYMTAB, else SHT_DYNSYM), unsorted."""
        tables = [s for s in self.sections if s.type == _SHT_SYMTAB] or \
                 [s for s in self.sections if s.type == _SHT_DYNSYM]
        size = struct.calcsize(self.fmt.sym)
        found: list[ElfSymbol] = []
        for table in tables:
            if table.link >= len(self.sections):
                raise self.error(f"symbol table links to string table {table.link}, which does not exist")
            strtab = self.sections[table.link]
            entsize = table.entsize or size
            if entsize < size:
                raise self.error(f"symbol table entries are {entsize} bytes, too small for ELF{self.cls}")
            names = self.read(strtab.offset, strtab.size, "symbol string table")
            self.check(table.offset, table.size, "symbol table")
            for at in range(table.offset, table.offset + table.size - entsize + 1, entsize):
                fields = struct.unpack_from(self.fmt.sym, self.data, at)
                if self.cls == 32:  # st_name, st_value, st_size, st_info, st_other, st_shndx
                    st_name, value, sym_size, info, shndx = fields[0], fields[1], fields[2], fields[3], fields[5]
                else:  # st_name, st_info, st_other, st_shndx, st_value, st_size
                    st_name, info, shndx, value, sym_size = fields[0], fields[1], fields[3], fields[4], fields[5]
                if shndx == _SHN_UNDEF or info & 0xF > 2 or not st_name or st_name >= len(names):
                    continue
                name = names[st_name:names.find(b"\0", st_name)].decode("latin-1")
                if name:
                    found.append(ElfSymbol(name, value, sym_size, info & 0xF))
        return found


# Far more notes than any file xendbg reads holds (QEMU writes two per CPU, a kernel a few dozen): a note
# area of empty 12-byte headers (a zero-filled area) is corrupt long before.
MAX_NOTES = 1 << 16


def parse_notes(area: bytes | memoryview, where: str, offset: int = 0,
                space: str = "file offset") -> list[tuple[bytes, int, memoryview]]:
    """(name, type, descriptor) of each ELF note in `area`, which starts at `offset` in `space` (the
    file, or the kdump file a flattened dump holds); a note running past it, or more than MAX_NOTES
    notes, raises DecodeError."""
    # Elf32_Nhdr and Elf64_Nhdr are both three 32-bit words; name and descriptor are padded to 4
    # bytes (libelf-tools.c elf_note_next, RELEASE-4.17.0), as Linux, binutils and QEMU write them.
    view = memoryview(area)
    notes: list[tuple[bytes, int, memoryview]] = []
    at = 0
    while at + 12 <= len(view):
        if len(notes) == MAX_NOTES:
            raise DecodeError(f"{where}: more than {MAX_NOTES} ELF notes in the note area at {space} {offset:#x} "
                              f"(the most xendbg reads): corrupt")
        namesz, descsz, kind = struct.unpack_from("<III", view, at)
        name_at = at + 12
        desc_at = name_at + (namesz + 3) // 4 * 4
        end = desc_at + (descsz + 3) // 4 * 4
        if desc_at + descsz > len(view):
            raise DecodeError(f"{where}: ELF note at {space} {offset + at:#x} runs past the end of its note area "
                              f"({len(view)} bytes at {offset:#x})")
        notes.append((bytes(view[name_at:name_at + namesz]).split(b"\0", 1)[0], kind, view[desc_at:desc_at + descsz]))
        at = end
    return notes


ElfFile = _Elf  # the project's one ELF reader (xendbg/dump reads memory dumps with it too)


def _strtoull(text: str) -> int | None:
    """C's strtoull(text, NULL, 0) on the leading number of `text`; None when there is none."""
    text = text.lstrip()
    base, digits = 10, text
    if text[:2].lower() == "0x":
        base, digits = 16, text[2:]
    elif text[:1] == "0":
        base = 8
    valid = "0123456789abcdef"[:base]
    end = 0
    while end < len(digits) and digits[end].lower() in valid:
        end += 1
    return int(digits[:end], base) if end else None


def _xen_guest_fields(elf: _Elf) -> dict[str, str]:
    """The legacy `__xen_guest` string's NAME=VALUE pairs (comma-separated), {} without the section."""
    section = elf.section_named(b"__xen_guest")
    if section is None:
        return {}
    text = elf.read(section.offset, section.size, "__xen_guest section").split(b"\0", 1)[0]
    fields: dict[str, str] = {}
    for item in text.decode("latin-1").split(","):
        name, _, value = item.partition("=")
        fields[name] = value  # libelf takes names as written, the last one winning
    return fields


def _xen_version_note(elf: _Elf) -> tuple[str, str] | None:
    """The Xen version the guest was built for: XEN_ELFNOTE_XEN_VERSION ("xen-3.0"), else the
    `__xen_guest` XEN_VER ("2.0" in Xen 2.0 guests, "xen-3.0" later), with where it was found."""
    notes = elf.xen_notes(_NOTE_XEN_VERSION)
    if notes:
        return notes[-1].split(b"\0", 1)[0].decode("latin-1"), "Xen ELF note XEN_VERSION"
    fields = _xen_guest_fields(elf)
    if "XEN_VER" in fields:
        return fields["XEN_VER"], "__xen_guest XEN_VER"
    return None


def _xen_guest_page(elf: _Elf) -> int | None:
    """HYPERCALL_PAGE from the legacy `__xen_guest` string, turned into a virtual address.

    The string is NAME=VALUE pairs separated by commas.  HYPERCALL_PAGE is a page number relative
    to VIRT_BASE: Xen adds VIRT_BASE + (value << 12) (3.0.2-branched xen/arch/x86/domain_build.c;
    3.0.3-branched xen/common/elf.c; RELEASE-4.17.0 libelf-dominfo.c elf_xen_parse_guest_info, which
    adds VIRT_BASE only when the string has one).  3.0.2 read the number as hex, later Xen with
    strtoull base 0; Linux wrote it with "0x", which both read alike.
    """
    fields = _xen_guest_fields(elf)
    if "HYPERCALL_PAGE" not in fields:
        return None
    page = _strtoull(fields["HYPERCALL_PAGE"])
    if page is None:
        raise elf.error(f"__xen_guest has HYPERCALL_PAGE={fields['HYPERCALL_PAGE']!r}, not a number")
    base = _strtoull(fields.get("VIRT_BASE", "")) or 0
    return (base + (page << 12)) & ((1 << elf.width) - 1)


def _page(elf: _Elf, symbols: dict[str, int] | None) -> tuple[int | None, str]:
    if symbols and "hypercall_page" in symbols:
        return symbols["hypercall_page"], SOURCE_SYMBOL
    notes = elf.xen_notes(_NOTE_HYPERCALL_PAGE)
    if notes:
        desc = notes[-1]  # libelf keeps the last one
        # elf_note_numeric (libelf-tools.c, RELEASE-4.17.0) reads a 1, 2, 4 or 8-byte value.
        if len(desc) not in (1, 2, 4, 8):
            raise elf.error(f"XEN_ELFNOTE_HYPERCALL_PAGE has a {len(desc)}-byte value (Xen reads 1, 2, 4 or 8)")
        return int.from_bytes(desc, "little"), SOURCE_NOTE
    page = _xen_guest_page(elf)
    if page is not None:
        return page, SOURCE_XEN_GUEST
    return None, SOURCE_NONE


def _site(elf: _Elf, name: str, entry: int, source: str, expect: int | None = None) -> InlineSite | None:
    """Confirm with capstone that the code at `entry` reaches a hypercall instruction."""
    code = elf.code_at(entry)
    site = find_hypercall_site(code, entry, elf.width) if code else None
    if site is None or (expect is not None and site.address != expect):
        return None
    return InlineSite(name, entry, site.address, site.convention, source, site.stub_nr)


def signature_matches(data: bytes | mmap.mmap, start: int, end: int) -> list[tuple[str, int, int]]:
    """Linux's stubs found by their exact bytes in data[start:end]: (name, offset of the stub's entry,
    offset of its hypercall instruction), offsets into `data`.  Used on ELF files and on guest memory."""
    found = []
    for sig in _LINUX_SIGNATURES:
        at = data.find(sig.code, start, end)
        while at >= 0:
            follower = data[at + len(sig.code):at + len(sig.code) + 1]
            if not sig.followers or (follower and follower in sig.followers):
                found.append((sig.name, at, at + sig.offset))
            at = data.find(sig.code, at + 1, end)
    return found


def _signature_sites(elf: _Elf) -> list[InlineSite]:
    if elf.width != 64:
        return []  # the signatures are x86_64 Linux (which has had no 32-bit PV guest since 5.9)
    sites = []
    for seg in elf.segments:
        if seg.type != _PT_LOAD or not seg.flags & _PF_X or not seg.filesz:
            continue
        elf.check(seg.offset, seg.filesz, "executable segment")
        for name, at, instruction in signature_matches(elf.data, seg.offset, seg.offset + seg.filesz):
            entry = seg.vaddr + at - seg.offset
            site = _site(elf, name, entry, SOURCE_SIGNATURE, entry + instruction - at)
            if site is not None:
                sites.append(site)
    return sites


# The hypercall instruction of each width: `syscall` (64-bit PV) and `int $0x82` (32-bit PV).
_HYPERCALL_BYTES = {64: b"\x0f\x05", 32: b"\xcd\x82"}


def _scanned_sites(elf: _Elf, known: set[int], page: int | None) -> list[InlineSite]:
    """Hypercall instructions anywhere in the file's functions (a guest may issue a call inline, outside
    its hypercall page and known stubs).  Byte matches are confirmed by disassembling the function
    that holds them from its start, so a match inside another instruction is not taken."""

    from xendbg.arch import find_hypercall_site, hypercall_instructions

    pattern = _HYPERCALL_BYTES[elf.width]
    candidates = []
    for seg in elf.segments:
        if seg.type != _PT_LOAD or not seg.flags & _PF_X or not seg.filesz:
            continue
        elf.check(seg.offset, seg.filesz, "executable segment")
        at = elf.data.find(pattern, seg.offset, seg.offset + seg.filesz)
        while at >= 0:
            address = seg.vaddr + at - seg.offset
            in_page = page is not None and page <= address < page + 4096
            if address not in known and not in_page:
                candidates.append(address)
            at = elf.data.find(pattern, at + 1, seg.offset + seg.filesz)
    if not candidates:
        return []
    functions = elf.functions()
    starts = [f[0] for f in functions]
    found = []
    decoded: dict[int, dict[int, int | None]] = {}
    for address in candidates:
        i = bisect.bisect_right(starts, address) - 1
        if i < 0 or address >= functions[i][0] + functions[i][1]:
            continue  # not inside a known function: cannot tell code from data
        start, length, name = functions[i]
        if start not in decoded:
            where = elf.file_offset(start)
            code = elf.read(where[0], min(length, where[1]), f"code of {name}") if where else b""
            decoded[start] = hypercall_instructions(code, start, elf.width)
        if address in decoded[start]:
            site = find_hypercall_site(elf.code_at(address), address, elf.width)
            if site is not None:
                found.append(InlineSite(f"{name}+{address - start:#x}", address, address, site.convention,
                                        SOURCE_SCAN, decoded[start][address]))
    return found


def find_hypercall_sites(path: str | os.PathLike[str]) -> HypercallSites:
    """Find the hypercall page and the inline hypercall stubs of the guest kernel in ELF file `path`."""
    name = os.fspath(path)
    with map_regular(name, "an ELF file") as data:
        return _find(name, data)


def _find(path: str, data: mmap.mmap) -> HypercallSites:
    elf = _Elf(path, data)
    symbols = elf.symbols(("hypercall_page", *_STUB_SYMBOLS, *XEN_VERSION_FUNCTIONS))
    image = xen_image_version(lambda name: elf.code_at(symbols[name]) if symbols and name in symbols else None)
    page, page_source = _page(elf, symbols)
    if image is not None:
        inline = []  # Xen's own code: no guest hypercall site
    elif symbols is None:
        inline = _signature_sites(elf)
    else:
        found = (_site(elf, stub, symbols[stub], SOURCE_SYMBOL) for stub in _STUB_SYMBOLS if stub in symbols)
        inline = [site for site in found if site is not None]
        inline += _scanned_sites(elf, {site.instruction for site in inline}, page)
    return HypercallSites(path, elf.width, symbols is not None, page, page_source,
                          tuple(sorted(set(inline), key=lambda s: s.entry)), _xen_version_note(elf), image)

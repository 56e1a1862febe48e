"""The session's Symbols protocol over the symbol tables of ELF files (a guest kernel, xen-syms): what
gdb's minimal symbols give a live session, for a dump."""

from __future__ import annotations

import bisect

from xendbg.files import map_regular
from xendbg.sites import ElfFile, ElfSymbol

PT_LOAD = 1


class ElfSymbols:
    """Address <-> name over the defined symbols of several ELF files: an address is named from the
    file whose loaded ranges hold it (a guest kernel's address never takes a name from xen-syms)."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = list(paths)
        self._files: list[tuple[list[tuple[int, int]], list[int], list[ElfSymbol]]] = []
        self._by_name: dict[str, int] = {}
        for path in self.paths:
            symbols, ranges = _read(path)
            # Prefer sized functions over untyped labels at the same address (gdb's choice too).
            symbols.sort(key=lambda s: (s.value, s.type != 2, s.name))
            for sym in symbols:
                self._by_name.setdefault(sym.name, sym.value)
            unique: list[ElfSymbol] = []
            for sym in symbols:
                if not unique or unique[-1].value != sym.value:
                    unique.append(sym)
            self._files.append((ranges, [s.value for s in unique], unique))

    def symbol_at(self, address: int) -> tuple[str, int] | None:
        for ranges, values, symbols in self._files:
            if not any(start <= address < end for start, end in ranges):
                continue
            i = bisect.bisect_right(values, address) - 1
            if i >= 0:
                return symbols[i].name, address - symbols[i].value
        return None

    def ranges(self) -> list[tuple[int, int]]:
        """(start, end) of every PT_LOAD of the files: where their code and data are loaded."""
        return [r for ranges, _, _ in self._files for r in ranges]

    def address_of(self, name: str) -> int | None:
        return self._by_name.get(name)

    def __len__(self) -> int:
        return sum(len(symbols) for _, _, symbols in self._files)


def _read(path: str) -> tuple[list[ElfSymbol], list[tuple[int, int]]]:
    with map_regular(path, "an ELF file") as data:
        elf = ElfFile(path, data)
        symbols = elf.symbol_table()
        ranges = [(s.vaddr, s.vaddr + max(s.memsz, s.filesz)) for s in elf.segments if s.type == PT_LOAD]
    return symbols, ranges  # a stripped file (Debian's vmlinux) still gives evidence of the Xen version

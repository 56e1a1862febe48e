"""Struct layouts of the guest-visible Xen ABI, per ABI generation and guest width.

The offsets and sizes are generated (`_layouts.py`, by tools/gen_abi_layouts.py) from Xen's public
headers at each generation's tag, compiled with gcc -m32 and -m64; tests/unit/test_abi_headers.py
checks the 4.17 ones against the installed libxen-dev headers.

Two eras differ most: Xen 2.0 used `memory_t` words (multicall_entry is `op, args[7]`, the result
written to args[5]; mmu_update is two words), Xen 3.0 on use `op, result, args[6]` and 64-bit
mmu_update words.  `layout(name, width, era)` takes an era (ERA_2, or ERA_3 for the newest
generation) or a generation name; `Abi.layout` asks for its own generation's layout.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from xendbg.abi import _layouts
from xendbg.abi.generations import NEWEST
from xendbg.errors import DecodeError

_SCALAR = {"u8": 1, "u16": 2, "u32": 4, "u64": 8}


@dataclass(frozen=True)
class Field:
    name: str
    offset: int
    kind: str  # u8/u16/u32/u64, bytes, or the name of a nested layout
    count: int = 1  # > 1 for an array; for `bytes`, the length


@dataclass(frozen=True)
class Layout:
    name: str
    size: int
    fields: tuple[Field, ...]
    generation: str = ""  # the generation whose headers gave it: its nested layouts come from there too

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.name} has no field {name}")


def _layout(name: str, size: int, spec: str, generation: str = "") -> Layout:
    """Build a layout from 'name@offset:kind[xcount] ...' words."""
    fields = []
    for word in spec.split():
        fname, rest = word.split("@")
        offset, kind = rest.split(":")
        count = 1
        if "x" in kind:
            kind, n = kind.split("x")
            count = int(n)
        fields.append(Field(fname, int(offset), kind, count))
    return Layout(name, size, tuple(fields), generation)


ERA_2 = "2.0"
ERA_3 = "3.0"
# The generation whose layouts an era name stands for.
_ERA_GENERATION = {ERA_2: "2.0", ERA_3: NEWEST}

# (struct name, guest width, generation) -> layout, from the generated tables.
GENERATION_LAYOUTS: dict[tuple[str, int, str], Layout] = {
    (name, width, generation): _layout(name, size, spec, generation)
    for generation, table in _layouts.LAYOUTS.items()
    for (name, width), (size, spec) in table.items()}

# (struct name, guest width, era) -> layout: ERA_2 is Xen 2.0's, ERA_3 the newest generation's.
LAYOUTS: dict[tuple[str, int, str], Layout] = {
    (name, width, era): lay for era, generation in _ERA_GENERATION.items()
    for (name, width, gen), lay in GENERATION_LAYOUTS.items() if gen == generation}

# Xen 2.0 wrote a multicall entry's result into args[5] (do_multicall in x86_32/entry.S, RELEASE-2.0.0).
MULTICALL_2_0_RESULT_ARG = 5


def generation_layout(name: str, width: int, generation: str) -> Layout:
    try:
        return GENERATION_LAYOUTS[(name, width, generation)]
    except KeyError:
        raise DecodeError(f"Xen {generation} has no {name} for {width}-bit guests") from None


def layout(name: str, width: int, era: str) -> Layout:
    """The layout of `name` in an era (ERA_2, ERA_3: the newest generation) or in a generation."""
    return generation_layout(name, width, _ERA_GENERATION.get(era, era))


def field_size(kind: str, width: int, era: str) -> int:
    if kind in _SCALAR:
        return _SCALAR[kind]
    if kind == "bytes":
        return 1
    return layout(kind, width, era).size


# A decoded struct: field name -> int, a list (arrays), or a nested Fields (structs), as its layout says.
# The layout, not the type checker, knows which: readers take int(row["field"]) etc.
Fields = dict[str, Any]


def unpack(lay: Layout, data: bytes, width: int, era: str) -> Fields:
    """Unpack `data` (at least lay.size bytes) into {field: int | list | bytes | dict}.

    A nested layout comes from the generation `lay` was read from (else from `era`)."""
    out: Fields = {}
    for f in lay.fields:
        out[f.name] = _unpack_field(f, data, width, lay, era)
    return out


def _nested(lay: Layout, kind: str, width: int, era: str) -> Layout:
    return generation_layout(kind, width, lay.generation) if lay.generation else layout(kind, width, era)


def _unpack_field(f: Field, data: bytes, width: int, lay: Layout, era: str) -> object:
    if f.kind == "bytes":
        return bytes(data[f.offset:f.offset + f.count])
    nested = None if f.kind in _SCALAR else _nested(lay, f.kind, width, era)
    size = _SCALAR[f.kind] if nested is None else nested.size
    values: list[Any] = []
    for i in range(f.count):
        start = f.offset + i * size
        chunk = data[start:start + size]
        if nested is None:
            values.append(int.from_bytes(chunk, "little"))
        else:
            values.append(unpack(nested, chunk, width, era))
    return values[0] if f.count == 1 else values


def pack_u(value: int, size: int) -> bytes:
    """Little-endian bytes of an unsigned value (used to build test images and probes)."""
    return struct.pack({1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[size], value & ((1 << (8 * size)) - 1))

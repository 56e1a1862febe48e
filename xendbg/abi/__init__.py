"""The Xen ABI as data: one `Abi` per (generation, guest width).

Every Xen number, name and layout xendbg uses is reachable from here:
  _tables.py      numbers generated from Xen's public headers at each generation's tag
  hypercalls.py   argument names and kinds of each hypercall
  layouts.py      struct layouts per generation and width (from _layouts.py, generated)
  generations.py  which Xen versions belong to which generation
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

from xendbg.abi import _tables
from xendbg.abi.generations import GENERATIONS, NEWEST, at_least, generation_tag, resolve_generation
from xendbg.abi.hypercalls import (
    FORMER_NAMES,
    SIGNATURE_OVERRIDES,
    SIGNATURES,
    WIDTH_ONLY,
    ArgSpec,
)
from xendbg.abi.layouts import ERA_2, ERA_3, Layout, generation_layout
from xendbg.errors import UsageError

__all__ = ["Abi", "Enum", "HypercallDef", "get_abi", "GENERATIONS", "NEWEST", "resolve_generation", "guest_widths",
           "ERRNO", "errno_name", "result_name", "result_text", "TRAP_FLAG_DPL_MASK", "TRAP_FLAG_IF", "DOMIDS"]

# x86 trap_info flags (xen/include/public/arch-x86/xen.h, RELEASE-4.17.0: TI_GET_DPL, TI_GET_IF;
# the same bits in RELEASE-2.0.0 arch-x86_32.h): bits 0-1 are the gate's DPL, bit 2 says "clear the
# event mask on entry", Xen's analogue of an interrupt gate clearing IF.
TRAP_FLAG_DPL_MASK = 0x3
TRAP_FLAG_IF = 0x4

# Special domain ids (xen/include/public/xen.h, RELEASE-4.17.0; DOMID_SELF since RELEASE-2.0.0).
DOMIDS: dict[int, str] = {0x7FF0: "DOMID_SELF", 0x7FF1: "DOMID_IO", 0x7FF2: "DOMID_XEN",
                          0x7FF3: "DOMID_COW", 0x7FF4: "DOMID_INVALID", 0x7FF5: "DOMID_IDLE"}

ERRNO: dict[str, int] = _tables.ERRNO
_ERRNO_NAMES: dict[int, str] = {}
for _name, _value in ERRNO.items():
    _ERRNO_NAMES.setdefault(_value, _name)


def errno_name(value: int) -> str | None:
    """Name of a negative Xen return value (-22 -> 'EINVAL'), None if it is not an errno."""
    return _ERRNO_NAMES.get(-value) if value < 0 else None


def result_name(value: int) -> str | None:
    """'OK' for a result that is not an error (0, a count, a version), else the errno name or None."""
    return "OK" if value >= 0 else errno_name(value)


def result_text(value: int) -> str:
    """A hypercall result as xendbg prints it everywhere: '-38 (ENOSYS)', '0', '0x20011' (large values
    are versions, addresses or counts, clearer in hex)."""
    name = errno_name(value)
    return f"{value} ({name})" if name else (f"{value:#x}" if value > 0xFFFF else str(value))


def guest_widths(generation: str) -> tuple[int, ...]:
    """The PV guest widths a generation ran.  Xen 2.0 ran 32-bit PV guests only: its x86_64 port has no
    hypercall entry (xen/arch/x86/x86_64/entry.S is empty at RELEASE-2.0.0); 64-bit PV guests came with
    RELEASE-3.0.0.  Where a generation has one width, that width is the default."""
    return (32,) if generation == "2.0" else (32, 64)


# Flat segment selectors Xen provides to PV guests (xen/include/public/arch-x86_32.h and
# arch-x86_64.h at RELEASE-2.0.0; arch-x86/xen-x86_32.h and xen-x86_64.h at RELEASE-3.0.0 onwards).
FLAT_SELECTORS: dict[tuple[str, int], dict[str, int]] = {
    (ERA_2, 32): {"FLAT_RING1_CS": 0x0819, "FLAT_RING1_DS": 0x0821, "FLAT_RING3_CS": 0x082B,
                  "FLAT_RING3_DS": 0x0833},
    (ERA_2, 64): {"FLAT_RING3_CS32": 0x0823, "FLAT_RING3_CS64": 0x082B, "FLAT_RING3_DS": 0x0833},
    (ERA_3, 32): {"FLAT_RING1_CS": 0xE019, "FLAT_RING1_DS": 0xE021, "FLAT_RING3_CS": 0xE02B,
                  "FLAT_RING3_DS": 0xE033},
    (ERA_3, 64): {"FLAT_RING3_CS32": 0xE023, "FLAT_RING3_CS64": 0xE033, "FLAT_RING3_DS32": 0xE02B,
                  "FLAT_RING3_SS64": 0xE02B},
}
# The guest kernel's code selector, the one Xen accepts whatever its checks (VALID_CODESEL).
KERNEL_CS_NAME = {32: "FLAT_RING1_CS", 64: "FLAT_RING3_CS64"}
# GDT entries Xen reserves for itself: RELEASE-2.0.0 arch-x86_32.h (entries 256-295); from
# RELEASE-3.0.0 arch-x86_32.h, FIRST_RESERVED_GDT_PAGE 14 (entry 7168) up to the end of the GDT.
RESERVED_GDT: dict[str, tuple[int, int]] = {ERA_2: (256, 295), ERA_3: (14 * 4096 // 8, 8191)}


def selector_text(selector: int, name: str | None) -> str:
    """How xendbg shows a segment selector everywhere: value, flat name when known, RPL."""
    return f"{selector:#06x} ({name}, RPL {selector & 3})" if name else f"{selector:#06x} (RPL {selector & 3})"


class Enum:
    """A family of Xen numbers (VCPUOP_*, SCHEDOP_*, ...) in one generation."""

    def __init__(self, family: str, values: dict[str, int]) -> None:
        self.family = family
        self.values = values
        self._names: dict[int, str] = {}
        for name, value in values.items():
            self._names.setdefault(value, name)

    def name_of(self, value: int) -> str | None:
        return self._names.get(value)



@dataclass(frozen=True)
class HypercallDef:
    nr: int
    name: str
    former_names: tuple[str, ...]
    args: tuple[ArgSpec, ...]
    signature: str  # key into hypercalls.SIGNATURES, or "" when xendbg knows no argument list


@dataclass(frozen=True)
class Abi:
    """The Xen ABI of one generation as one guest width sees it."""

    generation: str
    width: int
    _by_nr: dict[int, HypercallDef] = field(repr=False, compare=False, default_factory=dict)

    @property
    def tag(self) -> str:
        return generation_tag(self.generation)

    @property
    def era(self) -> str:
        return ERA_2 if self.generation == "2.0" else ERA_3

    @property
    def kernel_rpl(self) -> int:
        """The ring a PV guest kernel runs in: 1 on x86_32, 3 on x86_64."""
        return 1 if self.width == 32 else 3

    @property
    def rejects_bad_selectors(self) -> bool:
        """Xen 2.0 and 3.0.0-3.0.1 refuse a wrong-RPL code selector (-EPERM); later Xen fixes it up."""
        return not at_least(self.generation, "3.0.2")

    @property
    def null_trap_table_clears(self) -> bool:
        """From 3.0.2 a NULL set_trap_table clears the virtual IDT; before, it fails with -EFAULT
        (do_set_trap_table in xen/arch/x86/traps.c at 3.0.2-branched and RELEASE-3.0.0)."""
        return at_least(self.generation, "3.0.2")

    @property
    def has_fast_trap(self) -> bool:
        return "set_fast_trap" in _tables.HYPERCALL[self.generation]

    @property
    def removed_fast_trap_nr(self) -> int | None:
        """The number Xen 2.0's set_fast_trap had, in a generation that removed it (3.0: nothing there)."""
        return None if self.has_fast_trap else _tables.HYPERCALL["2.0"]["set_fast_trap"]

    @property
    def multicall_result_in_args(self) -> bool:
        return self.era == ERA_2

    @property
    def flat_selectors(self) -> dict[str, int]:
        return FLAT_SELECTORS[(self.era, self.width)]

    @property
    def kernel_cs(self) -> int:
        return self.flat_selectors[KERNEL_CS_NAME[self.width]]

    @property
    def reserved_gdt(self) -> tuple[int, int]:
        return RESERVED_GDT[self.era]

    @property
    def address_mask(self) -> int:
        return (1 << self.width) - 1

    def hypercalls(self) -> list[HypercallDef]:
        return [self._by_nr[nr] for nr in sorted(self._by_nr)]

    def hypercall(self, nr: int) -> HypercallDef | None:
        return self._by_nr.get(nr)

    def hypercall_named(self, name: str) -> HypercallDef | None:
        """Look a hypercall up by its name in this generation, then by a former name."""
        key = name.strip().lower().removeprefix("__hypervisor_")
        for hc in self._by_nr.values():
            if hc.name == key:
                return hc
        for hc in self._by_nr.values():
            if key in hc.former_names:
                return hc
        return None

    def number_of(self, name: str) -> int:
        """The number of a hypercall this generation has (KeyError for one it does not)."""
        found = self.hypercall_named(name)
        if found is None:
            raise KeyError(f"Xen {self.generation} has no hypercall {name}")
        return found.nr

    def enum(self, family: str) -> Enum:
        return _enum(self.generation, family)

    def layout(self, name: str) -> Layout:
        return generation_layout(name, self.width, self.generation)

    def selector_text(self, selector: int) -> str:
        """'0xe019 (FLAT_RING1_CS, RPL 1)': a selector with its flat name, if it is one, and RPL."""
        return selector_text(selector, self.selector_name(selector))

    def selector_name(self, selector: int) -> str | None:
        for name, value in self.flat_selectors.items():
            if value == selector:
                return name
        return None


@cache
def _enum(generation: str, family: str) -> Enum:
    table = getattr(_tables, family, None)
    if table is None:
        raise KeyError(f"no enum family {family}")
    return Enum(family, table[generation])


def _build_hypercalls(generation: str, width: int) -> dict[int, HypercallDef]:
    by_nr: dict[int, HypercallDef] = {}
    for name, nr in _tables.HYPERCALL[generation].items():
        if WIDTH_ONLY.get(name, width) != width or nr in by_nr:
            continue  # the first name Xen's header gives a number is its primary name
        signature = SIGNATURE_OVERRIDES.get((generation, name), name)
        if signature not in SIGNATURES:
            signature = f"{name}@{generation}" if f"{name}@{generation}" in SIGNATURES else ""
        args = SIGNATURES[signature].args(width) if signature else ()
        # Former names are shown beside the name; lookups try them only after every primary name.
        also = tuple(n for n, v in _tables.HYPERCALL[generation].items() if v == nr and n != name)
        former = tuple(dict.fromkeys(FORMER_NAMES.get(name, ()) + also))
        by_nr[nr] = HypercallDef(nr, name, former, args, signature)
    return by_nr


@cache
def get_abi(version: str = NEWEST, width: int = 64) -> Abi:
    """The ABI of Xen `version` (a generation name or any Xen version) for a 32- or 64-bit guest."""
    if width not in (32, 64):
        raise UsageError(f"guest width must be 32 or 64, not {width}")
    generation = version if version in GENERATIONS else resolve_generation(version)
    return Abi(generation, width, _build_hypercalls(generation, width))

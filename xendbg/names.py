"""Names a user types, and how xendbg resolves them for every front end: ABI generations, hypercalls
(by name, former name or number, across guest widths), interrupt vectors (by number or mnemonic).

The gdb commands need some of these when they register, before any table or decoder loads: `set xen
abi` offers the generation names and `xen break trap` completes vector mnemonics the moment xendbg is
sourced into gdb.  So this module imports nothing at load (see bench/run.py startup); xendbg.abi and
xendbg.arch take these names from here, and the resolvers import the tables when first called.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: importing typing alone costs milliseconds at gdb start-up
if TYPE_CHECKING:
    from collections.abc import Callable

# ABI generations, oldest first; the tables in xendbg/abi/_tables.py are keyed by these names
# (tests/platform/test_loading.py checks that the two agree).
GENERATIONS: tuple[str, ...] = ("2.0", "3.0", "3.0.2", "3.0.3", "4.0", "4.17", "4.20", "4.22")
NEWEST: str = GENERATIONS[-1]

# x86 exception vectors (Intel SDM vol. 3, table 6-1): mnemonic and name.
TRAP_VECTORS: dict[int, tuple[str, str]] = {
    0: ("#DE", "divide error"), 1: ("#DB", "debug"), 2: ("NMI", "non-maskable interrupt"),
    3: ("#BP", "breakpoint"), 4: ("#OF", "overflow"), 5: ("#BR", "bound range exceeded"),
    6: ("#UD", "invalid opcode"), 7: ("#NM", "device not available"), 8: ("#DF", "double fault"),
    9: ("CSO", "coprocessor segment overrun"), 10: ("#TS", "invalid TSS"),
    11: ("#NP", "segment not present"), 12: ("#SS", "stack-segment fault"),
    13: ("#GP", "general protection"), 14: ("#PF", "page fault"), 15: ("--", "reserved (spurious)"),
    16: ("#MF", "x87 floating-point error"), 17: ("#AC", "alignment check"), 18: ("#MC", "machine check"),
    19: ("#XM", "SIMD floating-point"), 20: ("#VE", "virtualization exception"),
    21: ("#CP", "control protection"),
}


# Vector names a user may type (case-insensitive): the exception mnemonics without '#', and int80.
VECTOR_NAMES: dict[str, int] = {mnemonic.lstrip("#").lower(): vector
                                for vector, (mnemonic, _) in TRAP_VECTORS.items() if mnemonic != "--"}
VECTOR_NAMES |= {"int80": 0x80, "syscall80": 0x80}


def hypercall_names(generations: tuple[str, ...]) -> list[str]:
    """Every hypercall name a guest of either width can use in these generations (completion)."""
    from xendbg.abi import get_abi

    return sorted({h.name for g in generations for width in (32, 64) for h in get_abi(g, width).hypercalls()})


def _generations_with(word: str) -> list[str]:
    from xendbg.abi import get_abi

    return [g for g in GENERATIONS if any(get_abi(g, w).hypercall_named(word) for w in (32, 64))]


def resolve_hypercall(word: str, generations: tuple[str, ...], why: str = "") -> str:
    """A hypercall given by name (current or former) or number, as its name in the first of `generations`
    (the chosen one, then the others the evidence allows) that has it, for a guest of either width; a
    one-line UsageError naming the generations that do have it otherwise.  `why` says how the chosen
    generation was picked ("set by hand", "guessed: ...")."""
    from xendbg.abi import get_abi
    from xendbg.errors import UsageError

    chosen = f"Xen {generations[0]}" + (f" ({why})" if why else "")
    try:
        nr = int(word, 0)
    except ValueError:
        nr = None
    key = word.strip().lower().removeprefix("__hypervisor_")
    for generation in generations:
        found = []
        for width in (64, 32):
            abi = get_abi(generation, width)
            hit = abi.hypercall(nr) if nr is not None else abi.hypercall_named(word)
            if hit is not None:
                found.append(hit)
        if found:  # a name one width has as its own wins over the other width's former name for it
            return next((h.name for h in found if h.name == key), found[0].name)
    listing = f"`xendbg abi --xen {generations[0]}` lists them; add --width 32 for 32-bit guests"
    if nr is not None:
        raise UsageError(f"{chosen} has no hypercall number {nr} ({listing})")
    elsewhere = _generations_with(word)
    if elsewhere:
        raise UsageError(f"{chosen} has no hypercall {word!r}: only Xen {', '.join(elsewhere)} "
                         f"{'has' if len(elsewhere) == 1 else 'have'} it (set xen abi {elsewhere[-1]})")
    raise UsageError(f"{chosen} has no hypercall {word!r}, and no other Xen has one ({listing})")


def parse_vector(word: str, number: Callable[[str], int]) -> int:
    """A vector by name (PF, gp, int80; '#' allowed) or by number (`number` evaluates expressions)."""
    from xendbg.errors import UsageError

    key = word.lower().lstrip("#")
    if key in VECTOR_NAMES:
        return VECTOR_NAMES[key]
    vector = number(word)
    if not 0 <= vector <= 255:
        raise UsageError(f"vector {vector} is out of range (0-255)")
    return vector


def complete(candidates: list[str], word: str) -> list[str]:
    """Candidates starting with `word`, case-insensitively, in the case the user is typing."""
    lowered = word.lower()
    upper = bool(word) and word.isupper()
    matches = [c for c in candidates if c.lower().startswith(lowered)]
    return sorted({c.upper() if upper else c for c in matches})

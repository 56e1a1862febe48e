"""What every front end shares about one debugging session, with no front end's API in it: the settings,
which Xen ABI generation to decode with (and why), the guest width of a vCPU, and where a stopped vCPU
stands (`decode_here`).

gdb (`xendbg/gdb/`), an MI client and a dump reader each hand this module a Target and a `Symbols`.

Choosing the ABI under `set xen abi auto` (the order is documented in README.md): evidence that names
one generation wins over evidence that only bounds it, and a guess always says so.
1. a `xen_version(XENVER_version)` result xendbg saw (catch, break or trace probes);
2. Xen's own version, read from its image (`xen_major_version` / `xen_minor_version` in xen-syms);
3. the guest kernel's Xen ELF note XEN_VERSION or its `__xen_guest` XEN_VER: "2.0" names Xen 2.0,
   "xen-3.0" only says 3.0 or later (every later Xen still accepts such guests);
4. the code selector in use: Xen 2.0's flat selectors (0x0819 ...) exist only in 2.0, the 0xe0xx ones
   only from 3.0;
5. whether the guest uses a hypercall page, which Xen provides from 3.0.
With only lower bounds, xendbg decodes with the newest generation and adds a `warning` finding that
says it guessed and which `set xen abi` settles it.  Conflicting evidence gets a warning too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from xendbg import arch
from xendbg.abi import FLAT_SELECTORS, GENERATIONS, NEWEST, Abi, get_abi, guest_widths, resolve_generation
from xendbg.abi.layouts import ERA_2, ERA_3
from xendbg.decode.model import Finding, GuestState, Hypercall
from xendbg.errors import UsageError, XendbgError
from xendbg.target import Target

if TYPE_CHECKING:
    from xendbg.sites import HypercallSites

# Which generation a flat code or data selector implies (abi.FLAT_SELECTORS, RELEASE-2.0.0 and
# RELEASE-3.0.0 public headers): the 2.0 values exist in no later Xen, the 3.0 values in no earlier one.
# Xen 2.0 had no 64-bit PV guests in practice, so only its 32-bit selectors count.
_SELECTOR_ERA: dict[int, str] = {value: ERA_3 for value in FLAT_SELECTORS[(ERA_3, 32)].values()}
_SELECTOR_ERA |= {value: ERA_3 for value in FLAT_SELECTORS[(ERA_3, 64)].values()}
_SELECTOR_ERA |= {value: ERA_2 for value in FLAT_SELECTORS[(ERA_2, 32)].values()}


class Symbols(Protocol):
    """Address <-> name lookups, from gdb, an MI client or a symbol file."""

    def symbol_at(self, address: int) -> tuple[str, int] | None:
        """(function, offset) for an address, or None."""
        ...

    def address_of(self, name: str) -> int | None:
        """The address of a (minimal) symbol, or None."""
        ...


class NoSymbols:
    """A Symbols that knows nothing (a target without symbol files)."""

    def symbol_at(self, address: int) -> tuple[str, int] | None:
        return None

    def address_of(self, name: str) -> int | None:
        return None


@dataclass
class Settings:
    abi: str = "auto"  # "auto" or a generation name
    width: str = "auto"  # "auto", "32" or "64"
    color: bool = True


@dataclass
class Evidence:
    """What xendbg knows about the Xen version, gathered by the front end (see the module docstring)."""

    reported: tuple[str, str] | None = None  # (version "4.17", where it was seen)
    xen_image: str | None = None  # "4.17", from Xen's own image
    guest_note: tuple[str, str] | None = None  # ("xen-3.0", which file and note)
    hypercall_page: str | None = None  # where the guest's hypercall page is, when it has one
    code_selector: int | None = None  # the last flat code selector a guest vCPU was seen running with


    def read_files(self, found: Iterable[HypercallSites]) -> None:
        """Take what the loaded files say (sites.py scans them): Xen's version from xen-syms, the guest's
        Xen ELF note, its hypercall page.  Replaces what earlier files said."""
        self.xen_image = self.guest_note = self.hypercall_page = None
        for sites in found:
            name = os.path.basename(sites.path)
            if sites.xen_image_version is not None:
                self.xen_image = self.xen_image or sites.xen_image_version
                continue
            if sites.xen_version is not None and self.guest_note is None:
                self.guest_note = (sites.xen_version[0], f"{sites.xen_version[1]} ({name})")
            if sites.hypercall_page is not None and self.hypercall_page is None:
                self.hypercall_page = f"{sites.hypercall_page:#x} ({name})"


@dataclass(frozen=True)
class AbiChoice:
    """The generation xendbg decodes with, why, and a warning when that is a guess or contested."""

    generation: str
    reason: str
    warning: str | None = None
    # Every generation the evidence allows (the chosen one first): a guess may be wrong, so a name or
    # number a user asks to watch is looked up in all of them.
    candidates: tuple[str, ...] = ()

    @property
    def guessed(self) -> bool:
        return len(self.candidates) > 1

    def findings(self) -> tuple[Finding, ...]:
        """The guess or conflict warning, as a finding to add to a report (none when the ABI is certain)."""
        if self.warning is None:
            return ()
        return (Finding("abi-evidence", "warning", self.warning, subject="abi"),)


def _known_generation(version: str) -> str | None:
    """The generation of a Xen version, None when it names no Xen xendbg knows (evidence to ignore)."""
    try:
        return resolve_generation(version)
    except UsageError:
        return None


def note_generation(note: str) -> tuple[str, bool] | None:
    """(generation, exact) for a guest's XEN_VER text: '2.0' names 2.0, 'xen-3.0' means 3.0 or later."""
    generation = _known_generation(note.strip().lower().removeprefix("xen-"))
    return None if generation is None else (generation, generation == "2.0")


def selector_era(selector: int) -> str | None:
    """ERA_2 or ERA_3 when `selector` is one of Xen's flat selectors of only that era."""
    return _SELECTOR_ERA.get(selector & 0xFFFF)


def choose_generation(setting: str, evidence: Evidence, code_selector: int | None = None) -> AbiChoice:
    """The generation to decode with: `setting` unless "auto", else from `evidence` (module docstring)."""
    exact: list[tuple[str, str]] = []  # (generation, why), in the documented order
    at_least_3: list[str] = []  # reasons that say "3.0 or later"
    # A version that names no known Xen (a misread result) is no evidence; it must not fail every command.
    if evidence.reported is not None and (reported := _known_generation(evidence.reported[0])) is not None:
        version, where = evidence.reported
        exact.append((reported, f"from xen_version() = {version}, {where}"))
    if evidence.xen_image is not None and (image := _known_generation(evidence.xen_image)) is not None:
        exact.append((image, f"from Xen's image: Xen {evidence.xen_image}"))
    if evidence.guest_note is not None:
        text, where = evidence.guest_note
        parsed = note_generation(text)
        if parsed is not None:
            why = f"from the guest's {where} {text!r}"
            if parsed[1]:
                exact.append((parsed[0], why))
            else:
                at_least_3.append(why.removeprefix("from "))
    if code_selector is not None:
        era = selector_era(code_selector)
        if era == ERA_2:
            exact.append(("2.0", f"from the guest's CS {code_selector:#06x}"))
        elif era == ERA_3:
            at_least_3.append(f"the guest's CS {code_selector:#06x}")
    if evidence.hypercall_page is not None:
        at_least_3.append(f"its hypercall page at {evidence.hypercall_page}")

    def contested(generation: str) -> list[str]:
        against = [why for gen, why in exact if gen != generation]
        if generation == "2.0":
            against += [f"{why} (Xen 3.0 or later)" for why in at_least_3]
        return against

    settle = "`set xen abi VERSION` settles it"
    if setting != "auto":
        against = contested(setting)
        warning = (f"decoding with Xen {setting} as set by hand, but the evidence disagrees: {'; '.join(against)}"
                   if against else None)
        return AbiChoice(setting, "set by hand", warning, (setting,))
    if exact:
        generation, why = exact[0]
        against = contested(generation)
        warning = (f"conflicting evidence about the Xen version: {why}, but {'; '.join(against)}; xendbg "
                   f"decodes with Xen {generation} (the first in its order of evidence): {settle}"
                   if against else None)
        return AbiChoice(generation, why, warning, (generation,))
    newest_first = tuple(reversed(GENERATIONS))
    if at_least_3:
        why = ", ".join(at_least_3)
        say = "says" if len(at_least_3) == 1 else "say"
        return AbiChoice(NEWEST, f"guessed: {why} {say} Xen 3.0 or later, not which",
                         f"the Xen version is a guess: {why} {say} Xen 3.0 or later, nothing says which; xendbg "
                         f"decodes with the newest ABI, {NEWEST}, and numbers differ between generations "
                         f"(e.g. sched_op before 3.0.2, event_channel_op before 3.0.3): {settle}",
                         tuple(g for g in newest_first if g != "2.0"))
    return AbiChoice(NEWEST, "guessed: no evidence of the Xen version",
                     f"the Xen version is a guess: xendbg has no evidence of it (no xen_version result seen, no "
                     f"Xen symbols, no Xen ELF note, no known code selector) and decodes with the newest ABI, "
                     f"{NEWEST}: {settle}", newest_first)


XEN_VERSION_FUNCTIONS = ("xen_major_version", "xen_minor_version")


def xen_image_version(read_code: Callable[[str], bytes | None]) -> str | None:
    """Xen's version from its own image: `xen_major_version` and `xen_minor_version` are each a
    `mov $N, %eax` followed by a return (xen/common/version.c, RELEASE-4.17.0).  `read_code` gives the
    first bytes of a function by name (from xen-syms, or Xen's memory), None when it cannot."""
    numbers = []
    for name in XEN_VERSION_FUNCTIONS:
        code = read_code(name)
        number = arch.mov_eax_immediate(code) if code else None
        if number is None:
            return None
        numbers.append(number)
    return f"{numbers[0]}.{numbers[1]}"


@dataclass
class Session:
    """One debugging session: settings, evidence, and the per-vCPU registered state."""

    settings: Settings = field(default_factory=Settings)
    evidence: Evidence = field(default_factory=Evidence)
    states: dict[int, GuestState] = field(default_factory=dict)
    gate_handlers: set[int] = field(default_factory=set)  # Xen's int $0x82 handlers found from the IDT

    def state(self, cpu: int) -> GuestState:
        return self.states.setdefault(cpu, GuestState())

    def saw_version(self, result: int, where: str) -> None:
        """A xen_version(XENVER_version) result: major in the top 16 bits, minor in the low 16."""
        if result > 0:
            self.evidence.reported = (f"{result >> 16}.{result & 0xFFFF}", where)

    def choice(self, code_selector: int | None = None) -> AbiChoice:
        """The ABI choice; a flat code selector seen now is remembered as evidence for the session."""
        if code_selector is not None and selector_era(code_selector) is not None:
            self.evidence.code_selector = code_selector
        return choose_generation(self.settings.abi, self.evidence, self.evidence.code_selector)

    def generation(self, code_selector: int | None = None) -> str:
        return self.choice(code_selector).generation

    def forced_width(self) -> int | None:
        return None if self.settings.width == "auto" else int(self.settings.width)

    def guest_width(self, target: Target) -> int | None:
        """The guest width of the vCPU (None when it is not in a guest: in Xen, ring 0, or in real mode or
        with paging off, where CR0 says so)."""
        forced = self.forced_width()
        return forced if forced is not None else arch.vcpu_mode(target).width

    def abi(self, width: int, code_selector: int | None = None) -> tuple[Abi, AbiChoice]:
        """The ABI for a guest of `width` bits (`set xen width` wins), and why this generation."""
        choice = self.choice(code_selector)
        forced = self.forced_width()
        return get_abi(choice.generation, forced if forced is not None else width), choice

    def abi_for_width(self, width: int) -> Abi:
        return self.abi(width)[0]

    def candidate_abis(self, width: int) -> list[Abi]:
        """The ABI of every generation the evidence allows, the chosen one first (for planning probes
        before the guest has run: its numbers are looked up in each)."""
        forced = self.forced_width()
        return [get_abi(g, forced if forced is not None else width) for g in self.choice().candidates]

    def current_abi(self, target: Target, where: str = "") -> tuple[Abi, AbiChoice]:
        """The ABI for the vCPU `target` shows: `set xen width/abi`, else the guest's CS and evidence."""
        cs = target.read_register("cs") & 0xFFFF
        width = self.guest_width(target)
        if width is None:
            widths = "|".join(map(str, guest_widths(self.generation())))
            mode = arch.vcpu_mode(target).description
            raise XendbgError(f"the selected vCPU is {mode}{f' {where}' if where else ''}, not in the guest "
                              f"(set xen width {widths} to decode its registers anyway)")
        code_selector = cs if arch.cpu_mode(cs).width is not None else None
        return self.guest_abi(width, code_selector, f"set xen width {width}" if self.forced_width() else
                              f"the vCPU's CS {cs:#06x} says {arch.cpu_mode(cs).description}")

    def guest_abi(self, width: int, code_selector: int | None, source: str) -> tuple[Abi, AbiChoice]:
        """`abi` for a guest whose width `source` gave; a width the chosen generation never ran is refused
        (Xen 2.0 ran no 64-bit PV guests) instead of decoding with numbers no such Xen had."""
        abi, choice = self.abi(width, code_selector)
        if abi.width not in guest_widths(choice.generation):
            fix = ("choose Xen 3.0 or later (set xen abi in gdb, --xen for xendbg core)"
                   + (", or set xen width auto" if self.forced_width() else ""))
            raise XendbgError(f"Xen {choice.generation} had no {abi.width}-bit PV guests (64-bit PV came with "
                              f"Xen 3.0), but {source}; xendbg decodes with Xen {choice.generation} "
                              f"({choice.reason}): {fix}")
        return abi, choice

    def decode_here(self, target: Target, symbols: Symbols, cpu: int) -> Hypercall:
        """The hypercall the vCPU is about to make or, inside Xen at a handler or at the hypercall
        entry (Xen's symbols needed), is serving; annotated with the ABI choice."""
        from xendbg.decode import decode_in_xen, decode_pending

        state = self.state(cpu)
        if self.guest_width(target) is None:
            pc = target.read_register("pc")
            sym = (arch.XEN_GATE_ENTRY, 0) if pc in self.gate_handlers else symbols.symbol_at(pc)
            if sym is not None and sym[1] == 0 and (sym[0] in (*arch.XEN_FRAME_ENTRIES, arch.XEN_GATE_ENTRY)
                                                    or arch.handler_hypercall(sym[0])):
                chosen: list[AbiChoice] = []

                def pick(width: int, code_selector: int | None = None) -> Abi:
                    source = (f"the guest's CS {code_selector:#06x} in Xen's frame" if code_selector is not None
                              else f"{sym[0]} serves {width}-bit guests")
                    abi, choice = self.guest_abi(width, code_selector, source)
                    chosen.append(choice)
                    return abi

                hc = decode_in_xen(target, sym[0], pick, state=state)
                return annotate(hc, chosen[-1])
            hint = ("" if symbols.address_of(arch.XEN_HYPERCALL_ENTRY) is not None
                    else "; load Xen's symbols (xen-syms) to decode inside Xen")
            mode = arch.vcpu_mode(target)
            if mode.paging is False:  # real mode or paging off: neither Xen nor a guest runs
                raise XendbgError(f"no pending hypercall: the selected vCPU is {mode.description} "
                                  f"{where(target, symbols)}, not in a PV guest")
            raise XendbgError(f"no pending hypercall: the selected vCPU is in Xen {where(target, symbols)}, not "
                              f"at the entry of a hypercall handler (do_NAME, compat_NAME) or of "
                              f"{arch.XEN_HYPERCALL_ENTRY}{hint}")
        abi, choice = self.current_abi(target)
        return annotate(decode_pending(target, abi, state=state), choice)


def annotate(hc: Hypercall, choice: AbiChoice) -> Hypercall:
    """`hc` with the reason for its ABI, and the guess/conflict warning among its findings."""
    return replace(hc, abi_reason=choice.reason, findings=hc.findings + choice.findings())


def where(target: Target, symbols: Symbols) -> str:
    pc = target.read_register("pc")
    sym = symbols.symbol_at(pc)
    if sym is None:
        return f"at {pc:#x}"
    return f"at {pc:#x} <{sym[0]}+{sym[1]}>" if sym[1] else f"at {pc:#x} <{sym[0]}>"


__all__ = ["AbiChoice", "Evidence", "GENERATIONS", "NoSymbols", "Session", "Settings", "Symbols", "annotate",
           "choose_generation", "note_generation", "selector_era", "where", "xen_image_version"]

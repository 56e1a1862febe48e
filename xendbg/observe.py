"""Watching a running guest, front-end independent: where to observe hypercalls for a catch, a trace or an
entry breakpoint (a plan of probes), which calls a probe hit starts, continues or repeats, and where
a followed entry point is now.  A front end turns the plan into its own breakpoints (gdb.Breakpoint in
xendbg/gdb/monitor.py) and feeds the hits back.

Probes are of four kinds:
- "instruction": on a hypercall instruction the guest issues calls from (Linux's `xen_hypercall_pv`,
  the 32-bit test guest's `xen_int82`); the number is in a register, so the front end can filter by
  number before decoding (`numbers`);
- "stub": on the hypercall instruction inside one hypercall-page stub (one probe per wanted number).
  Not at the stub's entry: Xen continues a preempted call by rewinding the guest to the instruction
  itself, and only a probe there sees the continuation;
- "handler": at a Xen handler's first instruction (`do_multicall`, `compat_vcpu_op`), Xen's symbols needed;
- "frame": at `pv_hypercall`, which every 64-bit PV hypercall passes, reading the guest's saved frame.
A call's result is read where it comes back to the guest (`return_places`), matched to its call by
(CPU, return address, stack pointer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from xendbg import arch
from xendbg.abi import Abi
from xendbg.abi.hypercalls import CONTINUED_BY_XEN, NEVER_RETURN
from xendbg.decode.model import GuestState, Hypercall, MulticallBatch, TrapTable
from xendbg.sites import HypercallSites

# The calls that change what the guest has registered (replayed into GuestState).  Guest-side probes
# also need multicall, whose batch may register; Xen-side handler probes see batched calls at their own
# handlers, since Xen's do_multicall calls the handlers directly.
REGISTERING = ("set_trap_table", "set_callbacks", "callback_op", "set_fast_trap")
VERSION_CALL = "xen_version"  # its XENVER_version result tells `set xen abi auto` which Xen this is

def is_version_query(hc: Hypercall) -> bool:
    """xen_version(XENVER_version): command 0 in every generation (Xen 2.0's only command)."""
    return hc.name == VERSION_CALL and bool(hc.args) and hc.args[0].value == 0


# mmu_update and mmuext_op mark a continuation in bit 31 of their count (MMU_UPDATE_PREEMPTED,
# xen/include/public/xen.h since RELEASE-3.0.0).
PREEMPTED_COUNT_BIT = 1 << 31


@dataclass
class Catch:
    names: frozenset[str] = frozenset()  # empty: every hypercall
    side: str = "auto"  # "auto", "guest", "xen"

    def matches(self, name: str) -> bool:
        return not self.names or name in self.names


def wanted_calls(catch_names: Iterable[frozenset[str]], active: bool) -> frozenset[str] | None:
    """The hypercall names the probes must see: what is caught or traced (an empty set: all, None), plus
    the calls that register and xen_version; nothing when no catch, trace or break is active."""
    if not active:
        return frozenset()
    names: set[str] = set(REGISTERING) | {VERSION_CALL}
    for wanted in catch_names:
        if not wanted:
            return None
        names |= wanted
    return frozenset(names)


@dataclass(frozen=True)
class GuestSite:
    """A place the loaded guest issues hypercalls from."""

    kind: str  # "page" (a hypercall page: one stub per number) or "instruction"
    address: int
    width: int
    label: str  # how xendbg found it, for the user
    fixed_nr: int | None = None  # a stub that only ever makes this hypercall (Linux's xen_iret)


def guest_sites(found: Iterable[HypercallSites]) -> list[GuestSite]:
    """Every place the scanned guest files issue hypercalls from."""
    sites = []
    for each in found:
        if each.hypercall_page is not None:
            sites.append(GuestSite("page", each.hypercall_page, each.width, f"by {each.page_source}"))
        for site in each.inline:
            sites.append(GuestSite("instruction", site.instruction, each.width, f"{site.name}, by {site.source}",
                                   site.nr))
    return sites


@dataclass(frozen=True)
class ProbeSpec:
    """One probe to place."""

    kind: str  # "instruction", "stub", "handler", "frame"
    address: int
    width: int = 64  # of the guest, for guest-side probes
    nr: int | None = None  # a stub's hypercall number
    function: str | None = None  # a Xen-side probe's function
    numbers: tuple[int, ...] | None = None  # only these hypercall numbers (None: all)
    # Old Xen masks the number with this (rules.dispatched_number): a number past its table runs the call
    # at number & wrap_mask, so a filter must let those through too.  None where no candidate ABI wraps.
    wrap_mask: int | None = None


@dataclass
class Plan:
    probes: list[ProbeSpec] = field(default_factory=list)
    returns: list[int] = field(default_factory=list)  # where guest-side calls come back
    description: str = ""


def _numbers(abis: list[Abi], names: frozenset[str] | None) -> tuple[int, ...]:
    """The numbers of these hypercalls in any of `abis` (all of theirs for None)."""
    return tuple(sorted({h.nr for abi in abis for h in abi.hypercalls() if names is None or h.name in names}
                        | {h.nr for abi in abis for n in names or () if (h := abi.hypercall_named(n)) is not None}))


def _wrap_mask(abis: list[Abi]) -> int | None:
    """The mask an old Xen applies to hypercall numbers, if any of `abis` wraps them."""
    from xendbg.decode.rules import dispatched_number

    masks = {dispatched_number(abi, -1) for abi in abis} - {-1}
    return max(masks) if masks else None


def plan_guest(sites: list[GuestSite], wanted: frozenset[str] | None,
               abis_for_width: Callable[[int], list[Abi]]) -> Plan:
    """Probes on the guest's own hypercall sites, and return probes where each call comes back.
    `abis_for_width` gives every ABI the evidence allows: before the guest has run, xendbg may not know
    its Xen yet, so a wanted name is watched under each of its numbers and told apart when decoded."""
    plan = Plan()
    described = []
    if wanted is not None:  # a batch may register: the guest side sees only the multicall, not its entries
        wanted = wanted | {"multicall"}
    for site in sites:
        abis = abis_for_width(site.width)
        numbers = _numbers(abis, wanted)
        irets = set(_numbers(abis, frozenset({"iret"})))
        if site.kind == "page":
            for nr in numbers:
                is_iret = nr in irets
                shape = arch.stub_shape(site.width, is_iret)
                stub = site.address + nr * arch.HYPERCALL_STUB_SIZE
                plan.probes.append(ProbeSpec("stub", stub + shape.instruction_offset, site.width, nr=nr))
                if not is_iret:  # iret never comes back
                    plan.returns.append(stub + shape.return_offset)
            described.append(f"{len(numbers)} stubs of the hypercall page at {site.address:#x} ({site.label})")
            continue
        if site.fixed_nr is not None and site.fixed_nr not in numbers:
            continue  # a stub for one unwanted call (xen_iret)
        filtered = numbers if wanted is not None and site.fixed_nr is None else None
        plan.probes.append(ProbeSpec("instruction", site.address, site.width, numbers=filtered,
                                     wrap_mask=_wrap_mask(abis) if filtered else None))
        if site.fixed_nr not in irets:
            plan.returns.append(site.address + 2)  # `syscall` and `int $0x82` are 2 bytes
        described.append(f"the hypercall instruction at {site.address:#x} ({site.label})")
    plan.description = "in the guest at " + "; ".join(described)
    return plan


def plan_gate(handler: int, wanted: frozenset[str] | None, abis: list[Abi], how: str) -> Plan:
    """One probe at Xen's int $0x82 handler, found from the IDT: every 32-bit PV hypercall enters there."""
    numbers = _numbers(abis, wanted) if wanted is not None else None
    return Plan([ProbeSpec("gate", handler, 32, function=arch.XEN_GATE_ENTRY, numbers=numbers)], [],
                f"in Xen at {arch.XEN_GATE_ENTRY} handler {handler:#x} ({how})")


# How far from the stopped PC xendbg looks for the guest's hypercall page or stubs when it has no symbol
# file: kernels keep them in their text, near where they run.
SCAN_WINDOW = 1 << 20
_SCAN_CHUNK = 1 << 16


def _page_stub(width: int, nr: int) -> bytes:
    """The first bytes of hypercall-page stub `nr` (arch.PAGE_STUB_SHAPE): 64-bit `push %rcx;
    push %r11; mov $nr,%eax; syscall`, 32-bit `mov $nr,%eax; int $0x82`."""
    number = nr.to_bytes(4, "little")
    return b"\x51\x41\x53\xb8" + number + b"\x0f\x05" if width == 64 else b"\xb8" + number + b"\xcd\x82"


def scan_memory(read: Callable[[int, int], bytes | None], pc: int, width: int,
                window: int = SCAN_WINDOW) -> list[GuestSite]:
    """The guest's hypercall page, or Linux's stubs, in guest memory within `window` bytes of PC.
    `read(address, size)` returns None where memory cannot be read."""
    from xendbg.sites import IRET_NR, signature_matches

    mask = (1 << width) - 1
    start = max(pc - window, 0) & ~0xFFF
    found: list[GuestSite] = []
    for address in range(start, min(pc + window, mask), _SCAN_CHUNK):
        data = read(address, _SCAN_CHUNK)
        if not data:
            continue
        for offset in range(0, len(data) - 4096 + 1, 4096):  # a page whose stubs 1 and 2 are Xen's
            if all(data[offset + 32 * n:offset + 32 * n + len(_page_stub(width, n))] == _page_stub(width, n)
                   for n in (1, 2)):
                found.append(GuestSite("page", address + offset, width, "found in guest memory near PC"))
        if width == 64:
            for name, _, instruction in signature_matches(data, 0, len(data)):
                fixed = IRET_NR if name == "xen_iret" else None
                found.append(GuestSite("instruction", address + instruction, 64,
                                       f"{name}, found in guest memory near PC by its instruction sequence", fixed))
    return found


def plan_xen(wanted: frozenset[str] | None, abis: list[Abi], address_of: Callable[[str], int | None]) -> Plan:
    """Probes inside Xen: at the handlers of the wanted calls, else at the hypercall entry."""
    plan = Plan()
    # Every frame entry this Xen has: a build with 32-bit PV support sends `int $0x82` through
    # do_entry_int82, which calls the dispatcher directly and never passes pv_hypercall.
    entries = [(f, a) for f in arch.XEN_FRAME_ENTRIES if (a := address_of(f)) is not None]
    where = " and ".join(f for f, _ in entries) or arch.XEN_HYPERCALL_ENTRY
    if wanted is None:
        plan.probes += [ProbeSpec("frame", a, function=f) for f, a in entries]
        plan.description = f"in Xen at {where} (every PV hypercall)"
        return plan
    placed, missing = [], []
    for name in sorted(wanted):
        found = False
        for width in (64, 32):
            function = arch.handler_symbol(name, width)
            address = address_of(function)
            if address is not None:
                plan.probes.append(ProbeSpec("handler", address, function=function))
                found = True
        if found:
            placed.append(name)
        elif any(abi.hypercall_named(name) is not None for abi in abis):
            missing.append(name)
    if missing:  # no handler symbol of its own: filter at the hypercall entry by number instead
        numbers = _numbers(abis, frozenset(missing))
        plan.probes += [ProbeSpec("frame", a, function=f, numbers=numbers) for f, a in entries]
    at = ([f"the handlers of {', '.join(placed)}"] if placed else []) + ([f"{where} for {', '.join(missing)}"]
                                                                          if missing else [])
    plan.description = "in Xen at " + ", and at ".join(at)
    return plan


# --- which call a probe hit is ----------------------------------------------------------------------------


def _args(hc: Hypercall) -> tuple[int, ...]:
    return tuple(a.value for a in hc.args)


def is_continuation(earlier: Hypercall, now: Hypercall, abi: Abi, *, same_place: bool = False) -> bool:
    """Whether `now` is Xen continuing `earlier` after preempting it: the guest re-enters the same
    hypercall with the arguments Xen left it (hypercall_create_continuation, RELEASE-4.17.0
    xen/arch/x86/hypercall.c; multicall.c, pv/callback.c, mm.c and console.c build the advanced ones).

    `same_place`: `now` entered at the instruction `earlier` entered at, from the same stack, with no
    return in between and not as a repeated report of the same stop.  Only Xen's rewinding brings a
    guest back there, so any call Xen continues counts, even one whose arguments did not move (a
    multicall whose first entry was preempted and rewritten in guest memory, a vcpu_op).  Without it
    (a Xen handler seen again) the arguments must show the progress."""
    if earlier.nr != now.nr or earlier.name not in CONTINUED_BY_XEN:
        return False
    before, after = _args(earlier), _args(now)
    if earlier.name == "multicall":
        size = abi.layout("multicall_entry").size
        done = (after[0] - before[0]) // size if after[0] >= before[0] else -1
        least = 0 if same_place else 1
        return least <= done < before[1] and after[0] == before[0] + done * size and after[1] == before[1] - done
    if earlier.name == "set_trap_table":
        size, done = abi.layout("trap_info").size, after[0] - before[0]
        # Continued at an entry of the earlier table (at most its terminator), never past it.
        within = not isinstance(earlier.detail, TrapTable) or done <= size * len(earlier.detail.entries)
        return done > 0 and done % size == 0 and within
    if earlier.name in ("mmu_update", "mmuext_op"):
        return bool(after[1] & PREEMPTED_COUNT_BIT)
    if earlier.name == "console_io":  # guest_console_write: the rest of the text, after what was written
        written = before[1] - after[1]
        return after[0] == before[0] and 0 < written and after[2] == before[2] + written
    return same_place


def completed_part(earlier: Hypercall, now: Hypercall, abi: Abi) -> Hypercall:
    """What of `earlier` Xen had completed when it preempted it, `now` being the continuation: the
    batch entries or trap-table entries before the continuation's starting point."""
    detail = earlier.detail
    skipped = _args(now)[0] - _args(earlier)[0]
    if isinstance(detail, MulticallBatch):
        kept = tuple(e for e in detail.entries if e.address < detail.address + skipped)
        return replace(earlier, detail=MulticallBatch(detail.address, len(kept), kept))
    if isinstance(detail, TrapTable):
        count = skipped // abi.layout("trap_info").size
        return replace(earlier, detail=TrapTable(detail.address, detail.entries[:count], True, detail.note))
    return earlier


@dataclass
class PendingCall:
    """A call seen entering, awaiting its return."""

    call: Hypercall
    abi: Abi
    seq: int | None = None  # its trace record, when traced
    # What the probe saw; a repeat with the same values is the same call.  Empty where a repeat cannot
    # be told (Xen side: the same arguments may well be a new call).
    registers: tuple[int, ...] = ()
    # The guest frame Xen saved at its last entry from the guest on this CPU, when Xen's memory can be
    # read (QEMU's gdbstub with xen-syms): evidence whether Xen ran the call between two identical hits.
    xen_frame: bytes | None = None

    def same_stop(self, other: PendingCall) -> bool:
        """Whether `other` shows exactly what this call showed: the registers, and the guest memory the
        decode read (a batch Xen rewrote, an iret frame), so nothing visible ran in between."""
        return bool(self.registers) and self.registers == other.registers and self.call.detail == other.call.detail


@dataclass(frozen=True)
class Entered:
    """What a probe hit means: a new call, the same call reported again, or a continuation.  `certain`
    is False for a repeat that could also be Xen continuing the call without visible progress: xendbg
    then has no evidence either way, and says so."""

    kind: str  # "new", "repeat", "continuation"
    earlier: PendingCall | None = None
    certain: bool = True


class CallTracker:
    """Calls entered and not yet returned, by (CPU, return address, stack pointer), and per CPU the last
    call that never returns (iret), which has nothing to wait for."""

    def __init__(self) -> None:
        self.pending: dict[tuple[int, int, int], PendingCall] = {}
        self.last_gone: dict[int, tuple[tuple[int, int, int], PendingCall]] = {}

    def enter(self, key: tuple[int, int, int], call: PendingCall) -> Entered:
        """Record a call entering at `key`.  The same key again before a return is either the probe
        reporting the same stop twice (everything identical: the instruction never ran, e.g. an
        interrupt came first and the breakpoint hit again), or Xen's continuation of a preempted call."""
        cpu = key[0]
        gone = self.last_gone.pop(cpu, None)
        if call.call.name in NEVER_RETURN:
            # Nothing comes back to wait for: only an identical hit with nothing else seen on this CPU
            # in between can be the same stop reported again, and then a second iret from the same
            # stack with the same frame is indistinguishable.
            self.last_gone[cpu] = (key, call)
            if gone is not None and gone[0] == key and gone[1].same_stop(call):
                self.last_gone[cpu] = gone
                return Entered("repeat", gone[1], certain=_xen_frame_unchanged(gone[1], call))
            return Entered("new")
        earlier = self.pending.get(key)
        if earlier is not None and earlier.same_stop(call):
            if call.call.name not in CONTINUED_BY_XEN:
                return Entered("repeat", earlier)
            if _rewound_since(earlier, call):
                self.pending[key] = call
                return Entered("continuation", earlier)
            return Entered("repeat", earlier, certain=_xen_frame_unchanged(earlier, call))
        self.pending[key] = call
        if earlier is None:
            return Entered("new")
        if is_continuation(earlier.call, call.call, call.abi, same_place=True):
            return Entered("continuation", earlier)
        return Entered("new", earlier)  # the earlier call never came back here (a vCPU reset, ...)

    def returned(self, key: tuple[int, int, int]) -> PendingCall | None:
        call = self.pending.pop(key, None)
        if call is not None:
            self.last_gone.pop(key[0], None)  # the CPU went on: an iret before this one is over
        return call

    def clear(self) -> None:
        self.pending.clear()
        self.last_gone.clear()


def _xen_frame_unchanged(earlier: PendingCall, now: PendingCall) -> bool:
    """Xen's saved guest frame is the same at both hits: Xen was not entered from the guest on this CPU
    in between, so the instruction never ran and `now` is the same stop reported again."""
    return earlier.xen_frame is not None and earlier.xen_frame == now.xen_frame


def _rewound_since(earlier: PendingCall, now: PendingCall) -> bool:
    """Xen's saved guest frame changed between the hits, and says Xen entered from this instruction and
    stack and rewound the guest onto it: Xen continued the call."""
    if earlier.xen_frame is None or now.xen_frame is None or earlier.xen_frame == now.xen_frame:
        return False
    pc, sp = now.registers[0], now.registers[1]
    return arch.frame_shows_rewound_hypercall(now.xen_frame, pc, sp)


# --- entry points followed across registrations ------------------------------------------------------


@dataclass
class EntryWatch:
    """One `xen break`: a guest entry point, followed across re-registrations."""

    kind: str  # "callback", "trap", "fasttrap"
    which: str  # callback kind ("event", ...), vector as text, or "" for the fast trap
    vector: int | None = None
    address: int | None = None

    def describe(self) -> str:
        if self.kind == "callback":
            return f"the {self.which} callback"
        if self.kind == "trap":
            return f"the trap handler for vector {self.vector:#x} ({arch.vector_name(self.vector or 0)})"
        return "the fast trap"

    def same_as(self, other: EntryWatch) -> bool:
        return (self.kind, self.which, self.vector) == (other.kind, other.which, other.vector)

    def current_address(self, states: Iterable[GuestState]) -> int | None:
        """Where this entry point is now: the most recent registration on any vCPU (Linux registers the
        same handlers on each)."""
        found = None
        for state in states:
            if self.kind == "callback" and self.which in state.callbacks:
                found = state.callbacks[self.which].address or found
            elif self.kind == "trap" and self.vector in state.trap_table:
                found = state.trap_table[self.vector].address or found
            elif self.kind == "fasttrap" and state.fast_trap and state.fast_trap.handler:
                found = state.fast_trap.handler.address
        return found


def vectors_entering(address: int, states: Iterable[GuestState]) -> list[int]:
    """Every vector whose registered handler is `address` (several vectors may share one handler)."""
    return sorted({v for state in states for v, e in state.trap_table.items() if e.address == address})

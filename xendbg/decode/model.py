"""What the decoders return: frozen dataclasses, plain data only (ints, strings, tuples).

Renderers turn these into text or JSON; nothing here reads the target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SEVERITIES = ("error", "warning", "info")


@dataclass(frozen=True)
class Finding:
    """One of Xen's own rules applied to what the guest asked for.

    severity: `error` where that Xen rejects the call or the guest will misbehave, `warning` where
    it is accepted but suspicious, `info` where Xen silently fixes it up.
    """

    rule: str
    severity: str
    message: str
    # What the finding is about, so each command shows its own: "trap_table", "callbacks", "fast_trap",
    # "abi", "state", or "" for the call itself.
    subject: str = ""


@dataclass(frozen=True)
class AbiUsed:
    """Which ABI a report was decoded with, and why (shown in its header)."""

    generation: str
    width: int
    reason: str = ""


@dataclass(frozen=True)
class Arg:
    name: str
    kind: str
    value: int
    text: str | None = None  # symbolic form: "VCPUOP_up", "0xe019 (FLAT_RING1_CS, RPL 1)"


@dataclass(frozen=True)
class TrapEntry:
    index: int
    vector: int
    vector_name: str
    flags: int
    dpl: int
    interrupt_flag: bool  # Xen clears the event mask on entry, like an interrupt gate clears IF
    cs: int
    rpl: int
    address: int
    # Registered state only: the selector the guest passed, where Xen keeps another (it raises a low RPL,
    # fixup_guest_code_selector); `cs` is then what Xen holds.
    passed_cs: int | None = None


@dataclass(frozen=True)
class TrapTable:
    address: int
    entries: tuple[TrapEntry, ...]
    terminated: bool  # ended by an entry whose address is 0
    note: str = ""


@dataclass(frozen=True)
class Callback:
    kind: str  # event, failsafe, syscall, nmi, sysenter, syscall32
    address: int
    selector: int | None = None  # 32-bit guests give a code selector with each callback
    rpl: int | None = None
    flags: int = 0
    flag_names: tuple[str, ...] = ()
    passed_selector: int | None = None  # registered state only: what the guest passed, where Xen keeps another


@dataclass(frozen=True)
class Callbacks:
    operation: str  # "register", "unregister", or "set_callbacks"
    entries: tuple[Callback, ...]


@dataclass(frozen=True)
class FastTrap:
    vector: int
    vector_name: str
    handler: TrapEntry | None  # the trap-table entry Xen turns into the gate, when xendbg knows it


@dataclass(frozen=True)
class MulticallEntry:
    index: int
    address: int
    call: Hypercall
    result: int | None  # None until Xen has run the entry
    result_text: str | None = None


@dataclass(frozen=True)
class MulticallBatch:
    address: int
    count: int
    entries: tuple[MulticallEntry, ...]
    truncated: bool = False

    def entry_findings(self) -> tuple[Finding, ...]:
        """The findings of the batched calls themselves (the batch's own come from the decoder)."""
        return tuple(f for entry in self.entries for f in entry.call.all_findings())


@dataclass(frozen=True)
class StructFields:
    """A sub-operation's argument struct, decoded field by field."""

    struct: str
    address: int
    fields: tuple[tuple[str, int | str], ...]


@dataclass(frozen=True)
class TableOf:
    """An array argument (mmu_update, mmuext_op requests)."""

    struct: str
    address: int
    rows: tuple[tuple[tuple[str, int | str], ...], ...]
    truncated: bool = False


@dataclass(frozen=True)
class Text:
    """A string argument (console_io write)."""

    address: int
    text: str
    truncated: bool = False


Detail = TrapTable | Callbacks | FastTrap | MulticallBatch | StructFields | TableOf | Text | None


@dataclass(frozen=True)
class GuestStack:
    """The guest's stack as Xen will see it at the hypercall instruction (an iret reads its frame
    there), when the decode does not stand at that instruction itself.

    `sp` is the guest's stack pointer at the instruction, None where xendbg cannot know it (inside a
    Xen handler, whose stack pointer register is Xen's own).  `pushed` are the words a stub pushes
    between where the vCPU stopped and its instruction, lowest address first: they are not in memory
    yet, they come from registers (None: a push whose value xendbg cannot tell)."""

    sp: int | None
    pushed: tuple[int | None, ...] = ()


@dataclass(frozen=True)
class Hypercall:
    nr: int
    name: str | None  # None for a number this generation does not know
    args: tuple[Arg, ...]
    generation: str
    width: int
    former_names: tuple[str, ...] = ()
    subop: str | None = None
    detail: Detail = None
    findings: tuple[Finding, ...] = ()
    site: str = ""
    abi_reason: str = ""  # why this generation (set by hand, from xen_version, guessed, ...)
    # The guest's stack at the instruction, when the decode did not stand there (a stub's entry, inside
    # Xen): what a command that decodes the call's memory again (xen multicall) must read it with.
    stack: GuestStack | None = None

    @property
    def display_name(self) -> str:
        return self.name if self.name is not None else f"hypercall_{self.nr}"

    def all_findings(self) -> tuple[Finding, ...]:
        """This call's findings and those of the calls it batches, outermost first."""
        if isinstance(self.detail, MulticallBatch):
            return self.findings + self.detail.entry_findings()
        return self.findings


@dataclass
class GuestState:
    """What one vCPU has registered so far, as far as xendbg has seen (decode/state.py replays calls
    into it; rules that depend on earlier registrations read it)."""

    trap_table: dict[int, TrapEntry] = field(default_factory=dict)  # Xen's virtual IDT, by vector
    callbacks: dict[str, Callback] = field(default_factory=dict)  # by kind: event, failsafe, ...
    fast_trap: FastTrap | None = None
    table: TrapTable | None = None  # the last trap table the guest handed Xen, as decoded
    history: list[str] = field(default_factory=list)  # one line per registering call applied
    width: int | None = None  # the guest width of the calls applied (the rules depend on it)

    @property
    def seen_anything(self) -> bool:
        return bool(self.history)

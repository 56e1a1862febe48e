"""The post-mortem door: a memory dump opened as a set of vCPUs the core decoders read like live ones.

    core = xendbg.open_core("guest.dump", symbols=["guest.elf"])
    for vcpu in core.vcpus:
        print(vcpu.index, vcpu.mode, hex(vcpu.pc), vcpu.pending())

The ABI comes from the same evidence as a live session (issue 5, xendbg/session.py): `xen=` when
given, else Xen's version in `xen_syms`, the guest's Xen ELF note, its code selector, its hypercall
page.  Registered state (trap table, callbacks) is what Xen keeps, not guest memory: with `xen_syms`,
a whole-machine dump's vCPUs are those of one domain (`domain=`, dom0 by default) as Xen's own data
describes them (xendbg/dump/xen.py), each with its registered state; without it, or when Xen's data
cannot be read, the vCPUs are the dump's CPUs and the registered state is unknown.  An `xl dump-core`
file (xendbg/dump/xccore.py) is one domain: its vCPUs, registers and registered state are its
vcpu_guest_contexts.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from xendbg import arch
from xendbg.abi import Abi, resolve_generation
from xendbg.decode.model import Finding, Hypercall
from xendbg.dump.elfcore import ElfDump
from xendbg.dump.kdump import KdumpDump, is_flattened, is_kdump
from xendbg.dump.symbols import ElfSymbols
from xendbg.dump.target import DumpTarget
from xendbg.dump.xccore import SOURCE as CONTEXT_SOURCE
from xendbg.dump.xccore import XcCoreDump, XcCoreVcpu, is_xc_core
from xendbg.dump.xen import IN_XEN, SOURCE, XenData, XenSyms, XenVcpu, read_xen
from xendbg.errors import DecodeError, TargetError, UsageError, XendbgError
from xendbg.files import map_regular
from xendbg.report import check
from xendbg.session import AbiChoice, NoSymbols, Session, Settings, Symbols
from xendbg.sites import ElfFile, find_hypercall_sites

REGISTERS_LIVE = "live on a CPU"  # a QEMU dump holds each CPU's registers as they were
NOT_RECOVERABLE = ("not recoverable from this dump without xen-syms: what a vCPU registered (trap table, "
                   "callbacks) lives in Xen's struct vcpu, not in guest memory, and xendbg does not read Xen's "
                   "data from a dump yet")

Dump = ElfDump | KdumpDump | XcCoreDump


def open_memory(path: str) -> tuple[Dump, mmap.mmap]:
    """The dump at `path` (QEMU's plain ELF or kdump-compressed, or `xl dump-core`), mapped read-only,
    never read whole."""
    data = map_regular(path, "a memory dump")
    try:
        if data[:4] == b"\x7fELF":
            if is_xc_core(ElfFile(path, data)):
                return XcCoreDump(path, data), data
            return ElfDump(path, data), data
        if is_flattened(data) or is_kdump(data):
            return KdumpDump(path, data), data
    except BaseException:
        data.close()
        raise
    head = data[:8]
    data.close()
    raise DecodeError(f"{path}: not a memory dump (starts {head.hex()}): xendbg reads QEMU's dump-guest-memory "
                      f"files, plain ELF or -z, and xl dump-core files")


def _evidence(session: Session, symbols: Sequence[str], xen_syms: str | None) -> None:
    """What the files say about the Xen version (the evidence a live session gathers from gdb's files)."""
    found = [find_hypercall_sites(path) for path in ([xen_syms] if xen_syms else []) + list(symbols)]
    if xen_syms is not None and found[0].xen_image_version is None:
        raise DecodeError(f"{xen_syms}: no xen_major_version/xen_minor_version code: not Xen's xen-syms")
    session.evidence.read_files(found)


_UNSET = object()


@dataclass
class Vcpu:
    """One vCPU of a dump: its registers, mode, and the hypercall it was making, if any."""

    core: Core
    index: int
    target: DumpTarget
    registers_source: str = REGISTERS_LIVE
    _pending: object = field(default=_UNSET, repr=False)
    why_not_pending: str = ""
    xen: XenVcpu | None = None  # what Xen's data says of this vCPU (a domain's vCPU, with xen-syms)
    context: XcCoreVcpu | None = None  # its vcpu_guest_context, in an xl dump-core file

    @property
    def registers(self) -> dict[str, int]:
        return dict(self.target.registers)

    @property
    def cs(self) -> int:
        return self.target.registers["cs"]

    @property
    def pc(self) -> int:
        return self.target.registers["pc"]

    @property
    def cpu_mode(self) -> arch.CpuMode:
        return arch.vcpu_mode(self.target)

    @property
    def mode(self) -> str:
        return self.cpu_mode.description

    @property
    def width(self) -> int | None:
        return self.core.session.guest_width(self.target)

    def pending(self) -> Hypercall | None:
        """The hypercall this vCPU was making: only where the code at PC is a hypercall instruction or a
        stub leading to one (or, inside Xen with xen-syms, a handler's first instruction); else None and
        `why_not_pending` says why."""
        if self._pending is _UNSET:
            self._pending = None
            try:
                if self.xen is not None and self.xen.in_hypercall and self.xen.frame is not None:
                    self._pending = self._serving()
                    return self._pending
                if self.context is not None and not self.context.online:
                    raise DecodeError("no hypercall pending: the vCPU is offline (its vcpu_guest_context lacks "
                                      "VGCF_online), its registers are stale")
                if self.xen is not None and self.xen.where == IN_XEN:
                    vector = self.xen.entry_vector
                    raise DecodeError(f"no hypercall in progress: Xen on CPU {self.xen.physical_cpu} holds this "
                                      f"vCPU's registers but its stack has no return into "
                                      f"{arch.XEN_HYPERCALL_ENTRY}{f' (entry vector {vector:#x})' if vector else ''}")
                if self.width is not None and not arch.read_code(self.target, self.pc):
                    self.target.read_memory(self.pc, 1)  # raises, saying why the code cannot be read
                    raise DecodeError(f"no hypercall pending: the code at {self.pc:#x} is not in the dump")
                self._pending = self.core.session.decode_here(self.target, self.core.symbols, self.index)
            except XendbgError as exc:
                self.why_not_pending = str(exc)
        return self._pending  # type: ignore[return-value]

    def _serving(self) -> Hypercall:
        """The hypercall Xen is serving for this vCPU, from the guest frame Xen saved, decoded as a live
        stop at the entry of pv_hypercall would decode it (guest pointers read through the guest's
        page tables, which map Xen too)."""
        assert self.xen is not None and self.xen.frame is not None
        entry = self.core.symbols.address_of(arch.XEN_HYPERCALL_ENTRY)
        if entry is None:
            raise DecodeError(f"xen-syms has no {arch.XEN_HYPERCALL_ENTRY}")
        at_entry = _AtEntry(self.target, entry, self.xen.frame)
        return self.core.session.decode_here(at_entry, self.core.symbols, self.index)

    def abi(self) -> tuple[Abi, AbiChoice]:
        """The ABI to judge this vCPU with: its own width when in the guest, else 64-bit."""
        if self.width is not None:
            return self.core.session.current_abi(self.target)
        return self.core.session.abi(64)

    def findings(self) -> list[Finding]:
        """Xen's rules over the pending call and, when Xen's data gave it, the registered state."""
        abi, _ = self.abi()
        found = check(self.pending(), self.core.session.state(self.index), abi)
        # "nothing registered seen yet" speaks of a live session; a dump says why it has no state instead.
        return [f for f in found if f.rule != "state-unknown"]

    @property
    def registered(self) -> bool:
        """Whether this vCPU's registered state was read (and checked) from Xen's data."""
        if self.context is not None:
            return self.context.state is not None
        return self.xen is not None and self.xen.state is not None

    def why_not_registered(self) -> str:
        if self.context is not None:
            return self.context.why_no_state
        if self.xen is not None:
            return self.xen.why_no_state
        return self.core.why_not_registered

    def registered_from(self) -> str:
        """Where the registered state came from (the key a dump adds to the live commands' JSON)."""
        if self.context is not None:
            return f"{self.core.registered_source} {self.context.index} (.xen_prstatus)"
        assert self.xen is not None
        return f"{SOURCE} at {self.xen.address:#x} (d{self.xen.domain}v{self.xen.vcpu_id})"

    def registered_stack(self) -> tuple[int | None, int | None, int | None]:
        """kernel_ss, kernel_sp and the guest's CR3 as Xen keeps them."""
        held = self.context if self.context is not None else self.xen
        return (held.kernel_ss, held.kernel_sp, held.guest_cr3) if held is not None else (None, None, None)

    @property
    def state_width(self) -> int:
        """The width to judge the registered state with (Xen's data is read for 64-bit PV domains)."""
        return self.context.width if self.context is not None else 64

    @property
    def physical_cpu(self) -> int | None:
        if self.context is not None:
            return None  # Xen does not say where a domain's vCPU ran
        return self.xen.physical_cpu if self.xen is not None else self.index

    def symbol(self) -> str:
        sym = self.core.symbols.symbol_at(self.pc)
        if sym is None:
            return ""
        return f"<{sym[0]}+{sym[1]}>" if sym[1] else f"<{sym[0]}>"



class _AtEntry:
    """A vCPU's Target seen as stopped at the first instruction of Xen's hypercall entry, whose
    argument (RDI) is the guest frame Xen saved: what session.decode_here decodes inside Xen."""

    def __init__(self, target: DumpTarget, entry: int, frame: int) -> None:
        self.target = target
        self.registers = {"pc": entry, "rip": entry, "rdi": frame, "cs": 0xE008}

    def read_register(self, name: str) -> int:
        name = name.lower()
        return self.registers[name] if name in self.registers else self.target.read_register(name)

    def read_memory(self, address: int, size: int) -> bytes:
        return self.target.read_memory(address, size)


class Core:
    """A memory dump opened for post-mortem decoding (use as a context manager, or call close())."""

    def __init__(self, path: str | os.PathLike[str], symbols: Sequence[str | os.PathLike[str]] = (),
                 xen_syms: str | os.PathLike[str] | None = None, xen: str | None = None,
                 domain: int | None = None) -> None:
        self.path = os.fspath(path)
        self.xen_syms = os.fspath(xen_syms) if xen_syms is not None else None
        symbol_files = [os.fspath(p) for p in symbols]
        xen_file = os.fspath(xen_syms) if xen_syms is not None else None
        settings = Settings(abi=resolve_generation(xen) if xen else "auto")
        self.session = Session(settings)
        _evidence(self.session, symbol_files, xen_file)
        files = symbol_files + ([xen_file] if xen_file else [])
        self.symbols: Symbols = ElfSymbols(files) if files else NoSymbols()
        self.memory, self._data = open_memory(self.path)
        self.format = self.memory.format
        self.vcpus = [Vcpu(self, cpu.index, DumpTarget(self.memory, cpu)) for cpu in self.memory.cpus]
        self.xen_data: XenData | None = None
        self.domain: int | None = None
        self.why_not_registered = NOT_RECOVERABLE
        self.registered_source = SOURCE
        if isinstance(self.memory, XcCoreDump):
            self._read_contexts(self.memory, xen_file, domain, settings.abi == "auto")
        elif xen_file is not None:
            self._read_xen(xen_file, symbol_files, domain)
        elif domain is not None:
            raise UsageError("--domain needs --xen-syms: the domains are found in Xen's own data")

    def _read_contexts(self, memory: XcCoreDump, xen_file: str | None, domain: int | None, infer: bool) -> None:
        """An xl dump-core file: one domain, whose vCPUs and registered state are its vcpu_guest_contexts
        (and the Xen version its xen_version note gives, the evidence of a live xen_version call)."""
        if xen_file is not None or domain is not None:
            self.close()
            raise UsageError("--xen-syms and --domain read Xen's data in a whole-machine QEMU dump; an xl dump-core "
                             "file is one domain, with its registered state in its vcpu_guest_contexts")
        self.registered_source = CONTEXT_SOURCE
        if memory.xen_version is not None and infer:
            self.session.evidence.reported = (memory.xen_version, "as the dump's xen_version note says")
        problems = []
        for vcpu, context in zip(self.vcpus, memory.vcpus, strict=True):
            vcpu.context = context
            vcpu.registers_source = context.registers_from
            state, why = (None, "an HVM guest registers no PV trap table or callbacks") if memory.hvm else \
                context.registered()
            context.state, context.why_no_state = state, why
            if state is not None:
                self.session.states[vcpu.index] = state
            else:
                problems.append(why)
        self.why_not_registered = "; ".join(dict.fromkeys(problems))

    def _read_xen(self, xen_file: str, guest_files: list[str], domain: int | None) -> None:
        """The vCPUs of one domain from Xen's data; when that cannot be read, the CPUs stay, and
        `why_not_registered` says what failed."""
        try:
            syms = XenSyms(xen_file)
            try:
                ranges = ElfSymbols(guest_files).ranges() if guest_files else None
                self.xen_data = read_xen(self.memory, self.memory.cpus, syms, None, ranges)
            finally:
                syms.close()
        except (DecodeError, TargetError) as exc:
            if domain is not None:
                raise
            self.why_not_registered = f"not recoverable from Xen's data with {os.path.basename(xen_file)}: {exc}"
            return
        domains = self.xen_data.domains()
        if domain is None:
            domain = 0 if 0 in domains else (domains[0] if domains else None)
        if domain is None:
            self.why_not_registered = "Xen's domain_list holds no domain with vCPUs"
            return
        if domain not in domains:
            raise UsageError(f"no domain {domain} in the dump: Xen lists {', '.join(f'd{d}' for d in domains)}")
        self.domain = domain
        self.why_not_registered = "; ".join(self.xen_data.problems)
        self.vcpus = []
        for xv in self.xen_data.vcpus:
            if xv.domain != domain:
                continue
            vcpu = Vcpu(self, xv.vcpu_id, DumpTarget(self.memory, xv.cpu), xv.registers_from, xen=xv)
            if xv.state is not None:
                self.session.states[xv.vcpu_id] = xv.state
            self.vcpus.append(vcpu)

    def vcpu(self, index: int) -> Vcpu:
        if not 0 <= index < len(self.vcpus):
            raise UsageError(f"no vCPU {index}: the dump has {len(self.vcpus)} (0 .. {len(self.vcpus) - 1})")
        return self.vcpus[index]

    def target(self, vcpu: int) -> DumpTarget:
        """The Target of one vCPU: what the core decoders read (decode_pending, decode_multicall, ...)."""
        return self.vcpu(vcpu).target

    def close(self) -> None:
        self._data.close()

    def __enter__(self) -> Core:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_core(path: str | os.PathLike[str], symbols: Sequence[str | os.PathLike[str]] | str = (),
              xen_syms: str | os.PathLike[str] | None = None, xen: str | None = None,
              domain: int | None = None) -> Core:
    """Open a QEMU dump (`dump-guest-memory FILE` or `-z FILE`) or an `xl dump-core` file (one domain,
    its registered state in its vcpu_guest_contexts); `symbols` are guest ELF files (a single path is
    taken as one), `xen_syms` Xen's symbol file (then the vCPUs of a QEMU dump are those of `domain`,
    dom0 by default, with what each registered), `xen` a Xen version that overrides the ABI evidence."""
    files = [symbols] if isinstance(symbols, str | os.PathLike) else list(symbols)
    return Core(path, files, xen_syms, xen, domain)

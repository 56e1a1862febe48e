"""The post-mortem door: a memory dump opened as a set of vCPUs the core decoders read like live ones.

    core = xendbg.open_core("guest.dump", symbols=["guest.elf"])
    for vcpu in core.vcpus:
        print(vcpu.index, vcpu.mode, hex(vcpu.pc), vcpu.pending())

The ABI comes from the same evidence as a live session (issue 5, xendbg/session.py): `xen=` when
given, else Xen's version in `xen_syms`, the guest's Xen ELF note, its code selector, its hypercall
page.  Registered state (trap table, callbacks) is what Xen keeps, not guest memory: a QEMU dump holds
it only inside Xen's own data, which this reader does not walk yet.
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
from xendbg.errors import DecodeError, UsageError, XendbgError
from xendbg.report import check
from xendbg.session import AbiChoice, NoSymbols, Session, Settings, Symbols
from xendbg.sites import find_hypercall_sites

REGISTERS_LIVE = "live on a CPU"  # a QEMU dump holds each CPU's registers as they were
NOT_RECOVERABLE = ("not recoverable from this dump without xen-syms: what a vCPU registered (trap table, "
                   "callbacks) lives in Xen's struct vcpu, not in guest memory, and xendbg does not read Xen's "
                   "data from a dump yet")

Dump = ElfDump | KdumpDump


def open_memory(path: str) -> tuple[Dump, mmap.mmap]:
    """The dump at `path` (plain ELF or kdump-compressed), mapped read-only, never read whole."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size == 0:
                raise DecodeError(f"{path}: empty file (0 bytes), not a memory dump")
            data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise DecodeError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        if data[:4] == b"\x7fELF":
            return ElfDump(path, data), data
        if is_flattened(data) or is_kdump(data):
            return KdumpDump(path, data), data
    except BaseException:
        data.close()
        raise
    head = data[:8]
    data.close()
    raise DecodeError(f"{path}: not a memory dump (starts {head.hex()}): xendbg reads QEMU's dump-guest-memory "
                      f"files, plain ELF or -z")


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
        return arch.cpu_mode(self.cs)

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
                if self.width is not None and not arch.read_code(self.target, self.pc):
                    self.target.read_memory(self.pc, 1)  # raises, saying why the code cannot be read
                    raise DecodeError(f"no hypercall pending: the code at {self.pc:#x} is not in the dump")
                self._pending = self.core.session.decode_here(self.target, self.core.symbols, self.index)
            except XendbgError as exc:
                self.why_not_pending = str(exc)
        return self._pending  # type: ignore[return-value]

    def abi(self) -> tuple[Abi, AbiChoice]:
        """The ABI to judge this vCPU with: its own width when in the guest, else 64-bit."""
        if self.width is not None:
            return self.core.session.current_abi(self.target)
        return self.core.session.abi(64)

    def findings(self) -> list[Finding]:
        """Xen's rules over the pending call (registered state is not recoverable from a QEMU dump yet)."""
        abi, _ = self.abi()
        found = check(self.pending(), self.core.session.state(self.index), abi)
        # "nothing registered seen yet" speaks of a live session; a dump says NOT_RECOVERABLE instead.
        return [f for f in found if f.rule != "state-unknown"]

    def symbol(self) -> str:
        sym = self.core.symbols.symbol_at(self.pc)
        if sym is None:
            return ""
        return f"<{sym[0]}+{sym[1]}>" if sym[1] else f"<{sym[0]}>"


class Core:
    """A memory dump opened for post-mortem decoding (use as a context manager, or call close())."""

    def __init__(self, path: str | os.PathLike[str], symbols: Sequence[str | os.PathLike[str]] = (),
                 xen_syms: str | os.PathLike[str] | None = None, xen: str | None = None) -> None:
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
              xen_syms: str | os.PathLike[str] | None = None, xen: str | None = None) -> Core:
    """Open a QEMU dump (`dump-guest-memory FILE` or `-z FILE`); `symbols` are guest ELF files (a
    single path is taken as one), `xen_syms` Xen's symbol file, `xen` a Xen version that overrides
    the ABI evidence."""
    files = [symbols] if isinstance(symbols, str | os.PathLike) else list(symbols)
    return Core(path, files, xen_syms, xen)

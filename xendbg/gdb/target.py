"""GdbTarget: the Target protocol over gdb's own Python API (the stopped, selected vCPU)."""

from __future__ import annotations

import gdb

from xendbg.errors import TargetGone, UnknownRegister, UnreadableMemory


class GdbTarget:
    """Registers and memory of gdb's selected thread (one QEMU gdbstub thread per vCPU).

    Registers are the vCPU's own (the newest frame), whatever frame `up` or `frame N` selected: a
    hypercall is made by the vCPU, not by a caller's frame.  They are cached for one stop: decoders
    ask for the same few several times.
    """

    def __init__(self) -> None:
        self._registers: dict[str, int] = {}

    def _frame(self):  # noqa: ANN202 - gdb.Frame
        try:
            return gdb.newest_frame()
        except gdb.error as exc:
            if gdb.selected_thread() is None:  # not connected, or the connection failed
                from xendbg.gdb.connect import no_vcpu_reason

                raise TargetGone(no_vcpu_reason()) from None
            raise TargetGone(f"no stopped target to read: {exc}") from None

    def read_register(self, name: str) -> int:
        key = name.lower()
        if key not in self._registers:
            try:
                value = self._frame().read_register(key)
            except ValueError:
                raise UnknownRegister(name) from None
            except gdb.error as exc:
                raise TargetGone(f"cannot read ${name}: {exc}") from None
            self._registers[key] = int(value) & ((1 << 64) - 1)
        return self._registers[key]

    def read_memory(self, address: int, size: int) -> bytes:
        _warn_if_outside_core(address, size)
        try:
            return bytes(gdb.selected_inferior().read_memory(address, size))
        except gdb.MemoryError:
            raise UnreadableMemory(address, size) from None
        except gdb.error as exc:
            raise TargetGone(f"cannot read memory at {address:#x}: {exc}") from None


# --- gdb on a core file -----------------------------------------------------------------------------

_core: tuple[str, list[tuple[int, int]]] | None = None  # (core file, its loaded address ranges)
_warned: set[int] = set()  # pages already warned about


def _core_ranges() -> list[tuple[int, int]] | None:
    """The address ranges the core file gdb has open holds, or None when gdb's target is no core file."""
    global _core
    connection = getattr(gdb.selected_inferior(), "connection", None)
    if connection is None or connection.type != "core":
        return None
    files = gdb.execute("info files", to_string=True)
    name = files.split("Local core dump file:", 1)[-1].split("\n", 2)[1].strip()
    if _core is None or _core[0] != name:
        block = files.split("Local core dump file:", 1)[-1].split("Local exec file:", 1)[0]
        ranges = [(int(lo, 16), int(hi, 16)) for lo, hi in
                  (line.split()[0:3:2] for line in block.splitlines() if " - " in line and " is " in line)]
        _core = (name, ranges)
    return _core[1]


def _warn_if_outside_core(address: int, size: int) -> None:
    """gdb reads what a core file lacks from the ELF file's own contents, which may be stale (a 64-bit
    PV guest's memory as the dump saw it is not the vmlinux): say so, once per page."""
    try:
        ranges = _core_ranges()
    except (gdb.error, ValueError, IndexError):
        return
    if ranges is None or any(lo <= address and address + size <= hi for lo, hi in ranges):
        return
    page = address >> 12
    if page not in _warned:
        _warned.add(page)
        gdb.write(f"xendbg: warning: {address:#x} is not in the core file: gdb reads it from the ELF file, whose "
                  f"bytes may be stale (xendbg core DUMP --to-gdb OUT writes a core of the guest's virtual "
                  f"memory)\n", gdb.STDERR)

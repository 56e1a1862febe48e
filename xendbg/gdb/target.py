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
        try:
            return bytes(gdb.selected_inferior().read_memory(address, size))
        except gdb.MemoryError:
            raise UnreadableMemory(address, size) from None
        except gdb.error as exc:
            raise TargetGone(f"cannot read memory at {address:#x}: {exc}") from None

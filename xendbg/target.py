"""The Target protocol: what the decoders may ask of a stopped guest.

Front ends provide a Target (gdb's own Python API, gdb over MI, a dump file); decoders only read
through it.  Reads fail with the typed errors of xendbg.errors, never with a front end's own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol, runtime_checkable

from xendbg.errors import UnknownRegister, UnreadableMemory


@runtime_checkable
class Target(Protocol):
    def read_register(self, name: str) -> int:
        """Value of a register of the selected vCPU ('rax', 'eip', 'cs', ...); UnknownRegister if absent."""
        ...

    def read_memory(self, address: int, size: int) -> bytes:
        """`size` bytes of guest-virtual memory; UnreadableMemory if any of them cannot be read."""
        ...


class InMemoryTarget:
    """A Target over a dict of registers and a set of memory regions (unit tests, `xendbg decode`)."""

    def __init__(self, registers: Mapping[str, int] | None = None,
                 memory: Iterable[tuple[int, bytes]] = ()) -> None:
        self.registers = {k.lower(): v for k, v in (registers or {}).items()}
        self.regions: list[tuple[int, bytes]] = []
        for address, data in memory:
            self.write(address, data)
        self.reads = 0  # how many read_memory calls were made (tests check decoders read once)

    def write(self, address: int, data: bytes) -> None:
        self.regions.append((address, bytes(data)))

    def read_register(self, name: str) -> int:
        try:
            return self.registers[name.lower()]
        except KeyError:
            raise UnknownRegister(name) from None

    def read_memory(self, address: int, size: int) -> bytes:
        self.reads += 1
        if size < 0 or address < 0:
            raise UnreadableMemory(address, max(size, 0), "negative address or size")
        out = bytearray(size)
        covered = bytearray(size)
        # Later writes win, as they would in real memory.
        for start, data in self.regions:
            lo = max(start, address)
            hi = min(start + len(data), address + size)
            if lo < hi:
                out[lo - address:hi - address] = data[lo - start:hi - start]
                covered[lo - address:hi - address] = b"\x01" * (hi - lo)
        if size and not all(covered):
            first = address + covered.index(0)
            raise UnreadableMemory(address, size, f"nothing mapped at {first:#x}")
        return bytes(out)

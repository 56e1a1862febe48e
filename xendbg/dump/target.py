"""DumpTarget: the Target protocol over one vCPU of a memory dump (its registers, guest-virtual reads
through its own page tables)."""

from __future__ import annotations

from xendbg.dump.cpus import CpuState
from xendbg.dump.paging import PAGE_SIZE, Paging, PhysicalMemory, translate
from xendbg.errors import UnknownRegister, UnreadableMemory

_MAX_READ = 1 << 24  # a decoder never asks for more; a larger read is a wild size, not a request


class DumpTarget:
    """Registers and guest-virtual memory of one CPU of a dump, as the decoders read a live vCPU."""

    def __init__(self, memory: PhysicalMemory, cpu: CpuState) -> None:
        self.memory = memory
        self.cpu = cpu
        self.registers = cpu.registers()
        self.paging = Paging.of(cpu)
        self._tlb: dict[int, int] = {}  # virtual page -> physical page

    def read_register(self, name: str) -> int:
        try:
            return self.registers[name.lower()]
        except KeyError:
            raise UnknownRegister(name) from None

    def physical(self, address: int) -> int:
        """The guest-physical address of virtual `address` on this vCPU."""
        page = address - address % PAGE_SIZE
        if page not in self._tlb:
            physical, _ = translate(self.memory, self.paging, page)
            self._tlb[page] = physical
        return self._tlb[page] + address % PAGE_SIZE

    def read_memory(self, address: int, size: int) -> bytes:
        if address < 0 or size < 0 or size > _MAX_READ:
            raise UnreadableMemory(address, max(size, 0), "negative address or size, or a read over 16 MiB")
        out = bytearray()
        at, left = address, size
        while left > 0:
            try:
                physical = self.physical(at)
            except UnreadableMemory as exc:
                raise UnreadableMemory(address, size, exc.args[0].split(": ", 1)[-1]) from None
            n = min(left, PAGE_SIZE - at % PAGE_SIZE)
            out += self.memory.read(physical, n)
            at, left = at + n, left - n
        return bytes(out)

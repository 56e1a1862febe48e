"""MiTarget: the core's Target protocol over gdb/MI, for decoding in an MI client's own process."""

from __future__ import annotations

import re

from xendbg.errors import TargetGone, UnknownRegister, UnreadableMemory
from xendbg.mi.client import GdbGone, MiClient, MiError

# gdb's generic names, as GdbTarget accepts them (frame.read_register knows them), by what exists
_ALIASES = {"pc": ("rip", "eip"), "sp": ("rsp", "esp")}
# FPU, vector and mask registers: no decoder reads them, and they are most of gdb's x86 register file
_NOT_READ = re.compile(r"^([xyz]mm\d+[hl]?|ymm\d+h|st\d|mm\d|k\d|bnd\d\w*|f(ctrl|stat|tag|iseg|ioff|oseg|ooff|op)"
                       r"|mxcsr|pkru|orig_[er]ax)$")


class MiTarget:
    """Registers and memory of one vCPU (gdb thread; None: gdb's selected thread) of a stopped target.

    All registers come in one `-data-list-register-values` and are kept for this object's life: make
    one per stop, as gdb's own GdbTarget is."""

    def __init__(self, client: MiClient, thread: int | None = None, timeout: float = 10.0) -> None:
        self.client = client
        self.thread = thread
        self.timeout = timeout
        self._registers: dict[str, int] | None = None

    def _where(self) -> str:
        return f" --thread {self.thread} --frame 0" if self.thread is not None else ""

    def _command(self, command: str) -> dict:
        try:
            return self.client.command(command, self.timeout).get("payload") or {}
        except GdbGone as exc:
            raise TargetGone(str(exc)) from None

    def _load_registers(self) -> dict[str, int]:
        try:
            names = self._names()
            wanted = " ".join(str(i) for i, name in enumerate(names) if name and not _NOT_READ.match(name))
            values = self._command(f"-data-list-register-values{self._where()} x {wanted}").get("register-values", [])
        except MiError as exc:
            raise TargetGone(f"cannot read the registers: {exc}") from None
        registers: dict[str, int] = {}
        for item in values:
            number = int(item.get("number", -1))
            if 0 <= number < len(names) and names[number]:
                try:
                    registers[names[number]] = int(item.get("value", ""), 16) & ((1 << 64) - 1)
                except ValueError:
                    continue  # vector registers ({...}) and unavailable values: not the decoders'
        return registers

    def _names(self) -> list[str]:
        """gdb's register names by number (kept on the client: they change only with the architecture)."""
        names = getattr(self.client, "_xendbg_register_names", None)
        if names is None:
            names = self._command("-data-list-register-names").get("register-names", [])
            self.client._xendbg_register_names = names  # type: ignore[attr-defined]
        return names

    def read_register(self, name: str) -> int:
        if self._registers is None:
            self._registers = self._load_registers()
        key = name.lower()
        for candidate in _ALIASES.get(key, (key,)):
            if candidate in self._registers:
                return self._registers[candidate]
        raise UnknownRegister(name)

    def read_memory(self, address: int, size: int) -> bytes:
        if size < 0 or address < 0:
            raise UnreadableMemory(address, max(size, 0), "negative address or size")
        if size == 0:
            return b""
        try:
            blocks = self._command(f"-data-read-memory-bytes{self._where()} {address:#x} {size}").get("memory", [])
        except MiError as exc:
            raise UnreadableMemory(address, size, str(exc)) from None
        data = bytearray(size)
        covered = 0
        for block in blocks:
            start = int(block["begin"], 16) - address
            chunk = bytes.fromhex(block.get("contents", ""))
            if start < 0 or start + len(chunk) > size:
                continue
            data[start:start + len(chunk)] = chunk
            covered += len(chunk)
        if covered != size:  # gdb gives the readable parts of a range: a hole is unreadable memory
            raise UnreadableMemory(address, size, "only part of it is readable")
        return bytes(data)

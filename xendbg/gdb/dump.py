"""`xen dump FILE [-z]`: a QEMU memory dump of the live target, for `xendbg core` (xendbg/dump).

QEMU's gdbstub takes `monitor dump-guest-memory` (it works with `-monitor none` too); QEMU writes the
file itself, relative to its own working directory, so the path is made absolute here first.
"""

from __future__ import annotations

import os

import gdb

from xendbg.errors import XendbgError
from xendbg.gdb.commands import _XenCommand


class XenDump(_XenCommand):
    """Take a QEMU memory dump of the live target: xen dump FILE [-z]

-z writes QEMU's kdump-zlib format (much smaller).  Read it with
`xendbg core FILE [--xen-syms xen-syms] [--symbols ELF]` (plain ELF dumps, never -p)."""

    usage = "xen dump FILE [-z]"
    flags = ("-z",)
    nargs = (1, 1)

    def __init__(self) -> None:
        super().__init__("xen dump", gdb.COMMAND_DATA, gdb.COMPLETE_FILENAME)

    def _parse(self, arg: str) -> tuple[dict[str, str], list[str]]:
        words = arg.split()
        flags = {"-z": ""} if "-z" in words else {}
        rest = [w for w in words if w != "-z"]
        if len(rest) != 1 or any(w.startswith("-") for w in rest):
            raise XendbgError(f"give one FILE (usage: {self.usage})")
        return flags, rest

    def run(self, flags: dict[str, str], words: list[str]) -> None:
        if not gdb.selected_inferior().pid:
            from xendbg.gdb.connect import no_vcpu_reason

            raise XendbgError(no_vcpu_reason("QEMU's gdbstub"))
        path = os.path.abspath(os.path.expanduser(words[0]))
        if not os.path.isdir(os.path.dirname(path)):
            raise XendbgError(f"{os.path.dirname(path)}: no such directory")
        before = os.stat(path).st_mtime_ns if os.path.exists(path) else None
        try:
            said = gdb.execute(f"monitor dump-guest-memory {'-z ' if '-z' in flags else ''}{path}", to_string=True)
        except gdb.error as exc:
            raise XendbgError(f"the target took no dump (is it QEMU's gdbstub?): {exc}") from None
        if not os.path.exists(path) or os.stat(path).st_mtime_ns == before:
            raise XendbgError(f"QEMU wrote no {path}: {said.strip() or 'no reply'} (QEMU writes on its own host)")
        size = os.path.getsize(path)
        gdb.write(f"wrote {path} ({size / 2**20:.1f} MiB); read it with: xendbg core {path} "
                  f"[--xen-syms xen-syms] [--symbols ELF]\n")

"""gdb's architecture against the register file of the target it connects to.

A 32-bit guest ELF loaded before `target remote` makes gdb take i386 from the file.  A 64-bit QEMU
(qemu-system-x86_64: Xen, and every PV guest under it, 32-bit ones included) sends x86-64 registers:
gdb rejects the target's description ("Selected architecture i386 is not compatible with reported
target architecture i386:x86-64") and the connection fails with "Remote 'g' packet reply is too long".
gdb announces the connection's threads before it reads their registers, so xendbg compares the two at
the first new thread, takes the target's architecture and says so in one line.  Nothing in xendbg
depends on gdb's architecture: a PV guest's width comes from its code selector (arch.cpu_mode).

When xendbg was loaded after such a failure, its commands name the fix instead (`no_vcpu_reason`).
This module is imported when gdb loads xendbg: it imports nothing but gdb, os and re.
"""

from __future__ import annotations

import os
import re

import gdb

# The x86 architectures whose register files differ in width (gdb's names).
_X86_WIDTH = {"i386": 32, "i386:intel": 32, "i386:x86-64": 64, "i386:x86-64:intel": 64}
X86_64 = "i386:x86-64"
_checked: set[int] = set()  # the connections (gdb's numbers, never reused) already compared


def _reported_architecture(connection: object) -> str | None:
    """The architecture the remote target's description names (qXfer:features:read:target.xml), or
    None when it sends none."""
    try:
        reply = connection.send_packet("qXfer:features:read:target.xml:0,fff")  # type: ignore[attr-defined]
    except (gdb.error, AttributeError, ValueError):
        return None
    text = reply.decode("ascii", "replace") if isinstance(reply, bytes) else str(reply)
    found = re.search(r"<architecture>\s*([^<\s]+)\s*</architecture>", text)
    return found.group(1) if found else None


def _whence() -> str:
    """Where gdb's current architecture came from, for the one line."""
    if gdb.parameter("architecture") != "auto":
        return "set by hand"
    exec_file = gdb.current_progspace().filename
    return f"from {os.path.basename(exec_file)}" if exec_file else "gdb's default"


def on_new_thread(event: object) -> None:
    """At a connection's first thread: take the target's x86 register width when gdb's differs."""
    try:
        thread = getattr(event, "inferior_thread", None)
        inferior = thread.inferior if thread is not None else gdb.selected_inferior()
        connection = inferior.connection
        if connection is None or connection.num in _checked or not hasattr(connection, "send_packet"):
            return
        _checked.add(connection.num)
        reported = _reported_architecture(connection)
        current = inferior.architecture().name()
        if reported is None or reported == current or None in (_X86_WIDTH.get(reported), _X86_WIDTH.get(current)):
            return
        whence = _whence()
        gdb.execute(f"set architecture {reported}", to_string=True)
        gdb.write(f"xendbg: set architecture {reported}: the target's registers are {_X86_WIDTH[reported]}-bit "
                  f"({reported}), which gdb's architecture {current} ({whence}) cannot read; xendbg takes a guest's "
                  f"width from its code selector\n")
    except gdb.error as exc:  # an event handler must not fail gdb's connection
        gdb.write(f"xendbg: cannot compare gdb's architecture with the target's: {exc}\n")


def no_vcpu_reason(to: str = "the guest") -> str:
    """Why there is no vCPU to read, in one line, with the command that fixes it (connecting gdb to `to`)."""
    inferior = gdb.selected_inferior()
    if inferior.connection is None:
        fix = f"connect gdb to {to} first (target remote HOST:PORT)"
        try:
            current = inferior.architecture().name()
        except gdb.error:
            current = ""
        if _X86_WIDTH.get(current) == 32:
            # gdb took a 32-bit architecture (a 32-bit ELF): a 64-bit QEMU fails the connection
            fix += (f"; if `target remote` said \"Remote 'g' packet reply is too long\", the target's registers "
                    f"are 64-bit and gdb's architecture is {current} ({_whence()}): set architecture "
                    f"{X86_64}, then target remote again")
        return f"no target: {fix}"
    if not inferior.threads():
        return "no vCPU to read: the target has no threads (it exited, or the connection failed): target remote again"
    return "no vCPU to read: none is selected (thread N selects one)"


def register() -> None:
    gdb.events.new_thread.connect(on_new_thread)

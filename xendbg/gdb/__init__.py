"""xendbg inside gdb: the only package that imports gdb."""

from __future__ import annotations

_registered = False


def register() -> None:
    """Register the `xen` commands once: sourcing gdbscripts/xendbg.py again must not hook gdb's
    stop event a second time (every stop would be reported twice)."""
    global _registered
    if _registered:
        return
    from xendbg.gdb.commands import register as _register

    _register()
    _registered = True

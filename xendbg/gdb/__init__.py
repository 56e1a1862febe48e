"""xendbg inside gdb: the only package that imports gdb."""

from __future__ import annotations


def register() -> None:
    from xendbg.gdb.commands import register as _register

    _register()

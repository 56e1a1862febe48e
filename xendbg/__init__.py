"""xendbg: a debugger for Xen paravirtualized guests, built into GDB."""

__version__ = "0.1.0"

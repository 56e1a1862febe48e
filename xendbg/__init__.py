"""xendbg: a debugger for Xen paravirtualized guests, built into GDB."""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The post-mortem API, imported on first use: loading xendbg into gdb must stay cheap.
    if name == "open_core":
        from xendbg.dump import open_core

        return open_core
    raise AttributeError(f"module 'xendbg' has no attribute {name!r}")

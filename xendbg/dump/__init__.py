"""Post-mortem: QEMU memory dumps read as a Target per vCPU (see api.py)."""

from xendbg.dump.api import Core, Vcpu, open_core

__all__ = ["Core", "Vcpu", "open_core"]

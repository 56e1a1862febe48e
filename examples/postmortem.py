"""What every vCPU of a QEMU memory dump was doing, through xendbg's Python API.

    .venv/bin/python examples/postmortem.py DUMP [GUEST_ELF ...]

DUMP is a file from QEMU's `dump-guest-memory FILE` (or `-z FILE`), e.g. taken in gdb connected to
QEMU with `monitor dump-guest-memory /tmp/guest.dump`.  GUEST_ELF files give symbols and evidence of
the Xen version.
"""

from __future__ import annotations

import sys

import xendbg
from xendbg.trace import call_line


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    with xendbg.open_core(argv[0], symbols=argv[1:]) as core:
        for vcpu in core.vcpus:
            print(f"vCPU {vcpu.index}: {vcpu.mode}, pc {vcpu.pc:#x}, registers {vcpu.registers_source}")
            hc = vcpu.pending()
            print(f"  pending: {call_line(hc)}" if hc else f"  no pending hypercall: {vcpu.why_not_pending}")
            for finding in vcpu.findings():
                print(f"  {finding.severity}: {finding.message}")
        target = core.target(0)  # a Target: any decoder reads it like a live vCPU
        print(f"vCPU 0 code at pc: {target.read_memory(core.vcpus[0].pc, 2).hex()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

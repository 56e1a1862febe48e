"""xen32shared under gdb: the trap table shim32's guest hands to set_trap_table, read raw from the guest's
memory at Xen's compat_set_trap_table, against what the real Xen keeps for the vCPU once the call is
complete (struct vcpu's arch.pv.trap_ctxt and callbacks, through this build's DWARF).
"""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.platform

RING1_CS = 0xE019  # FLAT_RING1_CS (arch-x86/xen-x86_32.h, RELEASE-4.17.0)
# The guest's table (guest/guest.c): vector, flags (DPL | TI_IF), handler symbol.
TABLE = [(3, 3, "trap_3"), (6, 0, "trap_6"), (13, 0, "trap_13"), (14, 4, "trap_14"), (0x80, 3, "int80_entry"),
         (0x81, 3, "int81_entry")]
# The guest is dom0 and makes the call on its vCPU 0 (common/domain.c: hardware_domain, d->vcpu[]).
CURRENT = "hardware_domain->vcpu[0]"


def test_xen_keeps_the_table_the_guest_handed_over(boot_gdb) -> None:
    booted = boot_gdb("xen32shared", timeout=90)
    # Back in the guest past its int $0x82: the call is complete (Xen may preempt set_trap_table between
    # entries and continue it from the same int $0x82, do_set_trap_table in pv/traps.c, RELEASE-4.17.0).
    cmds = ["hbreak compat_set_trap_table", "continue", "p/x $rdi", f"x/{2 * (len(TABLE) + 1)}wx $rdi", "delete",
            "hbreak *(xen_int82 + 2)", "continue"]
    for vector, _, name in TABLE:
        cmds += [f"p/x {CURRENT}->arch.pv.trap_ctxt[{vector}]", f"p/x (unsigned long)&{name}"]
    cmds += [f"p/x {CURRENT}->arch.pv.event_callback_cs", f"p/x {CURRENT}->arch.pv.event_callback_eip",
             "p/x (unsigned long)&event_entry", "delete", "detach"]
    out = booted.gdb_batch(*cmds, timeout=80)

    # The guest's own table, raw: 8 bytes an entry (vector, flags, cs, address), ended by a zero address.
    words = [int(w, 16) for line in re.findall(r"^0x[0-9a-f]+:\s+(.*)$", out, re.M) for w in line.split()]
    assert len(words) == 2 * (len(TABLE) + 1), out[-3000:]
    raw = [(w0 & 0xFF, (w0 >> 8) & 0xFF, w0 >> 16, addr) for w0, addr in zip(words[::2], words[1::2], strict=True)]
    assert raw[-1][3] == 0

    kept = re.findall(r"^\$\d+ = \{vector = (0x[0-9a-f]+), flags = (0x[0-9a-f]+), cs = (0x[0-9a-f]+), "
                      r"address = (0x[0-9a-f]+)\}$", out, re.M)
    addrs = [int(v, 16) for v in re.findall(r"^\$\d+ = (0x[0-9a-f]+)$", out, re.M)]
    assert len(kept) == len(TABLE), out[-3000:]
    # $rdi, one symbol per vector, then event cs, event eip, &event_entry.
    assert len(addrs) == 1 + len(TABLE) + 3, out[-3000:]
    symbols = addrs[1:1 + len(TABLE)]
    for (vector, flags, _), (kv, kf, kcs, ka), sym, mine in zip(TABLE, kept, symbols, raw[:-1], strict=True):
        assert mine == (vector, flags, RING1_CS, sym)  # what the guest wrote
        assert (int(kv, 16), int(kf, 16), int(kcs, 16), int(ka, 16)) == mine  # what Xen keeps
    event_cs, event_eip, event_entry = addrs[-3:]
    assert (event_cs, event_eip) == (RING1_CS, event_entry)
    res = booted.finish()
    assert res.ok, res.stderr
    assert res.transcript.steps["set_trap_table"].rc == 0

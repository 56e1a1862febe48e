"""xen32 under gdb, through QEMU's gdbstub: the 32-bit ring-1 guest's registers at its own int $0x82, the
compat hypercall page Xen filled in, and the same hypercall seen from Xen's side with the types of this
build's DWARF (do_entry_int82's regs, compat_multicall's arguments).

gdb's architecture is set by hand (the artifacts' "arch"): QEMU gives the 64-bit register file while the
guest runs in compat mode, and gdb would pick i386 from the 32-bit guest ELF.
"""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.platform

HC_xen_version, HC_multicall = 17, 13
RING1_CS = 0xE019  # FLAT_RING1_CS (arch-x86/xen-x86_32.h, RELEASE-4.17.0)


def values(out: str) -> list[int]:
    """The $N = value lines of a batch gdb, in order."""
    return [int(v, 0) for v in re.findall(r"^\$\d+ = (-?(?:0x[0-9a-f]+|\d+))$", out, re.M)]


def test_guest_and_xen_sides_of_one_hypercall(boot_gdb) -> None:
    booted = boot_gdb("xen32", timeout=90)
    out = booted.gdb_batch(
        # The guest's own int $0x82 (step xen_version.inline), raw registers and bytes.
        "hbreak *xen_int82", "continue",
        "p/x $cs", "p/x $eax", "p/x $rip", "x/2xb $pc",
        # Xen's compat stub for xen_version (pv_ring1_init_hypercall_page, pv/hypercall.c, RELEASE-4.17.0):
        # mov $17, %eax; int $0x82; ret.
        f"x/8xb (char *)&hypercall_page + {HC_xen_version} * 32",
        "delete",
        # The same call entering Xen: do_entry_int82(regs), read through this build's DWARF.
        "hbreak do_entry_int82", "continue",
        "p/x regs->eax", "p/x regs->cs", "p/x regs->rip",
        "delete",
        # The first multicall (multicall#1: 4 entries); its first entry read raw from the guest's list.
        "hbreak compat_multicall", "continue",
        "p nr_calls", "x/1dw &mc",
        "delete", "detach",
        timeout=80,
    )
    v = values(out)
    assert len(v) == 7, out[-3000:]
    cs, eax, rip, e_eax, e_cs, e_rip, nr = v
    assert (cs, eax) == (RING1_CS, HC_xen_version), out[-3000:]
    assert re.search(r"<xen_int82>:\s+0xcd\s+0x82$", out, re.M), out[-3000:]
    assert re.search(r"<hypercall_page\+544>:\s+0xb8\s+0x11\s+0x00\s+0x00\s+0x00\s+0xcd\s+0x82\s+0xc3$", out,
                     re.M), out[-3000:]
    # Xen saved what the guest had, and the return address past the 2-byte int $0x82.
    assert (e_eax, e_cs, e_rip) == (HC_xen_version, RING1_CS, rip + 2), out[-3000:]
    assert nr == 4, out[-3000:]
    m = re.search(r"<mc>:\s+(\d+)$", out, re.M)
    assert m and int(m.group(1)) == HC_xen_version, out[-3000:]
    res = booted.finish()
    assert res.ok, res.stderr
    assert res.transcript.steps["multicall#1"].fields["nr"] == "4"

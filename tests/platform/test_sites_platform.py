"""Hypercall sites of the platforms' real guest kernels: our 32- and 64-bit test guests and Debian's
Linux 6.1 vmlinux (no symbol table, no hypercall-page note), checked against binutils and, under QEMU,
against the registers at a breakpoint on each site found.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import build

from xendbg.sites import SOURCE_NONE, SOURCE_NOTE, SOURCE_SIGNATURE, SOURCE_SYMBOL, find_hypercall_sites

pytestmark = pytest.mark.platform

HC_iret, NR_HYPERCALLS = 23, 64  # xen/include/public/xen.h, RELEASE-4.17.0
KERNEL_CS_64 = 0xE033  # FLAT_KERNEL_CS64, arch-x86/xen-x86_64.h (RELEASE-4.17.0)


def nm(path: str) -> dict[str, int]:
    out = subprocess.run(["nm", path], capture_output=True, text=True, check=True).stdout
    return {cols[2]: int(cols[0], 16) for cols in (line.split() for line in out.splitlines()) if len(cols) == 3}


def objdump_at(path: str, address: int) -> str:
    """objdump's disassembly of the one instruction at `address`."""
    out = subprocess.run(["objdump", "-d", f"--start-address={address:#x}", f"--stop-address={address + 16:#x}",
                          path], capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if re.match(rf"\s*{address:x}:", line)]
    assert lines, out
    return lines[0]


def registers(out: str) -> list[int]:
    return [int(v, 16) for v in re.findall(r"^\$\d+ = (0x[0-9a-f]+)$", out, re.M)]


def test_shim32_guest() -> None:
    guest = build("shim32")["guest"]
    sites = find_hypercall_sites(guest)
    assert (sites.width, sites.symbols) == (32, True)
    assert (sites.hypercall_page, sites.page_source) == (None, SOURCE_NONE)  # the shim has no hypercall page
    (site,) = sites.inline
    address = nm(guest)["xen_int82"]
    assert (site.name, site.entry, site.instruction) == ("xen_int82", address, address)
    assert (site.convention, site.source, site.nr) == ("x86_32-pv", SOURCE_SYMBOL, None)
    assert "int    $0x82" in objdump_at(guest, site.instruction)


def test_xen64_guest_symbol_and_note(tmp_path: Path) -> None:
    artifacts = build("xen64")
    sites = find_hypercall_sites(artifacts["guest"])
    assert (sites.width, sites.symbols, sites.inline) == (64, True, ())
    assert (sites.hypercall_page, sites.page_source) == (artifacts["hypercall_page"], SOURCE_SYMBOL)
    # Stripped, the guest still says where its page is: in its XEN_ELFNOTE_HYPERCALL_PAGE note.
    stripped = tmp_path / "guest-stripped.elf"
    subprocess.run(["objcopy", "--strip-all", artifacts["guest"], str(stripped)], check=True)
    sites = find_hypercall_sites(stripped)
    assert (sites.symbols, sites.inline) == (False, ())
    assert (sites.hypercall_page, sites.page_source) == (artifacts["hypercall_page"], SOURCE_NOTE)


def test_stripped_shim32_guest_has_no_known_site(tmp_path: Path) -> None:
    stripped = tmp_path / "guest-stripped.elf"
    shutil.copy(build("shim32")["guest"], stripped)
    subprocess.run(["objcopy", "--strip-all", str(stripped)], check=True)
    sites = find_hypercall_sites(stripped)
    assert (sites.width, sites.symbols, sites.hypercall_page, sites.inline) == (32, False, None, ())


def linux_sites():
    vmlinux = build("linux64")["vmlinux"]
    return vmlinux, find_hypercall_sites(vmlinux)


def test_linux64_vmlinux_by_signature() -> None:
    vmlinux, sites = linux_sites()
    assert (sites.width, sites.symbols) == (64, False)
    assert (sites.hypercall_page, sites.page_source) == (None, SOURCE_NONE)  # XSA-466: no page, no note
    by_name = {site.name: site for site in sites.inline}
    assert sorted(by_name) == ["xen_hypercall_pv", "xen_iret"]
    assert {(s.source, s.convention) for s in sites.inline} == {(SOURCE_SIGNATURE, "x86_64-pv")}
    pv, iret = by_name["xen_hypercall_pv"], by_name["xen_iret"]
    assert (pv.instruction - pv.entry, pv.nr) == (3, None)
    assert (iret.instruction - iret.entry, iret.nr) == (11, HC_iret)
    for site in sites.inline:
        assert "syscall" in objdump_at(vmlinux, site.instruction)
    assert "push   %rcx" in objdump_at(vmlinux, pv.entry)
    assert "push   $0x0" in objdump_at(vmlinux, iret.entry)


def test_linux64_sites_are_hit_under_xen(boot_gdb) -> None:
    """Breakpoints at the two sites found in the stripped vmlinux stop dom0 at its hypercalls."""
    _, sites = linux_sites()
    by_name = {site.name: site for site in sites.inline}
    pv, iret = by_name["xen_hypercall_pv"], by_name["xen_iret"]
    booted = boot_gdb("linux64", timeout=150)
    out = booted.gdb_batch(f"hbreak *{pv.instruction:#x}", f"hbreak *{iret.instruction:#x}",
                           "continue", "p/x $rip", "p/x $rax", "p/x $cs",
                           "delete 1", "continue", "p/x $rip", "p/x $rax", "p/x $cs", timeout=140)
    values = registers(out)
    assert len(values) == 6, out
    rip, rax, cs, rip2, rax2, cs2 = values
    # Linux's first hypercall goes through xen_hypercall_pv (its number in RAX), from the PV kernel's CS.
    assert (rip, cs) == (pv.instruction, KERNEL_CS_64) and rax < NR_HYPERCALLS, out
    # The first return from an interrupt or exception issues iret from xen_iret.
    assert (rip2, rax2, cs2) == (iret.instruction, HC_iret, KERNEL_CS_64), out


def test_shim32_site_is_hit(boot_gdb) -> None:
    guest = build("shim32")["guest"]
    (site,) = find_hypercall_sites(guest).inline
    booted = boot_gdb("shim32", abi="4.0")
    out = booted.gdb_batch(f"hbreak *{site.instruction:#x}", "continue", "p/x $eip", "p/x $eax", "p/x $cs")
    values = registers(out)
    assert len(values) == 3, out
    eip, eax, cs = values
    assert eip == site.instruction and eax < NR_HYPERCALLS and cs & 3 == 1, out  # the ring-1 guest kernel

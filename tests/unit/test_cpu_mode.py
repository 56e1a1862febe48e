"""arch.cpu_mode: guest width and ring from a code selector (Xen's FLAT_* selectors at each tag), and what
CR0 and EFER add: a vCPU at reset or in boot code is neither Xen nor a guest."""

from __future__ import annotations

import pytest

from xendbg.abi import get_abi
from xendbg.arch import cpu_mode, vcpu_mode
from xendbg.target import InMemoryTarget


@pytest.mark.parametrize("cs,width,ring", [
    (0x0819, 32, 1),  # 2.0 FLAT_RING1_CS (arch-x86_32.h, RELEASE-2.0.0)
    (0x082B, 32, 3),  # 2.0 FLAT_RING3_CS: 32-bit user code, not a 64-bit guest (2.0 had no 64-bit PV)
    (0xE019, 32, 1),  # 3.0+ FLAT_RING1_CS
    (0xE02B, 32, 3),  # 3.0+ 32-bit FLAT_RING3_CS
    (0xE033, 64, 3),  # 3.0+ FLAT_RING3_CS64
    (0xE023, 32, 3),  # 3.0+ FLAT_RING3_CS32: compat user code of a 64-bit guest
    (0xE008, None, 0),  # Xen's own ring-0 selector
])
def test_cpu_mode_from_selector(cs, width, ring):
    mode = cpu_mode(cs)
    assert (mode.width, mode.ring) == (width, ring)


def test_xen_2_0_user_code_is_not_called_64_bit():
    assert "64-bit" not in cpu_mode(0x082B).description
    assert get_abi("2.0", 32).selector_name(0x082B) == "FLAT_RING3_CS"


def test_long_mode_overrides_an_unknown_ring3_selector():
    assert cpu_mode(0x0033, long_mode=True).width == 64
    assert cpu_mode(0x0033).width == 32


def test_every_32_bit_flat_code_selector_is_32_bit():
    for generation in ("2.0", "3.0", "4.17"):
        flat = get_abi(generation, 32).flat_selectors
        for name in ("FLAT_RING1_CS", "FLAT_RING3_CS"):
            assert cpu_mode(flat[name]).width == 32, (generation, name)
    flat64 = get_abi("4.17", 64).flat_selectors
    assert cpu_mode(flat64["FLAT_RING3_CS64"]).width == 64
    assert cpu_mode(flat64["FLAT_RING3_CS32"]).width == 32


# CR0 and EFER as QEMU shows them: at reset (SDM vol. 3, 9.1.1: CR0 = 0x60000010, CS 0xf000, IP 0xfff0),
# in protected mode without paging (PE, ET), and with paging on (PG, PE, ET).
CR0_RESET, CR0_FLAT, CR0_PAGED = 0x60000010, 0x11, 0x80000011
EFER_LMA = 0x500  # LMA and LME


def test_a_vcpu_at_reset_is_in_real_mode_not_in_xen():
    mode = cpu_mode(0xF000, cr0=CR0_RESET)
    assert mode.width is None and mode.paging is False
    assert mode.description == "in real mode, paging off (firmware or boot code)"
    assert "Xen" not in mode.description and "ring" not in mode.description


@pytest.mark.parametrize("cs", [0x07C1, 0x0003, 0xE019, 0xE033])
def test_real_mode_has_no_rings_and_no_guest_whatever_cs_holds(cs):
    # in real mode CS is a segment: its low bits are no RPL, and no PV guest runs there
    mode = cpu_mode(cs, cr0=CR0_RESET)
    assert (mode.width, mode.description) == (None, "in real mode, paging off (firmware or boot code)")


@pytest.mark.parametrize("cs,ring", [(0x0008, 0), (0xE019, 1), (0xE033, 3)])
def test_protected_mode_without_paging_is_boot_code_not_xen_or_a_guest(cs, ring):
    mode = cpu_mode(cs, cr0=CR0_FLAT)
    assert (mode.width, mode.ring, mode.paging) == (None, ring, False)
    assert mode.description == f"in protected mode, paging off (ring {ring}, boot code)"


def test_ring_0_with_paging_is_xen_and_guests_keep_their_width():
    assert cpu_mode(0x0008, cr0=CR0_PAGED).description == "in Xen (ring 0)"  # the shim's own selector
    assert cpu_mode(0xE008, cr0=CR0_PAGED).description == "in Xen (ring 0)"
    assert cpu_mode(0xE033, cr0=CR0_PAGED).width == 64 and cpu_mode(0xE019, cr0=CR0_PAGED).width == 32
    assert cpu_mode(0x0008, efer=EFER_LMA).description == "in Xen (ring 0)"  # long mode needs paging


@pytest.mark.parametrize("cs", [0xE008, 0xE038, 0x0808])
def test_without_cr0_xens_own_selectors_still_say_xen(cs):
    # Xen's ring-0 code selectors lie in the GDT entries it reserves (0xe008/0xe038 from 3.0, 0x0808 in 2.0)
    assert cpu_mode(cs).description == "in Xen (ring 0)"


@pytest.mark.parametrize("cs", [0xF000, 0x0008, 0x0010])
def test_without_cr0_another_ring_0_selector_says_only_what_is_known(cs):
    mode = cpu_mode(cs)
    assert mode.width is None and mode.paging is None
    assert mode.description == "in ring 0 (no CR0 to tell Xen from firmware or boot code)"


def test_vcpu_mode_reads_cr0_and_efer_where_the_target_has_them():
    assert vcpu_mode(InMemoryTarget({"cs": 0xF000, "cr0": CR0_RESET, "pc": 0xFFF0})).description.startswith(
        "in real mode")
    assert vcpu_mode(InMemoryTarget({"cs": 0x0010, "efer": EFER_LMA})).description == "in Xen (ring 0)"
    # gdbsx and gdb on an ELF core have neither: only the selector speaks
    assert vcpu_mode(InMemoryTarget({"cs": 0xE019})).width == 32
    assert "no CR0" in vcpu_mode(InMemoryTarget({"cs": 0x0010})).description

"""arch.cpu_mode: guest width and ring from a code selector (Xen's FLAT_* selectors at each tag)."""

from __future__ import annotations

import pytest

from xendbg.abi import get_abi
from xendbg.arch import cpu_mode


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

"""The decoder's rules for the cases tests/platform/test_shim32_fidelity.py runs on shim32, on their own:
each against what Xen's source at the tag does (the tag is cited next to the rule in xendbg/decode)."""

from __future__ import annotations

import pytest

from tests.unit.images import pack_many
from xendbg.abi import get_abi
from xendbg.decode import decode_call, decode_multicall
from xendbg.decode.rules import dispatched_number
from xendbg.target import InMemoryTarget

TABLE = 0x10000


def trap_table(abi, rows):
    return [(TABLE, pack_many(abi, "trap_info", [*rows, {"vector": 0, "address": 0}]))]


@pytest.mark.parametrize("version,wraps", [("2.0", True), ("3.0", True), ("3.0.2", True), ("3.0.3", False),
                                           ("4.0", False)])
def test_number_past_the_table(version, wraps):
    abi = get_abi(version, 32)
    assert dispatched_number(abi, 64) == (0 if wraps else 64)
    memory = trap_table(abi, [{"vector": 0x23, "cs": abi.kernel_cs, "address": 0x401000}])
    hc = decode_call(InMemoryTarget(memory=memory), abi, 64, [TABLE])
    if wraps:
        assert hc.nr == 64 and hc.name == "set_trap_table"
        assert [e.vector for e in hc.detail.entries] == [0x23]
        assert [f.rule for f in hc.findings] == ["hypercall-number-wraps"]
        assert "number 64 runs set_trap_table" in hc.findings[0].message
    else:
        assert hc.name is None and [f.rule for f in hc.findings] == ["unknown-hypercall"]
        assert "-ENOSYS" in hc.findings[0].message


def test_number_wrapping_to_nothing_fails_with_enosys():
    abi = get_abi("3.0", 32)
    hc = decode_call(InMemoryTarget(), abi, 32 + 25, [0])  # 25 is do_ni_hypercall in 3.0.0
    assert hc.name is None
    assert [(f.rule, f.severity) for f in hc.findings] == [("hypercall-number-wraps", "error")]
    assert "-ENOSYS" in hc.findings[0].message


def test_multicall_entry_number_wraps_too():
    """do_multicall masks each entry's number the same way (2.0: entry.S; 3.0.0: asm-x86/multicall.h)."""
    abi = get_abi("3.0", 32)
    rows = [{"op": 32 + 17, "result": 0x30000, "args": [0]},   # xen_version
            {"op": 32 + 13, "result": (-22) & 0xFFFFFFFF}]     # a nested multicall after all
    target = InMemoryTarget(memory=[(0x20000, pack_many(abi, "multicall_entry", rows))])
    batch, found = decode_multicall(target, abi, 0x20000, 2)
    assert [e.call.name for e in batch.entries] == ["xen_version", "multicall"]
    assert [f.rule for f in found] == ["multicall-nested"]
    assert [f.rule for f in batch.entries[0].call.findings] == ["hypercall-number-wraps"]

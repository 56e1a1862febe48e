"""Arbitrary registers and memory never make a decoder raise anything but xendbg's own errors."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from tests.unit.budget import budget
from xendbg.abi import GENERATIONS, get_abi
from xendbg.decode import decode_call, decode_multicall, decode_pending, decode_trap_table
from xendbg.errors import XendbgError
from xendbg.target import InMemoryTarget

BASE = 0x10000
words = st.integers(min_value=0, max_value=2**64 - 1)
# Pointers into the mapped window, near its end (tables running off mapped memory), or anywhere.
pointers = st.one_of(st.integers(BASE, BASE + 0x1000), st.integers(BASE + 0xF00, BASE + 0x2100), words)


@st.composite
def targets(draw):
    width = draw(st.sampled_from([32, 64]))
    generation = draw(st.sampled_from(GENERATIONS))
    mask = (1 << width) - 1
    names = ("eax", "ebx", "ecx", "edx", "esi", "edi", "esp", "eip") if width == 32 else (
        "rax", "rdi", "rsi", "rdx", "r10", "r8", "rsp", "rip")
    regs = {name: draw(st.one_of(pointers, words, st.integers(0, 64))) & mask for name in names}
    regs["cs"] = draw(st.integers(0, 0xFFFF))
    memory = draw(st.binary(min_size=0, max_size=0x2000))
    # Self-referential data: a multicall whose entries point back at the batch, tables of huge counts.
    loop = struct.pack("<QQQQ", 13, 0, BASE, 0xFFFFFFFF) * draw(st.integers(0, 4))
    chunks = [(BASE, memory), (BASE + 0x1800, loop)] if loop else [(BASE, memory)]
    code = draw(st.sampled_from([b"\x0f\x05", b"\xcd\x82", b"\x0f\x01\xc1", b"\x90\x90", b""]))
    if code:
        chunks.append((regs["eip" if width == 32 else "rip"], code + draw(st.binary(max_size=30))))
    return get_abi(generation, width), InMemoryTarget(regs, chunks)


def _only_own_errors(call) -> None:
    try:
        call()
    except XendbgError as exc:
        assert "\n" not in str(exc), "errors are one line"


@budget(300)
@given(targets())
def test_pending_decode_never_raises_foreign_errors(case):
    abi, target = case
    _only_own_errors(lambda: decode_pending(target, abi))


@budget(300)
@given(targets(), st.integers(0, 80), st.lists(st.one_of(pointers, words), min_size=0, max_size=6))
def test_any_number_any_arguments(case, nr, args):
    abi, target = case
    _only_own_errors(lambda: decode_call(target, abi, nr, args))


@budget(200)
@given(targets(), pointers, st.integers(0, 2**32 - 1))
def test_tables_and_batches(case, address, count):
    abi, target = case
    _only_own_errors(lambda: decode_trap_table(target, abi, address))
    _only_own_errors(lambda: decode_multicall(target, abi, address, count, results=True))

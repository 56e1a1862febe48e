"""Where hypercalls enter (xendbg/arch.py): hypercall-page stub shapes, the stub walk's push counting,
hypercall instructions in a function, IDT gates and Xen's int $0x82 entry."""

from __future__ import annotations

import pytest

from tests.unit.images import stub
from xendbg import arch
from xendbg.arch import (
    Site,
    StubShape,
    find_hypercall_site,
    gate_entry,
    handler_hypercall,
    handler_symbol,
    hypercall_instructions,
    idt_gate_handler,
    mov_eax_immediate,
    stub_shape,
)
from xendbg.target import InMemoryTarget

PC = 0xFFFFFFFF81001000

# Xen's iret stubs (pv_ring3_init_hypercall_page / pv_ring1_init_hypercall_page, RELEASE-4.17.0):
# 64-bit `push %rcx; push %r11; push %rax; mov $23,%eax; syscall`, 32-bit `push %eax; mov $23,%eax; int $0x82`.
IRET_64 = bytes.fromhex("51 4153 50 b817000000 0f05")
IRET_32 = bytes.fromhex("50 b817000000 cd82")
# Linux's xen_iret (arch/x86/xen/xen-asm.S after XSA-466): `pushq $0` first, then as Xen's.
LINUX_IRET = bytes.fromhex("6a00 51 4153 50 b817000000 0f05")


@pytest.mark.parametrize("width,iret,shape,returns", [
    (64, False, StubShape(8, 16), 10), (64, True, StubShape(9, 24), 11),
    (32, False, StubShape(5, 0), 7), (32, True, StubShape(6, 4), 8)])
def test_stub_shapes(width, iret, shape, returns):
    assert stub_shape(width, iret) == shape
    assert stub_shape(width, iret).return_offset == returns


@pytest.mark.parametrize("width,iret,code", [(64, False, stub(64, 13)), (64, True, IRET_64),
                                             (32, False, stub(32, 13)), (32, True, IRET_32)])
def test_stub_shapes_agree_with_the_stub_walk(width, iret, code):
    site = find_hypercall_site(code, PC, width)
    shape = stub_shape(width, iret)
    assert site is not None and site.kind == "stub"
    assert (site.address - PC, site.pushes) == (shape.instruction_offset, shape.pushed)
    assert site.stub_nr == (23 if iret else 13)


def test_the_walk_counts_push_imm_as_a_word():
    site = find_hypercall_site(LINUX_IRET, PC, 64)
    assert site == Site("stub", "x86_64-pv", "syscall", PC + 11, 23, 32, ("0", "rcx", "r11", "rax"))


def test_at_the_instruction_nothing_was_pushed():
    assert find_hypercall_site(bytes.fromhex("0f05 c3"), PC, 64) == Site("instruction", "x86_64-pv", "syscall", PC)
    site = find_hypercall_site(bytes.fromhex("cd82 c3"), 0xC0001000, 32)
    assert site == Site("instruction", "x86_32-pv", "int 0x82", 0xC0001000)


def test_a_number_from_a_register_is_not_the_stubs():
    site = find_hypercall_site(bytes.fromhex("51 89d8 0f05"), PC, 64)  # push %rcx; mov %ebx,%eax; syscall
    assert site is not None and (site.stub_nr, site.pushes, site.address) == (None, 8, PC + 3)


def test_hvm_instructions_and_the_end_of_a_stub():
    assert find_hypercall_site(bytes.fromhex("0f01c1"), PC, 64).convention == "x86_64-hvm"  # vmcall
    assert find_hypercall_site(bytes.fromhex("0f01d9"), 0x1000, 32).convention == "x86_32-hvm"  # vmmcall
    assert find_hypercall_site(bytes.fromhex("b811000000 c3 0f05"), PC, 64) is None  # ret ends the stub
    assert find_hypercall_site(bytes.fromhex("90" * 7 + "0f05"), PC, 64).address == PC + 7
    assert find_hypercall_site(bytes.fromhex("90" * 8 + "0f05"), PC, 64) is None  # at most 8 instructions


def test_hypercall_instructions_in_a_function():
    code = bytes.fromhex("b80d000000 0f05"  # mov $13,%eax; syscall
                         "4889f8 0f05"  # mov %rdi,%rax; syscall
                         "b811000000 90 0f05"  # mov $17,%eax; nop; syscall: the mov is not right before
                         "c3")
    assert hypercall_instructions(code, PC, 64) == {PC + 5: 13, PC + 10: None, PC + 18: None}
    code32 = bytes.fromhex("b811000000 cd82 cd80 c3")  # int $0x80 is not a hypercall
    assert hypercall_instructions(code32, 0xC0001000, 32) == {0xC0001005: 17}
    assert hypercall_instructions(bytes.fromhex("b80f050000 c3"), PC, 64) == {}  # 0f 05 inside an immediate


def test_mov_eax_immediate():
    assert mov_eax_immediate(bytes.fromhex("b804000000c3")) == 4
    assert mov_eax_immediate(bytes.fromhex("b9040000")) is None
    assert mov_eax_immediate(b"") is None


def _gate(handler: int, present: bool = True, long_mode: bool = False) -> bytes:
    type_attr = (0x80 if present else 0) | 0x20 | 0x0E  # DPL 1 interrupt gate
    gate = (handler & 0xFFFF).to_bytes(2, "little") + (0xE008).to_bytes(2, "little") + bytes([0, type_attr])
    gate += ((handler >> 16) & 0xFFFF).to_bytes(2, "little")
    if long_mode:
        gate += (handler >> 32).to_bytes(4, "little") + bytes(4)
    return gate


def test_idt_gate_handler():
    assert idt_gate_handler(_gate(0x12345678), long_mode=False) == 0x12345678
    assert idt_gate_handler(_gate(0xFFFF82D040391234, long_mode=True), long_mode=True) == 0xFFFF82D040391234
    assert idt_gate_handler(_gate(0x12345678, present=False), long_mode=False) is None
    assert idt_gate_handler(_gate(0x12345678), long_mode=True) is None  # a long-mode gate is 16 bytes
    assert idt_gate_handler(_gate(0x12345678)[:7], long_mode=False) is None


def test_gate_entry_reads_where_the_guest_came_from_on_xens_stack():
    sp = 0xFFFF830000007F00
    frame = b"".join(v.to_bytes(8, "little") for v in (0xC0001007, 0xE019, 0x246, 0xC0FFEF00, 0xE021))
    regs = {"rsp": sp, "rax": 0xFFFFFFFF00000011, "rbx": 1, "rcx": 2, "rdx": 3, "rsi": 4, "rdi": 5}
    entry = gate_entry(InMemoryTarget(regs, [(sp, frame)]))
    assert (entry.nr, entry.name, entry.args, entry.width) == (17, None, (1, 2, 3, 4, 5), 32)
    assert (entry.guest_sp, entry.guest_cs) == (0xC0FFEF00, 0xE019)
    assert entry.site == Site("gate", "x86_32 PV", arch.XEN_GATE_ENTRY, 0xC0001007)


def test_gate_entry_takes_the_width_from_the_pushed_selector():
    sp = 0xFFFF830000007F00
    frame = b"".join(v.to_bytes(8, "little") for v in (0x401000, 0xE033, 0x246, 0x1_0000_7F00, 0xE02B))
    regs = {"rsp": sp, "rax": 0x1_0000_0011, "rdi": 1, "rsi": 2, "rdx": 3, "r10": 4, "r8": 5}
    entry = gate_entry(InMemoryTarget(regs, [(sp, frame)]))
    assert (entry.width, entry.nr, entry.args, entry.guest_sp) == (64, 0x1_0000_0011, (1, 2, 3, 4, 5), 0x1_0000_7F00)
    frame = b"".join(v.to_bytes(8, "little") for v in (0xC0001007, 0xE019, 0x246, 0x1_C0FF_EF00, 0xE021))
    assert gate_entry(InMemoryTarget(regs | {"rbx": 0, "rcx": 0}, [(sp, frame)])).guest_sp == 0xC0FFEF00


def test_gate_entry_on_a_32_bit_register_file():
    sp = 0xFF000F00
    frame = b"".join(v.to_bytes(4, "little") for v in (0xC0001007, 0x0819, 0x246, 0xC0FFEF00, 0x0821))
    regs = {"esp": sp, "eax": 13, "ebx": 0xC0200000, "ecx": 2, "edx": 0, "esi": 0, "edi": 0}
    entry = gate_entry(InMemoryTarget(regs, [(sp, frame)]))
    assert (entry.nr, entry.args[:2], entry.guest_cs, entry.guest_sp) == (13, (0xC0200000, 2), 0x0819, 0xC0FFEF00)


def test_handler_names():
    assert handler_hypercall("do_multicall") == ("multicall", 64)
    assert handler_hypercall("compat_vcpu_op") == ("vcpu_op", 32)
    assert handler_hypercall("pv_hypercall") is None and handler_hypercall("do_entry_int82") is None
    assert handler_hypercall("schedule") is None
    assert handler_symbol("multicall", 64) == "do_multicall" and handler_symbol("multicall", 32) == "compat_multicall"

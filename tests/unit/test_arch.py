"""xendbg/arch.py: where a vCPU stands, which registers hold a hypercall, and what the code at PC is."""

from __future__ import annotations

import pytest

from tests.unit.images import stub
from xendbg import arch
from xendbg.abi.layouts import ERA_3, layout, pack_u
from xendbg.errors import DecodeError, UnknownRegister
from xendbg.target import InMemoryTarget

PC = 0x7000


class StrictTarget(InMemoryTarget):
    """Register names exactly as the Target protocol spells them (lower case), as gdb's own are."""

    def read_register(self, name: str) -> int:
        if name != name.lower():
            raise UnknownRegister(name)
        return super().read_register(name)


@pytest.mark.parametrize("cs,width,ring,description", [
    (0xE008, None, 0, "in Xen (ring 0)"),
    (0xE019, 32, 1, "32-bit PV guest kernel (ring 1)"),
    (0xE01A, 32, 2, "ring 2 (unusual for a PV guest)"),
    (0xE033, 64, 3, "64-bit PV guest (ring 3)"),
    (0x082B, 32, 3, "32-bit guest user code (ring 3)"),  # Xen 2.0's FLAT_RING3_CS: no 64-bit PV in 2.0
    (0xE023, 32, 3, "32-bit user code of a 64-bit PV guest (ring 3)"),
    (0x0823, 32, 3, "32-bit guest user code (ring 3)"),
    (0xE02B, 32, 3, "32-bit guest user code (ring 3)"),
])
def test_cpu_mode(cs, width, ring, description):
    assert arch.cpu_mode(cs) == arch.CpuMode(width, ring, description)


def test_cpu_mode_long_mode_overrides_an_unknown_selector():
    assert arch.cpu_mode(0x1233, long_mode=True).width == 64
    assert arch.cpu_mode(0x1233, long_mode=False).width == 32
    assert arch.cpu_mode(0x1231, long_mode=True).width == 32  # ring 1 is never 64-bit PV


@pytest.mark.parametrize("site,text", [
    (arch.Site("instruction", "x86_64-pv", "syscall", 0x1000), "at syscall"),
    (arch.Site("stub", "x86_64-pv", "syscall", 0x1008, 24), "in stub for hypercall 24, before syscall at 0x1008"),
    (arch.Site("stub", "x86_64-pv", "syscall", 0x1003), "in inline stub, before syscall at 0x1003"),
    (arch.Site("handler", "xen-c", "do_multicall()", 0x2000), "in Xen at do_multicall() (C arguments)"),
    (arch.Site("frame", "x86_64 PV", "pv_hypercall()", 0x3000),
     "in Xen at pv_hypercall(), from the guest's saved registers (guest PC 0x3000)"),
    (arch.Site("registers", "x86_32 PV", "int $0x82", 0x4000), "from registers"),
])
def test_site_descriptions(site, text):
    assert site.describe() == text


@pytest.mark.parametrize("width,code,kind,convention,instruction,address,nr,pushed", [
    (32, "cd82c3", "instruction", "x86_32-pv", "int 0x82", PC, None, ()),
    (64, "0f05c3", "instruction", "x86_64-pv", "syscall", PC, None, ()),
    (64, "0f01c1c3", "instruction", "x86_64-hvm", "vmcall", PC, None, ()),
    (32, "0f01d9c3", "instruction", "x86_32-hvm", "vmmcall", PC, None, ()),
    (32, "b818000000cd82c3", "stub", "x86_32-pv", "int 0x82", PC + 5, 24, ()),
    (32, "50b817000000cd82", "stub", "x86_32-pv", "int 0x82", PC + 6, 23, ("eax",)),  # the iret stub
    (64, "514153b81d0000000f05415b59c3", "stub", "x86_64-pv", "syscall", PC + 8, 29, ("rcx", "r11")),
    (64, "51415350b8170000000f05", "stub", "x86_64-pv", "syscall", PC + 9, 23, ("rcx", "r11", "rax")),  # iret
    (64, "514153488b05000000000f05c3", "stub", "x86_64-pv", "syscall", PC + 10, None, ("rcx", "r11")),
    (64, "48c7c0110000000f05c3", "stub", "x86_64-pv", "syscall", PC + 7, 17, ()),  # mov $17, %rax
    (32, "6a10cd82", "stub", "x86_32-pv", "int 0x82", PC + 2, None, ("0x10",)),  # push imm
])
def test_find_hypercall_site(width, code, kind, convention, instruction, address, nr, pushed):
    site = arch.find_hypercall_site(bytes.fromhex(code), PC, width)
    assert site == arch.Site(kind, convention, instruction, address, nr, len(pushed) * width // 8, pushed)


@pytest.mark.parametrize("code", ["c3cd82", "e900000000cd82", "e800000000cd82", "cccd82", "f4cd82", "0f0bcd82",
                                  "cfcd82", "90" * 8 + "cd82"])
def test_no_site_past_the_end_of_a_stub(code):
    # ret, jmp, call, int3, hlt, ud2, iret end a stub; more than 8 instructions are not a stub either
    assert arch.find_hypercall_site(bytes.fromhex(code), PC, 32) is None


def test_site_within_eight_instructions():
    assert arch.find_hypercall_site(bytes.fromhex("90" * 7 + "cd82"), PC, 32).address == PC + 7


def test_stub_number_and_page_stubs():
    assert arch.stub_number(stub(64, 24), 0x5000, 64) == 24
    assert arch.stub_number(stub(32, 13), 0x5000, 32) == 13
    assert arch.stub_number(b"\xc3" * 32, 0x5000, 64) is None
    inline = bytes.fromhex("514153") + bytes.fromhex("0f05415b59c3").ljust(29, b"\xcc")
    assert arch.stub_number(inline, 0x5000, 64) is None  # no mov: not a page stub
    page = b"".join(stub(64, nr) for nr in range(128))
    stubs = arch.hypercall_page_stubs(page + stub(64, 128), 0x10000, 64)  # only the first 4096 bytes count
    assert stubs == {nr: 0x10000 + 32 * nr for nr in range(128)}


def test_page_stub_shapes_match_the_stubs():
    for width, shape in arch.PAGE_STUB_SHAPE.items():
        site = arch.find_hypercall_site(stub(width, 3), PC, width)
        assert site.address == PC + shape.instruction_offset
        assert shape.return_offset == shape.instruction_offset + 2
    assert (arch.PAGE_STUB_SHAPE[64].pushed, arch.PAGE_STUB_SHAPE[32].pushed) == (16, 0)


def regs32(**extra):
    return {"eax": 24, "ebx": 1, "ecx": 2, "edx": 3, "esi": 4, "edi": 5, "eip": PC, **extra}


def regs64(**extra):
    return {"rax": 24, "rdi": 1, "rsi": 2, "rdx": 3, "r10": 4, "r8": 5, "rcx": 99, "rip": PC, **extra}


def test_pending_call_registers_per_convention():
    call = arch.pending_call(StrictTarget(regs32()), 32, code_at_pc=bytes.fromhex("cd82"))
    assert (call.nr, call.args, call.site.kind) == (24, (1, 2, 3, 4, 5), "instruction")
    call = arch.pending_call(StrictTarget(regs64()), 64, code_at_pc=bytes.fromhex("0f05"))
    assert (call.nr, call.args) == (24, (1, 2, 3, 4, 5))  # r10, not rcx (syscall clobbers rcx)
    call = arch.pending_call(StrictTarget(regs64()), 64, code_at_pc=bytes.fromhex("0f01c1"))
    assert (call.nr, call.args, call.site.convention) == (24, (1, 2, 3, 4, 5), "x86_64-hvm")


def test_pending_call_without_code_uses_registers():
    target = StrictTarget(regs32())
    call = arch.pending_call(target, 32, code_at_pc=b"")
    assert call.site == arch.Site("registers", "x86_32 PV", "int $0x82", PC)
    call = arch.pending_call(StrictTarget(regs64()), 64)  # nothing mapped at PC
    assert call.site == arch.Site("registers", "x86_64 PV", "syscall", PC) and call.nr == 24
    call = arch.pending_call(StrictTarget(regs64(rip=0, pc=0x1234)), 64, pc=0x5555, code_at_pc=b"")
    assert call.site.address == 0x5555


def test_pending_call_reads_pc_then_pc_alias_and_masks_to_width():
    regs = {"pc": PC, "eax": 0x1_0000_0011, "ebx": 0xFFFF_FFFF_0000_0001}
    call = arch.pending_call(StrictTarget(regs | {k: 0 for k in ("ecx", "edx", "esi", "edi")}), 32,
                             code_at_pc=b"")
    assert (call.site.address, call.nr, call.args[0]) == (PC, 0x11, 1)


def test_pending_call_from_a_64_bit_register_file_of_a_32_bit_guest():
    regs = {"rip": PC, "rax": 0xABCD_0000_0000_0018, "rbx": 0x1_0000_0007, "rcx": 8, "rdx": 9, "rsi": 10, "rdi": 11}
    target = StrictTarget(regs, [(PC, bytes.fromhex("cd82c3"))])
    call = arch.pending_call(target, 32, pc=PC)
    assert (call.nr, call.args) == (0x18, (7, 8, 9, 10, 11))


def test_pending_call_of_a_64_bit_guest_seen_through_32_bit_names():
    regs = {"eip": PC, "eax": 17, "edi": 1, "esi": 2, "edx": 3, "r10": 4, "r8": 5}
    call = arch.pending_call(StrictTarget(regs), 64, pc=PC, code_at_pc=b"")
    assert (call.nr, call.args) == (17, (1, 2, 3, 4, 5))


def test_not_a_hypercall_at_pc():
    with pytest.raises(DecodeError, match=r"^no hypercall pending: the code at 0x7000 is not a hypercall "
                                          r"instruction or a stub leading to one$"):
        arch.pending_call(StrictTarget(regs64()), 64, code_at_pc=bytes.fromhex("c3"))


def test_read_code_near_the_end_of_mapped_memory():
    page_end = 0x8000
    target = InMemoryTarget(memory=[(page_end - 4, b"\x0f\x05\xc3\xcc")])
    assert arch.read_code(target, page_end - 4) == b"\x0f\x05\xc3\xcc"  # up to the page's end
    target = InMemoryTarget(memory=[(0x7100, b"\x0f\x05" + b"\x90" * 8)])
    assert arch.read_code(target, 0x7100) == (b"\x0f\x05" + b"\x90" * 6)  # 32 bytes fail, then 16, then 8
    target = InMemoryTarget(memory=[(0x7100, b"\x0f\x05\x90")])
    assert arch.read_code(target, 0x7100) == b"\x0f\x05"
    assert arch.read_code(InMemoryTarget(memory=[(0x7100, b"\x90")]), 0x7100) == b""
    target = InMemoryTarget(memory=[(0x7100, bytes(range(40)))])
    assert arch.read_code(target, 0x7100) == bytes(range(32))
    assert target.reads == 1


def test_handlers_and_their_symbols():
    assert arch.handler_hypercall("do_multicall") == ("multicall", 64)
    assert arch.handler_hypercall("compat_vcpu_op") == ("vcpu_op", 32)
    assert arch.handler_hypercall("pv_hypercall") is None
    assert arch.handler_hypercall("do_entry_int82") is None
    assert arch.handler_hypercall("schedule") is None
    assert arch.handler_symbol("multicall", 64) == "do_multicall"
    assert arch.handler_symbol("vcpu_op", 32) == "compat_vcpu_op"


def test_handler_entry_reads_c_arguments():
    regs = {"rip": 0xFFFF82D040200000, "rdi": 1, "rsi": 2, "rdx": 3, "rcx": 4, "r8": 5, "r10": 99}
    entry = arch.handler_entry(StrictTarget(regs), "compat_vcpu_op")
    assert entry == arch.XenEntry(None, "vcpu_op", (1, 2, 3, 4, 5), 32,
                                  arch.Site("handler", "xen-c", "compat_vcpu_op()", 0xFFFF82D040200000))
    regs["rdi"] = 2**64 - 1
    assert arch.handler_entry(StrictTarget(regs), "do_vcpu_op").args[0] == 2**64 - 1
    assert arch.handler_entry(StrictTarget(regs), "compat_vcpu_op").args[0] == 2**32 - 1
    with pytest.raises(DecodeError, match=r"^schedule is not a Xen hypercall handler \(do_NAME or compat_NAME\)$"):
        arch.handler_entry(StrictTarget(regs), "schedule")


@pytest.mark.parametrize("cs,width,convention", [(0xE033, 64, "x86_64 PV"), (0xE019, 32, "x86_32 PV"),
                                                 (0xE008, 64, "x86_64 PV")])
def test_guest_frame_entry(cs, width, convention):
    lay = layout("cpu_user_regs", 64, ERA_3)
    frame = bytearray(lay.size)
    values = {"rax": 0xFFFF_0000_0000_0018, "rbx": 0x1_0000_0001, "rcx": 0x1_0000_0002, "rdx": 3, "rsi": 4,
              "rdi": 5, "r10": 6, "r8": 7, "rip": 0xC0100000, "cs": cs}
    for name, value in values.items():
        f = lay.field(name)
        size = {"u64": 8, "u32": 4, "u16": 2}[f.kind]
        frame[f.offset:f.offset + size] = pack_u(value, size)
    entry = arch.guest_frame_entry(StrictTarget(memory=[(0x1000, bytes(frame))]), 0x1000, "do_entry_int82")
    mask = 2**width - 1
    args = (0x1_0000_0001, 0x1_0000_0002, 3, 4, 5) if width == 32 else (5, 4, 3, 6, 7)
    assert entry == arch.XenEntry(values["rax"] & mask, None, tuple(a & mask for a in args), width,
                                  arch.Site("frame", convention, "do_entry_int82()", 0xC0100000), 0, cs)
    assert arch.guest_frame_entry(StrictTarget(memory=[(0x1000, bytes(frame))]), 0x1000).site.instruction == \
        "pv_hypercall()"


def test_vector_names():
    assert [arch.vector_name(v) for v in (0, 2, 14, 15, 21, 22, 31, 32, 0x80, 0x82, 0xFF)] == [
        "#DE", "NMI", "#PF", "--", "#CP", "reserved", "reserved", "int 0x20", "int 0x80", "int 0x82", "int 0xff"]
    assert arch.PAGE_FAULT == 14 and arch.TRAP_VECTORS[arch.PAGE_FAULT][0] == "#PF"


def test_conventions():
    assert arch.pv_convention(32).arg_registers == ("ebx", "ecx", "edx", "esi", "edi")
    assert arch.pv_convention(64).arg_registers == ("rdi", "rsi", "rdx", "r10", "r8")
    assert arch.pv_args(StrictTarget(regs64()), 64) == (1, 2, 3, 4, 5)
    assert arch.pv_args(StrictTarget(regs32()), 32) == (1, 2, 3, 4, 5)


# --- the guest's width decides how the code at PC is disassembled ---------------------------------------

def test_disassembly_follows_the_guest_width():
    # 64-bit: movabs $imm64, %rax; syscall.  Read as 32-bit code, its last immediate byte starts a
    # `mov $imm32, %eax` that swallows the syscall.
    code64 = bytes.fromhex("48b8" + "1100000000000" + "0b8" + "0f05c3cccc")
    site = arch.find_hypercall_site(code64, PC, 64)
    assert (site.kind, site.address, site.stub_nr) == ("stub", PC + 10, None)  # movabs is not a stub's mov
    assert arch.find_hypercall_site(code64, PC, 32) is None
    # 32-bit: dec %eax; mov $24, %eax; int $0x82.  Read as 64-bit code, 48 b8 is a movabs over the int.
    code32 = bytes.fromhex("48b818000000cd82c3")
    assert arch.find_hypercall_site(code32, PC, 32) == arch.Site("stub", "x86_32-pv", "int 0x82", PC + 6, 24)
    assert arch.find_hypercall_site(code32, PC, 64) is None
    page = b"".join(bytes.fromhex(f"48b8{nr:02x}000000cd82c3").ljust(32, b"\xcc") for nr in range(3))
    assert arch.hypercall_page_stubs(page, 0x5000, 32) == {0: 0x5000, 1: 0x5020, 2: 0x5040}
    assert arch.hypercall_page_stubs(page, 0x5000, 64) == {}
    assert arch.stub_number(page[32:64], 0x5020, 32) == 1


def test_only_a_mov_into_eax_names_the_stub():
    site = arch.find_hypercall_site(bytes.fromhex("83c0050f05c3"), PC, 64)  # add $5, %eax; syscall
    assert (site.kind, site.stub_nr) == ("stub", None)


def test_number_register_fallback_is_masked_to_the_width():
    assert arch.read_result(StrictTarget({"rax": 0x1_FFFF_FFF2}), 32) == -14
    assert arch.read_result(StrictTarget({"eax": 0xFFFFFFEA, "rax": 5}), 32) == -22  # EAX is the 32-bit result
    call = arch.pending_call(StrictTarget({"eip": PC, "rax": 0x1_0000_0011, "ebx": 0, "ecx": 0, "edx": 0,
                                           "esi": 0, "edi": 0}), 32, code_at_pc=b"")
    assert call.nr == 0x11


def test_read_code_stops_at_the_end_of_the_page():
    page_end = 0x8000
    target = InMemoryTarget(memory=[(page_end - 6, b"\x90\x90\x90\x90\x0f\x05")])
    assert arch.read_code(target, page_end - 6) == b"\x90\x90\x90\x90\x0f\x05"

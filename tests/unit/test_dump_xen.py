"""Reading struct vcpu / struct domain offsets off Xen's code (xendbg/dump/xenlayout.py), on code
written for the test in the shape of Xen 4.17's arch_get_info_guest, register_guest_callback and
for_each_domain loops (assembled with GNU as at .text 0x400000, the list head at 0x600000):

#   get_info:
#    push %rbx
#    mov %rdi,%rbp
#    mov %rsi,%rbx
#    mov 0x10(%rdi),%r12
#    mov 0x288(%rbp),%rdx
#    mov %rdx,0x208(%rbx)
#    mov 0x488(%rbp),%edx
#    and $0xfffffffa,%edx
#    mov %rdx,0x200(%rbx)
#    testb $0x2,0x128(%rbp)
#    jne 1f
#    orq $0x20,0x200(%rbx)
#   1:
#    mov 0x490(%rbp),%rsi
#    mov (%rsi),%rax
#    mov %rax,0x2d0(%rbx)
#    mov 0x400(%rbp),%rax
#    mov %rax,0x1378(%rbx)
#    call get_info
#    mov 0x518(%rbp),%rax
#    mov %rax,0x1368(%rbx)
#    mov 0x520(%rbp),%rax
#    mov %rax,0x1370(%rbx)
#    xor %eax,%eax
#   2:
#    mov 0x528(%rbp,%rax,1),%rdx
#    mov %rdx,0x1378(%rbx,%rax,1)
#    add $8,%rax
#    cmp $0x40,%rax
#    jne 2b
#    mov 0x568(%rbp),%rax
#    mov %rax,0x13f8(%rbx)
#    mov 0x570(%rbp),%rax
#    mov %rax,0x1400(%rbx)
#    mov 0x578(%rbp),%rax
#    mov %rax,0x1408(%rbx)
#    mov 0xb08(%rbp),%rax
#    shl $0xc,%rax
#    mov %rax,0x1390(%rbx)
#    pop %rbx
#    ret
#   reg_cb:
#    mov 0x8(%rdi),%rdx
#    mov %gs:0,%rcx
#    movzwl (%rdi),%eax
#    cmp $0x5,%ax
#    je 5f
#    cmp $0x7,%ax
#    jne 9f
#    mov %rdx,0x580(%rcx)
#    movzwl 0x2(%rdi),%eax
#    mov %al,0x594(%rcx)
#    ret
#   5:
#    mov %rdx,0x588(%rcx)
#    movzwl 0x2(%rdi),%eax
#    mov %al,0x595(%rcx)
#    ret
#   9:
#    mov $-38,%rax
#    ret
#   walk1:
#    mov list(%rip),%rbx
#   3:
#    test %rbx,%rbx
#    je 4f
#    mov 0x88(%rbx),%rbx
#    jmp 3b
#   4:
#    ret
#   walk2:
#    mov list(%rip),%r12
#    mov 0x10(%r12),%rax
#    mov 0x88(%r12),%r12
#    ret
#   list: .quad 0
"""

from __future__ import annotations

import pytest

from xendbg.dump import xenlayout as xl
from xendbg.errors import XendbgError

CODE = bytes.fromhex(
    "534889fd4889f34c8b6710488b9588020000488993080200008b958804000083e2fa48899300020000f6852801000002"
    "750848838b0002000020488bb590040000488b06488983d0020000488b850004000048898378130000e8a2ffffff488b"
    "851805000048898368130000488b85200500004889837013000031c0488b94052805000048899403781300004883c008"
    "4883f84075e6488b8568050000488983f8130000488b857005000048898300140000488b857805000048898308140000"
    "488b85080b000048c1e00c488983901300005bc3488b570865488b0c25000000000fb7076683f80574186683f8077524"
    "488991800500000fb74702888194050000c3488991880500000fb74702888195050000c348c7c0daffffffc3488b1ddd"
    "fe1f004885db7409488b9b88000000ebf2c34c8b25c7fe1f00498b4424104d8ba42488000000c3"
)
BASE, LIST = 0x400000, 0x600000
FUNCTIONS = {"get_info": (0x0, 0xd4), "reg_cb": (0xd4, 0x11c), "walk1": (0x11c, 0x132), "walk2": (0x132, len(CODE))}


def code(name: str) -> tuple[bytes, int]:
    start, end = FUNCTIONS[name]
    return CODE[start:end], BASE + start


def code_of(names: dict[str, str]):
    return lambda name: code(names[name]) if name in names else None


def test_context_stores_follow_each_field_of_the_vcpu():
    stores = xl.context_sources(*code("get_info"))
    assert stores[0x208] == [xl.Source(0x288)]  # user_regs
    assert stores[0x2d0] == [xl.Source(0x490, "deref")]  # trap_ctxt[0] through the pointer
    assert stores[0x1368] == [xl.Source(0x518)] and stores[0x1370] == [xl.Source(0x520)]
    # ctrlreg[0]: an HVM field and the PV array copied by index; ctrlreg[3]: a frame number shifted
    assert stores[0x1378] == [xl.Source(0x400), xl.Source(0x528, "indexed")]
    assert stores[0x1390] == [xl.Source(0xb08, "frame")]
    assert stores[xl.ONLINE_TEST] == [xl.Source(0x128, "test", 2, 0x200, 0x20)]


def test_recover_names_every_offset():
    layout = xl.recover(code_of({"arch_get_info_guest": "get_info", "register_guest_callback": "reg_cb"}),
                        [code("walk1"), code("walk2")], LIST)
    assert (layout.user_regs, layout.vgc_flags, layout.trap_ctxt) == (0x288, 0x488, 0x490)
    assert (layout.kernel_ss, layout.kernel_sp, layout.ctrlreg, layout.guest_table) == (0x518, 0x520, 0x528, 0xb08)
    assert layout.callbacks == {"event": 0x568, "failsafe": 0x570, "syscall": 0x578, "syscall32": 0x580,
                                "sysenter": 0x588}
    assert layout.disables_events == {"syscall32": 0x594, "sysenter": 0x595}
    assert layout.down == (0x128, 2) and layout.domain_next == 0x88 and layout.missing == []


def test_a_list_walk_seen_once_is_not_trusted():
    assert xl.list_link([code("walk1")[0]], [code("walk1")[1]], LIST) is None
    assert xl.list_link([code("walk1")[0], code("walk2")[0]], [BASE + 0x11c, BASE + 0x132], LIST + 8) is None


def test_an_unknown_build_says_what_is_missing():
    layout = xl.recover(code_of({"arch_get_info_guest": "walk1"}), [], None)
    assert layout.trap_ctxt is None and layout.callbacks == {}
    assert "the trap table (arch.pv.trap_ctxt)" in layout.missing
    assert "struct domain's next_in_list" in layout.missing
    layout = xl.recover(code_of({}), [], None)
    assert layout.missing[0] == "arch_get_info_guest is not in xen-syms"


def test_an_elf_that_is_not_xen_syms_is_one_line(tmp_path):
    from xendbg.dump.xen import XenSyms

    empty = tmp_path / "xen-syms"
    empty.write_bytes(b"")
    with pytest.raises(XendbgError, match=r"empty file \(0 bytes\), not Xen's xen-syms"):
        XenSyms(str(empty))


# In the shape of Xen 4.20's arch_get_info_guest (gcc 14): an epilogue and tail call in the middle.
#    push %rbp; push %rbx; mov %rdi,%rbp; mov %rsi,%rbx
#    testb $0x1,0x10(%rbp); jne 1f
#    pop %rbx; pop %rbp; jmp get_info          (the tail call)
#   1: mov 0x518(%rbp),%rax; mov %rax,0x1368(%rbx)
#    jmp 2f
#   3: mov %rax,0x1370(%rbx)                   (reached from elsewhere: %rax is not v's field here)
#   2: mov 0x520(%rbp),%rax; mov %rax,0x1370(%rbx)
#    pop %rbx; pop %rbp; ret
MID_EPILOGUE = bytes.fromhex("55534889fd4889f3f645100175045b5debee488b851805000048898368130000eb074889837013"
                             "0000488b8520050000488983701300005b5dc3")


def test_an_epilogue_in_the_middle_keeps_v_and_c():
    stores = xl.context_sources(MID_EPILOGUE, BASE)
    assert stores[0x1368] == [xl.Source(0x518)]
    assert stores[0x1370] == [xl.Source(0x520)]  # not the stale %rax after the jmp


@pytest.mark.parametrize("version,domain,vcpus", [
    ("4.17", 0x10, 0x8), ("4.18", 0x18, 0x8), ("4.19", 0x18, 0x8), ("4.20", 0x18, 0x10)])
def test_leading_fields_follow_the_release(version, domain, vcpus):
    fields, note = xl.leading_fields(version)
    assert fields is not None and note == ""
    assert (fields.vcpu_domain, fields.domain_vcpus, fields.cpu_info_size) == (domain, vcpus, 264)


def test_a_newer_or_unknown_xen_says_so():
    fields, note = xl.leading_fields("4.22")
    assert fields is None and "Xen 4.22's struct cpu_info and struct domain differ" in note
    fields, note = xl.leading_fields(None)
    assert fields is not None and fields.vcpu_domain == 0x10
    assert note == "a Xen whose version is not in its image: read with Xen 4.17's struct layouts, each checked"
    fields, note = xl.leading_fields("4.16")
    assert fields is not None and note.startswith("Xen 4.16: read with Xen 4.17's")

"""Bounce frames (and the 2.0 fast-trap CPU frame) decoded from InMemoryTarget stacks.

Each image is laid out by hand, slot by slot, the way Xen's create_bounce_frame (or the CPU) writes
it at the tag the generation cites, so a wrong slot order or a wrong mask position fails here.
"""

from __future__ import annotations

import json

import pytest

from xendbg.abi import get_abi
from xendbg.decode.bounce import BounceFrame, decode_bounce_frame, error_code_vectors
from xendbg.errors import DecodeError, UnreadableMemory, UsageError
from xendbg.render import json as render_json
from xendbg.render import text as render_text
from xendbg.target import InMemoryTarget

SP32 = 0xC0FFEFE0
SP64 = 0xFFFF8800_0010_0F80
IF, VM = 0x200, 0x20000


def stack(width: int, sp: int, *slots: int) -> InMemoryTarget:
    """A target whose memory holds exactly `slots` (lowest address first) at `sp`, nothing else."""
    size = width // 8
    return InMemoryTarget({}, [(sp, b"".join(v.to_bytes(size, "little") for v in slots))])


def decode(version: str, width: int, kind: str, *slots: int, vector: int | None = None, **kw) -> BounceFrame:
    sp = SP32 if width == 32 else SP64
    return decode_bounce_frame(stack(width, sp, *slots), get_abi(version, width), kind, sp, vector, **kw)


def names(frame: BounceFrame) -> list[str]:
    return [name for name, _ in frame.fields]


# --- Xen 2.0, 32-bit ---------------------------------------------------------------------------

def test_2_0_page_fault_pushes_cr2_below_the_error_code():
    f = decode("2.0", 32, "trap", 0x600000, 0x2, 0xC0101234, 0x0819, 0x246, vector=14)
    assert names(f) == ["cr2", "error_code", "eip", "cs", "eflags"]
    assert (f.cr2, f.error_code, f.ip, f.cs, f.rpl) == (0x600000, 2, 0xC0101234, 0x0819, 1)
    assert f.cs_name == "FLAT_RING1_CS" and f.vector_name == "#PF"
    assert f.guest_mode == "kernel" and not f.from_user and f.ring == 1
    assert f.sp is None and f.ss is None  # same-ring delivery: no stack switch
    assert f.saved_upcall_mask is None and f.events_masked is None  # 2.0 saves no mask
    assert f.size == 20 and f.address == SP32


def test_2_0_failsafe_from_ring_3_has_segments_at_the_bottom_and_esp_ss_at_the_top():
    f = decode("2.0", 32, "failsafe", 0x0833, 0x0834, 0x0, 0x7B, 0x08048000, 0x082B, 0x202, 0xBFFFF000, 0x0833)
    assert names(f) == ["ds", "es", "fs", "gs", "eip", "cs", "eflags", "esp", "ss"]
    assert (f.ds, f.es, f.fs, f.gs) == (0x0833, 0x0834, 0, 0x7B)
    assert (f.ip, f.cs, f.sp, f.ss) == (0x08048000, 0x082B, 0xBFFFF000, 0x0833)
    assert f.from_user and f.ring == 3 and f.cs_name == "FLAT_RING3_CS"
    assert f.error_code is None and f.cr2 is None


def test_2_0_general_protection_has_an_error_code_but_no_cr2():
    f = decode("2.0", 32, "trap", 0x1A, 0xC0100100, 0x0819, 0x246, vector=13)
    assert names(f) == ["error_code", "eip", "cs", "eflags"] and f.error_code == 0x1A and f.cr2 is None


def test_forwarded_software_interrupt_has_no_error_code():
    # An `int $0xd` Xen forwards through the trap table (GTBF_TRAP_NOCODE / TBF_EXCEPTION only).
    f = decode("2.0", 32, "trap", 0xC0100102, 0x082B, 0x202, 0xBFFFF000, 0x0833, vector=13, has_error_code=False)
    assert f.error_code is None and f.ip == 0xC0100102 and f.from_user


def test_2_0_event_cs_upper_bits_are_not_a_mask():
    f = decode("2.0", 32, "event", 0xC0100200, 0x00FF0819, 0x246)
    assert f.cs == 0x0819 and f.saved_upcall_mask is None
    assert any("does not save the old mask" in n for n in f.notes)


# --- Xen 3.0 / 4.0, 32-bit: saved_upcall_mask in CS bits 16-23 -----------------------------------

@pytest.mark.parametrize("version", ["3.0", "3.0.2", "3.0.3", "4.0", "4.17", "4.22"])
def test_32_bit_event_carries_saved_upcall_mask(version):
    # Bits 24-31 hold the padding byte after evtchn_upcall_mask: not part of the mask.
    f = decode(version, 32, "event", 0xC0100300, 0xAB01E019, 0x046)
    assert f.cs == 0xE019 and f.rpl == 1 and f.cs_name == "FLAT_RING1_CS"
    assert f.saved_upcall_mask == 1 and f.events_masked is True and not f.interrupt_flag
    assert f.guest_mode == "kernel" and f.sp is None and f.size == 12


def test_3_0_event_with_events_enabled():
    f = decode("3.0", 32, "event", 0xC0100300, 0xE019, 0x246)
    assert f.saved_upcall_mask == 0 and f.events_masked is False and f.interrupt_flag


def test_3_0_page_fault_has_no_cr2_on_the_stack():
    f = decode("3.0", 32, "trap", 0x0, 0xC0100400, 0x1E019, 0x046, vector=14)
    assert names(f) == ["error_code", "eip", "cs", "eflags"]
    assert f.cr2 is None and f.error_code == 0 and f.saved_upcall_mask == 1
    assert any("vcpu_info.arch.cr2" in n for n in f.notes)


def test_4_0_general_protection_from_ring_3():
    f = decode("4.0", 32, "trap", 0x10, 0x08048010, 0xE02B, 0x202, 0xBFFFE000, 0xE033, vector=13)
    assert names(f) == ["error_code", "eip", "cs", "eflags", "esp", "ss"]
    assert (f.error_code, f.ip, f.sp, f.ss) == (0x10, 0x08048010, 0xBFFFE000, 0xE033)
    assert f.from_user and f.ring == 3 and f.saved_upcall_mask == 0


def test_3_0_failsafe_from_kernel():
    # x86_32 create_bounce_frame copies whole cpu_user_regs dwords: the selector's padding comes along.
    f = decode("3.0", 32, "failsafe", 0x5A5AE021, 0xE021, 0x0, 0x0, 0xC0100500, 0xE019, 0x246)
    assert names(f) == ["ds", "es", "fs", "gs", "eip", "cs", "eflags"]
    assert f.ds == 0xE021 and dict(f.fields)["ds"] == 0x5A5AE021
    assert f.ip == 0xC0100500 and f.saved_upcall_mask == 0


def test_3_0_vm86_interruption_adds_the_cpu_vm86_segments():
    f = decode("3.0", 32, "event", 0x1234, 0xF000, VM | IF, 0xFFFE, 0x9000, 0x1111, 0x2222, 0x3333, 0x4444)
    assert f.guest_mode == "vm86" and f.from_user and f.ring == 3
    assert names(f)[-4:] == ["vm86_es", "vm86_ds", "vm86_fs", "vm86_gs"]
    assert dict(f.fields)["vm86_ds"] == 0x2222 and (f.sp, f.ss) == (0xFFFE, 0x9000)


# --- 64-bit: RCX/R11 first, mask in CS bits 32-39, always RSP/SS --------------------------------

def test_4_17_64_bit_general_protection_from_guest_kernel():
    f = decode("4.17", 64, "trap", 0x1111, 0x2222, 0x18, 0xFFFFFFFF81000010, (1 << 32) | 0xE030, 0x046,
               0xFFFFC90000013F00, 0xE02B, vector=13)
    assert names(f) == ["rcx", "r11", "error_code", "rip", "cs", "rflags", "rsp", "ss"]
    assert (f.rcx, f.r11, f.error_code, f.ip) == (0x1111, 0x2222, 0x18, 0xFFFFFFFF81000010)
    assert f.cs == 0xE030 and f.rpl == 0 and f.cs_name == "FLAT_RING3_CS64"  # RPL cleared: kernel context
    assert f.guest_mode == "kernel" and f.ring == 3
    assert f.saved_upcall_mask == 1 and f.events_masked and not f.interrupt_flag
    assert (f.sp, f.ss) == (0xFFFFC90000013F00, 0xE02B) and f.size == 64


def test_4_17_64_bit_event_from_user():
    f = decode("4.17", 64, "event", 0x3, 0x4, 0x401000, 0xE033, 0x202, 0x7FFFFFFFE000, 0xE02B)
    assert names(f) == ["rcx", "r11", "rip", "cs", "rflags", "rsp", "ss"]
    assert f.from_user and f.rpl == 3 and f.error_code is None and f.saved_upcall_mask == 0


def test_64_bit_failsafe_segments_sit_between_r11_and_rip():
    f = decode("4.17", 64, "failsafe", 0x1, 0x2, 0x2B, 0x2B, 0x0, 0x63, 0x401000, 0xE033, 0x202,
               0x7FFFFFFFE000, 0xE02B)
    assert names(f) == ["rcx", "r11", "ds", "es", "fs", "gs", "rip", "cs", "rflags", "rsp", "ss"]
    assert (f.ds, f.es, f.fs, f.gs, f.ip) == (0x2B, 0x2B, 0, 0x63, 0x401000)


def test_3_0_64_bit_failsafe_mask_unknown_when_zero():
    slots = (0x1, 0x2, 0, 0, 0, 0, 0x401000, 0xE033, 0x202, 0x7FFFFFFFE000, 0xE02B)
    old = decode("3.0", 64, "failsafe", *slots)
    assert old.saved_upcall_mask is None and old.notes
    assert decode("3.0.3", 64, "failsafe", *slots).saved_upcall_mask == 0


def test_64_bit_syscall_frame_and_single_read():
    target = stack(64, SP64, 0x401234, 0x246, 0x401234, 0xE033, 0x246, 0x7FFFFFFFD000, 0xE02B)
    f = decode_bounce_frame(target, get_abi("4.17", 64), "syscall", SP64)
    assert f.ip == 0x401234 and f.from_user and f.rcx == 0x401234
    assert target.reads == 1


def test_error_code_vectors_by_generation():
    assert 21 in error_code_vectors(get_abi("4.17", 64)) and 21 not in error_code_vectors(get_abi("4.0", 64))
    f = decode("4.17", 64, "trap", 0, 0, 0x3, 0x401000, 0xE033, 0x202, 0x7FFFFFFFE000, 0xE02B, vector=21)
    assert f.error_code == 3 and f.vector_name == "#CP"


# --- Xen 2.0 fast trap: the CPU's frame ----------------------------------------------------------

def test_fast_trap_from_ring_3():
    f = decode("2.0", 32, "fasttrap", 0x08048020, 0x082B, 0x202, 0xBFFFF100, 0x0833, vector=0x80)
    assert names(f) == ["eip", "cs", "eflags", "esp", "ss"]
    assert f.from_user and f.ring == 3 and (f.sp, f.ss) == (0xBFFFF100, 0x0833)
    assert f.saved_upcall_mask is None and f.vector_name == "int 0x80" and f.interrupt_flag


def test_fast_trap_from_ring_1_has_no_stack_switch():
    f = decode("2.0", 32, "fasttrap", 0xC0100600, 0x0819, 0x202, vector=0x80)
    assert names(f) == ["eip", "cs", "eflags"] and f.guest_mode == "kernel"


def test_stack_pointer_defaults_to_the_register():
    target = stack(32, SP32, 0xC0100700, 0xE019, 0x246)
    target.registers["esp"] = SP32
    assert decode_bounce_frame(target, get_abi("4.0", 32), "event").ip == 0xC0100700


# --- what cannot be decoded ---------------------------------------------------------------------

def test_unreadable_stack():
    with pytest.raises(UnreadableMemory):
        decode_bounce_frame(InMemoryTarget(), get_abi("4.17", 64), "event", SP64)


def test_esp_ss_beyond_the_readable_stack():
    # The base of a ring-3 frame is readable but ESP/SS above it are not.
    with pytest.raises(UnreadableMemory):
        decode("4.0", 32, "event", 0x08048000, 0xE02B, 0x202)


@pytest.mark.parametrize("version,width,kind,vector,error", [
    ("3.0", 32, "fasttrap", 0x80, DecodeError),
    ("2.0", 64, "event", None, DecodeError),
    ("4.17", 32, "syscall", None, DecodeError),
    ("4.17", 64, "trap", None, UsageError),
    ("4.17", 64, "event", 14, UsageError),
    ("4.17", 64, "interrupt", None, UsageError),
])
def test_refused(version, width, kind, vector, error):
    with pytest.raises(error):
        decode_bounce_frame(InMemoryTarget(), get_abi(version, width), kind, 0x1000, vector)


# --- renderers ------------------------------------------------------------------------------------

def test_renderers():
    f = decode("3.0", 32, "trap", 0x0, 0xC0100400, 0x1E019, 0x046, vector=14)
    out = render_text.to_string(render_text.bounce_frame(f), width=140)
    assert "trap frame for vector 0xe (#PF) at 0xc0ffefe0" in out
    assert "0xc0ffefe8  cs" in out and "0xe019 (FLAT_RING1_CS, RPL 1), saved_upcall_mask 1" in out
    assert "events were masked" in out and "vcpu_info.arch.cr2" in out
    obj = json.loads(render_json.dumps(render_json.bounce_frame(f)))
    assert obj["type"] == "bounce_frame" and obj["saved_upcall_mask"] == 1 and obj["cr2"] is None
    assert [s["name"] for s in obj["fields"]] == ["error_code", "eip", "cs", "eflags"]
    assert obj["fields"][2] == {"address": SP32 + 8, "name": "cs", "value": 0x1E019}


# --- what each refusal and each frame's source say, word for word ------------------------------------

@pytest.mark.parametrize("version,width,kind,vector,error,message", [
    ("3.0", 32, "fasttrap", 0x80, DecodeError, "Xen 3.0 has no fast traps (set_fast_trap went in 3.0)"),
    ("2.0", 64, "event", None, DecodeError, "Xen 2.0 runs no 64-bit PV guests (x86_64/entry.S is empty at "
                                            "RELEASE-2.0.0)"),
    ("4.17", 32, "syscall", None, DecodeError, "only 64-bit PV guests get a bounce frame for syscall "
                                               "(x86_64/entry.S)"),
    ("4.17", 64, "trap", None, UsageError, "a trap frame needs its vector (it says whether Xen pushed an error "
                                           "code)"),
    ("4.17", 64, "event", 14, UsageError, "event frames have no vector"),
    ("4.17", 64, "failsafe", 14, UsageError, "failsafe frames have no vector"),
    ("4.17", 64, "syscall", 14, UsageError, "syscall frames have no vector"),
    ("4.17", 64, "interrupt", None, UsageError, "unknown frame kind 'interrupt' (expected one of event, failsafe, "
                                                "trap, syscall, fasttrap)"),
])
def test_refusal_messages(version, width, kind, vector, error, message):
    with pytest.raises(error) as info:
        decode_bounce_frame(InMemoryTarget(), get_abi(version, width), kind, 0x1000, vector)
    assert str(info.value) == message


def test_fast_trap_and_forced_error_code_frames():
    f = decode("2.0", 32, "fasttrap", 0xC0100102, 0x0819, 0x202, vector=0x80)
    assert f.error_code is None and f.source == "the CPU, through the IDT gate of set_fast_trap (traps.c)"
    f = decode("4.0", 32, "trap", 7, 0xC0100102, 0xE019, 0x202, vector=0x80, has_error_code=True)
    assert f.error_code == 7 and f.ip == 0xC0100102
    f = decode("4.0", 32, "trap", 0xC0100102, 0xE019, 0x202, vector=14, has_error_code=False)
    assert f.error_code is None and f.ip == 0xC0100102


def test_stack_pointer_register_by_width():
    from tests.unit.test_arch import StrictTarget

    for version, width, sp, frame in (("4.0", 32, SP32, (0xC0100700, 0xE019, 0x246)),
                                      ("4.17", 64, SP64, (0, 0, 0xFFFFFFFF81000000, 0xE033, 0x246, 0x1000, 0xE02B))):
        target = StrictTarget({"esp" if width == 32 else "rsp": sp},
                              [(sp, b"".join(v.to_bytes(width // 8, "little") for v in frame))])
        assert decode_bounce_frame(target, get_abi(version, width), "event").address == sp


@pytest.mark.parametrize("version,width,kind,source", [
    ("2.0", 32, "event", "x86_32/entry.S create_bounce_frame"),
    ("3.0", 32, "failsafe", "x86_32/entry.S create_bounce_frame"),
    ("4.0", 32, "event", "x86_32/entry.S create_bounce_frame (x86_64/compat/entry.S on a 64-bit Xen)"),
    ("4.17", 32, "event", "x86_64/compat/entry.S compat_create_bounce_frame"),
    ("4.17", 32, "failsafe", "domain.c load_segments"),
    ("3.0", 64, "event", "x86_64/entry.S create_bounce_frame"),
    ("4.0", 64, "failsafe", "x86_64/entry.S create_bounce_frame or domain.c load_segments"),
    ("4.22", 64, "failsafe", "domain.c load_segments"),
    ("4.22", 64, "syscall", "x86_64/entry.S create_bounce_frame"),
])
def test_frame_sources(version, width, kind, source):
    sp = SP32 if width == 32 else SP64
    target = stack(width, sp, *([0xC0100000, 0xE019, 0x202, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0] if width == 32 else
                                [0] * 16))
    assert decode_bounce_frame(target, get_abi(version, width), kind, sp).source == source


def test_frame_fields_and_notes_word_for_word():
    f = decode("2.0", 32, "fasttrap", 0x08048020, 0x082B, 0x202, 0xBFFFF100, 0x0833, vector=0x80)
    assert (f.guest_mode, f.generation, f.tag, f.eflags, f.error_code) == ("user", "2.0", "RELEASE-2.0.0", 0x202,
                                                                            None)
    assert f.notes == ("a fast trap enters the handler through a real IDT gate: the CPU built this frame",)
    f = decode("2.0", 32, "event", 0xC0100600, 0x0819, 0x202)
    assert f.notes == ("Xen 2.0 masks events before delivering one and does not save the old mask",)
    f = decode("2.0", 32, "trap", 0x2, 0xC0101234, 0x0819, 0x246, vector=13)
    assert f.notes == ()
    f = decode("4.0", 32, "trap", 0x2, 0xC0101234, 0xE019, 0x246, vector=14)
    assert f.notes == ("the faulting address is in vcpu_info.arch.cr2, not on the stack",)
    assert decode("4.0", 32, "trap", 0x2, 0xC0101234, 0xE019, 0x246, vector=13).notes == ()
    assert decode("4.0", 32, "event", 0xC0101234, 0xE019, 0x246).notes == ()
    f = decode("4.17", 64, "event", 0x3, 0x4, 0x401000, 0xE033, 0x202, 0x7FFFFFFFE000, 0xE02B)
    assert (f.guest_mode, f.ring, f.cs_name) == ("user", 3, "FLAT_RING3_CS64")
    f = decode("4.17", 64, "event", 0x3, 0x4, 0xFFFFFFFF81000000, 0xE030, 0x202, 0xFFFFC90000001000, 0xE02B)
    assert (f.guest_mode, f.cs_name) == ("kernel", "FLAT_RING3_CS64")  # RPL 0 in the frame: the kernel
    f = decode("4.17", 64, "event", 0x3, 0x4, 0xFFFFFFFF81000000, 0xE034, 0x202, 0xFFFFC90000001000, 0xE02B)
    assert f.cs_name is None  # an LDT selector is not Xen's flat one
    old = decode("3.0", 64, "failsafe", 0x1, 0x2, 0, 0, 0, 0, 0x401000, 0xE033, 0x202, 0x7FFFFFFFE000, 0xE02B)
    assert old.notes == ("Xen 3.0.0-3.0.2 load_segments() builds this frame without the upcall mask (CS bits 32-39 "
                         "read 0, RFLAGS.IF is the real one)",)


def test_only_64_bit_frames_name_a_kernel_cs_by_its_raised_rpl():
    # 64-bit: Xen clears the RPL of a kernel frame's CS; 0xe030 is the kernel's FLAT_RING3_CS64.
    assert decode("4.17", 64, "event", 0, 0, 0x1000, 0xE031, 0x202, 0x2000, 0xE02B).cs_name is None
    assert decode("4.0", 32, "event", 0xC0100000, 0xE028, 0x246).cs_name is None  # not FLAT_RING3_CS (0xe02b)

"""The session core (xendbg/session.py): the ABI chosen from evidence, with its reason, warning and
candidates; settings; where a stopped vCPU stands (`decode_here`), over InMemoryTarget."""

from __future__ import annotations

import pytest

from tests.unit.images import pack, registers, stub
from xendbg import arch
from xendbg.abi import GENERATIONS, NEWEST, get_abi
from xendbg.abi.layouts import ERA_2, ERA_3
from xendbg.errors import XendbgError
from xendbg.session import (
    AbiChoice,
    Evidence,
    NoSymbols,
    Session,
    annotate,
    choose_generation,
    note_generation,
    selector_era,
    where,
    xen_image_version,
)
from xendbg.target import InMemoryTarget

PC = 0x7000
ALL_NEWEST_FIRST = ("4.22", "4.20", "4.17", "4.0", "3.0.3", "3.0.2", "3.0", "2.0")
FROM_3_0_NEWEST_FIRST = ALL_NEWEST_FIRST[:-1]
XEN_CS = 0xE008  # Xen's own ring-0 code selector: the vCPU is in Xen


class Symbols:
    """A Symbols over a dict of name -> address (a function's start)."""

    def __init__(self, **addresses: int) -> None:
        self.addresses = addresses

    def symbol_at(self, address: int) -> tuple[str, int] | None:
        best = None
        for name, start in self.addresses.items():
            if start <= address < start + 0x100 and (best is None or start > best[1]):
                best = (name, start)
        return None if best is None else (best[0], address - best[1])

    def address_of(self, name: str) -> int | None:
        return self.addresses.get(name)


# --- choose_generation: the order of evidence ----------------------------------------------------------


def test_no_evidence_guesses_the_newest_and_says_so():
    choice = choose_generation("auto", Evidence())
    assert choice.generation == NEWEST == "4.22"
    assert choice.reason == "guessed: no evidence of the Xen version"
    assert choice.warning is not None
    assert "xendbg has no evidence" in choice.warning and "`set xen abi VERSION` settles it" in choice.warning
    assert choice.candidates == ALL_NEWEST_FIRST == tuple(reversed(GENERATIONS))
    assert choice.guessed
    (finding,) = choice.findings()
    assert (finding.rule, finding.severity, finding.subject) == ("abi-evidence", "warning", "abi")
    assert finding.message == choice.warning


@pytest.mark.parametrize("cs", [0xE019, 0xE021, 0xE02B, 0xE033, 0xE023])
def test_a_3_0_selector_only_bounds_the_generation(cs):
    choice = choose_generation("auto", Evidence(), cs)
    assert choice.generation == "4.22"
    assert choice.reason.startswith(f"guessed: the guest's CS {cs:#06x} say")
    assert "Xen 3.0 or later" in choice.reason
    assert choice.warning is not None and "the Xen version is a guess" in choice.warning
    assert "sched_op before 3.0.2" in choice.warning
    assert choice.candidates == FROM_3_0_NEWEST_FIRST  # 2.0 is ruled out, newest first


@pytest.mark.parametrize("cs", [0x0819, 0x082B, 0x0821, 0x0833])
def test_a_2_0_selector_names_2_0(cs):
    choice = choose_generation("auto", Evidence(), cs)
    assert choice == AbiChoice("2.0", f"from the guest's CS {cs:#06x}", None, ("2.0",))
    assert not choice.guessed and choice.findings() == ()


@pytest.mark.parametrize("cs", [0x0010, 0x0073, 0xE008, 0x0823])
def test_selectors_of_no_single_era_are_no_evidence(cs):
    # 0x0823 is only in 2.0's x86_64 header, whose guests never ran: it is not counted.
    assert choose_generation("auto", Evidence(), cs) == choose_generation("auto", Evidence())


def test_a_reported_version_wins_over_everything_else_and_conflicts_are_warned():
    evidence = Evidence(reported=("4.17", "returned on cpu 0"), xen_image="3.2",
                        guest_note=("2.0", "ELF note XEN_VERSION"), hypercall_page="0xc0001000")
    choice = choose_generation("auto", evidence, 0x0819)
    assert choice.generation == "4.17"
    assert choice.reason == "from xen_version() = 4.17, returned on cpu 0"
    assert choice.candidates == ("4.17",)
    warning = choice.warning or ""
    assert warning.startswith("conflicting evidence about the Xen version: from xen_version() = 4.17")
    # Every disagreeing piece is named, in the documented order.
    parts = ["from Xen's image: Xen 3.2", "from the guest's ELF note XEN_VERSION '2.0'", "from the guest's CS 0x0819"]
    positions = [warning.index(p) for p in parts]
    assert positions == sorted(positions)
    assert "Xen 4.17 (the first in its order of evidence)" in warning
    assert "hypercall page" not in warning  # a page says 3.0 or later: it agrees with 4.17


def test_consistent_evidence_gives_no_warning():
    evidence = Evidence(reported=("4.17.3", "trace"), xen_image="4.17", guest_note=("xen-3.0", "note"),
                        hypercall_page="0x1000")
    choice = choose_generation("auto", evidence, 0xE033)
    assert (choice.generation, choice.warning, choice.candidates) == ("4.17", None, ("4.17",))


def test_xen_image_comes_second():
    choice = choose_generation("auto", Evidence(xen_image="3.0.4"), 0x0819)
    assert choice.generation == "3.0.3" and choice.reason == "from Xen's image: Xen 3.0.4"
    assert "from the guest's CS 0x0819" in (choice.warning or "")


def test_a_2_0_note_is_exact_and_a_3_0_selector_contests_it():
    choice = choose_generation("auto", Evidence(guest_note=("2.0", "__xen_guest XEN_VER")), 0xE019)
    assert choice.generation == "2.0"
    assert choice.reason == "from the guest's __xen_guest XEN_VER '2.0'"
    assert "the guest's CS 0xe019 (Xen 3.0 or later)" in (choice.warning or "")


def test_a_2_0_selector_is_contested_by_a_hypercall_page():
    choice = choose_generation("auto", Evidence(hypercall_page="0xc0001000 (vmlinux)"), 0x0819)
    assert choice.generation == "2.0"
    assert "its hypercall page at 0xc0001000 (vmlinux) (Xen 3.0 or later)" in (choice.warning or "")


def test_lower_bounds_are_listed_in_order_and_the_newest_is_guessed():
    evidence = Evidence(guest_note=("xen-3.0", "ELF note XEN_VERSION"), hypercall_page="0xc0001000")
    choice = choose_generation("auto", evidence, 0xE019)
    assert choice.generation == "4.22"
    assert choice.reason == ("guessed: the guest's ELF note XEN_VERSION 'xen-3.0', the guest's CS 0xe019, "
                             "its hypercall page at 0xc0001000 say Xen 3.0 or later, not which")
    assert choice.candidates == FROM_3_0_NEWEST_FIRST


def test_an_unparsable_note_is_ignored():
    assert choose_generation("auto", Evidence(guest_note=("linux", "note"))) == choose_generation("auto", Evidence())


def test_set_by_hand_wins_and_warns_only_when_evidence_disagrees():
    assert choose_generation("3.0", Evidence()) == AbiChoice("3.0", "set by hand", None, ("3.0",))
    # A lower bound of 3.0 does not contest 4.17, an exact 4.17 agrees.
    agreeing = Evidence(reported=("4.17", "x"), hypercall_page="0x1000")
    assert choose_generation("4.17", agreeing, 0xE033).warning is None
    against = choose_generation("4.17", Evidence(xen_image="4.0"), 0x0819)
    assert against.generation == "4.17" and against.reason == "set by hand" and against.candidates == ("4.17",)
    assert against.warning == ("decoding with Xen 4.17 as set by hand, but the evidence disagrees: "
                               "from Xen's image: Xen 4.0; from the guest's CS 0x0819")
    old = choose_generation("2.0", Evidence(hypercall_page="0x1000"))
    assert old.warning == ("decoding with Xen 2.0 as set by hand, but the evidence disagrees: "
                           "its hypercall page at 0x1000 (Xen 3.0 or later)")


def test_evidence_naming_no_known_xen_is_ignored_not_fatal():
    # A xen_version result or an image that names no Xen xendbg knows must not stop every command.
    bogus = Evidence(reported=("0.1", "returned on cpu 0"), xen_image="1.9")
    assert choose_generation("auto", bogus, 0x0819).generation == "2.0"
    assert choose_generation("auto", bogus) == choose_generation("auto", Evidence())
    session = Session()
    session.saw_version(1, "returned on cpu 0")
    assert session.generation() == NEWEST


def test_note_generation_and_selector_era():
    assert note_generation("2.0") == ("2.0", True)
    assert note_generation(" xen-3.0 ") == ("3.0", False)
    assert note_generation("XEN-4.17") == ("4.17", False)
    assert note_generation("generic") is None
    assert note_generation("1.0") is None
    assert selector_era(0x0819) == ERA_2 and selector_era(0x082B) == ERA_2
    assert selector_era(0xE019) == ERA_3 and selector_era(0xE033) == ERA_3 and selector_era(0xE023) == ERA_3
    assert selector_era(0x1_0819) == ERA_2  # only the selector's 16 bits count
    assert selector_era(0x0823) is None and selector_era(0xE008) is None and selector_era(0x0010) is None


def test_xen_image_version_reads_both_functions():
    code = {"xen_major_version": bytes.fromhex("b804000000c3"), "xen_minor_version": bytes.fromhex("b811000000c3")}
    assert xen_image_version(code.get) == "4.17"
    assert xen_image_version({"xen_major_version": code["xen_major_version"]}.get) is None
    assert xen_image_version(lambda name: b"\x31\xc0\xc3") is None  # xor %eax,%eax: not a mov $N
    assert xen_image_version(lambda name: b"") is None
    assert arch.mov_eax_immediate(bytes.fromhex("b8040000")) is None  # too short for an imm32
    assert arch.mov_eax_immediate(bytes.fromhex("b8ffffffff")) == 0xFFFFFFFF


# --- the Session ----------------------------------------------------------------------------------------


def test_saw_version_splits_major_and_minor_and_ignores_errors():
    session = Session()
    session.saw_version(-38, "returned on cpu 0")
    session.saw_version(0, "returned on cpu 0")
    assert session.evidence.reported is None
    session.saw_version(0x40011, "returned on cpu 1")
    assert session.evidence.reported == ("4.17", "returned on cpu 1")
    assert session.choice().reason == "from xen_version() = 4.17, returned on cpu 1"
    session.saw_version(0x20000, "trace")
    assert session.generation() == "2.0"


def test_a_flat_selector_seen_is_remembered_and_others_are_not():
    session = Session()
    assert session.choice(0x0819).generation == "2.0"
    assert session.evidence.code_selector == 0x0819
    assert session.choice(0x0010).generation == "2.0"  # not a flat selector: the last one stays
    assert session.choice().generation == "2.0"
    assert session.choice(0xE019).generation == NEWEST
    assert session.evidence.code_selector == 0xE019


def test_settings_width_and_abi():
    session = Session()
    assert session.forced_width() is None
    abi, choice = session.abi(64)
    assert (abi.generation, abi.width, choice.generation) == (NEWEST, 64, NEWEST)
    session.settings.width = "32"
    session.settings.abi = "3.0"
    assert session.forced_width() == 32
    abi, choice = session.abi(64)
    assert (abi.generation, abi.width, choice.reason) == ("3.0", 32, "set by hand")
    assert session.abi_for_width(64) == get_abi("3.0", 32)
    assert session.candidate_abis(64) == [get_abi("3.0", 32)]


def test_candidate_abis_follow_the_candidates_in_order():
    session = Session()
    session.choice(0xE033)
    assert [(a.generation, a.width) for a in session.candidate_abis(64)] == [(g, 64) for g in FROM_3_0_NEWEST_FIRST]
    session.settings.width = "32"
    assert {a.width for a in session.candidate_abis(64)} == {32}


@pytest.mark.parametrize("cs,width", [(0xE033, 64), (0xE019, 32), (0x0819, 32), (0xE023, 32), (XEN_CS, None)])
def test_guest_width_from_the_code_selector(cs, width):
    target = InMemoryTarget({"cs": cs})
    assert Session().guest_width(target) == width
    forced = Session()
    forced.settings.width = "64"
    assert forced.guest_width(target) == 64


def test_current_abi_uses_the_vcpus_selector_as_evidence():
    session = Session()
    abi, choice = session.current_abi(InMemoryTarget({"cs": 0x0819}))
    assert (abi.generation, abi.width, choice.reason) == ("2.0", 32, "from the guest's CS 0x0819")
    assert session.evidence.code_selector == 0x0819
    # Xen 2.0 (from that selector) had one guest width: the hint names only it
    with pytest.raises(XendbgError, match=r"^the selected vCPU is in Xen \(ring 0\) at do_foo, not in the guest "
                                          r"\(set xen width 32 to"):
        session.current_abi(InMemoryTarget({"cs": XEN_CS}), "at do_foo")
    with pytest.raises(XendbgError, match=r"^the selected vCPU is in Xen \(ring 0\), not"):
        session.current_abi(InMemoryTarget({"cs": XEN_CS}))
    session.settings.width = "32"
    abi, _ = session.current_abi(InMemoryTarget({"cs": XEN_CS}))  # forced: the ring-0 CS is not evidence
    assert (abi.generation, abi.width) == ("2.0", 32)


def test_annotate_adds_the_reason_and_the_warning_once():
    target = InMemoryTarget(registers(64, 17, 0, 0, pc=PC), [(PC, stub(64, 17))])
    from xendbg.decode import decode_pending

    hc = decode_pending(target, get_abi("4.17", 64))
    sure = annotate(hc, AbiChoice("4.17", "set by hand", None, ("4.17",)))
    assert sure.abi_reason == "set by hand" and sure.findings == hc.findings
    guessed = annotate(hc, choose_generation("auto", Evidence()))
    assert guessed.abi_reason == "guessed: no evidence of the Xen version"
    assert [f.rule for f in guessed.findings] == [f.rule for f in hc.findings] + ["abi-evidence"]


# --- decode_here -------------------------------------------------------------------------------------


def test_decode_here_in_the_guest_uses_its_selector():
    regs = registers(32, 17, 0, 0, pc=PC) | {"cs": 0x0819}
    session = Session()
    hc = session.decode_here(InMemoryTarget(regs, [(PC, stub(32, 17))]), NoSymbols(), 0)
    assert (hc.name, hc.generation, hc.width) == ("xen_version", "2.0", 32)
    assert hc.abi_reason == "from the guest's CS 0x0819"
    assert all(f.rule != "abi-evidence" for f in hc.findings)


def test_decode_here_under_a_guess_carries_the_warning():
    target = InMemoryTarget(registers(64, 29, 0, 0, pc=PC), [(PC, stub(64, 29))])
    hc = Session().decode_here(target, NoSymbols(), 0)
    assert (hc.name, hc.generation) == ("sched_op", NEWEST)
    assert hc.abi_reason.startswith("guessed: the guest's CS 0xe033")
    assert [f.subject for f in hc.findings if f.rule == "abi-evidence"] == ["abi"]


def test_decode_here_changes_no_registered_state():
    abi = get_abi("4.17", 64)
    table = pack(abi, "trap_info", vector=14, cs=0xE033, address=0xFFFFFFFF81000E00) + pack(abi, "trap_info")
    target = InMemoryTarget(registers(64, 0, 0x9000, pc=PC), [(PC, stub(64, 0)), (0x9000, table)])
    session = Session()
    for _ in range(2):
        hc = session.decode_here(target, NoSymbols(), 3)
        assert hc.name == "set_trap_table"
    assert not session.state(3).seen_anything and session.state(3).trap_table == {}


def test_decode_here_at_a_xen_handler_uses_its_prefix_for_the_width():
    symbols = Symbols(do_xen_version=0xFFFF82D040200000, compat_xen_version=0xFFFF82D040300000)
    session = Session()
    native = InMemoryTarget({"cs": XEN_CS, "rip": 0xFFFF82D040200000, "pc": 0xFFFF82D040200000,
                             "rdi": 0, "rsi": 0, "rdx": 0, "rcx": 0, "r8": 0})
    hc = session.decode_here(native, symbols, 0)
    assert (hc.name, hc.width, hc.generation) == ("xen_version", 64, NEWEST)
    assert hc.site == "in Xen at do_xen_version() (C arguments)"
    assert hc.abi_reason.startswith("guessed")
    compat = InMemoryTarget(native.registers | {"rip": 0xFFFF82D040300000, "pc": 0xFFFF82D040300000})
    assert session.decode_here(compat, symbols, 0).width == 32


def test_decode_here_at_pv_hypercall_reads_the_saved_frame():
    abi = get_abi("4.17", 64)
    frame = pack(abi, "cpu_user_regs", rax=17, rdi=0, rsi=0, rip=0xFFFFFFFF81001008, cs=0xE033,
                 rsp=0xFFFFC90000003F00)
    entry = 0xFFFF82D040380000
    target = InMemoryTarget({"cs": XEN_CS, "pc": entry, "rip": entry, "rdi": 0x5000}, [(0x5000, frame)])
    session = Session()
    hc = session.decode_here(target, Symbols(pv_hypercall=entry), 0)
    assert (hc.name, hc.width) == ("xen_version", 64)
    assert "guest PC 0xffffffff81001008" in hc.site
    assert session.evidence.code_selector == 0xE033  # the frame's selector is evidence


def test_decode_here_at_the_int82_gate_found_from_the_idt():
    handler, sp = 0xFFFF82D040390000, 0xFFFF830000007F00
    frame = b"".join(v.to_bytes(8, "little") for v in (0xC0001007, 0x0819, 0x246, 0xC0FFEF00, 0x0821))
    regs = {"cs": XEN_CS, "pc": handler, "rip": handler, "rsp": sp, "rax": 17, "rbx": 0, "rcx": 0, "rdx": 0,
            "rsi": 0, "rdi": 0}
    session = Session()
    session.gate_handlers.add(handler)
    hc = session.decode_here(InMemoryTarget(regs, [(sp, frame)]), NoSymbols(), 0)
    assert (hc.name, hc.width, hc.generation) == ("xen_version", 32, "2.0")
    assert hc.abi_reason == "from the guest's CS 0x0819"
    assert hc.site == f"in Xen at {arch.XEN_GATE_ENTRY} (IDT), from the guest's registers (returns to 0xc0001007)"
    assert session.evidence.code_selector == 0x0819


def test_decode_here_in_xen_elsewhere_says_where_and_what_is_missing():
    pc = 0xFFFF82D040200004
    target = InMemoryTarget({"cs": XEN_CS, "pc": pc})
    with pytest.raises(XendbgError) as err:
        Session().decode_here(target, Symbols(do_xen_version=pc - 4), 0)
    message = str(err.value)
    assert message.startswith(f"no pending hypercall: the selected vCPU is in Xen at {pc:#x} <do_xen_version+4>, "
                              f"not at the entry of a hypercall handler")
    assert message.endswith("; load Xen's symbols (xen-syms) to decode inside Xen")
    with pytest.raises(XendbgError) as err:
        Session().decode_here(target, Symbols(schedule=pc, pv_hypercall=0x1000), 0)
    assert str(err.value).endswith(f"{arch.XEN_HYPERCALL_ENTRY}") and "<schedule>" in str(err.value)


def test_where_formats_the_symbol():
    target = InMemoryTarget({"pc": 0x1010})
    assert where(target, NoSymbols()) == "at 0x1010"
    assert where(target, Symbols(f=0x1000)) == "at 0x1010 <f+16>"
    assert where(target, Symbols(f=0x1010)) == "at 0x1010 <f>"


def test_xen_2_0_refuses_a_64_bit_vcpu_instead_of_decoding_with_an_abi_no_xen_had():
    session = Session()
    session.settings.abi = "2.0"
    with pytest.raises(XendbgError, match=r"^Xen 2.0 had no 64-bit PV guests \(64-bit PV came with Xen 3.0\), but "
                                          r"the vCPU's CS 0xe033 says 64-bit PV guest \(ring 3\); xendbg decodes with "
                                          r"Xen 2.0 \(set by hand\): choose Xen 3.0 or later \(set xen abi in "
                                          r"gdb, --xen for xendbg core\)$"):
        session.current_abi(InMemoryTarget({"cs": 0xE033}))
    session.settings.width = "64"
    with pytest.raises(XendbgError, match=r"but set xen width 64; .*: choose Xen 3.0 or later .*, or set xen "
                                          r"width auto$"):
        session.current_abi(InMemoryTarget({"cs": 0xE019}))
    session.settings.width = "auto"  # with the width from CS, 2.0's one width decodes
    abi, _ = session.current_abi(InMemoryTarget({"cs": 0xE019}))
    assert (abi.generation, abi.width) == ("2.0", 32)


RESET = {"cs": 0xF000, "cr0": 0x60000010, "pc": 0xFFF0, "rip": 0xFFF0}  # QEMU started with -S


def test_a_vcpu_at_reset_is_in_real_mode_with_nothing_pending_and_not_in_xen():
    target = InMemoryTarget(RESET, [(0xFFF0, bytes.fromhex("ea5be000f0"))])  # SeaBIOS's ljmp $0xf000,$0xe05b
    session = Session()
    assert session.guest_width(target) is None
    with pytest.raises(XendbgError) as caught:
        session.decode_here(target, NoSymbols(), 0)
    assert str(caught.value) == ("no pending hypercall: the selected vCPU is in real mode, paging off (firmware or "
                                 "boot code) at 0xfff0, not in a PV guest")
    with pytest.raises(XendbgError, match=r"^the selected vCPU is in real mode, paging off \(firmware or boot code\), "
                                          r"not in the guest"):
        session.current_abi(target)

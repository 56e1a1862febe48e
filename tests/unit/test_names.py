"""Names a user types (xendbg/names.py): hypercalls over the candidate generations with their error
messages, completion, vectors."""

from __future__ import annotations

import pytest

from xendbg.errors import UsageError
from xendbg.names import (
    GENERATIONS,
    NEWEST,
    TRAP_VECTORS,
    VECTOR_NAMES,
    complete,
    hypercall_names,
    parse_vector,
    resolve_hypercall,
)

LISTING = "(`xendbg abi --xen {0}` lists them; add --width 32 for 32-bit guests)"


def test_generations_oldest_first():
    assert GENERATIONS == ("2.0", "3.0", "3.0.2", "3.0.3", "4.0", "4.17", "4.20", "4.22")
    assert NEWEST == "4.22"


@pytest.mark.parametrize("word,generations,name", [
    ("multicall", ("4.17",), "multicall"),
    ("__HYPERVISOR_multicall", ("4.17",), "multicall"),
    ("dom0_op", ("4.17",), "platform_op"),  # a former name gives today's
    ("sched_op", ("4.17",), "sched_op"),  # today's name wins over sched_op_compat's former one
    ("6", ("4.17",), "sched_op_compat"),
    ("6", ("3.0",), "sched_op"),
    ("0x30", ("4.17",), "mca"),  # __HYPERVISOR_arch_0 (arch-x86/xen-mca.h)
    ("49", ("4.17",), "paging_domctl_cont"),
    ("set_segment_base", ("4.17",), "set_segment_base"),  # 64-bit guests only: either width counts
    ("25", ("4.17",), "set_segment_base"),
    ("switch_vm86", ("3.0",), "switch_vm86"),  # 3.0's 32-bit guests only
    ("23", ("3.0",), "switch_to_user"),  # a number: the 64-bit name first
    # The chosen generation first, then the others the evidence allows.
    ("set_fast_trap", ("4.22", "4.17", "2.0"), "set_fast_trap"),
    ("16", ("4.22", "2.0"), "event_channel_op_compat"),
    ("16", ("2.0", "4.22"), "event_channel_op"),
])
def test_resolve_hypercall(word, generations, name):
    assert resolve_hypercall(word, generations) == name


def test_a_name_only_older_xen_has():
    with pytest.raises(UsageError) as err:
        resolve_hypercall("set_fast_trap", ("4.22", "4.17"), "guessed: no evidence of the Xen version")
    assert str(err.value) == ("Xen 4.22 (guessed: no evidence of the Xen version) has no hypercall "
                              "'set_fast_trap': only Xen 2.0 has it (set xen abi 2.0)")


def test_a_name_only_newer_xen_has_suggests_the_newest():
    with pytest.raises(UsageError) as err:
        resolve_hypercall("callback_op", ("3.0",))
    assert str(err.value) == ("Xen 3.0 has no hypercall 'callback_op': only Xen 3.0.3, 4.0, 4.17, 4.20, 4.22 have it "
                              "(set xen abi 4.22)")


def test_unknown_names_and_numbers():
    with pytest.raises(UsageError) as err:
        resolve_hypercall("frobnicate", ("4.17",), "set by hand")
    assert str(err.value) == ("Xen 4.17 (set by hand) has no hypercall 'frobnicate', and no other Xen has one "
                              + LISTING.format("4.17"))
    with pytest.raises(UsageError) as err:
        resolve_hypercall("999", ("4.22", "2.0"))
    assert str(err.value) == "Xen 4.22 has no hypercall number 999 " + LISTING.format("4.22")


def test_hypercall_names_for_completion():
    old = hypercall_names(("2.0",))
    new = hypercall_names(("4.17", "4.22"))
    assert old == sorted(old) and new == sorted(new)
    assert "set_fast_trap" in old and "set_fast_trap" not in new
    assert "set_segment_base" in new and "callback_op" in new and "callback_op" not in old
    assert set(hypercall_names(("2.0", "4.22"))) == set(old) | set(hypercall_names(("4.22",)))


def test_vector_names():
    assert VECTOR_NAMES["pf"] == 14 and VECTOR_NAMES["de"] == 0 and VECTOR_NAMES["nmi"] == 2
    assert VECTOR_NAMES["int80"] == VECTOR_NAMES["syscall80"] == 0x80
    assert "--" not in VECTOR_NAMES and "" not in VECTOR_NAMES
    assert len(VECTOR_NAMES) == len(TRAP_VECTORS) - 1 + 2  # vector 15 has no mnemonic


@pytest.mark.parametrize("word,vector", [("PF", 14), ("pf", 14), ("#GP", 13), ("#gp", 13), ("Int80", 0x80),
                                         ("0x82", 0x82), ("255", 255), ("0", 0)])
def test_parse_vector(word, vector):
    assert parse_vector(word, lambda text: int(text, 0)) == vector


@pytest.mark.parametrize("word,value", [("256", 256), ("-1", -1)])
def test_parse_vector_range(word, value):
    with pytest.raises(UsageError, match=rf"^vector {value} is out of range \(0-255\)$"):
        parse_vector(word, lambda text: int(text, 0))


def test_parse_vector_uses_the_front_ends_evaluator_for_anything_else():
    seen = []

    def number(text: str) -> int:
        seen.append(text)
        return 3

    assert parse_vector("$trapno", number) == 3 and seen == ["$trapno"]
    assert parse_vector("pf", number) == 14 and seen == ["$trapno"]


def test_complete_follows_the_users_case():
    vectors = sorted(VECTOR_NAMES)
    assert complete(vectors, "p") == ["pf"]
    assert complete(vectors, "P") == ["PF"]
    assert complete(vectors, "Pf") == ["pf"]  # mixed case: the candidates as they are
    assert complete(vectors, "") == vectors
    assert complete(["multicall", "mmu_update", "mmuext_op"], "mm") == ["mmu_update", "mmuext_op"]
    assert complete(["--guest", "--xen"], "--g") == ["--guest"]
    assert complete(["--guest", "--xen"], "x") == []
    assert complete(["b", "a", "A"], "a") == ["A", "a"]  # sorted, each once

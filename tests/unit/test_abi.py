"""The ABI tables: generation mapping and values cited from Xen's headers at each tag."""

from __future__ import annotations

import pytest

from xendbg.abi import GENERATIONS, errno_name, get_abi, resolve_generation
from xendbg.errors import UsageError


@pytest.mark.parametrize("version,generation", [
    ("2.0", "2.0"), ("2.0.7", "2.0"), ("3.0.0", "3.0"), ("3.0.1", "3.0"), ("3.0.2", "3.0.2"),
    ("3.0.4", "3.0.3"), ("3.2", "3.0.3"), ("3.4.3", "3.0.3"), ("4.0", "4.0"), ("4.16.5", "4.0"),
    ("4.17", "4.17"), ("4.19", "4.17"), ("4.19-rc1", "4.17"), ("4.20.1", "4.20"), ("xen-4.21.1", "4.20"),
        ("4.22", "4.22"),
    ("5.1", "4.22"), ("newest", "4.22"),
])
def test_version_maps_to_generation(version, generation):
    assert resolve_generation(version) == generation


@pytest.mark.parametrize("bad", ["1.0", "four", "", "4..1"])
def test_bad_versions_are_usage_errors(bad):
    with pytest.raises(UsageError):
        resolve_generation(bad)


# Values read from xen/include/public/xen.h at each tag (RELEASE-2.0.0, RELEASE-3.0.0,
# 3.0.2-branched, 3.0.3-branched, RELEASE-4.17.0).
@pytest.mark.parametrize("generation,name,nr", [
    ("2.0", "set_fast_trap", 11), ("2.0", "dom_mem_op", 12), ("2.0", "sched_op", 6),
    ("2.0", "event_channel_op", 16), ("3.0", "memory_op", 12), ("3.0", "vcpu_op", 24),
    ("3.0", "sched_op", 6), ("3.0.2", "sched_op", 29), ("3.0.2", "sched_op_compat", 6),
    ("3.0.2", "event_channel_op", 16), ("3.0.3", "event_channel_op", 32), ("3.0.3", "physdev_op", 33),
    ("3.0.3", "callback_op", 30), ("4.17", "hypfs_op", 42), ("4.17", "iret", 23), ("4.22", "multicall", 13),
])
def test_hypercall_numbers(generation, name, nr):
    hc = get_abi(generation, 32).hypercall_named(name)
    assert hc is not None and hc.nr == nr


def test_set_fast_trap_exists_only_in_2_0():
    assert get_abi("2.0", 32).hypercall(11).name == "set_fast_trap"
    for generation in GENERATIONS[1:]:
        assert get_abi(generation, 32).hypercall(11) is None
        assert not get_abi(generation, 32).has_fast_trap


def test_width_specific_hypercalls_and_signatures():
    assert get_abi("3.0", 32).hypercall(23).name == "switch_vm86"
    assert get_abi("3.0", 64).hypercall(23).name == "switch_to_user"
    assert len(get_abi("4.17", 32).hypercall(4).args) == 4  # set_callbacks with selectors
    assert len(get_abi("4.17", 64).hypercall(4).args) == 3
    assert [a.name for a in get_abi("2.0", 32).hypercall(6).args] == ["op"]


@pytest.mark.parametrize("width", [32, 64])
def test_x86_arch_slots(width):
    # arch-x86/xen-mca.h: __HYPERVISOR_mca is __HYPERVISOR_arch_0 (48); 49 (arch_1) is the hypervisor's
    # paging_domctl_cont from 4.5 (xen/arch/x86/include/asm/hypercall.h, RELEASE-4.17.0).
    abi = get_abi("4.17", width)
    assert abi.hypercall_named("mca").nr == 48 and abi.hypercall(48).name == "mca"
    assert "arch_0" in abi.hypercall(48).former_names
    assert abi.hypercall_named("paging_domctl_cont").nr == 49 and abi.hypercall_named("arch_1").nr == 49
    assert get_abi("4.0", width).hypercall(48).name == "mca" and get_abi("4.0", width).hypercall(49).name == "arch_1"
    assert get_abi("3.0.3", width).hypercall_named("mca") is None


@pytest.mark.parametrize("generation", [g for g in GENERATIONS if g != "2.0"])
def test_set_segment_base_is_64_bit_only(generation):
    assert get_abi(generation, 32).hypercall_named("set_segment_base") is None
    assert get_abi(generation, 32).hypercall(25) is None
    assert get_abi(generation, 64).hypercall(25).name == "set_segment_base"


def test_selector_policy_per_generation():
    assert get_abi("2.0", 32).rejects_bad_selectors and get_abi("3.0", 64).rejects_bad_selectors
    assert not get_abi("3.0.2", 32).rejects_bad_selectors
    assert (get_abi("4.17", 32).kernel_rpl, get_abi("4.17", 64).kernel_rpl) == (1, 3)
    assert get_abi("2.0", 32).kernel_cs == 0x0819 and get_abi("3.0", 32).kernel_cs == 0xE019
    assert get_abi("4.17", 64).kernel_cs == 0xE033


@pytest.mark.parametrize("generation,family,name,value", [
    ("2.0", "SCHEDOP", "SCHEDOP_shutdown", 2), ("2.0", "MMU", "MMU_MACHPHYS_UPDATE", 2),
    ("3.0", "MMU", "MMU_MACHPHYS_UPDATE", 1), ("2.0", "VIRQ", "VIRQ_TIMER", 1), ("4.17", "VIRQ", "VIRQ_TIMER", 0),
    ("3.0", "VCPUOP", "VCPUOP_is_up", 3), ("4.17", "CALLBACKTYPE", "CALLBACKTYPE_syscall32", 7),
    ("4.17", "UVMF", "UVMF_ALL", 4), ("4.17", "ELFNOTE", "XEN_ELFNOTE_HYPERCALL_PAGE", 2),
])
def test_enum_values(generation, family, name, value):
    enum = get_abi(generation, 64).enum(family)
    assert enum.values[name] == value


def test_layout_eras():
    assert get_abi("2.0", 32).layout("multicall_entry").size == 32
    assert get_abi("2.0", 32).layout("multicall_entry").field("args").count == 7
    assert get_abi("3.0", 32).layout("multicall_entry").field("args").count == 6
    assert get_abi("2.0", 32).layout("mmu_update").size == 8
    assert get_abi("3.0", 32).layout("mmu_update").size == 16


def test_errno_names():
    assert errno_name(-22) == "EINVAL" and errno_name(-38) == "ENOSYS" and errno_name(0) is None
    assert errno_name(-9999) is None

"""The generated struct layouts: every struct xendbg decodes exists where it is used, and the facts
the headers of each tag gave that the hand-copied tables had wrong."""

from __future__ import annotations

import pytest

from xendbg.abi import GENERATIONS, NEWEST, get_abi
from xendbg.abi.layouts import (
    ERA_2,
    ERA_3,
    GENERATION_LAYOUTS,
    LAYOUTS,
    field_size,
    generation_layout,
    layout,
    unpack,
)
from xendbg.decode.hypercall import _EVTCHN_STRUCTS
from xendbg.errors import DecodeError

# Sub-operations whose argument struct the decoders read, besides the event-channel ones.
SUBOP_STRUCTS = {
    ("VCPUOP", "VCPUOP_initialise"): "vcpu_guest_context",
    ("VCPUOP", "VCPUOP_set_singleshot_timer"): "vcpu_set_singleshot_timer",
    ("VCPUOP", "VCPUOP_register_vcpu_info"): "vcpu_register_vcpu_info",
    ("CALLBACKOP", "CALLBACKOP_register"): "callback_register",
    ("CALLBACKOP", "CALLBACKOP_unregister"): "callback_unregister",
    **{("EVTCHNOP", cmd): struct for cmd, struct in _EVTCHN_STRUCTS.items()},
}
CASES = [(g, w) for g in GENERATIONS for w in (32, 64)]


def _has(name: str, width: int, generation: str) -> bool:
    return (name, width, generation) in GENERATION_LAYOUTS


@pytest.mark.parametrize("generation,width", CASES)
def test_every_struct_a_hypercall_points_to_exists(generation, width):
    abi = get_abi(generation, width)
    used = {arg.kind.split(":", 1)[1] for hc in abi.hypercalls() for arg in hc.args if arg.kind.startswith("ptr:")}
    assert used, "some hypercall takes a struct pointer"
    assert {name for name in used if not _has(name, width, generation)} == set()
    if abi.hypercall_named("sched_op") and abi.hypercall_named("sched_op").signature == "sched_op":
        assert _has("sched_shutdown", width, generation)  # SCHEDOP_shutdown's argument


@pytest.mark.parametrize("generation,width", CASES)
def test_every_struct_a_sub_operation_reads_exists(generation, width):
    abi = get_abi(generation, width)
    for (family, value), struct in SUBOP_STRUCTS.items():
        if value in abi.enum(family).values:
            assert _has(struct, width, generation), f"{value} in {generation} reads {struct}"
    # The pre-3.0.3 evtchn_op holds each command's struct in its union.
    union = abi.layout("evtchn_op").field("u").count
    for cmd, struct in _EVTCHN_STRUCTS.items():
        if cmd in abi.enum("EVTCHNOP").values:
            assert abi.layout(struct).size <= union


@pytest.mark.parametrize("generation,width", CASES)
def test_nested_layouts_come_from_the_same_headers(generation, width):
    for (name, w, gen), lay in GENERATION_LAYOUTS.items():
        if (gen, w) != (generation, width):
            continue
        assert lay.generation == generation
        end = 0
        for f in lay.fields:
            if f.kind not in ("u8", "u16", "u32", "u64", "bytes"):
                assert _has(f.kind, width, generation), f"{name}.{f.name}"
            end = max(end, f.offset + f.count * field_size(f.kind, width, generation))
        assert end <= lay.size, name


def test_era_names_and_generation_names():
    assert layout("start_info", 32, ERA_3) == generation_layout("start_info", 32, NEWEST)
    assert layout("multicall_entry", 32, ERA_2) == generation_layout("multicall_entry", 32, "2.0")
    assert layout("start_info", 32, "3.0.2").size == 1104  # a generation name is that generation's
    assert LAYOUTS[("multicall_entry", 64, ERA_3)].field("result").offset == 8
    assert get_abi("3.0", 32).layout("start_info").size == 1104
    assert get_abi("4.0", 32).layout("start_info").size == 1112


def test_unpack_takes_nested_layouts_from_the_layouts_generation():
    lay = generation_layout("vcpu_guest_context", 32, "3.0")
    data = bytearray(lay.size)
    regs = lay.field("user_regs").offset
    data[regs + 32:regs + 36] = (0xC0001000).to_bytes(4, "little")  # eip
    trap = lay.field("trap_ctxt").offset + 14 * 8
    data[trap] = 14
    row = unpack(lay, bytes(data), 32, ERA_3)
    assert row["user_regs"]["eip"] == 0xC0001000  # type: ignore[index]
    assert row["trap_ctxt"][14]["vector"] == 14  # type: ignore[index]


# What the headers at each tag say where the hand-copied tables had reused a later layout.
def test_xen_2_0_event_channel_structs():
    # RELEASE-2.0.0 event_channel.h: bind_virq had no vcpu; close named the domain first.
    virq = generation_layout("evtchn_bind_virq", 32, "2.0")
    assert virq.size == 8 and [(f.name, f.offset) for f in virq.fields] == [("virq", 0), ("port", 4)]
    close = generation_layout("evtchn_close", 32, "2.0")
    assert close.field("port").offset == 4 and generation_layout("evtchn_close", 32, "3.0").field("port").offset == 0
    bind = generation_layout("evtchn_bind_interdomain", 32, "2.0")
    assert [f.name for f in bind.fields] == ["dom1", "dom2", "port1", "port2"]
    assert generation_layout("evtchn_op", 32, "2.0").field("u").offset == 8


def test_start_info_per_generation():
    two = generation_layout("start_info", 32, "2.0")  # memory_t words padded to 8 bytes, 256-byte cmd_line
    assert (two.size, two.field("shared_info").offset, two.field("cmd_line").count) == (320, 8, 256)
    three = generation_layout("start_info", 64, "3.0.3")  # first_p2m_pfn/nr_p2m_frames came in 4.0
    assert three.size == 1152 and "first_p2m_pfn" not in [f.name for f in three.fields]
    assert generation_layout("start_info", 64, "4.0").field("first_p2m_pfn").offset == 1152


@pytest.mark.parametrize("name,first", [
    ("sched_shutdown", "3.0.2"), ("callback_register", "3.0.3"), ("vcpu_set_singleshot_timer", "4.0"),
    ("vcpu_guest_context", "3.0"), ("mmuext_op", "3.0"), ("cpu_user_regs", "3.0"),
])
def test_structs_exist_from_the_tag_that_defines_them(name, first):
    for generation in GENERATIONS:
        expected = GENERATIONS.index(generation) >= GENERATIONS.index(first)
        assert _has(name, 32, generation) == expected, generation
    with pytest.raises(DecodeError):
        generation_layout(name, 32, "2.0")

"""Xen's trace event numbers and record payloads, as data.

Numbers: xen/include/public/trace.h at RELEASE-4.17.0 (the PV, scheduler and general classes are the
same at RELEASE-4.22.0).  Payload shapes: xen/arch/x86/pv/trace.c (PV traps, faults, emulation) and
xen/common/trace.c (hypercalls, lost records) at RELEASE-4.17.0.
"""

from __future__ import annotations

# Record header (struct t_rec): event in bits 0-27, extra-word count in bits 28-30, bit 31 = a TSC follows.
EVENT_MASK = 0x0FFFFFFF
EXTRA_SHIFT = 28
EXTRA_MAX = 7
CYCLES_FLAG = 1 << 31

# Classes (the high bits of an event) and the mask that turns the PV class on.
TRC_GEN = 0x0001F000
TRC_SCHED = 0x0002F000
TRC_PV = 0x0020F000
TRC_ALL = 0x0FFFF000
TRC_SCHED_MIN = 0x00021000
TRC_SCHED_CLASS = 0x00022000
TRC_SCHED_VERBOSE = 0x00028000
TRC_PV_ENTRY = 0x00201000
TRC_PV_SUBCALL = 0x00202000
TRC_64_FLAG = 0x100

LOST_RECORDS = TRC_GEN + 1
WRAP_BUFFER = TRC_GEN + 2
CPU_CHANGE = TRC_GEN + 3
HYPERCALL = TRC_PV_ENTRY + 1  # the old format: op only
HYPERCALL_V2 = TRC_PV_ENTRY + 13
SUBCALL = TRC_PV_SUBCALL + 14

# HYPERCALL_V2 / SUBCALL: extra word 0 is the op in bits 0-19 and, from bit 20, one 2-bit field per
# argument 0-5 (00 absent, 01 32-bit, 10 64-bit, 11 reserved); the present arguments follow in order.
OP_MASK = 0x000FFFFF
ARG_SHIFT = 20
ARG_ABSENT, ARG_32, ARG_64 = 0, 1, 2
MAX_ARGS = 6

# PV entry events (TRC_PV_ENTRY + n): a name and, for the 64-bit variant (| TRC_64_FLAG), the payload
# fields as (name, size in bytes) in order.  The 32-bit variants carry 32-bit addresses.
PV_EVENTS: dict[int, tuple[str, tuple[tuple[str, int], ...]]] = {
    1: ("hypercall", (("op", 4),)),
    3: ("trap", (("rip", 8), ("trap", 2), ("error_code", 2))),
    4: ("page_fault", (("rip", 8), ("addr", 8), ("error_code", 4))),
    5: ("forced_invalid_op", (("rip", 8),)),
    6: ("emulate_privop", (("rip", 8),)),
    7: ("emulate_4gb", (("rip", 8),)),
    8: ("math_state_restore", ()),
    9: ("paging_fixup", (("rip", 8), ("addr", 8))),
    10: ("gdt_ldt_mapping_fault", (("rip", 8), ("offset", 8))),
    11: ("ptwr_emulation", (("pte", 8), ("addr", 8), ("rip", 8))),
    12: ("ptwr_emulation_pae", (("pte", 8), ("addr", 4), ("rip", 4))),
    13: ("hypercall", ()),
}
PV_32BIT_FIELDS: dict[int, tuple[tuple[str, int], ...]] = {
    3: (("rip", 4), ("trap", 2), ("error_code", 2)),
    4: (("rip", 4), ("addr", 4), ("error_code", 4)),
    5: (("rip", 4),), 6: (("rip", 4),), 7: (("rip", 4),),
    9: (("rip", 4), ("addr", 4)),
    10: (("rip", 4), ("offset", 4)),
    11: (("pte", 8), ("addr", 4), ("rip", 4)),
    12: (("pte", 8), ("addr", 4), ("rip", 4)),
}

SCHED_EVENTS: dict[int, str] = {
    TRC_SCHED_MIN + 1: "runstate_change", TRC_SCHED_MIN + 2: "continue_running",
    TRC_SCHED_VERBOSE + 1: "dom_add", TRC_SCHED_VERBOSE + 2: "dom_rem", TRC_SCHED_VERBOSE + 3: "sleep",
    TRC_SCHED_VERBOSE + 4: "wake", TRC_SCHED_VERBOSE + 5: "yield", TRC_SCHED_VERBOSE + 6: "block",
    TRC_SCHED_VERBOSE + 7: "shutdown", TRC_SCHED_VERBOSE + 8: "ctl", TRC_SCHED_VERBOSE + 9: "adjdom",
    TRC_SCHED_VERBOSE + 10: "switch", TRC_SCHED_VERBOSE + 11: "s_timer_fn", TRC_SCHED_VERBOSE + 12: "t_timer_fn",
    TRC_SCHED_VERBOSE + 13: "dom_timer_fn", TRC_SCHED_VERBOSE + 14: "switch_infprev",
    TRC_SCHED_VERBOSE + 15: "switch_infnext", TRC_SCHED_VERBOSE + 16: "shutdown_code",
    TRC_SCHED_VERBOSE + 17: "switch_infcont",
}
GEN_EVENTS = {LOST_RECORDS: "lost_records", WRAP_BUFFER: "wrap_buffer", CPU_CHANGE: "cpu_change"}

# The class xendbg turns on (`xen trace enable`, fixtures/run --xentrace): PV entry points and subcalls.
DEFAULT_MASK = TRC_PV


def event_name(event: int) -> str:
    """'hypercall', 'emulate_privop64', 'runstate_change', 'sched_class', ... or 'event_0x...'."""
    if event in GEN_EVENTS:
        return GEN_EVENTS[event]
    if event == SUBCALL:
        return "subcall"
    if event & 0xFFFFF000 == TRC_PV_ENTRY:
        known = PV_EVENTS.get(event & 0xFF)
        if known is not None:
            return known[0] + ("64" if event & TRC_64_FLAG and event & 0xFF != 13 else "")
    if event in SCHED_EVENTS:
        return SCHED_EVENTS[event]
    if event & 0xFFFFF000 == TRC_SCHED_CLASS:
        return "sched_class"
    return f"event_{event:#010x}"


def event_class(event: int) -> str:
    """'pv', 'sched', 'gen' or 'other': what `--only hypercalls` and the labels go by."""
    if event & 0x0FFF0000 == TRC_PV & 0x0FFF0000:
        return "pv"
    if event & 0x0FFF0000 == TRC_SCHED & 0x0FFF0000:
        return "sched"
    if event & 0x0FFF0000 == TRC_GEN & 0x0FFF0000:
        return "gen"
    return "other"


def pv_fields(event: int, words: tuple[int, ...]) -> dict[str, int]:
    """The named payload of a PV entry record (trap, page fault, privop, ...); {} when unknown."""
    n = event & 0xFF
    if event & 0xFFFFF000 != TRC_PV_ENTRY or n in (1, 13):
        return {}
    shape = PV_EVENTS[n][1] if event & TRC_64_FLAG else PV_32BIT_FIELDS.get(n, ())
    data = b"".join(w.to_bytes(4, "little") for w in words)
    out: dict[str, int] = {}
    at = 0
    for name, size in shape:
        if at + size > len(data):
            break
        value = int.from_bytes(data[at:at + size], "little")
        if name == "trap":  # trapnr:15, use_error_code:1
            out["vector"] = value & 0x7FFF
            out["has_error_code"] = value >> 15
        else:
            out[name] = value
        at += size
    return out

"""shim32's trace buffers (Xen's layout, 32-bit pointers) read live by `xen trace start --buffers`, on
each ABI: every int $0x82 and every multicall entry, with its five arguments, against gdb's own
breakpoint on the shim's int $0x82 gate reading the guest's registers and the batch in memory raw
(no xendbg code), in the same boot; the calls named by the ABI set."""

from __future__ import annotations

import json
import re
import struct

import pytest
from conftest import XENDBG_SCRIPT as SCRIPT

pytestmark = pytest.mark.platform

# Multicall entries (fixtures/guest/xen32.h, from the public headers): 2.0 `op, args[7]`, 3.0+ `op,
# result, args[6]`; 32 bytes each.  The shim records args 0-4 of each.
ENTRY, FIRST_ARG = 32, {"2.0": 1, "3.0": 2, "4.0": 2}
NAMES = {"2.0": {6: "sched_op", 13: "multicall", 17: "xen_version"},
         "3.0": {6: "sched_op", 13: "multicall", 24: "vcpu_op"},
         "4.0": {6: "sched_op_compat", 29: "sched_op", 30: "callback_op", 32: "event_channel_op"}}

RAW_RECORDER = """
import gdb, json
class RawGate(gdb.Breakpoint):
    def __init__(self):
        super().__init__("*hypercall_entry", type=gdb.BP_HARDWARE_BREAKPOINT)
        self.seen = []
    def stop(self):
        regs = [int(gdb.parse_and_eval(f"${r}")) & 0xFFFFFFFF for r in ("eax", "ebx", "ecx", "edx", "esi", "edi")]
        batch = ""
        if regs[0] == 13 and 0 < regs[2] <= 64:
            batch = bytes(gdb.selected_inferior().read_memory(regs[1], 32 * regs[2])).hex()
        self.seen.append([gdb.selected_thread().num - 1, regs, batch])
        return False
RAW = RawGate()
"""


def matched_stops(records: list[list[int]], stops: list[list[int]]) -> list[int]:
    """For each record, the index of its gate stop, in order. A stop the records do not account for must
    repeat the stop before it: gdb reports one stop twice when the drain timer's interrupt meets it."""
    matched: list[int] = []
    for index, stop in enumerate(stops):
        if len(matched) < len(records) and stop == records[len(matched)]:
            matched.append(index)
        else:
            assert index and stop == stops[index - 1], f"stop {index} {stop} is not record {len(matched)}"
    assert len(matched) == len(records), f"records from {len(matched)} on have no stop"
    assert len(stops) - len(matched) <= 3, "more duplicate stops than interrupts explain"
    return matched


@pytest.mark.parametrize("abi", ["2.0", "3.0", "4.0"])
def test_buffers_hold_every_gate_entry_and_batch(boot_gdb, tmp_path, abi: str) -> None:
    log, recorder = tmp_path / "buffers.jsonl", tmp_path / "raw.py"
    recorder.write_text(RAW_RECORDER)
    # --hold: the runner must not end QEMU at the scenario's last line while gdb holds the shim.
    booted = boot_gdb("shim32", abi=abi, timeout=90, extra=("--hold",))
    out = booted.gdb_batch(f"source {SCRIPT}", "set xen color off", f"set xen abi {abi}",
                           f"xen trace start --buffers --file {log}", f"source {recorder}",
                           "hbreak shim.c:shutdown", "continue",
                           "python print('RAWSTOPS', json.dumps(RAW.seen))", "xen trace stop", "delete", "detach",
                           timeout=80)
    assert "Traceback" not in out and "trace stopped" in out, out[-3000:]
    assert "0 records lost" in out
    stops = json.loads(re.search(r"^RAWSTOPS (.*)$", out, re.M).group(1))
    records = [json.loads(line) for line in log.read_text().splitlines()]
    calls = [r for r in records if r["event"] == "call"]
    assert all(r["source"] == "xen-buffers" and r["hypercall"]["xen"] == abi and r["hypercall"]["width"] == 32
               and r["hypercall"]["xen_source"] == "set by hand" for r in calls)

    for cpu in sorted({cpu for cpu, _, _ in stops}):
        mine = [(regs, batch) for c, regs, batch in stops if c == cpu]
        # Each call record: the number and all five arguments of the int $0x82, in order.
        got = [[r["nr"], *(v for _, v in r["recorded"])] for r in calls if r["cpu"] == cpu]
        stop_of = matched_stops(got, [regs for regs, _ in mine])
        # Each multicall's SUBCALL records: the first entries of its batch in memory at the gate.
        sequence = [r for r in records if r["event"] in ("call", "subcall") and r["cpu"] == cpu]
        for index, record in enumerate(sequence):
            if record["event"] != "call" or record["nr"] != 13:
                continue
            subcalls = []
            for later in sequence[index + 1:]:
                if later["event"] != "subcall":
                    break
                subcalls.append([later["nr"], *(v for _, v in later["recorded"])])
            regs, batch = mine[stop_of[sum(1 for r in sequence[:index] if r["event"] == "call")]]
            raw = bytes.fromhex(batch)
            entries = [struct.unpack_from("<8I", raw, at) for at in range(0, len(raw), ENTRY)]
            first = FIRST_ARG[abi]
            expected = [[e[0], *e[first:first + 5]] for e in entries]
            assert subcalls and subcalls == expected[:len(subcalls)], (cpu, record["seq"])

    named = {r["nr"]: r["name"] for r in calls}
    assert {nr: named[nr] for nr in NAMES[abi] if nr in named} == NAMES[abi]
    assert calls[-1]["line"].startswith("sched_op") and "shutdown" in calls[-1]["line"].lower()


def test_gdb_exits_cleanly_after_a_long_stop(boot_gdb) -> None:
    """The drain timer posts to gdb only while the target runs: an event still queued when gdb exits
    crashed gdb 13 at exit (it was posted every interval while the target sat stopped)."""
    booted = boot_gdb("shim32", abi="4.0", timeout=60, extra=("--hold",))
    out = booted.gdb_batch(f"source {SCRIPT}", "xen trace start --buffers", "hbreak shim.c:shutdown", "continue",
                           "python import time; time.sleep(4 * float(gdb.parameter('xen trace-interval')))",
                           "xen trace stop", "detach", timeout=50)
    assert "trace stopped" in out, out[-2000:]
    assert "Fatal signal" not in out and "internal to GDB" not in out, out[-2000:]

"""Xen's own trace buffers read live through gdb on linux64 (fixtures/run linux64 --xentrace[=PAGES]):
the same hypercalls as a breakpoint at pv_hypercall, the first multicall's SUBCALL records equal to its batch
in guest memory, and a full buffer reported as a gap."""

from __future__ import annotations

import json
import re
import struct

import pytest
from conftest import XENDBG_SCRIPT as SCRIPT
from conftest import frame_recorder, json_blocks

pytestmark = pytest.mark.platform

ENTRY = 64  # struct multicall_entry, 64-bit: op, result, args[6]
# The arguments Xen records per op (index, by xen/common/trace.c __trace_hypercall, RELEASE-4.17.0).
RECORDED = {1: (1,), 13: (1,), 20: (0, 2), 24: (0, 1), 26: (1,), 29: (0,)}


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# An independent reading in the same boot: gdb's own breakpoint at pv_hypercall(regs) reading the guest's
# registers from struct cpu_user_regs, with no xendbg code involved. Debian's xen-syms has no type for it:
# the offsets are from xen/include/public/arch-x86/xen-x86_64.h (RELEASE-4.17.0), r15 first, 8 bytes each.
REGS_AT = {"rax": 80, "rdi": 112, "rsi": 104, "rdx": 96, "r10": 56, "r8": 72}
RAW_RECORDER = frame_recorder("pv_hypercall", tuple(REGS_AT.values()))


def key_of_raw(regs: list[int]) -> tuple:
    nr, args = regs[0], regs[1:]
    return nr, tuple(args[i] & 0xFFFFFFFF for i in RECORDED.get(nr, ()))


def key_of_buffer(record: dict) -> tuple:
    return record["nr"], tuple(v for _, v in record["recorded"])


def duplicates_between(buffer_keys: list[tuple], raw_keys: list[tuple]) -> int:
    """How many breakpoint stops repeat the stop before them (gdb's duplicate reports of one call) when
    the buffer records are the stops in order; fails at the first record the stops do not account for."""
    duplicates, at = 0, 0
    for index, key in enumerate(raw_keys):
        if at < len(buffer_keys) and key == buffer_keys[at]:
            at += 1
        elif index and key == raw_keys[index - 1]:
            duplicates += 1
        else:
            raise AssertionError(f"stop {index} {key} is not buffer record {at} {buffer_keys[at:at + 1]}")
    assert at == len(buffer_keys), f"buffer records from {at} on have no stop: {buffer_keys[at:at + 3]}"
    return duplicates


def test_buffers_agree_with_pv_hypercall_stops_and_the_batch(boot_gdb, tmp_path) -> None:
    """One boot, two readings: xendbg drains Xen's buffers while gdb's own breakpoint at pv_hypercall
    records every entry (continuations included, as Xen records them); the sequences are the same but
    for the breakpoint's duplicate reports. The first multicall's SUBCALL records equal the batch."""
    buffered, recorder = tmp_path / "buffers.jsonl", tmp_path / "raw_recorder.py"
    recorder.write_text(RAW_RECORDER)
    booted = boot_gdb("linux64", timeout=250, extra=("--xentrace",))
    out = booted.gdb_batch(f"source {SCRIPT}", "set xen color off", "set xen abi auto",
                           f"xen trace start --buffers --only hypercalls --file {buffered}",
                           f"source {recorder}", "hbreak do_multicall", "continue",
                           "python print('RAWCALLS', json.dumps(RAW.seen))", "p/x $rsi", "p/x $rdi",
                           "python import gdb; n = int(gdb.parse_and_eval('$rsi')); "
                           "print('RAW', bytes(gdb.selected_inferior().read_memory(int(gdb.parse_and_eval('$rdi')) "
                           "& (1 << 64) - 1, 64 * n)).hex())",
                           "delete", "hbreak pv_hypercall", "continue", "continue", "continue", "xen stats --json",
                           "xen trace stop", "delete", "detach", timeout=240)
    assert "Traceback" not in out and "trace stopped" in out, out[-3000:]
    assert re.search(r"^RAW [0-9a-f]+$", out, re.M), out[-3000:]
    raw = bytes.fromhex(re.search(r"^RAW ([0-9a-f]+)$", out, re.M).group(1))
    batch = [struct.unpack_from("<8Q", raw, at) for at in range(0, len(raw), ENTRY)]
    got = records(buffered)
    calls = [r for r in got if r["event"] == "call"]
    assert all(r["source"] == "xen-buffers" for r in calls)
    first = next(i for i, r in enumerate(calls) if r["name"] == "multicall")
    batch_calls = {calls[first]["seq"]}  # the multicall and Xen's continuations of it
    for r in calls[first + 1:]:
        if r.get("continues") in batch_calls:
            batch_calls.add(r["seq"])
    subcalls = [r for r in got if r["event"] == "subcall" and r["in"] in batch_calls]
    assert len(subcalls) == len(batch) >= 1
    for record, entry in zip(subcalls, batch, strict=True):
        assert record["nr"] == entry[0]
        assert all(value == entry[2 + index] & 0xFFFFFFFF for index, value in record["recorded"])
    assert not [r for r in got if r["event"] == "gap"]

    raw_keys = [key_of_raw(regs) for regs in json.loads(re.search(r"^RAWCALLS (.*)$", out, re.M).group(1))]
    buffer_keys = [key_of_buffer(r) for r in calls[:first + 1]]
    assert buffer_keys[-1][0] == raw_keys[-1][0] == 13 and len(buffer_keys) > 1000  # up to the first multicall
    # A duplicate report comes from an interrupt meeting a stop: the drain timer's (one per drain) or
    # QEMU's own (a few per thousand stops).
    drains = int(re.search(r"in (\d+) drains", out).group(1))
    assert duplicates_between(buffer_keys, raw_keys) <= drains + len(raw_keys) // 200


def test_full_buffer_is_a_gap(boot_gdb, tmp_path) -> None:
    """Two pages per CPU and no drain until the first multicall: Xen drops records, and says so."""
    log = tmp_path / "small.jsonl"
    booted = boot_gdb("linux64", timeout=120, extra=("--xentrace=2",))
    out = booted.gdb_batch(f"source {SCRIPT}", "set xen color off", "set xen trace-interval 3600",
                           f"xen trace start --buffers --file {log}", "hbreak do_multicall", "continue",
                           "continue", "xen trace show 400", "xen trace stop", "delete", "detach", timeout=110)
    gaps = [r for r in records(log) if r["event"] == "gap"]
    assert gaps and all(g["lost"] > 0 for g in gaps), out[-2000:]
    assert re.search(r"<gap: Xen lost \d+ trace records on this CPU>", out)
    assert re.search(r"\d+ records lost", out)


def test_whole_boot_to_panic(boot_gdb, tmp_path) -> None:
    """Linux's whole boot to its root-mount panic at the default size with the timed drain: nothing
    lost, every record counted by `xen stats`, and the last call is dom0's shutdown."""
    log = tmp_path / "boot.jsonl"
    # --hold: the runner must not end QEMU at the console's panic line while gdb holds it at the shutdown.
    booted = boot_gdb("linux64", timeout=150, extra=("--xentrace", "--hold"))
    out = booted.gdb_batch(f"source {SCRIPT}", "set xen color off", "set xen abi auto",
                           f"xen trace start --buffers --only hypercalls --file {log}", "hbreak domain_shutdown",
                           "continue", "xen stats --json", "xen trace stop", "delete", "detach", timeout=140)
    assert "Fatal signal" not in out and "Traceback" not in out, out[-3000:]
    got = records(log)
    calls = [r for r in got if r["event"] == "call"]
    stats = next(b for b in json_blocks(out) if "hypercalls" in b)["hypercalls"]
    assert sum(row["calls"] for row in stats) == len([r for r in calls if "continues" not in r]) > 20000
    assert sum(row["in_multicalls"] for row in stats) == len([r for r in got if r["event"] == "subcall"])
    assert not [r for r in got if r["event"] == "gap"]
    assert [r["seq"] for r in calls] == list(range(calls[0]["seq"], calls[0]["seq"] + len(calls)))
    assert calls[-1]["line"] == "sched_op(cmd=SCHEDOP_shutdown)"
    drains = int(re.search(r"in (\d+) drains", out).group(1))
    assert drains > 5  # the timer drained while the guest ran


def test_enable_at_boot(boot_gdb, tmp_path) -> None:
    """Xen booted without trace options: `xen trace enable` from the reset sets them at init_trace_bufs."""
    log = tmp_path / "enabled.jsonl"
    booted = boot_gdb("linux64", timeout=120)
    out = booted.gdb_batch(f"source {SCRIPT}", "set xen color off", "xen trace enable --pages 512",
                           f"xen trace start --buffers --only hypercalls --file {log}", "hbreak do_multicall",
                           "continue", "xen trace stop", "delete", "detach", timeout=110)
    assert "when Xen reaches init_trace_bufs" in out, out[-2000:]
    calls = [r for r in records(log) if r["event"] == "call"]
    assert len(calls) > 1000 and calls[-1]["name"] == "multicall"



def test_detail_probes_merge_with_the_buffers(boot_gdb, tmp_path) -> None:
    """--detail: full decodes of the named calls from probes in Xen, every other call from the buffers,
    in the order the calls happened (the buffers are drained at each probe hit before its record)."""
    log = tmp_path / "detail.jsonl"
    booted = boot_gdb("linux64", timeout=150, extra=("--xentrace",))
    out = booted.gdb_batch(f"source {SCRIPT}", "set xen color off", "set xen abi auto",
                           f"xen trace start --buffers --only hypercalls --detail callback_op,set_trap_table "
                           f"--file {log}", "hbreak do_multicall", "continue", "xen trace stop", "delete", "detach",
                           timeout=140)
    assert "full decodes of callback_op, set_trap_table" in out, out[-2000:]
    calls = [r for r in records(log) if r["event"] == "call"]
    detailed = [r for r in calls if r["name"] in ("callback_op", "set_trap_table")]
    assert detailed and all("source" not in r and r["hypercall"]["detail"] for r in detailed)
    kinds = {r["hypercall"]["detail"]["callbacks"][0]["kind"] for r in detailed if r["name"] == "callback_op"}
    assert {"event", "failsafe", "syscall"} <= kinds
    assert all(r["source"] == "xen-buffers" for r in calls if r not in detailed)
    assert [r["seq"] for r in calls] == list(range(1, len(calls) + 1))  # one sequence
    # The buffers' TSCs around each detailed call are in order: nothing drained late.
    tscs = [r["tsc"] for r in calls if "tsc" in r]
    assert tscs == sorted(tscs)

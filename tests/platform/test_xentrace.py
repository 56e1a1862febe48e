"""Xen's own trace buffers read live through gdb on linux64 (fixtures/run linux64 --xentrace[=PAGES]):
the same hypercalls as probes at pv_hypercall, the first multicall's SUBCALL records equal to its batch
in guest memory, and a full buffer reported as a gap."""

from __future__ import annotations

import difflib
import json
import re
import struct

import pytest
from conftest import XENDBG_SCRIPT as SCRIPT
from conftest import json_blocks

pytestmark = pytest.mark.platform

ENTRY = 64  # struct multicall_entry, 64-bit: op, result, args[6]
# The arguments Xen records per op (index, by xen/common/trace.c __trace_hypercall, RELEASE-4.17.0).
RECORDED = {1: (1,), 13: (1,), 20: (0, 2), 24: (0, 1), 26: (1,), 29: (0,)}


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def key_of_probe(record: dict) -> tuple:
    hc = record["hypercall"]
    values = [a["value"] for a in hc["args"]]
    return hc["nr"], tuple(values[i] & 0xFFFFFFFF for i in RECORDED.get(hc["nr"], ()) if i < len(values))


def key_of_buffer(record: dict) -> tuple:
    return record["nr"], tuple(v for _, v in record["recorded"])


def test_buffers_agree_with_probes_and_the_batch(boot_gdb, tmp_path) -> None:
    buffered, probed = tmp_path / "buffers.jsonl", tmp_path / "probes.jsonl"
    booted = boot_gdb("linux64", timeout=150, extra=("--xentrace",))
    out = booted.gdb_batch(f"source {SCRIPT}", "set xen color off", "set xen abi auto",
                           f"xen trace start --buffers --only hypercalls --file {buffered}",
                           "hbreak do_multicall", "continue", "p/x $rsi", "p/x $rdi",
                           "python import gdb; n = int(gdb.parse_and_eval('$rsi')); "
                           "print('RAW', bytes(gdb.selected_inferior().read_memory(int(gdb.parse_and_eval('$rdi')) "
                           "& (1 << 64) - 1, 64 * n)).hex())",
                           "delete", "hbreak pv_hypercall", "continue", "continue", "continue", "xen stats --json",
                           "xen trace stop", "delete", "detach", timeout=140)
    assert "Traceback" not in out and "trace stopped" in out, out[-3000:]
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

    booted = boot_gdb("linux64", timeout=200, extra=("--xentrace",))
    out = booted.gdb_batch(f"source {SCRIPT}", "set xen color off", "set xen abi auto",
                           "xen catch hypercall --xen kexec_op", f"xen trace start --file {probed}",
                           "hbreak do_multicall", "continue", "xen trace stop", "delete", "detach", timeout=190)
    assert "trace stopped" in out, out[-3000:]
    # Xen preempts calls by timing (the probes slow the guest down): compare the calls, not their
    # continuations, which both traces mark.
    probe_keys = [key_of_probe(r) for r in records(probed) if r["event"] == "call" and "continues" not in r]
    buffer_keys = [key_of_buffer(r) for r in calls[:first + 1] if "continues" not in r]
    assert probe_keys[-1][0] == 13 and buffer_keys[-1][0] == 13  # both end at the first multicall
    # The same sequence but for the probes' duplicate reports of one call and what timing changes
    # between two boots (an interrupt's iret, a console line more or less): at most 2% apart.
    matcher = difflib.SequenceMatcher(a=buffer_keys, b=probe_keys, autojunk=False)
    differing = sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in matcher.get_opcodes() if tag != "equal")
    assert len(buffer_keys) > 1000 and differing <= len(buffer_keys) // 50, differing


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
    booted = boot_gdb("linux64", timeout=150, extra=("--xentrace",))
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

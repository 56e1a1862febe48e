"""Trace records, the JSONL log, strace-style lines and stats (xendbg/trace.py), without gdb."""

from __future__ import annotations

import json

import pytest

from tests.unit.images import pack, registers, stub
from xendbg.abi import get_abi
from xendbg.decode import decode_pending
from xendbg.errors import UsageError
from xendbg.target import InMemoryTarget
from xendbg.trace import Stats, TraceLog, call_line, result_text, show_lines

PC = 0x7000


def call(nr: int, *args: int, memory=()):
    target = InMemoryTarget(registers(64, nr, *args, pc=PC), [(PC, stub(64, nr)), *memory])
    return decode_pending(target, get_abi("4.17", 64))


def test_each_record_is_on_disk_as_soon_as_it_is_logged(tmp_path):
    path = tmp_path / "t.jsonl"
    log = TraceLog(str(path), ("vcpu_op",))
    seq = log.call(0, call(24, 3, 1, 0), "guest")
    # Not closed: a reader (or a crash) sees the start and the call already.
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["event"] for r in lines] == ["start", "call"]
    assert lines[0]["names"] == ["vcpu_op"]
    assert lines[1]["line"] == "vcpu_op(cmd=VCPUOP_is_up, vcpuid=0x1, extra_args=0x0)"
    assert lines[1]["hypercall"]["subop"] == "VCPUOP_is_up"
    log.result(0, seq, "vcpu_op", -22)
    log.close()
    last = [json.loads(line) for line in path.read_text().splitlines()][-2:]
    assert last[0] == {**last[0], "event": "return", "seq": seq, "result": -22, "errno": "EINVAL"}
    assert last[1]["event"] == "stop"


def test_unwritable_trace_file_is_a_one_line_usage_error(tmp_path):
    with pytest.raises(UsageError, match="cannot open trace file"):
        TraceLog(str(tmp_path / "missing" / "t.jsonl"), ())


def test_show_lines_joins_a_call_with_its_result_and_marks_interleaving():
    log = TraceLog(None, ())
    first = log.call(0, call(17, 0, 0), "guest")
    second = log.call(1, call(29, 0, 0), "guest")  # another vCPU's call comes in between
    log.result(0, first, "xen_version", 0x40011)
    log.preempted(1, second, "sched_op")
    log.error(0, "probe at 0x7000", "cannot read memory at 0x0")
    lines = show_lines(list(log.recent)[1:])
    assert lines[0].endswith("xen_version(cmd=XENVER_version, arg=0x0)")
    assert lines[2].endswith("<... xen_version resumed> = 0x40011")
    assert lines[3].endswith("<... sched_op resumed> = <preempted: Xen continues it>")
    assert "could not decode probe at 0x7000" in lines[4]


def test_stats_count_calls_errors_subops_and_batched_calls():
    abi = get_abi("4.17", 64)
    entry = pack(abi, "multicall_entry", op=24, args=[3, 0, 0, 0, 0, 0])
    stats = Stats()
    stats.count_call(call(24, 3, 1, 0))
    stats.count_call(call(24, 2, 1, 0))
    stats.count_result("vcpu_op", -1)
    stats.count_call(call(13, 0x8000, 2, memory=[(0x8000, entry + entry)]))
    rows = {r["name"]: r for r in stats.rows()}
    assert rows["vcpu_op"] == {"name": "vcpu_op", "calls": 2, "errors": 1, "errnos": {"EPERM": 1},
                               "subops": {"VCPUOP_is_up": 1, "VCPUOP_down": 1}, "in_multicalls": 2}
    assert rows["multicall"]["calls"] == 1


def test_result_text_and_call_line():
    assert result_text(-38) == "-38 (ENOSYS)"
    assert result_text(0) == "0" and result_text(0x40011) == "0x40011"
    assert call_line(call(4, 0xFFFFFFFF81000000, 0, 0)).startswith("set_callbacks(event_address=0xffffffff81000000")


def test_trace_log_records_in_order_with_their_fields(tmp_path):
    path = tmp_path / "t.jsonl"
    log = TraceLog(str(path), ("multicall", "vcpu_op"))
    hc = call(17, 0, 0)
    first = log.call(2, hc, "guest at syscall")
    log.error(1, "probe at 0x7000", "cannot read memory at 0x0")
    log.preempted(2, first, "xen_version")
    log.close()
    log.close()  # a second stop writes nothing more
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["event"] for r in records] == ["start", "call", "error", "preempted", "stop"]
    start, rec, err, pre, _ = records
    assert {k: start[k] for k in ("schema", "names")} == {"schema": 1, "names": ["multicall", "vcpu_op"]}
    assert isinstance(start["pid"], int) and all(isinstance(r["t"], float) for r in records)
    assert {k: rec[k] for k in ("seq", "cpu", "where", "name", "nr", "line")} == {
        "seq": 1, "cpu": 2, "where": "guest at syscall", "name": "xen_version", "nr": 17,
        "line": "xen_version(cmd=XENVER_version, arg=0x0)"}
    assert rec["hypercall"]["args"][0]["text"] == "XENVER_version"
    assert err == {**err, "seq": 2, "cpu": 1, "where": "probe at 0x7000", "error": "cannot read memory at 0x0"}
    assert pre == {**pre, "seq": 1, "cpu": 2, "name": "xen_version"}
    assert log.written == 5 and len(log.recent) == 5


def test_trace_without_a_file_keeps_the_recent_records_only():
    log = TraceLog(None, ())
    for _ in range(1005):
        log.call(0, call(17, 0, 0), "guest")
    assert len(log.recent) == 1000 and log.recent[-1]["seq"] == 1005 and log.written == 0
    log.close()
    assert log.recent[-1]["event"] == "call"  # nothing to stop without a file


def test_show_lines_stamps_and_resumed_results():
    records = [{"event": "call", "seq": 1, "cpu": 0, "t": 1.5, "line": "a()"},
               {"event": "call", "seq": 2, "cpu": 1, "t": 2.25, "line": "b()"},
               {"event": "return", "seq": 2, "cpu": 1, "t": 2.5, "name": "b", "result": -1},
               {"event": "return", "seq": 1, "cpu": 0, "t": 3.0, "name": "a", "result": 0},
               {"event": "return", "seq": 9, "name": "c", "result": 5}]
    assert show_lines(records) == ["  1.500000 cpu0 a()",
                                   "  2.250000 cpu1 b() = -1 (EPERM)",
                                   "  3.000000 cpu0 <... a resumed> = 0",
                                   "  0.000000 cpu? <... c resumed> = 5"]

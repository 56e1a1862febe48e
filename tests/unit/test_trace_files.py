"""Trace files that cannot be written (a full device, a file-size limit), the stop summary, and how
continuations show (xendbg/trace.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.unit.images import registers, stub
from xendbg.abi import get_abi
from xendbg.decode import decode_pending
from xendbg.target import InMemoryTarget
from xendbg.trace import TraceLog, show_lines

PC = 0x7000
ROOT = Path(__file__).resolve().parents[2]


def call(nr: int, *args: int):
    target = InMemoryTarget(registers(64, nr, *args, pc=PC), [(PC, stub(64, nr))])
    return decode_pending(target, get_abi("4.17", 64))


def test_a_full_device_ends_the_file_once_and_keeps_every_record_in_memory():
    log = TraceLog("/dev/full", ("xen_version",))
    # The start record already failed: one error, said once, the file closed.
    assert log.file_error == ("cannot write trace file /dev/full: No space left on device (after 0 records; "
                              "every record stays in memory)")
    first = log.file_error
    seq = log.call(0, call(17, 0, 0), "guest")
    log.result(0, seq, "xen_version", 0x40011)
    log.close()
    assert log.file_error == first
    assert [r["event"] for r in log.recent] == ["start", "call", "return"]  # no "stop": the file was gone
    assert (log.written, log.calls, seq) == (0, 1, 1)
    assert log.summary() == f"1 hypercall traced; 0 records written to /dev/full; {first}"


def test_a_file_size_limit_leaves_only_whole_records(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"event":"stop"}\n')  # an earlier trace in the same file is kept
    script = textwrap.dedent("""
        import json, resource, sys
        from xendbg.trace import TraceLog
        resource.setrlimit(resource.RLIMIT_FSIZE, (700, 700))
        log = TraceLog(sys.argv[1], ("xen_version",))
        for n in range(50):
            log.error(n, "probe at 0x7000", "x" * 60)
        log.close()
        print(json.dumps({"error": log.file_error, "written": log.written, "recent": len(log.recent),
                          "summary": log.summary()}))
    """)
    done = subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT, capture_output=True, text=True,
                          check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    out = json.loads(done.stdout)
    assert out["error"].startswith(f"cannot write trace file {path}: File too large (after ")
    assert out["error"].endswith(f"after {out['written']} records; every record stays in memory)")
    assert 0 < out["written"] < 51 and out["recent"] == 51  # start + 50 errors, all in memory
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""  # the file ends with a whole line
    records = [json.loads(line) for line in lines[:-1]]  # every line is one JSON object
    assert records[0] == {"event": "stop"}
    assert len(records) == 1 + out["written"]
    assert records[1]["event"] == "start" and [r["event"] for r in records[2:]] == ["error"] * (out["written"] - 1)
    assert out["summary"] == f"0 hypercalls traced; {out['written']} records written to {path}; {out['error']}"


def test_summary_counts():
    log = TraceLog(None, ())
    assert log.summary() == "0 hypercalls traced"
    log.call(0, call(17, 0, 0), "guest")
    assert log.summary() == "1 hypercall traced"
    log.call(0, call(17, 0, 0), "xen")
    assert log.summary() == "2 hypercalls traced"


def test_summary_with_a_file(tmp_path):
    path = tmp_path / "t.jsonl"
    log = TraceLog(str(path), ())
    log.call(1, call(17, 0, 0), "guest")
    log.close()
    assert log.summary() == f"1 hypercall traced; 3 records written to {path}"
    assert [json.loads(line)["event"] for line in path.read_text().splitlines()] == ["start", "call", "stop"]


def test_a_continuation_names_the_call_it_continues():
    log = TraceLog(None, ())
    first = log.call(0, call(13, 0x8000, 5), "guest")
    log.preempted(0, first, "multicall")
    second = log.call(0, call(13, 0x8040, 4), "guest", continues=first)
    log.result(0, second, "multicall", 0)
    records = list(log.recent)
    assert "continues" not in records[1]
    assert records[3]["continues"] == first and records[3]["seq"] == second == 2
    assert records[3]["where"] == "guest"
    lines = show_lines(records[1:])
    assert lines[0].endswith("multicall(call_list=0x8000, nr_calls=0x5) = <preempted: Xen continues it>")
    assert lines[1].endswith("multicall(call_list=0x8040, nr_calls=0x4) <continues #1> = 0")
    assert len(lines) == 2


def test_show_lines_for_a_result_without_its_call_and_unknown_events():
    lines = show_lines([{"event": "return", "seq": 7, "cpu": 2, "name": "sched_op", "result": -22, "t": 1.5},
                        {"event": "stop", "t": 2.0}])
    assert lines == ["  1.500000 cpu2 <... sched_op resumed> = -22 (EINVAL)"]


def test_an_uncertain_repeat_is_said_in_the_trace_and_counted_apart(tmp_path):
    """A hit xendbg cannot tell from gdb's repeated report (or a continuation without progress) is its own
    record, shown as such, and counted apart from the calls, live and read back from the file."""
    path = tmp_path / "t.jsonl"
    log = TraceLog(str(path), ())
    seq = log.call(0, call(1, 0x8000, 8 | 1 << 31, 0, 0x7FF0), "guest")
    log.uncertain(0, seq, "mmu_update")
    log.result(0, seq, "mmu_update", 0)
    log.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["event"] for r in records] == ["start", "call", "uncertain", "return", "stop"]
    assert records[2]["seq"] == seq and "repeated stop report" in records[2]["why"]
    assert any("hit again unchanged" in line for line in show_lines(records))
    out = subprocess.run([sys.executable, "-m", "xendbg.cli", "trace", str(path), "--stats", "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)["hypercalls"]
    assert (row["name"], row["calls"], row["uncertain"]) == ("mmu_update", 1, 1)

"""Runs inside gdb (gdb -batch -x bench/in_gdb.py), connected to a guest stopped at its first instruction.

BENCH=trace: alternately, on the same guest in the same run, N stops of a bare breakpoint that only
  continues (gdb's ignore count) and N calls traced by `xen trace start`; prints per-stop costs.
BENCH=first-multicall: time from `continue` to the stop of `xen catch hypercall multicall`.
Prints one JSON line prefixed with BENCH-RESULT.
"""

import json
import os
import time

import gdb  # type: ignore[import-not-found]

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
STOPS = int(os.environ.get("BENCH_STOPS", "300"))


def run(command: str) -> str:
    return gdb.execute(command, to_string=True)


def timed_continue() -> float:
    start = time.perf_counter()
    run("continue")
    return time.perf_counter() - start


def bench_trace(site: int) -> dict:
    from xendbg.gdb.monitor import MONITOR

    bare, traced = [], []
    for _ in range(ROUNDS):
        # A bare breakpoint: gdb stops, counts the hit against the ignore count and resumes.
        bp = gdb.Breakpoint(f"*{site:#x}", internal=False)
        bp.ignore_count = STOPS
        elapsed = timed_continue()
        bare.append(elapsed / STOPS)
        bp.delete()
        # The same number of traced calls: each is an entry stop and a return stop, both decoded.
        run("xen trace start")
        stopper = gdb.Breakpoint(f"*{site:#x}", internal=False)
        stopper.ignore_count = STOPS
        elapsed = timed_continue()
        stopper.delete()
        trace = MONITOR.trace
        stops = sum(1 for r in trace.recent if r["event"] in ("call", "return", "preempted", "error"))
        run("xen trace stop")
        traced.append(elapsed / max(stops, 1))
    return {"bare_stop_s": min(bare), "trace_stop_s": min(traced), "ratio": min(traced) / min(bare),
            "rounds": ROUNDS, "stops_per_round": STOPS}


def bench_first_multicall() -> dict:
    plan = run("xen catch hypercall multicall")
    elapsed = timed_continue()
    out = run("xen hypercall")
    return {"seconds": elapsed, "plan": plan.strip(), "stopped_at_multicall": out.startswith("multicall")}


def main() -> None:
    which = os.environ["BENCH"]
    if which == "trace":
        result = bench_trace(int(os.environ["BENCH_SITE"], 0))
    else:
        result = bench_first_multicall()
    print("BENCH-RESULT " + json.dumps(result))


main()

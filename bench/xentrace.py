#!/usr/bin/env python3
"""Tracing Linux dom0's boot through Xen's own trace buffers against probes, in one session.

    .venv/bin/python bench/xentrace.py [--repeats N] [--probes-to-panic]

Each run boots linux64 with Xen's trace buffers on (`fixtures/run linux64 --xentrace`, which costs no
measurable time by itself) under gdb, and times from `continue` at the reset to Linux's first multicall
(Xen's do_multicall) and to its shutdown after the root-mount panic (Xen's domain_shutdown):
  untraced   gdb attached, nothing traced
  buffers    xen trace start --buffers --only hypercalls (the timed drain every 0.5 s)
  probes     xen trace start with probes at pv_hypercall (`xen catch hypercall --xen kexec_op`, a call
             Linux never makes, puts the probes in Xen); to the first multicall only unless
             --probes-to-panic (minutes)
Target: buffers at most 1.3x untraced to the panic.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "platform"))

from conftest import XENDBG_SCRIPT, Booted  # noqa: E402

TIMER = ("python import time; __import__('builtins')._xt_start = time.monotonic()",)
LAP = "python import time; print('LAP %.3f' % (time.monotonic() - __import__('builtins')._xt_start))"
SETUP = {
    "untraced": [],
    "buffers": ["xen trace start --buffers --only hypercalls"],
    "probes": ["xen catch hypercall --xen kexec_op", "xen trace start"],
}


def once(mode: str, to_panic: bool) -> dict:
    booted = Booted("linux64", None, False, 900, ("--xentrace",))
    try:
        commands = [f"source {XENDBG_SCRIPT}", "set xen color off", "set xen abi 4.17", *SETUP[mode],
                    "hbreak do_multicall", *TIMER, "continue", LAP, "delete"]
        if to_panic:
            commands += ["hbreak domain_shutdown", "continue", LAP]
        if mode != "untraced":
            commands.append("xen trace stop")
        out = booted.gdb_batch(*commands, "delete", "detach", timeout=900)
    finally:
        booted.stop()
    laps = [float(x) for x in re.findall(r"^LAP ([0-9.]+)$", out, re.M)]
    calls = re.search(r"(\d+) hypercalls? traced", out)
    if len(laps) != (2 if to_panic else 1):
        raise RuntimeError(f"{mode}: no timing in gdb's output: {out[-1500:]}")
    return {"first_multicall_s": laps[0], "panic_s": laps[1] if to_panic else None,
            "calls": int(calls.group(1)) if calls else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--probes-to-panic", action="store_true")
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {mode: [] for mode in SETUP}
    for _ in range(args.repeats):  # interleaved, so drift hits every mode alike
        for mode in SETUP:
            runs[mode].append(once(mode, mode != "probes" or args.probes_to_panic))
    result: dict[str, object] = {"repeats": args.repeats}
    for mode, rows in runs.items():
        result[mode] = {key: statistics.median(r[key] for r in rows) if rows[0][key] is not None else None
                        for key in rows[0]}
    base = result["untraced"]
    for mode in ("buffers", "probes"):
        row = result[mode]
        assert isinstance(row, dict) and isinstance(base, dict)
        row["first_multicall_ratio"] = row["first_multicall_s"] / base["first_multicall_s"]
        if row["panic_s"] is not None:
            row["panic_ratio"] = row["panic_s"] / base["panic_s"]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""xendbg's benchmarks, each a ratio or a time measured in one session on this machine.

    .venv/bin/python bench/run.py [startup] [trace] [first-multicall]   (default: all three)

startup          the time `source gdbscripts/xendbg.py` adds to a bare `gdb -nx -batch` (target: at
                 most 15 ms), and the modules loading it imports
trace            one decoded `xen trace` stop against a bare gdb breakpoint that only continues, on
                 Linux 6.1 dom0 under Xen 4.17 (linux64), same guest, same run (target: under 1.2x)
first-multicall  time to Linux dom0's first multicall with `xen catch hypercall multicall`, with
                 Xen's symbols (caught at do_multicall) and without (caught at Linux's syscall)
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "platform"))
sys.path.insert(0, str(ROOT))

SCRIPT = ROOT / "gdbscripts" / "xendbg.py"
IN_GDB = ROOT / "bench" / "in_gdb.py"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} x {cpu}, {platform.system()} {platform.release()}"


def startup(repeats: int = 21) -> dict:
    """Median of `repeats` interleaved runs of a bare `gdb -nx -batch` and of one that sources xendbg,
    and what loading xendbg imports (a module appearing here is a start-up cost to justify)."""
    def once(extra: list[str]) -> float:
        start = time.perf_counter()
        subprocess.run(["gdb", "-nx", "-batch", *extra], capture_output=True, check=True)
        return time.perf_counter() - start

    bare, loaded = [], []
    for _ in range(repeats):  # interleaved, so drift hits both alike
        bare.append(once([]))
        loaded.append(once(["-ex", f"source {SCRIPT}"]))
    b, s = statistics.median(bare), statistics.median(loaded)
    probe = subprocess.run(
        ["gdb", "-nx", "-batch", "-ex", "python import sys; _before = set(sys.modules)", "-ex", f"source {SCRIPT}",
         "-ex", "python print('IMPORTED', *sorted(set(sys.modules) - _before))"],
        capture_output=True, text=True, check=True).stdout
    imported = next((line.split()[1:] for line in probe.splitlines() if line.startswith("IMPORTED")), [])
    # Without compiled bytecode (PYTHONDONTWRITEBYTECODE, no ./setup.sh env) every load compiles the package.
    compiled = (ROOT / "xendbg" / "gdb" / "__pycache__").is_dir()
    return {"runs": repeats, "bare_gdb_ms": b * 1000, "with_xendbg_ms": s * 1000, "added_ms": (s - b) * 1000,
            "ratio": s / b, "bytecode_compiled": compiled, "imported_at_load": imported}


def in_gdb(booted, env: dict, symbols: list[str]) -> dict:
    argv = ["gdb", "-nx", "-batch", "-ex", "set pagination off", "-ex", "set confirm off",
            "-ex", "set architecture i386:x86-64", "-ex", f"file {symbols[0]}"]
    for extra in symbols[1:]:
        argv += ["-ex", f"add-symbol-file {extra}"]
    argv += ["-ex", f"target remote 127.0.0.1:{booted.port}", "-ex", f"source {SCRIPT}", "-x", str(IN_GDB)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=900, env={**os.environ, **env})
    for line in out.stdout.splitlines():
        if line.startswith("BENCH-RESULT "):
            return json.loads(line.split(" ", 1)[1])
    raise RuntimeError(f"benchmark gave no result: {(out.stdout + out.stderr)[-2000:]}")


def linux_boot():
    from conftest import Booted

    return Booted("linux64", None, False, 600)


def trace() -> dict:
    from xendbg.sites import find_hypercall_sites

    booted = linux_boot()
    try:
        vmlinux = booted.artifacts["vmlinux"]
        site = next(s for s in find_hypercall_sites(vmlinux).inline if s.name == "xen_hypercall_pv")
        return in_gdb(booted, {"BENCH": "trace", "BENCH_SITE": hex(site.instruction)}, [vmlinux])
    finally:
        booted.stop()


def first_multicall() -> dict:
    results = {}
    for label, with_xen in (("with_xen_syms", True), ("guest_side_only", False)):
        booted = linux_boot()
        try:
            symbols = booted.artifacts["symbols"] if with_xen else [booted.artifacts["vmlinux"]]
            results[label] = in_gdb(booted, {"BENCH": "first-multicall"}, symbols)
        finally:
            booted.stop()
    return results


def main() -> int:
    chosen = sys.argv[1:] or ["startup", "trace", "first-multicall"]
    runs = {"startup": startup, "trace": trace, "first-multicall": first_multicall}
    report = {"machine": machine()}
    for name in chosen:
        if name not in runs:
            print(f"bench/run.py: unknown benchmark {name!r} ({', '.join(runs)})", file=sys.stderr)
            return 2
        report[name] = runs[name]()
        print(json.dumps({name: report[name]}, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

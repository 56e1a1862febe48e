#!/usr/bin/env python3
"""Reading a large xentrace file: `xendbg trace FILE` against `cat FILE`, on one generated file.

    .venv/bin/python bench/xentrace_file.py [--size-mb 300] [--cpus 4] [--keep FILE]

The file is what xentrace writes on a busy host: windows of each CPU in turn (one per drain), holding
HYPERCALL_V2 records with their recorded arguments, multicall subcalls, a continued mmu_update, PV
and scheduler records, TSC on every record.  Each reader runs in its own process, output to
/dev/null; reported: MB/s of `cat`, of `xendbg trace` (strace-style lines), `--stats` and `--json`,
each ratio to cat, and the peak RSS of each (getrusage of the child).
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xendbg.xentrace import events as ev  # noqa: E402
from xendbg.xentrace.xtfile import CPU_CHANGE_HEADER  # noqa: E402

# (op, 32-bit recorded arguments) of the calls a PV dom0 makes most (xen/include/public/xen.h numbers)
_CALLS = ((29, (1,)), (13, (3,)), (24, (0, 1)), (1, (5,)), (26, (1,)), (20, (2, 7)), (17, ()), (32, (4, 0)))


def _call(op: int, args: tuple[int, ...], event: int = ev.HYPERCALL_V2) -> tuple[int, tuple[int, ...]]:
    first = op
    for index in range(len(args)):
        first |= ev.ARG_32 << (ev.ARG_SHIFT + 2 * index)
    return event, (first, *args)


def _window_records(cpu: int) -> list[tuple[int, tuple[int, ...]]]:
    """One drain's worth of one CPU's records (event, words), TSCs added when written."""
    out = []
    for n in range(400):
        op, args = _CALLS[(n + cpu) % len(_CALLS)]
        out.append(_call(op, args))
        if op == 13:  # multicall: its subcalls follow
            out += [_call(1, (1,), ev.SUBCALL), _call(26, (0,), ev.SUBCALL), _call(24, (1, 0), ev.SUBCALL)]
        if n % 50 == 0:  # an mmu_update Xen preempts and continues
            out.append(_call(1, (0x80000000 | 3,)))
        if n % 7 == 0:
            out.append((ev.TRC_PV_ENTRY + 3, (0x1000 + n, 0, 14 << 16)))  # a PV trap record
    return out


def generate(path: Path, size: int, cpus: int) -> int:
    """Write a valid xentrace file of about `size` bytes; returns its size."""
    templates = [_window_records(cpu) for cpu in range(cpus)]
    tsc = 1_000_000
    written = 0
    with open(path, "wb") as file:
        while written < size:
            for cpu in range(cpus):
                body = bytearray()
                for event, words in templates[cpu]:
                    header = event | len(words) << ev.EXTRA_SHIFT | ev.CYCLES_FLAG
                    body += struct.pack(f"<IQ{len(words)}I", header, tsc, *words)
                    tsc += 37
                chunk = struct.pack("<IiI", CPU_CHANGE_HEADER, cpu, len(body)) + body
                file.write(chunk)
                written += len(chunk)
    return written


def measure(argv: list[str]) -> tuple[float, int]:
    """wall seconds and the child's own peak RSS (KiB), measured by a small wrapper process."""
    wrapper = ("import resource,subprocess,sys,time;t=time.perf_counter();"
               "r=subprocess.run(sys.argv[1:],stdout=subprocess.DEVNULL,stderr=subprocess.PIPE);"
               "d=time.perf_counter()-t;"
               "sys.exit(r.stderr.decode()[-500:]) if r.returncode else "
               "print(d, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", wrapper, *argv], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed: {out.stderr[-500:]}")
    seconds, rss = out.stdout.split()
    return float(seconds), int(rss)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=float, default=300, help="size of the generated file (default: 300)")
    ap.add_argument("--cpus", type=int, default=4)
    ap.add_argument("--keep", metavar="FILE", help="write the file here and keep it (default: a temporary file)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.keep) if args.keep else Path(tmp) / "trace.xentrace"
        size = generate(path, int(args.size_mb * (1 << 20)), args.cpus)
        xendbg = [sys.executable, "-m", "xendbg.cli", "trace", str(path), "--xen", "4.17"]
        runs = {"cat": ["cat", str(path)], "lines": xendbg, "stats": [*xendbg, "--stats"], "json": [*xendbg, "--json"]}
        result: dict[str, object] = {"file_mb": size / (1 << 20), "cpus": args.cpus}
        for name, argv in runs.items():
            seconds, rss = measure(argv)
            result[name] = {"seconds": seconds, "mb_per_s": size / (1 << 20) / seconds, "peak_rss_mb": rss / 1024}
        cat = result["cat"]
        assert isinstance(cat, dict)
        for name in ("lines", "stats", "json"):
            row = result[name]
            assert isinstance(row, dict)
            row["ratio_to_cat"] = row["seconds"] / cat["seconds"]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Post-mortem benchmark: open a 2 GiB QEMU dump (plain ELF and -z) and decode every vCPU, against
baselines measured in the same run.  Not part of the test suite.

    .venv/bin/python bench/postmortem.py [--mem MIB] [--keep DIR]

It boots shim32 with `-m MIB` (default 2048) under QEMU, stops it at its first multicall through gdb,
takes `dump-guest-memory` and `dump-guest-memory -z`, then runs, each in a fresh Python process:
  notes-only   open the file and parse its CPU notes (the least any reader does)
  summary      xendbg.open_core + every vCPU's pending hypercall and findings
and `cat FILE > /dev/null` (reading the whole file once).  Reported: wall time and peak RSS, also as a
fraction of the file size and of the guest's RAM (the RSS beyond a bare `import xendbg.dump`) or of the
cat time (time).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fixtures"))
sys.path.insert(0, str(ROOT / "tests" / "platform"))

from platforms import common, shim32  # noqa: E402

CHILD = {
    "python": "import xendbg.dump",
    "notes-only": "from xendbg.dump.api import open_memory; m, d = open_memory(PATH); assert m.cpus",
    "summary": ("import xendbg\n"
                "with xendbg.open_core(PATH, symbols=[GUEST]) as core:\n"
                "    assert [v.pending() for v in core.vcpus][0] is not None\n"
                "    [v.findings() for v in core.vcpus]"),
}


def make_dumps(mem: int, out: Path) -> dict[str, Path]:
    from conftest import free_port, listening

    opts = common.Options(platform="shim32", abi="4.0", extra=("-m", str(mem)))
    shim32.build(opts)
    art = shim32.artifacts(opts)
    port = free_port()
    qemu = subprocess.Popen(shim32.qemu_argv(opts) + common.gdb_argv(port), stdout=subprocess.DEVNULL)
    try:
        while not listening(port):
            time.sleep(0.02)
        dumps = {"plain": out / "dump.elf", "zlib": out / "dump.kz"}
        subprocess.run(["gdb", "-nx", "-batch", "-ex", "set architecture i386", "-ex", f"file {art['guest']}",
                        "-ex", f"target remote 127.0.0.1:{port}", "-ex", "hbreak xen_int82 if $eax == 13",
                        "-ex", "continue", "-ex", f"monitor dump-guest-memory {dumps['plain']}",
                        "-ex", f"monitor dump-guest-memory -z {dumps['zlib']}", "-ex", "kill"],
                       check=True, capture_output=True, timeout=600)
    finally:
        qemu.kill()
        qemu.wait()
    dumps["guest"] = Path(art["guest"])
    return dumps


def child(kind: str, path: Path, guest: Path) -> tuple[float, int]:
    """Wall time and peak RSS (bytes) of one fresh Python running CHILD[kind]."""
    code = f"PATH = {str(path)!r}; GUEST = {str(guest)!r}\n" + CHILD[kind]
    script = ("import resource, time, sys\nt = time.perf_counter()\n" + code +
              "\nprint(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                       env=os.environ | {"PYTHONPATH": str(ROOT)})
    seconds, rss = r.stdout.split()
    return float(seconds), int(rss)


def cat(path: Path) -> float:
    start = time.perf_counter()
    subprocess.run(f"cat {path} > /dev/null", shell=True, check=True)
    return time.perf_counter() - start


def best(runs: list[tuple[float, int]]) -> tuple[float, int]:
    return min(t for t, _ in runs), max(r for _, r in runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mem", type=int, default=2048, help="guest RAM in MiB (default 2048)")
    ap.add_argument("--keep", type=Path, help="keep the dumps in DIR (default: a temporary directory)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        dumps = make_dumps(args.mem, out)
        results = {}
        for fmt in ("plain", "zlib"):
            path = dumps[fmt]
            size = path.stat().st_size
            cat(path)  # warm the page cache for every reader alike
            cat_s = min(cat(path) for _ in range(3))
            python = best([child("python", path, dumps["guest"]) for _ in range(3)])
            notes = best([child("notes-only", path, dumps["guest"]) for _ in range(3)])
            summary = best([child("summary", path, dumps["guest"]) for _ in range(3)])
            results[fmt] = {
                "file_bytes": size, "cat_s": round(cat_s, 3),
                "python_import": {"s": round(python[0], 3), "rss_mib": round(python[1] / 2**20, 1)},
                "notes_only": {"s": round(notes[0], 3), "rss_mib": round(notes[1] / 2**20, 1)},
                "decode_every_vcpu": {"s": round(summary[0], 3), "rss_mib": round(summary[1] / 2**20, 1),
                                      "s_over_import": round(summary[0] - python[0], 3),
                                      "s_vs_cat": round(summary[0] / cat_s, 3) if cat_s else None,
                                      "extra_rss_mib": round((summary[1] - python[1]) / 2**20, 1),
                                      "extra_rss_over_file": round((summary[1] - python[1]) / size, 4),
                                      "extra_rss_over_ram": round((summary[1] - python[1]) / (args.mem << 20), 4)},
            }
        print(json.dumps({"guest_mib": args.mem, "peak_rss_of_bench": resource.getrusage(
            resource.RUSAGE_SELF).ru_maxrss, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

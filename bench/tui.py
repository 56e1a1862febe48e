#!/usr/bin/env python3
"""`xendbg attach` on shim32: how fast the screen follows gdb.

    .venv/bin/python bench/tui.py [RUNS]      (default 5; needs tmux)

first screen   from the moment the target is reachable (QEMU's gdbstub listens) to the first complete
               screen (target: under 1 s); also from the command's start (which includes booting QEMU)
refresh        from gdb's `*stopped` record (read by the MI reader thread) to the screen redrawn with
               every pane refreshed (target: under 100 ms): the multicall catch stops and stepi stops

The TUI writes those times itself (XENDBG_TUI_TIMINGS); each run is its own tmux session, ended by
name, and its processes end with it (F10).
"""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv" / "bin" / "python"


def screen(name: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", name], capture_output=True, text=True).stdout


def wait(name: str, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in screen(name):
        if time.monotonic() > deadline:
            raise SystemExit(f"bench/tui.py: {text!r} did not show:\n{screen(name)}")
        time.sleep(0.05)


def one_run(index: int, timings: Path) -> None:
    name = f"xendbg-bench-tui-{index}"
    argv = [str(PYTHON), "-m", "xendbg.cli", "attach", "--platform", "shim32", "--abi", "4.0",
            "--ex", "xen catch hypercall multicall", "--ex", "continue"]
    script = (f"cd {shlex.quote(str(ROOT))} && XENDBG_TUI_TIMINGS={shlex.quote(str(timings))} "
              f"{' '.join(shlex.quote(a) for a in argv)}")
    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "160", "-y", "50", "sh", "-c", script], check=True)
    try:
        wait(name, "STOPPED: caught multicall")
        for _ in range(5):  # stepi stops: the whole screen refreshed each time
            before = timings.read_text().count("\n")
            subprocess.run(["tmux", "send-keys", "-t", name, "F7"], check=True)
            deadline = time.monotonic() + 20
            while timings.read_text().count("\n") == before and time.monotonic() < deadline:
                time.sleep(0.05)
        subprocess.run(["tmux", "send-keys", "-t", name, "F10"], check=True)
        deadline = time.monotonic() + 20
        while subprocess.run(["tmux", "has-session", "-t", name], capture_output=True).returncode == 0:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    subprocess.run(["/usr/bin/python3", str(ROOT / "fixtures" / "run"), "shim32", "--build-only", "--quiet"],
                   check=True)
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            timings = Path(tmp) / f"run{i}.jsonl"
            timings.touch()
            one_run(i, timings)
            for line in timings.read_text().splitlines():
                record = json.loads(line)
                samples.setdefault(record["what"], []).append(record["seconds"] * 1000)
    result = {what: {"n": len(v), "median_ms": round(statistics.median(v), 1), "max_ms": round(max(v), 1)}
              for what, v in samples.items()}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/python3
"""Boot a bundled guest under QEMU and open xendbg on it, stopped at its first multicall.

    tools/walkthrough.py [--platform shim32|xen64|linux64] [--abi A] [--gdb | --batch]

Interactive by default: the full-screen debugger, `xendbg attach` (F10 quits and ends QEMU).  --gdb
opens gdb's own prompt with xendbg loaded instead (quit ends QEMU too).  --batch, or a terminal-less
run, runs the README's walkthrough commands in gdb and exits.  Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "fixtures" / "run"
SCRIPT = ROOT / "gdbscripts" / "xendbg.py"

# What the README walks through, once stopped at the first multicall.
WALKTHROUGH = [
    "xen hypercall",            # the pending multicall, decoded
    "xen multicall",            # its batch, entry by entry
    "xen traps --registered",   # the virtual IDT the guest registered before it
    "xen callbacks --registered",
    "xen check",                # Xen's rules over the pending call and the registered state
    "xen vcpus",
    "xen catch delete",
    "xen trace start",          # then trace the rest of the run, strace-style
    "continue",
    "xen trace show 12",
    "xen stats",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, runner: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if runner.poll() is not None:
            sys.exit(f"walkthrough: the platform ended before gdb could attach (status {runner.returncode})")
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                rows = Path(table).read_text().splitlines()[1:]
            except OSError:
                continue
            if any(r.split()[3] == "0A" and int(r.split()[1].rsplit(":", 1)[1], 16) == port for r in rows):
                return
        time.sleep(0.05)
    sys.exit("walkthrough: QEMU did not open its gdbstub")


def attach(args: argparse.Namespace) -> int:
    """`xendbg attach` on the platform, stopped at the first multicall (it boots and ends QEMU itself)."""
    python = ROOT / ".venv" / "bin" / "python"
    if not python.exists():
        sys.exit("walkthrough: no .venv: run ./setup.sh env first")
    argv = [str(python), "-m", "xendbg.cli", "attach", "--platform", args.platform]
    if args.abi:
        argv += ["--abi", args.abi, "--xen", args.abi]
    # The trace from the first hypercall: the trace pane shows what led to the multicall, and xendbg
    # sees every registration (Esc t / Esc c show the registered trap table and callbacks).
    argv += ["--ex", "xen trace start", "--ex", "xen catch hypercall multicall", "--ex", "continue"]
    os.chdir(ROOT)  # the project's xendbg package, whatever the current directory
    os.execv(argv[0], argv)
    return 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--platform", default="shim32", help="shim32 (default), xen64 or linux64")
    ap.add_argument("--abi", help="the Xen ABI the platform emulates or expects (default: its own)")
    ap.add_argument("--gdb", action="store_true", help="gdb's own prompt instead of the full-screen debugger")
    ap.add_argument("--batch", action="store_true", help="run the walkthrough commands and exit")
    args = ap.parse_args()
    batch = args.batch or not sys.stdin.isatty() or not sys.stdout.isatty()
    if not batch and not args.gdb:
        return attach(args)
    base = [sys.executable, str(RUN), args.platform] + (["--abi", args.abi] if args.abi else [])
    built = subprocess.run(base + ["--artifacts"], capture_output=True, text=True)
    if built.returncode:
        sys.exit(f"walkthrough: cannot build {args.platform}: {built.stderr.strip()}")
    artifacts = json.loads(built.stdout)
    port = free_port()
    runner = subprocess.Popen(base + ["--gdb", str(port), "--timeout", "900", "--quiet"])
    try:
        wait_listening(port, runner)
        symbols = artifacts.get("symbols") or []
        commands = ["set pagination off" if batch else "set pagination on", "set confirm off",
                    f"set architecture {artifacts['arch']}"]
        commands += [f"file {symbols[0]}"] if symbols else []
        commands += [f"add-symbol-file {s}" for s in symbols[1:]]
        commands += [f"target remote 127.0.0.1:{port}", f"source {SCRIPT}"]
        if args.abi:
            commands.append(f"set xen abi {args.abi}")
        commands += ["xen catch hypercall multicall", "continue"]
        if batch:  # echo each command, as if typed, so the output reads like the README
            commands += [c for command in WALKTHROUGH for c in (f"echo \\n(gdb) {command}\\n", command)]
        argv = ["gdb", "-nx", "-q"] + (["-batch"] if batch else [])
        for command in commands:
            argv += ["-ex", command]
        return subprocess.call(argv)
    finally:
        if runner.poll() is None:
            os.kill(runner.pid, signal.SIGTERM)  # the runner ends its QEMU
            runner.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())

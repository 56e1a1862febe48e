"""pytest fixtures that boot a test platform (fixtures/run PLATFORM ...) under QEMU, optionally with the
gdbstub on a free loopback port, and hand tests the transcript and a gdb connected to it.

    def test_x(platform_run):            # transcript only; cached per (platform, abi, faulty)
        res = platform_run("shim32", abi="2.0")
        assert res.ok and res.transcript.steps["set_fast_trap"].rc == 0

    def test_y(boot_gdb):                # QEMU waiting for gdb
        booted = boot_gdb("shim32", abi="4.0")
        out = booted.gdb_batch("hbreak *xen_int82", "continue", "p/x $eax")
        mi = booted.gdb_mi()             # pygdbmi GdbController, connected and stopped at reset

Every QEMU is bounded by the runner's --timeout and ended through the runner's PID.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"
RUN = FIXTURES / "run"
sys.path.insert(0, str(FIXTURES))

from platforms.common import Transcript, parse_transcript  # noqa: E402

from xendbg.mi.attach import listening  # noqa: E402 - the same /proc check xendbg attach makes

XENDBG_SCRIPT = ROOT / "gdbscripts" / "xendbg.py"  # what a user `source`s in gdb


def frame_recorder(location: str, offsets: tuple[int, ...], word: int = 8, stack_word: bool = False,
                   cpu: bool = False) -> str:
    """A gdb Python script (to `source`) whose hardware breakpoint at `location` records, at each hit and
    with no xendbg code, fields of the struct cpu_user_regs whose address is in RDI (pv_hypercall,
    do_entry_int82): the 8-byte values at `offsets`, cut to `word` bytes; with `stack_word`, also the word
    at the guest stack pointer, which must be the last offset; with `cpu`, first the CPU (gdb's thread less
    one).  `RAW.seen` holds one list per hit."""
    mask = (1 << 8 * word) - 1
    return f"""
import gdb, json, struct
class RawEntries(gdb.Breakpoint):
    def __init__(self):
        super().__init__("*{location}", type=gdb.BP_HARDWARE_BREAKPOINT)
        self.seen = []
    def stop(self):
        inferior = gdb.selected_inferior()
        regs = bytes(inferior.read_memory(int(gdb.parse_and_eval("$rdi")) & (1 << 64) - 1, 200))
        entry = [struct.unpack_from("<Q", regs, at)[0] & {mask} for at in {list(offsets)}]
        if {stack_word}:
            entry.append(int.from_bytes(bytes(inferior.read_memory(entry[-1], {word})), "little"))
        if {cpu}:
            entry.insert(0, gdb.selected_thread().num - 1)
        self.seen.append(entry)
        return False
RAW = RawEntries()
"""


def json_blocks(out: str) -> list[dict]:
    """The JSON objects a batch gdb printed (each starts with '{' alone on a line)."""
    blocks, depth, current = [], 0, []
    for line in out.splitlines():
        if line == "{" and depth == 0:
            current = []
        if depth or line == "{":
            current.append(line)
            depth += line.count("{") - line.count("}")
            if depth == 0:
                blocks.append(json.loads("\n".join(current)))
    return blocks


SYSTEM_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def runner_argv(platform: str, abi: str | None, faulty: bool, extra: list[str]) -> list[str]:
    argv = [SYSTEM_PYTHON, str(RUN), platform]
    if abi:
        argv += ["--abi", abi]
    if faulty:
        argv.append("--faulty")
    return argv + extra


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str
    elapsed: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def transcript(self) -> Transcript:
        return parse_transcript(self.stdout)


def build(platform: str, abi: str | None = None, faulty: bool = False) -> dict:
    """Build a platform and return its artifacts (JSON from fixtures/run --artifacts)."""
    r = subprocess.run(runner_argv(platform, abi, faulty, ["--artifacts"]), capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, f"build of {platform} failed: {r.stderr}"
    return json.loads(r.stdout)


def run_platform(
    platform: str, abi: str | None = None, faulty: bool = False, timeout: float = 60
) -> RunResult:
    build(platform, abi, faulty)
    start = time.monotonic()
    r = subprocess.run(runner_argv(platform, abi, faulty, ["--timeout", str(timeout)]), capture_output=True,
                       text=True, timeout=timeout + 30)
    return RunResult(r.returncode, r.stdout, r.stderr, time.monotonic() - start)


@pytest.fixture(scope="session")
def platform_run() -> Callable[..., RunResult]:
    """Boot a platform to completion; results are cached for the session."""
    cache: dict[tuple, RunResult] = {}

    def get(platform: str, abi: str | None = None, faulty: bool = False, timeout: float = 60) -> RunResult:
        key = (platform, abi, faulty)
        if key not in cache:
            cache[key] = run_platform(platform, abi, faulty, timeout)
        return cache[key]

    return get


class Booted:
    """A platform started with --gdb, waiting for gdb before its first instruction."""

    def __init__(self, platform: str, abi: str | None, faulty: bool, timeout: float,
                 extra: tuple[str, ...] = ()) -> None:
        self.artifacts = build(platform, abi, faulty)
        self.port = free_port()
        self.timeout = timeout
        argv = runner_argv(platform, abi, faulty, ["--gdb", str(self.port), "--timeout", str(timeout), *extra])
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not listening(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out, err = self.proc.communicate()
                raise RuntimeError(f"QEMU did not open its gdbstub: {err.strip() or out[-500:]}")
            time.sleep(0.02)
        self._mi = None

    def symbol_commands(self) -> list[str]:
        syms = self.artifacts.get("symbols") or []
        cmds = ["set pagination off", "set confirm off"]
        if self.artifacts.get("arch"):
            cmds.append(f"set architecture {self.artifacts['arch']}")
        if syms:
            cmds.append(f"file {syms[0]}")
            cmds += [f"add-symbol-file {s}" for s in syms[1:]]
        return cmds

    def gdb_batch(self, *commands: str, timeout: float = 60) -> str:
        """Run one batch gdb (`gdb -nx -batch -ex ...`) connected to the platform; returns its output."""
        argv = ["gdb", "-nx", "-batch"]
        for c in [*self.symbol_commands(), f"target remote 127.0.0.1:{self.port}", *commands]:
            argv += ["-ex", c]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return r.stdout + r.stderr

    def gdb_mi(self):  # -> pygdbmi.gdbcontroller.GdbController
        """An MI session (pygdbmi) with symbols loaded and connected."""
        from pygdbmi.gdbcontroller import GdbController

        mi = GdbController(command=["gdb", "--nx", "--quiet", "--interpreter=mi3"],
                           time_to_check_for_additional_output_sec=0.05)
        for c in [*self.symbol_commands(), f"target remote 127.0.0.1:{self.port}"]:
            mi.write(f"-interpreter-exec console \"{c}\"", timeout_sec=30)
        self._mi = mi
        return mi

    def qemu_pid(self) -> int:
        """The PID of this platform's QEMU (a descendant of the runner we started)."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                if b"qemu-system" in (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")[0]:
                    return pid
            except OSError:
                pass
            todo += children.get(pid, [])
        raise RuntimeError("no QEMU among the runner's descendants")

    def finish(self, timeout: float | None = None) -> RunResult:
        """Wait for the runner to end (the guest must be running: continue or detach gdb first)."""
        start = time.monotonic()
        try:
            out, err = self.proc.communicate(timeout=timeout or self.timeout + 10)
        except subprocess.TimeoutExpired:
            self.stop()
            out, err = self.proc.communicate()
        return RunResult(self.proc.returncode, out, err, time.monotonic() - start)

    def stop(self) -> None:
        if self._mi is not None:
            self._mi.exit()
            self._mi = None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)   # the runner ends its QEMU on SIGTERM
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def boot_gdb() -> Iterator[Callable[..., Booted]]:
    """Factory: boot_gdb(platform, abi=None, faulty=False, timeout=60, extra=()) -> Booted (extra: more
    fixtures/run options, e.g. --xentrace); stopped at teardown."""
    booted: list[Booted] = []

    def start(platform: str, abi: str | None = None, faulty: bool = False, timeout: float = 60,
              extra: tuple[str, ...] = ()) -> Booted:
        b = Booted(platform, abi, faulty, timeout, extra)
        booted.append(b)
        return b

    yield start
    for b in booted:
        b.stop()

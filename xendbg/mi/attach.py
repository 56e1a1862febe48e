"""Starting what `xendbg attach` drives: a bundled platform under QEMU (fixtures/run), and a gdb over MI
with xendbg loaded, the symbol files and the target.  Everything that can fail here fails before the
screen opens, in one line (XendbgError), and leaves no gdb or QEMU behind."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from xendbg.errors import UsageError, XendbgError
from xendbg.mi import PLATFORMS
from xendbg.mi.client import MiClient, MiError, Record

ROOT = Path(__file__).resolve().parents[2]  # the project: gdbscripts/, fixtures/
SCRIPT = ROOT / "gdbscripts" / "xendbg.py"
RUNNER = ROOT / "fixtures" / "run"
GDB_MIN = (13, 1)  # gdb.MICommand (the -xen-* commands) came with gdb 13
ARCHES = {"i386": "i386", "x86-64": "i386:x86-64"}
PLATFORM_TIMEOUT = 3600  # seconds QEMU may live under the runner (it still ends with the session)


@dataclass
class AttachOptions:
    target: str | None = None  # HOST:PORT or PORT
    platform: str | None = None
    abi: str | None = None
    faulty: bool = False
    symbols: list[str] = field(default_factory=list)
    arch: str | None = None
    xen: str | None = None
    gdb: str = "gdb"
    trace: str | None = None
    commands: list[str] = field(default_factory=list)  # run after attaching, as if typed


def parse_target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"not a gdbstub address: {text!r} (give HOST:PORT or PORT)")
    return host or "127.0.0.1", int(port)


def find_gdb(path: str) -> str:
    """The gdb to drive: it must exist and be 13 or later (gdb.MICommand)."""
    found = shutil.which(path)
    if found is None:
        raise UsageError(f"no gdb at {path!r}: install Debian's gdb (apt-get install gdb) or give --gdb PATH")
    try:
        out = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"cannot run {found}: {exc}") from None
    first = out.splitlines()[0] if out else ""
    match = re.search(r"(\d+)\.(\d+)", first)
    if match is None or "gdb" not in first.lower():
        raise UsageError(f"{found} does not say which gdb it is (gdb --version): is it gdb?")
    version = (int(match.group(1)), int(match.group(2)))
    if version < GDB_MIN:
        raise UsageError(f"{found} is gdb {version[0]}.{version[1]}; xendbg attach needs gdb "
                         f"{GDB_MIN[0]}.{GDB_MIN[1]} or later (its Python MI commands)")
    return found


def check_symbols(paths: list[str]) -> None:
    for path in paths:
        if not os.path.isfile(path):
            raise UsageError(f"no symbol file {path}")


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port, read from /proc: connecting would take QEMU's only
    gdbstub connection."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Platform:
    """A bundled platform: built (its artifacts: symbol files, gdb architecture) when made, booted by
    fixtures/run with QEMU waiting for gdb by `start()`; `stop()` ends it (the runner ends its QEMU on
    SIGTERM)."""

    def __init__(self, name: str, abi: str | None, faulty: bool) -> None:
        if name not in PLATFORMS:
            raise UsageError(f"unknown platform {name!r} ({', '.join(PLATFORMS)})")
        if not RUNNER.is_file():
            raise UsageError(f"--platform needs xendbg's source tree: no {RUNNER.relative_to(ROOT)} next to it")
        self.base = [sys.executable if not os.path.exists("/usr/bin/python3") else "/usr/bin/python3",
                     str(RUNNER), name] + (["--abi", abi] if abi else []) + (["--faulty"] if faulty else [])
        built = subprocess.run(self.base + ["--artifacts"], capture_output=True, text=True)
        if built.returncode:
            lines = (built.stderr or built.stdout).strip().splitlines()
            raise UsageError(lines[-1] if lines else f"cannot build {name}")
        self.artifacts = json.loads(built.stdout)
        self.name = name
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Boot QEMU, waiting for gdb (`wait()` until its gdbstub listens)."""
        self.port = _free_port()
        self.proc = subprocess.Popen(
            self.base + ["--gdb", str(self.port), "--timeout", str(PLATFORM_TIMEOUT), "--quiet"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)

    def wait(self, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while not listening(self.port):
            proc = self.proc
            if proc is None or proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode(errors="replace").strip() if proc and proc.stderr else ""
                self.stop()
                raise XendbgError(f"{self.name} did not open its gdbstub: "
                                  f"{err.splitlines()[-1] if err else 'timeout'}")
            time.sleep(0.01)

    @property
    def symbols(self) -> list[str]:
        return list(self.artifacts.get("symbols") or [])

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the runner and its QEMU
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def start_gdb(gdb: str, on_record: Callable[[Record], None]) -> MiClient:
    return MiClient([gdb, "--nx", "--quiet", "--interpreter=mi3"], on_record,
                    env={**os.environ, "TERM": "dumb"})


def prepare(client: MiClient, symbols: list[str], arch: str | None, columns: int = 0) -> None:
    """Load xendbg and the symbol files (before the target is up: QEMU boots meanwhile).  `columns`:
    the width console output is rendered at (0: gdb's own)."""
    setup = ["-gdb-set mi-async on", "-gdb-set pagination off", "-gdb-set confirm off",
             "-gdb-set tcp auto-retry off", "-gdb-set tcp connect-timeout 5"]
    setup += [f"-gdb-set width {columns}"] if columns else []
    for command in setup:
        client.command(command)
    lines = [f"set architecture {ARCHES.get(arch, arch)}"] if arch else []
    if symbols:
        lines.append(f"file {symbols[0]}")
        lines += [f"add-symbol-file {path}" for path in symbols[1:]]
    lines.append(f"source {SCRIPT}")
    for line in lines:
        try:
            client.console(line, timeout=60)
        except MiError as exc:
            raise XendbgError(f"gdb refused {line!r}: {exc}") from None
    exists = client.command("-info-gdb-mi-command xen-hypercall").get("payload") or {}
    if exists.get("command", {}).get("exists") != "true":
        raise XendbgError(f"xendbg did not load into gdb (source {SCRIPT}): run ./setup.sh env")


def connect(client: MiClient, host: str, port: int, xen: str | None, trace: str | None) -> None:
    """Attach to the gdbstub (the target stays stopped), then `set xen abi` and start the trace."""
    try:
        client.command(f"-target-select remote {host}:{port}", timeout=20)
    except MiError as exc:
        why = str(exc).removeprefix(f"{host}:{port}: ").rstrip(".")
        raise UsageError(f"cannot attach to {host}:{port}: {why}") from None
    if xen:
        try:
            client.console(f"set xen abi {xen}")
        except MiError as exc:
            raise UsageError(f"--xen {xen}: {exc}") from None
    if trace:
        try:
            client.console(f"xen trace start --file {shlex.quote(trace)}")
        except MiError as exc:
            raise UsageError(f"--trace {trace}: {exc}") from None

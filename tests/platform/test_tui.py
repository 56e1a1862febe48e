"""`xendbg attach` in a real terminal: tmux runs the TUI (160x50), the tests press keys (send-keys) and
read the screen (capture-pane), against shim32 (Xen 2.0 and 4.0) and xen64 booted by --platform.

Every process a test starts carries a marker in its environment (XENDBG_TEST_MARK): gdb, the runner
and QEMU inherit it, so "nothing left behind" is checked by the PIDs that have it, and a stray one is
ended by its PID.  Each wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import build

from xendbg.abi import resolve_generation

pytestmark = pytest.mark.platform

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def marked(mark: str) -> list[int]:
    """The PIDs whose environment carries this test's marker."""
    found = []
    needle = f"XENDBG_TEST_MARK={mark}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Tui:
    """One `xendbg attach ARGS` in its own tmux session."""

    def __init__(self, args: list[str], tmp: Path) -> None:
        self.mark = uuid.uuid4().hex
        self.name = f"xendbg-tui-{self.mark[:12]}"
        tmp = tmp / self.mark[:8]
        tmp.mkdir()
        self.status = tmp / "status"
        self.stderr = tmp / "stderr"
        self.timings = tmp / "timings.jsonl"
        argv = " ".join(shlex.quote(a) for a in [PYTHON, "-m", "xendbg.cli", "attach", *args])
        script = (f"cd {shlex.quote(str(ROOT))} && XENDBG_TEST_MARK={self.mark} "
                  f"XENDBG_TUI_TIMINGS={shlex.quote(str(self.timings))} {argv} 2>{shlex.quote(str(self.stderr))}; "
                  f"echo $? > {shlex.quote(str(self.status))}; sleep 600")
        subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", "160", "-y", "50", "sh", "-c", script],
                       check=True, timeout=10)

    def screen(self, colours: bool = False) -> str:
        argv = ["tmux", "capture-pane", "-p", "-t", self.name] + (["-e"] if colours else [])
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout

    def keys(self, *keys: str) -> None:
        for key in keys:
            subprocess.run(["tmux", "send-keys", "-t", self.name, key], check=True, timeout=10)
            time.sleep(0.15)

    def type(self, line: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, "-l", line], check=True, timeout=10)
        self.keys("Enter")

    def wait(self, pattern: str, timeout: float = 60) -> str:
        """The screen once `pattern` (a regex) shows on it."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if re.search(pattern, screen, re.M):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not on the screen after {timeout} s:\n{screen}\n"
                                     f"stderr: {self.stderr.read_text() if self.stderr.exists() else ''}")
            time.sleep(0.1)

    def exit_status(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while not self.status.exists() or not self.status.read_text().strip():
            if time.monotonic() > deadline:
                raise AssertionError(f"xendbg attach did not end:\n{self.screen()}")
            time.sleep(0.1)
        return int(self.status.read_text())

    def processes(self) -> dict[int, str]:
        """The TUI's processes: xendbg, gdb, the runner, QEMU (not the shell that waits in the pane)."""
        return {pid: cmdline(pid) for pid in marked(self.mark) if not cmdline(pid).startswith("sh -c")}

    def close(self) -> None:
        left = self.processes()
        for pid in left:  # only ours, by PID
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True, timeout=10)


@pytest.fixture
def tui(tmp_path):
    started: list[Tui] = []

    def start(*args: str) -> Tui:
        t = Tui(list(args), tmp_path)
        started.append(t)
        return t

    yield start
    for t in started:
        t.close()


def quit_cleanly(t: Tui, qemu_running: bool = True) -> None:
    """F10 ends xendbg attach with status 0, and with it gdb and (--platform) QEMU: no PID is left."""
    pids = t.processes()
    assert any("qemu-system" in c for c in pids.values()) == qemu_running, pids
    assert any("--interpreter=mi3" in c for c in pids.values()), pids
    t.keys("F10")
    assert t.exit_status() == 0, t.stderr.read_text()
    deadline = time.monotonic() + 15
    while t.processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert t.processes() == {}, t.processes()
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists() and cmdline(pid) == pids[pid]]


@pytest.mark.parametrize("abi", ["2.0", "4.0"])
def test_shim32_first_multicall_registered_state_trace_and_quit(tui, tmp_path, abi):
    trace = tmp_path / "trace.jsonl"
    t = tui("--platform", "shim32", "--abi", abi, "--xen", abi, "--trace", str(trace),
            "--ex", "xen catch hypercall multicall", "--ex", "continue")
    screen = t.wait(r"STOPPED: caught multicall \(at int 0x82\)")
    assert "32-bit PV guest kernel (ring 1)" in screen and "vCPU 0 of 2" in screen
    assert re.search(rf"^multicall\s+nr 13\s+\[Xen {abi} ABI", screen, re.M), screen
    assert "multicall batch at 0x405ae0: 3 entries" in screen  # the detail pane follows the call
    for entry in (r"0\s+17\s+xen_version", r"1\s+18\s+console_io\s+cmd=CONSOLEIO_write",
                  r"2\s+3\s+stack_switch\s+ss=0x"):
        assert re.search(entry, screen), screen
    # The trace (--trace) shows the calls before it, strace-style, with their results.
    assert re.search(r"cpu0 set_trap_table\(traps=0x[0-9a-f]+\) = -?\w+", screen), screen
    t.keys("F2", "PageUp")  # the trace pane (F2 from the detail pane) scrolled back to its first lines
    screen = t.wait(r"trace: on \(F9\)  \[1-\d+ of \d+\]")
    assert re.search(r"cpu0 xen_version\(cmd=", screen), screen
    t.keys("PageDown", "PageDown", "PageDown")  # back at the bottom: it follows new records again
    t.wait(r"trace: on \(F9\)  \[\d+-(\d+) of \1\]")
    # Esc t: the registered trap table, replayed from the traced set_trap_table.
    t.keys("M-t")
    screen = t.wait(r"detail: registered trap table")
    screen = t.wait(r"registered: 6 vectors")
    assert re.search(r"0x80\s+int 0x80\s+3", screen), screen
    t.keys("M-c")
    screen = t.wait(r"detail: registered callbacks")
    assert re.search(r"^event\s+0x[0-9a-f]+\s+0x(0819|e019)", screen, re.M), screen
    if abi == "2.0":
        assert "fast trap: vector 0x80" in screen
    t.keys("F12")
    screen = t.wait(r"vCPU 1 of 2")
    t.keys("F11")
    t.wait(r"vCPU 0 of 2")
    t.keys("F1")
    t.wait(r"xendbg attach: keys")
    t.keys("F1")
    t.keys("F7")  # into the hypervisor's int $0x82 handler
    screen = t.wait(r"STOPPED: stepped one instruction")
    assert "xendbg attach: keys" not in screen
    # Run to the end: the guest shuts down, QEMU exits, the screen says so and keeps the trace.
    t.type("xen catch delete")
    t.wait(r"no longer catching hypercalls")
    t.keys("F5")
    screen = t.wait(r"GONE: the target is gone", timeout=60)
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    last_call = [r for r in records if r["event"] == "call"][-1]
    assert last_call["line"] in screen, screen  # the last record the guest made is on the screen
    quit_cleanly(t, qemu_running=False)


def test_shim32_trap_table_rpl_finding_coloured(tui):
    t = tui("--platform", "shim32", "--abi", "2.0", "--faulty", "--xen", "2.0")
    t.wait(r"STOPPED: ")
    t.keys("F8")  # catch by name: the command line, completed by gdb
    subprocess.run(["tmux", "send-keys", "-t", t.name, "-l", "set_tr"], check=True, timeout=10)
    t.keys("Tab")
    t.wait(r"^\(xendbg\) xen catch hypercall set_trap_table\s*$")
    t.keys("Enter")
    t.wait(r"catching set_trap_table")
    t.keys("F9")
    t.wait(r"trace: on")
    t.keys("F5")
    screen = t.wait(r"STOPPED: caught set_trap_table")
    assert re.search(r"cpu0 stack_switch\(.*\) = -?\w+", screen), screen  # traced before it, with its result
    assert re.search(r"^set_trap_table\s+nr 0", screen, re.M)
    assert re.search(r"trap table at 0x[0-9a-f]+: \d+ entries", screen)  # the detail pane: the table
    finding = r"error\s+\[selector-rpl\] trap_info\[\d\] \(vector 0x[0-9a-f]+ [^)]*\): selector 0x0818 has RPL 0"
    assert re.search(finding, screen), screen
    coloured = t.screen(colours=True)
    assert re.search(r"\x1b\[[0-9;]*31m[^\n]*error", coloured), "the error finding is not red"
    quit_cleanly(t)


def test_shim32_fast_trap_stop_under_2_0(tui):
    t = tui("--platform", "shim32", "--abi", "2.0", "--xen", "2.0", "--ex", "xen break fasttrap", "--ex", "continue")
    t.wait(r"now on the fast trap")  # xendbg stopped once to place the breakpoint where it was registered
    t.wait(r"STOPPED:")
    t.keys("F5")
    screen = t.wait(r"STOPPED: entered the fast trap")
    assert "interrupted guest user (ring 3)" in screen  # the bounce frame in the detail pane
    assert re.search(r"fasttrap frame|frame for vector 0x80", screen), screen
    quit_cleanly(t)


def test_xen64_interrupt_continue_and_first_multicall(tui):
    t = tui("--platform", "xen64")
    t.wait(r"STOPPED: ")
    t.keys("F5")
    t.wait(r"RUNNING \(Ctrl-C stops it\)")
    t.keys("C-c")
    screen = t.wait(r"STOPPED: interrupted \(Ctrl-C\)")
    assert "GONE" not in screen
    t.type("xen catch hypercall multicall")
    t.wait(r"catching multicall")
    t.keys("F5")
    # xen64 has Xen's symbols (xen-syms): the catch is inside Xen, at do_multicall.
    screen = t.wait(r"STOPPED: caught multicall \(in Xen at do_multicall", timeout=180)
    assert "in Xen (ring 0)" in screen
    generation = resolve_generation(build("xen64")["xen_version"])  # of the Xen the platform runs
    assert re.search(rf"^multicall\s+nr 13\s+\[Xen {re.escape(generation)} ABI \(from Xen's image", screen,
                     re.M), screen
    assert re.search(r"multicall batch at 0x[0-9a-f]+: 4 entries", screen), screen
    assert re.search(r"0\s+17\s+xen_version", screen), screen
    quit_cleanly(t)


def test_qemu_killed_keeps_the_trace(tui, tmp_path):
    trace = tmp_path / "trace.jsonl"
    t = tui("--platform", "shim32", "--abi", "4.0", "--trace", str(trace),
            "--ex", "xen catch hypercall multicall", "--ex", "continue")
    t.wait(r"STOPPED: caught multicall")
    qemu = [pid for pid, c in t.processes().items() if "qemu-system" in c]
    assert len(qemu) == 1
    os.kill(qemu[0], signal.SIGKILL)
    t.keys("F5")
    screen = t.wait(r"GONE: ")
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    calls = [r for r in records if r["event"] == "call"]
    assert calls and calls[-1]["line"] in screen  # no record lost: the last one traced is shown
    assert "Traceback" not in screen
    quit_cleanly(t, qemu_running=False)


def test_unreachable_port_and_wrong_symbols(tui, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    t = tui(f"127.0.0.1:{port}")
    assert t.exit_status() == 2
    err = t.stderr.read_text()
    # One line; gdb's own wording of the refusal differs between releases (gdb 16: "could not connect: ...").
    assert err.startswith(f"xendbg: error: cannot attach to 127.0.0.1:{port}: ") and err.count("\n") == 1, err
    assert err.rstrip().endswith("Connection refused"), err
    assert t.processes() == {}
    t2 = tui("--platform", "shim32", "--symbols", str(tmp_path / "nope.elf"))
    assert t2.exit_status() == 2
    assert t2.stderr.read_text() == f"xendbg: error: no symbol file {tmp_path / 'nope.elf'}\n"
    assert t2.processes() == {}


def test_xen64_at_reset_the_status_line_says_real_mode_as_cr0_does(tui):
    """Before its first instruction the CPU is in real mode (QEMU -S): the status line says so, never
    "in Xen", and gdb's own CR0 in the same session agrees."""
    t = tui("--platform", "xen64")
    screen = t.wait(r"vCPU 0 of 2 \| (?!mode \?).* \| STOPPED: ")  # the status line, once its mode is read
    assert "| in real mode, paging off (firmware or boot code) |" in screen and "in Xen" not in screen, screen
    t.type("info registers cr0 cs")
    screen = t.wait(r"^cr0\s+0x[0-9a-f]+")
    cr0 = int(re.search(r"^cr0\s+(0x[0-9a-f]+)", screen, re.M).group(1), 16)
    assert not cr0 & 1 and not cr0 & 1 << 31, screen  # CR0.PE and CR0.PG clear: real mode, no paging
    assert re.search(r"^cs\s+0xf000\s", screen, re.M), screen
    quit_cleanly(t)


def test_xen32_first_multicall_at_xens_compat_handler(tui):
    """xendbg attach on the 32-bit ring-1 guest under the Xen built from source: caught inside Xen at
    compat_multicall, decoded as a 32-bit PV call; the batch's first op is what gdb reads raw at the
    handler's C argument (the guest's call_list in RDI), in the same session."""
    t = tui("--platform", "xen32")
    t.wait(r"STOPPED: ")
    t.type("xen catch hypercall multicall")
    t.wait(r"catching multicall")
    t.keys("F5")
    screen = t.wait(r"STOPPED: caught multicall \(in Xen at compat_multicall", timeout=120)
    assert "in Xen (ring 0)" in screen
    assert re.search(r"^multicall\s+nr 13\s+\[Xen 4\.\d+ ABI \(from Xen's image: Xen 4\.\d+\), 32-bit PV", screen,
                     re.M), screen
    t.type("x/wx $rdi")
    raw = r"^0x[0-9a-f]+(?: <\w+>)?:(?:\^I|\s)+(0x[0-9a-f]{8})\s*$"  # the console shows gdb's tab as ^I
    screen = t.wait(raw)
    op = int(re.findall(raw, screen, re.M)[-1], 16)
    assert re.search(rf"^0\s+{op}\s+\w+", screen, re.M), screen
    quit_cleanly(t)

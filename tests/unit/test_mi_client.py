"""The MI client and MiTarget against a stand-in gdb (a small Python script speaking MI), the TUI's
panes and stop reasons, and `xendbg attach`'s one-line errors: no QEMU, no real gdb needed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from xendbg.errors import UnknownRegister, UnreadableMemory
from xendbg.mi.client import GdbGone, MiClient, MiError, mi_quote
from xendbg.mi.target import MiTarget

ROOT = Path(__file__).resolve().parents[2]

# Answers by command; "split" answers in two writes (a partial line), "slow" never answers, "exit" dies.
FAKE_GDB = textwrap.dedent(r'''
    import re, sys, time
    out = sys.stdout
    def say(text):
        out.write(text + "\n"); out.flush()
    for line in sys.stdin:
        m = re.match(r"(\d+)(.*)", line.strip())
        token, command = m.group(1), m.group(2)
        if command == "-data-list-register-names":
            say(token + '^done,register-names=["eax","ecx","","eip","esp","cs","xmm0"]')
        elif command.startswith("-data-list-register-values"):
            say(token + '^done,register-values=[{number="0",value="0xd"},{number="1",value="0xffffffff"},'
                '{number="3",value="0x400028"},{number="4",value="0x40b000"},{number="5",value="0x819"},'
                '{number="6",value="{v4_float = {0x0}}"}]')
        elif command.startswith("-data-read-memory-bytes"):
            address, size = command.split()[-2:]
            if int(address, 16) >= 0x1000:
                say(token + '^done,memory=[{begin="' + address + '",offset="0x0",end="0x0",contents="cd82"}]')
            else:
                say(token + '^error,msg="Cannot access memory at address ' + address + '"')
        elif command == "-split":
            out.write('~"half a '); out.flush(); time.sleep(0.2); say('line\\n"'); say(token + "^done")
        elif command == "-slow":
            pass
        elif command == "-exit":
            sys.exit(3)
        elif command == "-gdb-exit":
            say(token + "^exit"); sys.exit(0)
        else:
            say('*stopped,reason="signal-received",signal-name="SIGINT",frame={addr="0x10",func="??"}')
            say(token + '^error,msg="Undefined MI command: ' + command + '"')
''')


@pytest.fixture
def fake_gdb(tmp_path):
    script = tmp_path / "gdb.py"
    script.write_text(FAKE_GDB)
    records: list[dict] = []
    client = MiClient([sys.executable, str(script)], records.append)
    yield client, records
    client.close()


def test_results_errors_and_async_records(fake_gdb):
    client, records = fake_gdb
    with pytest.raises(MiError, match="^Undefined MI command: -bogus$"):
        client.command("-bogus")
    stopped = [r for r in records if r.get("message") == "stopped"]
    assert stopped and stopped[0]["payload"]["signal-name"] == "SIGINT"


def test_partial_lines_are_read_whole(fake_gdb):
    client, records = fake_gdb
    client.command("-split")
    assert {"type": "console", "message": None, "payload": "half a line\n"} in records


def test_a_command_gdb_never_answers_times_out_and_a_late_answer_is_dropped(fake_gdb):
    client, _ = fake_gdb
    started = time.monotonic()
    with pytest.raises(MiError, match=r"did not answer -slow within 0.3 s"):
        client.command("-slow", timeout=0.3)
    assert time.monotonic() - started < 5
    assert client.command("-data-list-register-names")["payload"]["register-names"][0] == "eax"


def test_gdb_exiting_underneath_fails_pending_commands(fake_gdb):
    client, records = fake_gdb
    waiting = client.request("-slow")
    client.request("-exit")
    with pytest.raises(GdbGone, match=r"gdb exited \(status 3\)"):
        waiting.result(5)
    with pytest.raises(GdbGone):
        client.command("-data-list-register-names", timeout=5)
    assert not client.alive and records[-1]["type"] == "gdb-exit"


def test_mi_target_registers_and_memory(fake_gdb):
    client, _ = fake_gdb
    target = MiTarget(client, thread=1)
    assert target.read_register("EAX") == 13 and target.read_register("ecx") == 0xFFFFFFFF
    assert target.read_register("pc") == 0x400028 and target.read_register("sp") == 0x40B000  # gdb's aliases
    assert target.read_register("cs") == 0x819
    with pytest.raises(UnknownRegister):
        target.read_register("xmm0")  # not a number: not for the decoders
    with pytest.raises(UnknownRegister):
        target.read_register("r15")
    assert target.read_memory(0x400028, 2) == b"\xcd\x82"
    with pytest.raises(UnreadableMemory, match="only part of it"):
        target.read_memory(0x400028, 4)  # gdb gave 2 of the 4 bytes
    with pytest.raises(UnreadableMemory, match="Cannot access memory"):
        target.read_memory(0x10, 2)


def test_commands_from_many_threads_get_their_own_answers(fake_gdb):
    client, _ = fake_gdb
    results: list[object] = []

    def ask() -> None:
        results.append(MiTarget(client).read_memory(0x400028, 2))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [b"\xcd\x82"] * 8


def test_mi_quote():
    assert mi_quote('xen trace start --file "a b.jsonl"') == r'"xen trace start --file \"a b.jsonl\""'


def test_panes_scroll_and_follow():
    from xendbg.tui.app import Pane

    pane = Pane("trace", tail=True, height=3)
    for i in range(10):
        pane.add([("", f"line {i}")])
    assert pane.offset == 7  # a tail pane shows the newest lines
    pane.scroll(-2)
    pane.add([("", "line 10")])
    assert pane.offset == 5 and pane.pinned  # scrolled back: it stays put while lines come in
    pane.scroll(100)
    assert pane.offset == 8 and not pane.pinned
    detail = Pane("detail", height=2)
    detail.set_ansi("\x1b[1mbold\x1b[0m\nplain\nthird\n")
    assert detail.lines[0] == [("bold", "b"), ("bold", "o"), ("bold", "l"), ("bold", "d")]
    detail.scroll(-5)
    assert detail.offset == 0


def test_stop_reasons():
    from xendbg.tui.app import _stop_reason

    assert _stop_reason({"reason": "signal-received", "signal-name": "SIGINT",
                         "frame": {"addr": "0x400028", "func": "xen_int82"}}) == (
        "interrupted (Ctrl-C)", " at 0x400028 <xen_int82>")
    assert _stop_reason({"reason": "end-stepping-range", "frame": {"addr": "0x10", "func": "??"}}) == (
        "stepped one instruction", " at 0x10")
    assert _stop_reason({}) == ("stopped", "")


@pytest.mark.parametrize("args,message", [
    (["attach"], "give HOST:PORT (or PORT) to attach to, or --platform"),
    (["attach", "1234", "--platform", "shim32"], "give HOST:PORT (or PORT) to attach to, or --platform"),
    (["attach", "1234", "--abi", "2.0"], "--abi and --faulty choose a bundled platform"),
    (["attach", "host:port"], "not a gdbstub address: 'host:port'"),
    (["attach", "1234", "--symbols", "/nonexistent/vmlinux"], "no symbol file /nonexistent/vmlinux"),
    (["attach", "1234", "--gdb", "/nonexistent/gdb"], "no gdb at '/nonexistent/gdb'"),
    (["attach", "1234", "--gdb", "true"], "does not say which gdb it is"),
    (["attach", "1234", "--trace", "/nonexistent/dir/t.jsonl"], "--trace /nonexistent/dir/t.jsonl: cannot write"),
    (["attach", "1234"], "xendbg attach is a full-screen program: run it in a terminal"),
])
def test_attach_refuses_in_one_line(args, message):
    r = subprocess.run([sys.executable, "-m", "xendbg.cli", *args], capture_output=True, text=True, cwd=ROOT,
                       stdin=subprocess.DEVNULL, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_too_old_gdb_is_refused(tmp_path):
    old = tmp_path / "gdb"
    old.write_text("#!/bin/sh\necho 'GNU gdb (GDB) 12.1'\n")
    old.chmod(0o755)
    r = subprocess.run([sys.executable, "-m", "xendbg.cli", "attach", "1234", "--gdb", str(old)],
                       capture_output=True, text=True, cwd=ROOT, stdin=subprocess.DEVNULL, timeout=60)
    assert r.returncode == 2
    assert f"{old} is gdb 12.1; xendbg attach needs gdb 13.1 or later" in r.stderr

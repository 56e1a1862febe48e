"""The flight recorder: `xendbg core DUMP trace --xen-syms X` reads the records still in Xen's trace
buffers of a crashed linux64 (booted with --xentrace, dumped through QMP after Xen halted), and says
so in one line when Xen never had buffers."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from conftest import XENDBG_SCRIPT as SCRIPT
from conftest import build, runner_argv
from test_postmortem_xen import core, qmp

pytestmark = pytest.mark.platform


def crash_dump(tmp, extra: list[str]) -> str:
    sock, dump = str(tmp / "qmp.sock"), str(tmp / "crash.dump")
    proc = subprocess.Popen(runner_argv("linux64", None, False, ["--qmp", sock, "--hold", "--timeout", "300", *extra]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "Hardware Dom0 crashed" in line:
                break
        time.sleep(1)  # Xen halts its CPUs right after that line
        replies = qmp(sock, {"execute": "stop"},
                      {"execute": "dump-guest-memory", "arguments": {"paging": False, "protocol": f"file:{dump}"}},
                      {"execute": "quit"})
        assert all("return" in r for r in replies), replies
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
    return dump


def test_flight_recorder_of_a_crash(tmp_path) -> None:
    artifacts = build("linux64")
    dump = crash_dump(tmp_path, ["--xentrace"])
    r = core(dump, "trace", "--xen-syms", artifacts["xen_syms"], "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    calls = [x for x in data["records"] if x["event"] == "call"]
    assert data["cpus"] == 2 and data["pages"] == 1024 and data["lost"] == 0
    assert len(calls) > 20000 and all(x["source"] == "xen-buffers" for x in calls)
    # Linux's last call: SCHEDOP_shutdown (its crash), on the CPU that ran dom0's vCPU.
    assert calls[-1]["line"] == "sched_op(cmd=SCHEDOP_shutdown)"
    assert [x["seq"] for x in calls] == list(range(1, len(calls) + 1))
    text = core(dump, "trace", "--xen-syms", artifacts["xen_syms"])
    assert text.returncode == 0 and "sched_op(cmd=SCHEDOP_shutdown)" in text.stdout.splitlines()[-1]

    plain = crash_dump(tmp_path / "..", [])
    r = core(plain, "trace", "--xen-syms", artifacts["xen_syms"])
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert "never allocated in this dump" in r.stderr and "tbuf_size=" in r.stderr


# Run inside gdb (the machine stopped at Xen's domain_shutdown): QEMU dumps its memory through QMP.
QMP_DUMP = """
import json, socket
def qmp(sock, *commands):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    f = s.makefile("rw")
    f.readline()
    for command in ({{"execute": "qmp_capabilities"}}, *commands):
        f.write(json.dumps(command) + "\\n")
        f.flush()
        while True:
            reply = json.loads(f.readline())
            if "return" in reply or "error" in reply:
                break
    s.close()
    return reply
print("QMP", json.dumps(qmp({sock!r}, {{"execute": "dump-guest-memory",
                                       "arguments": {{"paging": False, "protocol": "file:{dump}"}}}})))
"""


def test_a_dump_holds_what_a_live_drain_reads(boot_gdb, tmp_path) -> None:
    """One boot stopped at dom0's crash (domain_shutdown), nothing drained before: QEMU dumps the
    machine, then xendbg drains the same buffers live. The dump's records are the live drain's."""
    artifacts = build("linux64")
    sock, dump, live, script = (str(tmp_path / "qmp.sock"), tmp_path / "crash.dump", tmp_path / "live.jsonl",
                                tmp_path / "dump.py")
    script.write_text(QMP_DUMP.format(sock=sock, dump=dump))
    # --hold: the runner must not end QEMU when the console shows the panic, while gdb holds it there.
    booted = boot_gdb("linux64", timeout=200, extra=("--xentrace", "--qmp", sock, "--hold"))
    out = booted.gdb_batch("hbreak domain_shutdown", "continue", f"source {script}", f"source {SCRIPT}",
                           "set xen color off", "set xen abi auto", f"xen trace start --buffers --file {live}",
                           "xen trace stop", "delete", "detach", timeout=190)
    assert '"return": {}' in out and "trace stopped" in out, out[-3000:]
    drained = [x for x in (json.loads(line) for line in live.read_text().splitlines())
               if x["event"] not in ("start", "stop")]
    assert drained, out[-3000:]
    r = core(str(dump), "trace", "--xen-syms", artifacts["xen_syms"], "--json")
    assert r.returncode == 0, r.stderr
    from_dump = json.loads(r.stdout)["records"]
    assert len(from_dump) > 20000
    # The same records; `t` is when xendbg wrote each line, the one key that differs.
    assert [{k: v for k, v in x.items() if k != "t"} for x in from_dump] == \
        [{k: v for k, v in x.items() if k != "t"} for x in drained]

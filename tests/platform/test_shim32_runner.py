"""The runner's launcher and transcript contract, with a stand-in for QEMU (a shell script)."""

from __future__ import annotations

import os
import sys
import time

import pytest
from conftest import FIXTURES

sys.path.insert(0, str(FIXTURES))
from platforms import common  # noqa: E402

pytestmark = pytest.mark.platform


def fake(script: str) -> list[str]:
    return ["sh", "-c", script]


def test_steps_and_done() -> None:
    out = common.run_qemu(fake(
        "echo '[shim] hypercall first: 17'; "
        "echo '[guest] set_trap_table: rc=-1 (EPERM) entries=6 cs6=0xe018'; "
        "echo '(d0) [guest] multicall#1.entry0: rc=262144 (OK) op=17'; "
        "echo '[guest] SCENARIO DONE'"), timeout=10)
    assert out.ok and out.reason == "scenario done"
    st = out.transcript.steps["set_trap_table"]
    assert (st.rc, st.errno, st.fields) == (-1, "EPERM", {"entries": "6", "cs6": "0xe018"})
    assert out.transcript.steps["multicall#1.entry0"].rc == 262144   # prefixed console line
    assert out.first_hypercall is not None


def test_guest_failure() -> None:
    out = common.run_qemu(fake("echo '[guest] SCENARIO FAILED: no event delivered'; exit 0"), timeout=10)
    assert not out.ok and out.reason == "guest failure: no event delivered"


def test_qemu_died() -> None:
    out = common.run_qemu(fake("echo '[guest] xen_version: rc=0 (OK)'; exit 3"), timeout=10)
    assert not out.ok and out.reason == "QEMU exited (status 3) before the scenario finished"
    assert "xen_version" in out.transcript.steps


def test_timeout_ends_the_process(tmp_path) -> None:
    pidfile = tmp_path / "pid"
    start = time.monotonic()
    out = common.run_qemu(fake(f"echo $$ > {pidfile}; exec sleep 60"), timeout=0.5)
    assert not out.ok and out.reason == "timeout after 0.5 s"
    assert time.monotonic() - start < 5
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_lingering_process_ended_after_the_last_line() -> None:
    start = time.monotonic()
    out = common.run_qemu(fake("echo '[guest] SCENARIO DONE'; exec sleep 60"), timeout=30)
    assert out.ok
    assert time.monotonic() - start < common.EXIT_GRACE + 3

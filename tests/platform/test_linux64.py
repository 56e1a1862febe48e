"""linux64: Debian's Linux 6.1 as a 64-bit PV dom0 on Debian's Xen 4.17 (QEMU, TCG).

"Completed" means Linux got through its whole Xen PV start-up and reached the root-mount panic
(there is no disk and no initrd); see fixtures/platforms/linux64.py. The gdb test loads xen-syms
and stops in Xen at Linux's first multicall.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
from conftest import XENDBG_SCRIPT as SCRIPT
from conftest import json_blocks

pytestmark = pytest.mark.platform

HC_update_va_mapping, NR_HYPERCALLS = 14, 64


def test_boots_to_root_mount_panic(platform_run) -> None:
    res = platform_run("linux64", timeout=120)
    t = res.transcript
    assert res.ok, res.stderr + t.text()[-3000:]
    assert t.done and t.failed is None
    # Milestones, in order: Xen builds dom0, Linux starts, brings up its second vCPU, panics at root.
    marks = ["xen.dom0_build", "linux.start", "linux.smp", "linux.root_mount_panic"]
    times = [float(t.steps[m].fields["t"]) for m in marks]
    assert times == sorted(times)
    assert any("smp: Brought up 1 node, 2 CPUs" in line for line in t.lines)


def test_gdb_first_multicall(boot_gdb) -> None:
    """Break in Xen's do_multicall (symbols from xen-syms) and read Linux's first batch."""
    booted = boot_gdb("linux64", timeout=120)
    out = booted.gdb_batch("hbreak do_multicall", "continue", "p/x $rip", "p/x $rsi", "x/2gx $rdi",
                           "bt 3", timeout=90)
    # Debian 13's xen-syms has DWARF (arguments shown, _pv_hypercall inlined), Debian 12's has not.
    assert re.search(r"^#0  .*\bdo_multicall \(", out, re.M), out
    assert re.search(r"\bpv_hypercall \(", out), out  # reached from the 64-bit PV hypercall path
    nr = int(re.search(r"^\$2 = (0x[0-9a-f]+)$", out, re.M).group(1), 16)
    assert 1 <= nr <= 64, out  # nr_calls (RSI)
    # RDI is the guest's call list: the CPU is in Xen on dom0's page tables, so gdb reads it
    # directly. The first entry's op is a hypercall number (Linux starts with update_va_mapping).
    m = re.search(r"^0xffffffff[0-9a-f]+:\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)$", out, re.M)
    assert m, out
    op = int(m.group(1), 16)
    assert op < NR_HYPERCALLS, out


# --- the gdb front end on a real Linux dom0 ---------------------------------------------------------

def test_gdb_linux_registrations_guest_side(boot_gdb) -> None:
    """Linux registers its callbacks with callback_op and installs its virtual IDT with RPL-0
    selectors, which Xen 4.17 silently fixes up: informational findings, never errors."""
    booted = boot_gdb("linux64", timeout=120)
    steps = []
    for _ in range(4):  # event, failsafe, syscall, syscall32 (after several set_trap_table calls)
        steps += ["continue", "xen hc --json"]
    out = booted.gdb_batch(f"source {SCRIPT}", "set xen color off", "set xen abi auto",
                           "xen catch hypercall --guest set_trap_table", "continue", "xen hc --json",
                           "xen catch delete", "xen catch hypercall --guest callback_op", *steps,
                           "xen callbacks --registered --json", "xen traps --registered --json", "xen check --json",
                           "xen catch delete", "detach", timeout=110)
    assert "Traceback" not in out
    assert "xen_hypercall_pv, by signature" in out  # found in the symbol-less vmlinux
    *calls, callbacks, traps, check = json_blocks(out)
    names = [c["name"] for c in calls]
    assert set(names) == {"callback_op", "set_trap_table"}, names
    registered = [c["detail"]["callbacks"][0]["kind"] for c in calls if c["name"] == "callback_op"]
    assert {"event", "failsafe", "syscall"} <= set(registered)
    table = next(c for c in calls if c["name"] == "set_trap_table")
    assert len(table["detail"]["entries"]) >= 20 and table["detail"]["terminated"]
    severities = {(f["rule"], f["severity"]) for c in calls for f in c["findings"]}
    assert ("selector-rpl", "info") in severities and not any(s == "error" for _, s in severities)
    kinds = {c["kind"] for c in callbacks["callbacks"]["callbacks"]}
    assert {"event", "failsafe", "syscall"} <= kinds
    assert {e["vector"] for e in traps["entries"]} >= {0, 1, 3, 6, 13, 14}
    assert {f["severity"] for f in check["findings"]} == {"info"}


def test_gdb_linux_first_multicall_from_inside_xen(boot_gdb) -> None:
    """With xen-syms loaded, `xen catch hypercall multicall` stops at do_multicall only."""
    booted = boot_gdb("linux64", timeout=120)
    out = booted.gdb_batch(f"source {SCRIPT}", "set xen color off", "set xen abi auto",
                           "xen catch hypercall multicall", "continue", "xen hc --json", "xen multicall --json",
                           "xen catch delete", "detach", timeout=110)
    assert "observing in Xen at the handlers of" in out
    hc, batch = json_blocks(out)
    assert hc["name"] == "multicall" and hc["site"] == "in Xen at do_multicall() (C arguments)"
    assert 1 <= hc["args"][1]["value"] <= 64
    ops = [e["op"] for e in hc["detail"]["entries"]]
    assert ops and all(op < NR_HYPERCALLS for op in ops)
    assert [e["op"] for e in batch["entries"]] == ops
    assert not [f for f in hc["findings"] if f["severity"] == "error"]


def test_gdb_linux_first_multicall_guest_side(boot_gdb) -> None:
    """The same first batch, caught at Linux's own syscall (every hypercall before it is a gdb stop)."""
    booted = boot_gdb("linux64", timeout=150)
    out = booted.gdb_batch(f"source {SCRIPT}", "set xen color off", "set xen abi auto",
                           "xen catch hypercall --guest multicall", "continue", "xen hc --json",
                           "xen catch delete", "detach", timeout=145)
    (hc,) = json_blocks(out)
    assert hc["name"] == "multicall" and hc["site"] == "at syscall"
    assert all(e["op"] < NR_HYPERCALLS for e in hc["detail"]["entries"])
    assert all(e["result"] is None for e in hc["detail"]["entries"])


def test_trace_survives_kill_9_of_qemu(boot_gdb, tmp_path) -> None:
    """Every record reaches the JSONL file as it happens; after QEMU dies gdb and xendbg still answer."""
    log = tmp_path / "linux.jsonl"
    booted = boot_gdb("linux64", timeout=120)
    mi = booted.gdb_mi()

    def console(command: str, timeout: float = 30) -> str:
        responses = mi.write(f'-interpreter-exec console "{command}"', timeout_sec=timeout)
        return "".join(r["payload"] for r in responses if r["type"] in ("console", "log") and r["payload"])

    assert "xendbg ready" in console(f"source {SCRIPT}")
    assert "tracing every hypercall" in console(f"xen trace start --file {log}")
    mi.write("-exec-continue", timeout_sec=10)

    def calls_in_file() -> int:
        return log.read_text().count('"event":"call"') if log.exists() else 0

    def gdb_saw_qemu_die(responses: list[dict]) -> bool:
        return any(r["type"] == "notify" and r["message"] == "thread-group-exited" or
                   "Remote connection closed" in str(r.get("payload")) for r in responses)

    # Let the guest run, traced, until the file holds a good number of calls (draining gdb's output
    # meanwhile), then kill QEMU under it.
    deadline = time.monotonic() + 90
    while calls_in_file() <= 50:
        assert time.monotonic() < deadline, f"only {calls_in_file()} calls traced in 90 s"
        mi.get_gdb_response(timeout_sec=0.5, raise_error_on_timeout=False)
    os.kill(booted.qemu_pid(), signal.SIGKILL)
    deadline = time.monotonic() + 30
    noticed = False
    while not noticed and time.monotonic() < deadline:
        noticed = gdb_saw_qemu_die(mi.get_gdb_response(timeout_sec=1, raise_error_on_timeout=False))
    assert noticed, "gdb never noticed that QEMU died (no thread-group-exited, no 'Remote connection closed')"
    records = [json.loads(line) for line in log.read_text().splitlines()]  # every line is whole JSON
    calls = [r for r in records if r["event"] == "call"]
    assert len(calls) > 50
    seqs = [r["seq"] for r in records if "seq" in r and r["event"] in ("call", "error")]
    assert seqs == list(range(1, len(seqs) + 1))  # nothing missing in between
    stats = console("xen stats --json")
    counted = sum(row["calls"] for row in json.loads(stats)["hypercalls"])
    assert counted == len(calls)  # the file has every call xendbg saw, up to the last
    stopped = console("xen trace stop")
    assert f"trace stopped: {len(calls)} hypercalls traced" in stopped
    assert "Traceback" not in stats + stopped

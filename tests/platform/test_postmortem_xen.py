"""A real crash, dumped as a user would: Linux dom0 (linux64) runs to its root-mount panic and reports
SHUTDOWN_crash; Xen halts the machine; `fixtures/run --qmp SOCK --hold` keeps QEMU, and QMP stops and
dumps it.  `xendbg core DUMP --xen-syms` must name the crashing sched_op and show dom0's registered
trap table and callbacks, checked against raw reads of Xen's struct vcpu in the same dump (at the
offsets measured by hand for Debian's Xen 4.17, not the ones xendbg reads off Xen's code)."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time

import pytest
from conftest import ROOT, build, runner_argv

from xendbg.abi import resolve_generation

pytestmark = pytest.mark.platform

ENV = os.environ | {"PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
# struct vcpu of Debian's Xen 4.17 (measured: do_set_trap_table loads arch.pv.trap_ctxt from +0x490,
# register_guest_callback stores event/failsafe/syscall/syscall32 at +0x568/+0x570/+0x578/+0x580).
TRAP_CTXT, CALLBACKS = 0x490, {"event": 0x568, "failsafe": 0x570, "syscall": 0x578, "syscall32": 0x580}


class RawDump:
    """The dump's RAM by physical address (its PT_LOADs) and a bare 4-level walk: independent of xendbg."""

    def __init__(self, path: str) -> None:
        self.file = open(path, "rb")  # noqa: SIM115 - closed by the test
        head = self.file.read(64)
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        self.loads = []
        for i in range(phnum):
            self.file.seek(phoff + i * phentsize)
            kind, _, offset, _, paddr, filesz = struct.unpack("<IIQQQQ", self.file.read(40))
            if kind == 1:
                self.loads.append((paddr, filesz, offset))

    def physical(self, address: int, size: int) -> bytes:
        for paddr, filesz, offset in self.loads:
            if paddr <= address < paddr + filesz:
                self.file.seek(offset + address - paddr)
                return self.file.read(size)
        raise AssertionError(f"physical {address:#x} not in the dump")

    def virtual(self, cr3: int, address: int, size: int) -> bytes:
        table = cr3 & 0xFFFFFFFFFF000
        for shift in (39, 30, 21, 12):
            entry, = struct.unpack("<Q", self.physical(table + ((address >> shift) & 511) * 8, 8))
            assert entry & 1, f"{address:#x} not mapped"
            if shift in (30, 21) and entry & 0x80:
                base = entry & 0xFFFFFFFFFF000 & ~((1 << shift) - 1)
                return self.physical(base + (address & ((1 << shift) - 1)), size)
            table = entry & 0xFFFFFFFFFF000
        return self.physical(table + (address & 0xFFF), size)


def qmp(sock: str, *commands: dict) -> list[dict]:
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    f = s.makefile("rw")
    f.readline()
    replies = []
    for command in ({"execute": "qmp_capabilities"}, *commands):
        f.write(json.dumps(command) + "\n")
        f.flush()
        while True:
            reply = json.loads(f.readline())
            if "return" in reply or "error" in reply:
                replies.append(reply)
                break
    s.close()
    return replies[1:]


def core(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xendbg.cli", "core", *argv], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=180)


@pytest.fixture(scope="module")
def crash(tmp_path_factory) -> tuple[str, dict]:
    """linux64 run to its crash and dumped through QMP after Xen halted the machine."""
    artifacts = build("linux64")
    tmp = tmp_path_factory.mktemp("crash")
    sock, dump = str(tmp / "qmp.sock"), str(tmp / "crash.dump")
    proc = subprocess.Popen(runner_argv("linux64", None, False, ["--qmp", sock, "--hold", "--timeout", "300"]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "Hardware Dom0 crashed" in line:
                break
        assert seen and "Hardware Dom0 crashed" in seen[-1], "".join(seen[-20:])
        time.sleep(1)  # Xen halts its CPUs right after that line
        replies = qmp(sock, {"execute": "stop"},
                      {"execute": "dump-guest-memory", "arguments": {"paging": False, "protocol": f"file:{dump}"}},
                      {"execute": "quit"})
        assert all("return" in r for r in replies), replies
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err  # --hold: QEMU quit after the scenario is a success
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
    return dump, artifacts


def test_linux_crash_names_the_call_and_dom0s_registered_state(crash):
    dump, artifacts = crash
    files = ["--xen-syms", artifacts["xen_syms"], "--symbols", artifacts["vmlinux"]]
    r = core(dump, "--json", *files)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["domain"] == 0 and summary["registered_state"] == "registered state: from Xen's struct vcpu"
    rows = summary["vcpus"]
    assert [row["vcpu"] for row in rows] == [0, 1]
    def crash_call(row: dict) -> bool:
        hc = row["hypercall"]
        return bool(hc) and hc["name"] == "sched_op" and hc["subop"] == "SCHEDOP_shutdown" and \
            (hc["detail"] or {}).get("fields", {}).get("reason") == "SHUTDOWN_crash"

    crashing = [row for row in rows if crash_call(row)]
    assert len(crashing) == 1, rows  # one vCPU asked Xen to crash the domain
    assert crashing[0]["registers_from"].startswith("inside Xen on CPU")
    # The other vCPU was idle, or (on a loaded machine) itself inside Xen serving a call of its own:
    # either way it says which.
    (other,) = [row for row in rows if row is not crashing[0]]
    assert other["hypercall"] or "no hypercall in progress" in other["not_pending"]
    assert not other["hypercall"] or other["registers_from"].startswith("inside Xen on CPU")

    raw = RawDump(dump)
    try:
        for row in rows:
            registered = row["registered"]
            vcpu = int(registered["registered_from"].split(" at ")[1].split()[0], 16)
            cr3 = registered["cr3"]
            table = registered["trap_table"]["entries"]
            # Linux registers vectors 0-31 and 0x80; Xen raised the selectors' RPL to 3 (from __KERNEL_CS).
            assert [e["vector"] for e in table] == [*range(32), 0x80]
            assert {e["cs"] & 3 for e in table} == {3}
            trap_ctxt, = struct.unpack("<Q", raw.virtual(cr3, vcpu + TRAP_CTXT, 8))
            for e in table:
                vector, flags, cs, address = struct.unpack("<BBH4xQ", raw.virtual(cr3, trap_ctxt + 16 * e["vector"],
                                                                                   16))
                assert (vector, flags, cs, address) == (e["vector"], e["flags"], e["cs"], e["address"])
            callbacks = {c["kind"]: c["address"] for c in registered["callbacks"]["callbacks"]}
            assert set(callbacks) >= {"event", "failsafe", "syscall"}
            for kind, offset in CALLBACKS.items():
                assert callbacks.get(kind, 0) == struct.unpack("<Q", raw.virtual(cr3, vcpu + offset, 8))[0]
    finally:
        raw.file.close()

    # traps / callbacks print the live commands' JSON, with where the state came from
    vcpu = str(crashing[0]["vcpu"])
    traps = json.loads(core(dump, "traps", "--vcpu", vcpu, "--json", *files).stdout)
    assert traps["type"] == "trap_table" and len(traps["entries"]) == 33
    assert traps["registered_from"].startswith("from Xen's struct vcpu")
    callbacks = json.loads(core(dump, "callbacks", "--vcpu", vcpu, "--json", *files).stdout)
    generation = resolve_generation(artifacts["xen_release"])  # the Xen that ran (Debian's release decides)
    assert callbacks["callbacks"]["operation"] == "registered" and callbacks["xen"] == generation
    r = core(dump, "--domain", "7", *files)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "no domain 7" in r.stderr


def test_xen_dump_in_gdb_reads_back_as_the_live_stop(boot_gdb, tmp_path):
    """`xen dump FILE` at a caught set_trap_table on xen64: the dump, read with xen-syms, gives dom0's vCPU
    0 live on its CPU and the same pending call as the live `xen hypercall --json`."""
    from conftest import XENDBG_SCRIPT, json_blocks

    booted = boot_gdb("xen64", timeout=120)
    dump = tmp_path / "live.dump"
    out = booted.gdb_batch(f"source {XENDBG_SCRIPT}", "set xen color off", "set xen abi auto",
                           "xen catch hypercall --guest set_trap_table", "continue", "xen hypercall --json",
                           f"xen dump {dump} -z", "xen dump", "kill", timeout=120)
    live = json_blocks(out)[0]
    assert live["name"] == "set_trap_table", out
    assert f"wrote {dump}" in out and "give one FILE (usage: xen dump FILE [-z])" in out, out
    xen_syms, guest = booted.artifacts["xen_syms"], booted.artifacts["guest"]
    r = core(str(dump), "hypercall", "--json", "--xen-syms", xen_syms, "--symbols", guest)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == live | {"xen_source": f"from Xen's image: Xen {booted.artifacts['xen_release']}"}
    rows = json.loads(core(str(dump), "vcpus", "--json", "--xen-syms", xen_syms, "--symbols", guest).stdout)["vcpus"]
    assert rows[0]["registers_from"] == "live on a CPU (CPU 0, in the guest)" and rows[0]["pending"] == "set_trap_table"

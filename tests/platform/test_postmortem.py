"""Live against post-mortem: stop a platform at a caught multicall, take QEMU dumps there (through gdb's
`monitor dump-guest-memory`, plain and -z, and through the QMP socket `fixtures/run --qmp` opens), and
check that `xendbg core DUMP hypercall --json` says what the live `xen hypercall --json` said."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, Booted, json_blocks
from conftest import XENDBG_SCRIPT as SCRIPT

from xendbg.abi import resolve_generation

pytestmark = pytest.mark.platform

ENV = os.environ | {"PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
# QMP over the socket, from gdb's `shell` while gdb holds the machine stopped: the path a script takes
# to dump a guest that died without gdb attached.
QMP_DUMP = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
def ask(cmd, **args):
    f.write(json.dumps({"execute": cmd, "arguments": args}) + "\\n"); f.flush()
    while True:
        reply = json.loads(f.readline())
        if "return" in reply or "error" in reply:
            return reply
f.readline()
ask("qmp_capabilities")
print("QMP", json.dumps(ask("dump-guest-memory", paging=False, protocol="file:" + sys.argv[2])))
"""


class BootedWithQmp(Booted):
    """Booted, with `--qmp SOCKET` added to the runner's arguments."""

    def __init__(self, platform: str, abi: str | None, tmp_path, timeout: float = 90) -> None:
        self.qmp = str(tmp_path / "qmp.sock")
        super().__init__(platform, abi, False, timeout, ("--qmp", self.qmp))


def core(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xendbg.cli", "core", *argv], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=120)


def core_json(*argv: str) -> dict:
    r = core(*argv, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def stop_at_multicall(booted: BootedWithQmp, tmp_path, abi: str, catch: str) -> tuple[dict, dict[str, str]]:
    dumps = {kind: str(tmp_path / f"dump.{kind}") for kind in ("elf", "kz", "qmp")}
    out = booted.gdb_batch(
        f"source {SCRIPT}", "set xen color off", f"set xen abi {abi}", catch, "continue", "xen hypercall --json",
        f"monitor dump-guest-memory {dumps['elf']}", f"monitor dump-guest-memory -z {dumps['kz']}",
        f"shell {sys.executable} -c '{QMP_DUMP}' {booted.qmp} {dumps['qmp']}", "kill", timeout=120)
    blocks = json_blocks(out)
    assert blocks and blocks[0]["name"] == "multicall", out
    assert 'QMP {"return": {}}' in out, out
    booted.stop()
    return blocks[0], dumps


@pytest.mark.parametrize("abi", ["2.0", "4.0"])
def test_shim32_dump_decodes_as_live(tmp_path, abi):
    booted = BootedWithQmp("shim32", abi, tmp_path)
    try:
        live, dumps = stop_at_multicall(booted, tmp_path, abi, "xen catch hypercall multicall")
    finally:
        booted.stop()
    guest = booted.artifacts["guest"]
    for path in dumps.values():
        assert core_json(path, "hypercall", "--symbols", guest, "--xen", abi) == live
    vcpus = core_json(dumps["kz"], "vcpus")["vcpus"]
    assert vcpus[0]["pending"] == "multicall" and vcpus[0]["mode"] == "32-bit PV guest kernel (ring 1)"
    assert vcpus[0]["registers_from"] == "live on a CPU"
    inferred = core_json(dumps["elf"], "hypercall", "--symbols", guest)
    if abi == "2.0":  # Xen 2.0's flat code selector names its generation
        assert inferred == live | {"xen_source": "from the guest's CS 0x0819"}
    else:  # 0xe019 only says 3.0 or later: the newest, with the guess among the findings
        assert inferred["xen"] == "4.22" and inferred["findings"][-1]["rule"] == "abi-evidence"


def test_xen64_dump_decodes_as_live_and_opens_in_gdb(tmp_path):
    booted = BootedWithQmp("xen64", None, tmp_path, timeout=120)
    try:
        xen = resolve_generation(booted.artifacts["xen_release"])  # Debian 12's Xen 4.17, 13's 4.20: 4.17
        live, dumps = stop_at_multicall(booted, tmp_path, xen, "xen catch hypercall --guest multicall")
    finally:
        booted.stop()
    guest, xen_syms = booted.artifacts["guest"], booted.artifacts["xen_syms"]
    for path in dumps.values():
        assert core_json(path, "hypercall", "--symbols", guest, "--xen", xen) == live
    # Xen's version comes from xen-syms, as it does live with xen-syms loaded
    inferred = core_json(dumps["kz"], "hypercall", "--symbols", guest, "--xen-syms", xen_syms)
    assert inferred == live | {"xen_source": f"from Xen's image: Xen {booted.artifacts['xen_release']}"}
    # the gdb door on the rewritten core: virtual PT_LOADs, the xen commands read guest memory
    gdb_core = str(tmp_path / "gdb.core")
    r = core(dumps["kz"], "--to-gdb", gdb_core)
    assert r.returncode == 0 and "PT_LOADs" in r.stdout, r.stderr
    out = subprocess.run(["gdb", "-nx", "-batch", "-ex", f"file {guest}", "-ex", f"core-file {gdb_core}",
                          "-ex", f"source {SCRIPT}", "-ex", "set xen color off", "-ex", f"set xen abi {xen}",
                          "-ex", "xen hypercall --json"], capture_output=True, text=True, timeout=120).stdout
    assert json_blocks(out) == [live], out


def test_linux64_dump_decodes_as_live_inside_xen(tmp_path):
    """Linux dom0 stopped inside Xen at its first multicall (do_multicall, with xen-syms): the dump says
    the same call, the same arguments and the same batch as the live session."""
    booted = BootedWithQmp("linux64", None, tmp_path, timeout=150)
    try:
        live, dumps = stop_at_multicall(booted, tmp_path, "auto", "xen catch hypercall multicall")
    finally:
        booted.stop()
    files = ["--symbols", booted.artifacts["vmlinux"], "--xen-syms", booted.artifacts["xen_syms"]]
    dumped = core_json(dumps["kz"], "hypercall", *files)
    same = ("name", "nr", "xen", "width", "subop", "args")
    assert {k: dumped[k] for k in same} == {k: live[k] for k in same}
    assert [(e["op"], e["args"]) for e in dumped["detail"]["entries"]] == \
        [(e["op"], e["args"]) for e in live["detail"]["entries"]]

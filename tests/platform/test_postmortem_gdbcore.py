"""gdb on a QEMU dump of a 64-bit PV guest: reads the dump lacks (guest-virtual addresses; its PT_LOADs
are physical) come from the ELF file's stale bytes, and the xen commands say so; on the core that
`xendbg core --to-gdb` writes they do not."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT
from conftest import XENDBG_SCRIPT as SCRIPT

pytestmark = pytest.mark.platform


def gdb_on_core(guest: str, core: str, *commands: str) -> str:
    argv = ["gdb", "-nx", "-batch", "-ex", "set architecture i386:x86-64", "-ex", f"file {guest}",
            "-ex", f"core-file {core}", "-ex", f"source {SCRIPT}", "-ex", "set xen color off"]
    for c in commands:
        argv += ["-ex", c]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    return r.stdout + r.stderr


def test_reads_outside_the_dump_are_flagged(boot_gdb, tmp_path):
    booted = boot_gdb("xen64", timeout=90)
    guest, dump, core = booted.artifacts["guest"], tmp_path / "guest.dump", tmp_path / "guest.core"
    out = booted.gdb_batch(f"source {SCRIPT}", "xen catch hypercall --guest multicall", "continue",
                           f"monitor dump-guest-memory {dump}", "kill", timeout=90)
    assert dump.exists(), out[-2000:]
    page = booted.artifacts["hypercall_page"]
    stale = gdb_on_core(guest, str(dump), f"xen multicall {page:#x} 1", f"xen multicall {page:#x} 1")
    assert stale.count(f"xendbg: warning: {page:#x} is not in the core file") == 1, stale[-2000:]
    r = subprocess.run([sys.executable, "-m", "xendbg.cli", "core", str(dump), "--to-gdb", str(core)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    fresh = gdb_on_core(guest, str(core), f"xen multicall {page:#x} 1")
    assert "is not in the core file" not in fresh and "multicall batch at" in fresh, fresh[-2000:]

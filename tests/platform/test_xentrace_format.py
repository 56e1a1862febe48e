"""Debian's xentrace_format (package xen-utils-common) reads the files `--xentrace-out` writes.

Debian 12 ships the script with Python 2 syntax under a python3 #! line, so it runs under a Python 2.7
(pyenv's, when the system has none)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from xendbg.xentrace import events as ev
from xendbg.xentrace.records import Record
from xendbg.xentrace.xtfile import XentraceWriter

pytestmark = pytest.mark.platform

XENTRACE_FORMAT = Path("/usr/bin/xentrace_format")
FORMATS = """\
0x0020100d  CPU%(cpu)d %(tsc)d hypercall op=%(1)d a=%(2)d b=%(3)d
0x0020200e  CPU%(cpu)d %(tsc)d subcall op=%(1)d
0x0001f001  CPU%(cpu)d %(tsc)d lost n=%(1)d
"""


def python2() -> tuple[str, dict[str, str]]:
    """A Python 2.7 and the environment to run it in."""
    env = dict(os.environ)
    pyenv = shutil.which("pyenv")
    if pyenv:
        versions = subprocess.run([pyenv, "versions", "--bare"], capture_output=True, text=True).stdout.split()
        two = [v for v in versions if v.startswith("2.")]
        if two:
            env["PYENV_VERSION"] = two[-1]
    for name in ("python2.7", "python2"):
        path = shutil.which(name)
        if path and subprocess.run([path, "-c", "import sys; assert sys.version_info[0] == 2"], env=env,
                                   capture_output=True).returncode == 0:
            return path, env
    raise AssertionError("no Python 2.7 to run Debian's xentrace_format with")


def test_debian_xentrace_format_reads_our_file(tmp_path) -> None:
    assert XENTRACE_FORMAT.exists(), "apt-get install xen-utils-common"
    path = tmp_path / "trace.bin"
    out = XentraceWriter(str(path))
    out.write({0: [Record(0, ev.HYPERCALL_V2, 1000, (29 | 1 << 20, 2)),
                   Record(0, ev.SUBCALL, 1001, (14,))],
               1: [Record(1, ev.HYPERCALL_V2, 1002, (24 | 5 << 20, 0, 1))]})
    out.write({0: [Record(0, ev.LOST_RECORDS, 1003, (7, 0, 0, 0))]})
    out.close()
    formats = tmp_path / "formats"
    formats.write_text(FORMATS)
    interpreter, env = python2()
    with path.open("rb") as stdin:
        r = subprocess.run([interpreter, str(XENTRACE_FORMAT), str(formats)], stdin=stdin, capture_output=True,
                           text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["CPU0 1000 hypercall op=29 a=2 b=0", "CPU0 1001 subcall op=14",
                                     "CPU1 1002 hypercall op=24 a=0 b=1", "CPU0 1003 lost n=7"]

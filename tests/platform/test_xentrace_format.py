"""Xen's own readers of xentrace files read the files `--xentrace-out` writes.

- xenalyze (Debian's xen-utils-common, a C program, on Debian 12 and 13): its raw dump of every record
  it reads, per physical CPU, must be our records exactly, and its decode must name our hypercalls.
- xentrace_format: Debian 12 ships the script with Python 2 syntax under a python3 #! line, so it runs
  under a Python 2.7 (pyenv's, when the system has none). Xen 4.20 removed it: Debian 13 has none."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from xendbg.xentrace import events as ev
from xendbg.xentrace.records import Record
from xendbg.xentrace.xtfile import XentraceWriter

pytestmark = pytest.mark.platform

XENTRACE_FORMAT = Path("/usr/bin/xentrace_format")
XENALYZE = Path("/usr/bin/xenalyze")
CPU_CHANGE = 0x0001F003  # TRC_TRACE_CPU_CHANGE: the file's per-CPU headers, not a record of ours
FORMATS = """\
0x0020100d  CPU%(cpu)d %(tsc)d hypercall op=%(1)d a=%(2)d b=%(3)d
0x0020200e  CPU%(cpu)d %(tsc)d subcall op=%(1)d
0x0001f001  CPU%(cpu)d %(tsc)d lost n=%(1)d
"""


def sample_file(path: Path) -> dict[int, list[Record]]:
    """Two CPUs, two writes (as two drains would), a hypercall, a multicall entry and a lost-records gap."""
    drains = [{0: [Record(0, ev.HYPERCALL_V2, 1000, (29 | 1 << 20, 2)), Record(0, ev.SUBCALL, 1001, (14,))],
               1: [Record(1, ev.HYPERCALL_V2, 1002, (24 | 5 << 20, 0, 1))]},
              {0: [Record(0, ev.LOST_RECORDS, 1003, (7, 0, 0, 0))]}]
    out = XentraceWriter(str(path))
    for drain in drains:
        out.write(drain)
    out.close()
    return {0: drains[0][0] + drains[1][0], 1: drains[0][1]}


# xenalyze --dump-raw-reads: "R p CPU oOFFSET EVENT NEXTRA TSC|- [ WORD ... ] | RAW WORDS |", in hex but
# for the TSC.
RAW_READ = re.compile(r"^R p\s*(\d+) o([0-9a-f]+)\s+([0-9a-f]+) (\d)\s+(\d+|-) \[([0-9a-f ]*)\]", re.M)


def test_xenalyze_reads_our_file(tmp_path) -> None:
    assert XENALYZE.exists(), "apt-get install xen-utils-common"
    path = tmp_path / "trace.bin"
    written = sample_file(path)
    raw = subprocess.run([str(XENALYZE), "--dump-raw-reads", "--dump-no-processing", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert raw.returncode == 0, raw.stderr
    read: dict[int, dict[int, tuple]] = {}  # cpu -> offset -> record (xenalyze reads some twice)
    for cpu, offset, event, extra, tsc, words in RAW_READ.findall(raw.stdout):
        if int(event, 16) != CPU_CHANGE:
            data = tuple(int(w, 16) for w in words.split())
            assert len(data) == int(extra)
            read.setdefault(int(cpu), {})[int(offset, 16)] = (int(event, 16), None if tsc == "-" else int(tsc), data)
    got = {cpu: [by_offset[o] for o in sorted(by_offset)] for cpu, by_offset in read.items()}
    assert got == {cpu: [(r.event, r.tsc, r.words) for r in records] for cpu, records in written.items()}

    decoded = subprocess.run([str(XENALYZE), "--dump-all", str(path)], capture_output=True, text=True, timeout=60)
    assert decoded.returncode == 0, decoded.stderr
    assert re.search(r"v0 hypercall 1d \(sched_op\)", decoded.stdout), decoded.stdout
    assert re.search(r"v1 hypercall 18 \(vcpu_op\)", decoded.stdout), decoded.stdout
    assert "lost_records count 7" in decoded.stdout


def python2() -> tuple[str, dict[str, str]] | None:
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
    return None


def test_debian_xentrace_format_reads_our_file(tmp_path) -> None:
    if not XENTRACE_FORMAT.exists():
        pytest.skip("no xentrace_format: Xen 4.20 removed it (Debian 13); xenalyze reads the file instead")
    found = python2()
    if found is None:
        pytest.skip("Debian's xentrace_format needs a Python 2.7, which this machine lacks; xenalyze reads "
                    "the file instead")
    interpreter, env = found
    path = tmp_path / "trace.bin"
    sample_file(path)
    formats = tmp_path / "formats"
    formats.write_text(FORMATS)
    with path.open("rb") as stdin:
        r = subprocess.run([interpreter, str(XENTRACE_FORMAT), str(formats)], stdin=stdin, capture_output=True,
                           text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["CPU0 1000 hypercall op=29 a=2 b=0", "CPU0 1001 subcall op=14",
                                     "CPU1 1002 hypercall op=24 a=0 b=1", "CPU0 1003 lost n=7"]

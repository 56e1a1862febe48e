"""The README's main job, as its batch form runs it: boot the bundled guest, stop at its first multicall,
and run every command the README's gdb walkthrough shows, each as written."""

from __future__ import annotations

import re
import subprocess

import pytest
from conftest import ROOT, SYSTEM_PYTHON

pytestmark = pytest.mark.platform


def readme_walkthrough_commands() -> list[str]:
    """The `(gdb) xen ...` lines of the README's walkthrough block, without their comments."""
    text = (ROOT / "README.md").read_text()
    block = text.split("The walkthrough `./setup.sh demo --gdb` runs", 1)[-1].split("```", 2)[1]
    return [line.split("(gdb) ", 1)[1].split("  #")[0].strip() for line in block.splitlines()
            if line.startswith("(gdb) ")]


def test_the_walkthrough_runs_every_readme_command():
    r = subprocess.run([SYSTEM_PYTHON, str(ROOT / "tools" / "walkthrough.py"), "--batch"], capture_output=True,
                       text=True, timeout=300, stdin=subprocess.DEVNULL)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-2000:]
    assert "Traceback" not in out and "Python Exception" not in out
    assert "xendbg: cpu 0 caught hypercall multicall (at int 0x82)" in out
    assert re.search(r"multicall  nr 13  \[Xen 4\.0 ABI \(from xen_version\(\) = 4\.0", out)
    commands = readme_walkthrough_commands()
    assert "xen catch hypercall multicall" in commands and "xen stats" in commands
    for command in commands:
        if command != "continue":
            assert f"(gdb) {command}" in out or command.startswith("xen catch hypercall"), command
    assert re.search(r"^\s+\d+\.\d+ cpu[01] \w+\(.*\) = -?\w+", out, re.M)  # xen trace show: calls and results
    assert re.search(r"^calls\s+errors\s+hypercall", out, re.M)  # xen stats

"""Every way into gdb loads xendbg (gdbscripts/xendbg.py), cheaply; a real `gdb -nx -batch`, no target.

The start-up time itself is measured by `bench/run.py startup`; here, what loading imports.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT
from conftest import XENDBG_SCRIPT as SCRIPT

READY = "xendbg ready: 'help xen' lists the commands"
HELP = "Xen PV guest debugging"  # first line of `help xen`
VENV = ROOT / ".venv"


def gdb(*args: str, cwd: Path, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("XENDBG_VENV", "XENDBG_ROOT")}
    out = subprocess.run(["gdb", "-nx", "-batch", *args, "-ex", "help xen"], cwd=cwd, env={**clean, **env},
                         capture_output=True, text=True, timeout=60)
    return out.stdout + out.stderr


def assert_ready(out: str) -> None:
    assert "Traceback" not in out and "not loaded" not in out, out
    assert out.count(READY) == 1, out
    assert HELP in out and "xen catch hypercall" in out, out


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A working directory that is not the project."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    return cwd


def test_gdb_x(elsewhere):
    assert_ready(gdb("-x", str(SCRIPT), cwd=elsewhere))


def test_source_relative_in_project():
    assert_ready(gdb("-ex", "source gdbscripts/xendbg.py", cwd=ROOT))


def test_source_from_another_directory(elsewhere):
    assert_ready(gdb("-ex", f"source {SCRIPT}", cwd=elsewhere))


def test_source_from_a_python_script_elsewhere(tmp_path, elsewhere):
    # gdb 13 keeps the outer script's __file__ while it sources the inner one.
    outer = tmp_path / "scripts" / "outer.py"
    outer.parent.mkdir()
    outer.write_text(f"import gdb\ngdb.execute('source {SCRIPT}')\nprint('outer file', __file__)\n")
    out = gdb("-x", str(outer), cwd=elsewhere)
    assert_ready(out)
    assert f"outer file {outer}" in out  # the outer script's own __file__ is left alone


def test_exec_of_the_text_in_project():
    assert_ready(gdb("-ex", "python exec(open('gdbscripts/xendbg.py').read())", cwd=ROOT))


def test_exec_of_the_text_elsewhere_needs_xendbg_root(elsewhere):
    command = f"python exec(open('{SCRIPT}').read())"
    out = gdb("-ex", command, cwd=elsewhere)
    assert "Traceback" not in out and READY not in out
    assert [line for line in out.splitlines() if line.startswith("xendbg:")] == [
        "xendbg: not loaded: cannot tell where the project is (this file ran without its name); "
        "set XENDBG_ROOT to the project directory, or `source` the file"]
    assert_ready(gdb("-ex", command, cwd=elsewhere, XENDBG_ROOT=str(ROOT)))


@pytest.fixture
def bare_project(tmp_path: Path) -> Path:
    """A copy of the project's loader and package with no .venv next to them."""
    project = tmp_path / "project"
    (project / "gdbscripts").mkdir(parents=True)
    shutil.copy(SCRIPT, project / "gdbscripts" / "xendbg.py")
    shutil.copytree(ROOT / "xendbg", project / "xendbg", ignore=shutil.ignore_patterns("__pycache__"))
    return project


def test_xendbg_venv_elsewhere(bare_project, elsewhere):
    script = bare_project / "gdbscripts" / "xendbg.py"
    out = gdb("-ex", f"source {script}", cwd=elsewhere)
    assert "Traceback" not in out and READY not in out
    assert f"run ./setup.sh env in {bare_project} (creates {bare_project / '.venv'}/lib/python" in out
    assert_ready(gdb("-ex", f"source {script}", cwd=elsewhere, XENDBG_VENV=str(VENV)))


def test_xendbg_venv_missing(tmp_path, elsewhere):
    missing = tmp_path / "no-venv"
    out = gdb("-ex", f"source {SCRIPT}", cwd=elsewhere, XENDBG_VENV=str(missing))
    assert "Traceback" not in out and READY not in out
    lines = [line for line in out.splitlines() if line.startswith("xendbg:")]
    assert len(lines) == 1, out
    assert lines[0].startswith(f"xendbg: not loaded: XENDBG_VENV is {missing}, which has no {missing}/lib/python3.")
    assert lines[0].endswith(f"or unset it to use {ROOT / '.venv'}")


def test_sourcing_twice_registers_once(elsewhere):
    """A second `source` (say ~/.gdbinit, then by hand) must not hook gdb's stop event twice."""
    out = gdb("-ex", f"source {SCRIPT}",
              "-ex", "python import xendbg.gdb.commands as c; calls = []; c.register = lambda: calls.append(1)",
              "-ex", f"source {SCRIPT}", "-ex", "python print('registered again', len(calls))", cwd=elsewhere)
    assert out.count(READY) == 2 and "Traceback" not in out, out
    assert "registered again 0" in out


def test_loading_leaves_the_heavy_imports_for_later(elsewhere):
    """What loading imports into gdb's Python beyond gdb's own start-up: none of the ABI tables,
    decoders, capstone, rich, typing, dataclasses, nor the editable install's finder."""
    out = gdb("-ex", "python import sys; before = set(sys.modules)", "-ex", f"source {SCRIPT}",
              "-ex", "python print('IMPORTED', *sorted(set(sys.modules) - before))", cwd=elsewhere)
    assert_ready(out)
    imported = set(next(line for line in out.splitlines() if line.startswith("IMPORTED")).split()[1:])
    assert "xendbg.gdb.commands" in imported
    heavy = {"xendbg.abi", "xendbg.arch", "xendbg.decode", "xendbg.gdb.monitor", "xendbg.render", "capstone",
             "rich", "typing", "dataclasses", "pathlib", "urllib", "importlib.util"}
    assert not imported & heavy, sorted(imported & heavy)
    assert not [name for name in imported if name.startswith("__editable__")]


def test_light_names_agree_with_the_abi_tables():
    from xendbg import arch, names
    from xendbg.abi import GENERATIONS
    from xendbg.abi._tables import GENERATION_TAGS

    assert tuple(GENERATION_TAGS) == names.GENERATIONS == GENERATIONS
    assert arch.TRAP_VECTORS is names.TRAP_VECTORS

"""Every `xendbg` command the project shows a user runs as written: README's offline section, the
examples' own instructions, `xendbg --help`, and the hints in messages."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The console script beside this interpreter (.venv/bin/xendbg); PYTHONPATH makes it run this tree.
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
SCRIPT = Path(sys.executable).parent / "xendbg"


def section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(title)
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def shell_lines(markdown: str) -> list[str]:
    """The lines of the markdown's code blocks, backslash continuations joined."""
    lines: list[str] = []
    inside, pending = False, ""
    for line in markdown.splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        if not inside:
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    return lines


def readme_commands() -> list[str]:
    return [line for line in shell_lines(section("## Decoding offline: `xendbg`"))
            if line.startswith(".venv/bin/xendbg ")]


def example_commands() -> list[str]:
    return [line.removeprefix("# ") for path in sorted((ROOT / "examples").glob("*.args"))
            for line in path.read_text().splitlines() if line.startswith("# .venv/bin/xendbg ")]


def help_examples() -> list[str]:
    out = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=60)
    assert out.returncode == 0, out.stderr
    return [line.strip() for line in out.stdout.splitlines() if line.startswith("  xendbg ")]


def run(command: str) -> subprocess.CompletedProcess[str]:
    argv = shlex.split(command, comments=True)
    if argv[0] == "xendbg":
        argv[0] = str(SCRIPT)
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=60)


def test_there_are_commands_to_run():
    assert len(readme_commands()) == 5
    assert len(example_commands()) == 4
    assert len(help_examples()) == 4


@pytest.mark.parametrize("command", readme_commands() + example_commands() + help_examples())
def test_shown_commands_run_as_written(command):
    assert "..." not in command
    out = run(command)
    assert out.returncode == 0, f"{command}: {out.stderr}"
    assert out.stdout.strip() and not out.stderr
    if "--json" in command:
        json.loads(out.stdout)


def test_the_example_table_file_holds_the_example_table():
    args = (ROOT / "examples/xen20-trap-table.args").read_text().splitlines()
    hexbytes = next(line.split(":", 1)[1] for line in args if line.startswith("--mem=0xc0300000:"))
    assert (ROOT / "examples/xen20-trap-table.bin").read_bytes() == bytes.fromhex(hexbytes)


def test_the_hints_in_usage_errors_run():
    hints = set()
    for args in (["abi", "4.22"], ["traps"], ["multicall", "0x10"], ["decode", "--width", "48"], ["frobnicate"]):
        out = run(shlex.join(["xendbg", *args]))
        assert out.returncode == 2
        hints |= set(re.findall(r"'(xendbg [^']*)'", out.stderr))
    assert {"xendbg abi --help", "xendbg traps --help", "xendbg multicall --help"} <= hints
    for hint in hints:
        out = run(hint)
        assert out.returncode == 0 and "usage: xendbg" in out.stdout, hint


# Sample values for the placeholders of f-string hints; a new placeholder needs one here.
PLACEHOLDERS = {"abi.generation": "4.17", "abi.width": "64", "generations[0]": "4.17"}


def source_hints() -> list[tuple[str, str]]:
    """`xendbg ...` commands quoted in backticks in the package's strings (not its docstrings)."""
    found = []
    for path in sorted((ROOT / "xendbg").rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                text = "".join(part.value if isinstance(part, ast.Constant) else
                               "{" + ast.unparse(part.value) + "}" for part in node.values)  # type: ignore[attr-defined]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                text = node.value
            else:
                continue
            found += [(path.name, hint) for hint in re.findall(r"`(xendbg [^`]*)`", text)]
    return found


def test_hints_in_the_package_run():
    hints = source_hints()
    assert any(name == "names.py" for name, _ in hints)
    for name, hint in hints:
        command = re.sub(r"\{([^}]*)\}", lambda m: PLACEHOLDERS[m.group(1)], hint)
        out = run(command)
        assert out.returncode == 0, f"{name}: {hint}: {out.stderr}"


def test_the_linux_recipe_runs_as_written():
    """The recipe takes its paths from `fixtures/run linux64 --artifacts`: no glob gdb would not
    expand, no Debian version pinned, and only keys the artifacts really have."""
    recipe = section("## Inside gdb")
    recipe = recipe[recipe.index("Debugging Linux dom0"):]
    lines = [line for line in shell_lines(recipe) if not line.startswith(("(gdb)", "#"))]
    text = "\n".join(lines)
    assert "fixtures/run linux64 --artifacts" in text
    assert "*" not in text and not re.search(r"\d+\.\d+\.\d+-|4\.17|6\.1", text)
    keys = set(re.findall(r"""a\["(\w+)"\]""", text))
    source = ast.parse((ROOT / "fixtures/platforms/linux64.py").read_text())
    artifacts = next(node for node in ast.walk(source) if isinstance(node, ast.FunctionDef)
                     and node.name == "artifacts")
    returned = next(node.value for node in ast.walk(artifacts) if isinstance(node, ast.Return))
    assert isinstance(returned, ast.Dict)
    assert keys and keys <= {k.value for k in returned.keys if isinstance(k, ast.Constant)}
    gdb_line = next(line for line in lines if line.startswith("gdb "))
    files = [arg for arg in shlex.split(gdb_line) if arg.startswith(("file ", "add-symbol-file "))]
    assert files == ["file $vmlinux", "add-symbol-file $xen_syms"]

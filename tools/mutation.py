#!/usr/bin/env python3
"""Mutation testing of xendbg's decoders and rules with mutmut (3.x), against the unit tests only.

    .venv/bin/python tools/mutation.py                  # every module, one bounded mutmut run each
    .venv/bin/python tools/mutation.py decode arch      # some modules
    .venv/bin/python tools/mutation.py --survivors decode   # rerun only last time's survivors (new tests)
    .venv/bin/python tools/mutation.py --report         # only the counts of the last runs
    .venv/bin/python tools/mutation.py --report --write-doc  # ... into docs/mutation-survivors.md too

mutmut's configuration is [tool.mutmut] in pyproject.toml; it mutates a copy of the tree in
mutants/ (git-ignored; --fresh removes it, needed after editing xendbg/ itself).  Each run is niced
and bounded by `timeout`, because the machines this runs on are shared.  A survivor listed in
backquotes in docs/mutation-survivors.md is counted as a known equivalent mutant, not as a gap.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTANTS = ROOT / "mutants"
DOC = ROOT / "docs" / "mutation-survivors.md"

# module -> the files it covers (paths under xendbg/, as mutmut's meta files name them)
MODULES: dict[str, tuple[str, ...]] = {
    "decode": ("decode/",),
    "arch": ("arch.py",),
    "trace": ("trace.py",),
    "render": ("render/",),
    "abi": ("abi/",),
    "session": ("session.py",),
    "observe": ("observe.py",),
    "report": ("report.py",),
    "names": ("names.py",),
}
PATTERNS = {module: f"xendbg.{files[0].removesuffix('/').removesuffix('.py')}.*" for module, files in MODULES.items()}

# mutmut's exit codes (mutmut/stats.py): what a mutant's test run ended with.
KILLED = {1, 3}
TIMEOUT = {24, -24, 36, 152, 255}  # the tests hung or ran away: the mutant was noticed
SURVIVED = {0}
NO_TESTS = {5, 33}
START, END = "<!-- scores: tools/mutation.py --write-doc -->", "<!-- /scores -->"


def mutmut() -> list[str]:
    exe = Path(sys.executable).parent / "mutmut"
    if not exe.exists():
        sys.exit("mutmut is not installed in this Python's environment: pip install mutmut")
    return [str(exe)]


def run(module: str, seconds: int, jobs: int, names: list[str] | None = None) -> int:
    """One bounded mutmut run over a module's mutants (or only `names`, e.g. its survivors)."""
    targets = names if names is not None else [PATTERNS[module]]
    if not targets:
        print(f"== {module}: nothing to rerun", flush=True)
        return 0
    cmd = ["nice", "-n", "10", "timeout", str(seconds), *mutmut(), "run", "--max-children", str(jobs), *targets]
    shown = PATTERNS[module] if names is None else f"{len(names)} survivors of {module}"
    print(f"== {module}: mutmut run {shown} (at most {seconds} s)", flush=True)
    MUTANTS.mkdir(exist_ok=True)
    with open(MUTANTS / "run.log", "a", encoding="utf-8") as log:
        # XENDBG_MUTATION: the property tests draw fewer examples, from a fixed seed (tests/unit/budget.py)
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                             env=os.environ | {"XENDBG_MUTATION": "1"})
    if rc == 124:
        print(f"   {module}: stopped at the {seconds} s bound; counts below are partial", flush=True)
    elif rc:
        print(f"   {module}: mutmut exited with {rc}; see mutants/run.log", flush=True)
    return rc


def results() -> dict[str, dict[str, int | None]]:
    """{file under xendbg/: {mutant name: exit code or None}} from mutmut's meta files."""
    out: dict[str, dict[str, int | None]] = {}
    for meta in sorted((MUTANTS / "xendbg").rglob("*.py.meta")):
        rel = meta.relative_to(MUTANTS / "xendbg").as_posix().removesuffix(".meta")
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        if codes:
            out[rel] = codes
    return out


def documented_equivalents() -> set[str]:
    if not DOC.exists():
        return set()
    return set(re.findall(r"`(xendbg\.[^`\s]+__mutmut_\d+)`", DOC.read_text()))


def module_of(path: str) -> str | None:
    for module, prefixes in MODULES.items():
        if any(path == p or (p.endswith("/") and path.startswith(p)) for p in prefixes):
            return module
    return None


def classify(code: int | None) -> str:
    if code in KILLED or code in TIMEOUT:
        return "killed"
    if code in SURVIVED:
        return "survived"
    if code in NO_TESTS:
        return "no tests"
    return "not run" if code is None else "other"


def table(by_file: dict[str, dict[str, int | None]], modules: list[str], equivalent: set[str]) -> list[str]:
    lines = ["| module | killed | survived (equivalent) | no tests | not run | score |",
             "|---|---|---|---|---|---|"]
    for module in modules:
        files = {p: codes for p, codes in by_file.items() if module_of(p) == module}
        counts: Counter[str] = Counter()
        eq = 0
        for codes in files.values():
            for name, code in codes.items():
                kind = classify(code)
                counts[kind] += 1
                eq += kind == "survived" and name in equivalent
        total = sum(counts.values())
        checked = total - counts["not run"]
        score = f"{100 * counts['killed'] / checked:.1f}%" if checked else "-"
        lines.append(f"| {module} | {counts['killed']}/{total} | {counts['survived']} ({eq}) | "
                     f"{counts['no tests']} | {counts['not run']} | {score} |")
    return lines


def survivors(by_file: dict[str, dict[str, int | None]], modules: list[str], equivalent: set[str]) -> list[str]:
    out = []
    for path, codes in by_file.items():
        if module_of(path) not in modules:
            continue
        for name, code in sorted(codes.items(), key=lambda kv: _natural(kv[0])):
            kind = classify(code)
            if kind in ("survived", "no tests", "other"):
                mark = " (documented equivalent)" if name in equivalent else ""
                out.append(f"{kind:8}  {name}{mark}")
    return out


def _natural(name: str) -> tuple[str, int]:
    base, _, number = name.rpartition("__mutmut_")
    return base, int(number) if number.isdigit() else 0


def write_doc(lines: list[str]) -> None:
    text = DOC.read_text() if DOC.exists() else f"# Mutation testing\n\n{START}\n{END}\n"
    if START not in text:
        text += f"\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(head + START + "\n" + "\n".join(lines) + "\n" + END + tail)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE",
                        help=f"modules to run: {', '.join(MODULES)} (default: all)")
    parser.add_argument("--report", action="store_true", help="do not run mutmut, only count the last results")
    parser.add_argument("--survivors", action="store_true",
                        help="rerun only the mutants that survived last time (after adding tests)")
    parser.add_argument("--fresh", action="store_true", help="remove mutants/ first (after editing xendbg/)")
    parser.add_argument("--timeout", type=int, default=2400, help="bound of each module's run, seconds")
    parser.add_argument("--jobs", type=int, default=2, help="mutmut worker processes")
    parser.add_argument("--write-doc", action="store_true", help=f"put the score table into {DOC.name}")
    args = parser.parse_args()
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module {unknown[0]!r}: choose from {', '.join(MODULES)}")
    modules = args.modules or list(MODULES)
    if not args.report:
        if args.fresh and MUTANTS.exists():
            shutil.rmtree(MUTANTS)
        for module in modules:
            names = None
            if args.survivors:
                names = [name for path, codes in results().items() if module_of(path) == module
                         for name, code in codes.items() if classify(code) in ("survived", "no tests")]
            run(module, args.timeout, args.jobs, names)
    by_file = results()
    equivalent = documented_equivalents()
    scores = table(by_file, list(MODULES) if args.write_doc else modules, equivalent)
    print("\n".join(scores))
    left = survivors(by_file, modules, equivalent)
    print(f"\n{len(left)} mutants not killed:" if left else "\nevery mutant killed")
    print("\n".join(left))
    if args.write_doc:
        write_doc(scores)
    return 0


if __name__ == "__main__":
    sys.exit(main())

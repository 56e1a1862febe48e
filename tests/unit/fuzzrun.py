"""Run many `xendbg` command lines in one child process, each bounded in time, the child in memory.

    python -m tests.unit.fuzzrun CASES.json RESULTS.json

CASES.json is a list of argv lists.  The child limits its own address space (RLIMIT_AS, 2 GiB) and the
files it writes (RLIMIT_FSIZE), and gives each run SECONDS of wall time (SIGALRM); RESULTS.json gets,
per case, its exit status ("hung" when the alarm went off), its stderr, the head of its stdout and how
much its peak RSS grew.  `run_cases` starts the child and reads the results.
"""

from __future__ import annotations

import io
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MEMORY = 2 << 30
SECONDS = 10
FILE_SIZE = 256 << 20


class _Hung(BaseException):
    """Raised by the alarm: a BaseException, so that xendbg's main() does not report it as its own."""


def _alarm(signum: int, frame: object) -> None:
    raise _Hung


def _one(argv: list[str]) -> dict:
    from xendbg.cli import main

    err, out = io.StringIO(), _Head()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    signal.alarm(SECONDS)
    try:
        status: int | str = main(argv)
    except _Hung:
        status = "hung"
    except BaseException as exc:  # noqa: BLE001 - anything main() lets out is a finding
        status = f"raised {type(exc).__name__}: {exc}"
    finally:
        signal.alarm(0)
        sys.stdout, sys.stderr = saved
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss
    return {"argv": argv, "status": status, "stderr": err.getvalue(), "stdout": out.getvalue(), "rss_grown_kib": grown}


class _Head(io.StringIO):
    """stdout, of which the first 64 KiB are kept."""

    def write(self, text: str) -> int:
        if self.tell() < 1 << 16:
            super().write(text[:1 << 16])
        return len(text)


def main() -> int:
    cases, results = sys.argv[1], sys.argv[2]
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
    # Output files are bounded too: a write beyond FILE_SIZE fails (EFBIG) instead of filling the disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE, FILE_SIZE))
    signal.signal(signal.SIGALRM, _alarm)
    out = [_one(argv) for argv in json.loads(Path(cases).read_text())]
    Path(results).write_text(json.dumps(out))
    return 0


def run_cases(tmp_path: Path, cases: list[list[str]], timeout: float = 120) -> list[dict]:
    """Each case's {"argv", "status", "stderr"}, run in one bounded child process."""
    cases_file, results_file = tmp_path / "cases.json", tmp_path / "results.json"
    cases_file.write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XENDBG_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "tests.unit.fuzzrun", str(cases_file), str(results_file)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(results_file.read_text())


def problems(results: list[dict]) -> list[str]:
    """What breaks the rule for bad input: exit 0, or 1 or 2 with one line on stderr that is no internal
    error and no traceback; and no run that hangs."""
    found = []
    for r in results:
        status, err = r["status"], r["stderr"]
        lines = err.splitlines()
        errors = [line for line in lines if not line.startswith("xendbg: warning: ")]
        bad = (status not in (0, 1, 2) or "internal error" in err or "Traceback" in err
               or (status != 0 and len(errors) != 1) or (status == 0 and errors))
        if bad:
            found.append(f"{' '.join(a[:60] for a in r['argv'])} -> {status}: {err[-300:]!r}")
    return found


if __name__ == "__main__":
    sys.exit(main())

"""A gdb driven over gdb/MI: one gdb process, its records parsed by pygdbmi, read by a thread of its own.

pygdbmi's GdbController reads with timeouts in the caller's thread; a full-screen UI cannot block
there, and its known pitfalls are ours to guard against:
- partial reads: we read whole lines (MI is line-based) from a thread, and parse each complete line
  with pygdbmi's parser;
- long-running commands: every command carries a token and a deadline; a late answer is dropped;
  commands that run the guest answer `^running` at once (mi-async), the stop comes as `*stopped`;
- gdb exiting underneath: end of output fails every pending command with GdbGone, and says so once.

Asynchronous records (`*stopped`, `=thread-group-exited`, console and log streams) go to the
`on_record` callback, called in the reader thread: a UI hands them over to its own loop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from pygdbmi.gdbmiparser import parse_response

from xendbg.errors import TargetGone, XendbgError

DEFAULT_TIMEOUT = 30.0  # seconds: a decode over a slow target (TCG) stays well under this


class MiError(XendbgError):
    """gdb answered a command with ^error (its message is one line)."""


class GdbGone(TargetGone):
    """gdb exited or stopped answering."""


Record = dict[str, Any]


def mi_quote(text: str) -> str:
    """A C string for an MI command argument."""
    return json.dumps(text, ensure_ascii=False)  # C escapes: JSON's \" \\ \n \t are the same


class MiClient:
    """One gdb speaking MI3 on pipes.  `command()` waits for the answer (any thread but the reader's);
    `request()` returns a Future."""

    def __init__(self, argv: list[str], on_record: Callable[[Record], None] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.on_record = on_record or (lambda record: None)
        try:
            # Its own session: a Ctrl-C meant for the UI never reaches gdb (the UI interrupts the
            # guest with -exec-interrupt), and gdb never takes the terminal.
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
        except OSError as exc:
            raise XendbgError(f"cannot run {argv[0]}: {exc.strerror}") from None
        self._lock = threading.Lock()
        self._token = 0
        self._pending: dict[int, Future[Record]] = {}
        self.gone: str | None = None  # why gdb is gone, once it is
        self._reader = threading.Thread(target=self._read, name="gdb-mi-reader", daemon=True)
        self._reader.start()

    # --- sending --------------------------------------------------------------------------------------

    def request(self, command: str) -> Future[Record]:
        """Send `command` (an MI command, `-...`); the Future gets its result record."""
        future: Future[Record] = Future()
        with self._lock:
            if self.gone is not None:
                future.set_exception(GdbGone(self.gone))
                return future
            self._token += 1
            token = self._token
            self._pending[token] = future
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(f"{token}{command}\n".encode())
                self.proc.stdin.flush()
            except OSError:
                self._pending.pop(token, None)
                future.set_exception(GdbGone("gdb is gone (its input is closed)"))
        return future

    def command(self, command: str, timeout: float = DEFAULT_TIMEOUT) -> Record:
        """Send and wait: the result record ({"message": "done"|"running"|..., "payload": ...})."""
        future = self.request(command)
        try:
            return future.result(timeout)
        except FutureTimeout:
            self._forget(future)
            raise MiError(f"gdb did not answer {command.split()[0]} within {timeout:g} s") from None

    def console(self, line: str, timeout: float = DEFAULT_TIMEOUT) -> Record:
        """A console command (gdb's or xendbg's `xen ...`), as typed; its output comes as stream records."""
        return self.command(f"-interpreter-exec console {mi_quote(line)}", timeout)

    def _forget(self, future: Future[Record]) -> None:
        with self._lock:
            for token, pending in list(self._pending.items()):
                if pending is future:
                    del self._pending[token]

    # --- reading --------------------------------------------------------------------------------------

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:  # whole lines only: a partial read never reaches the parser
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not line or line.strip() == "(gdb)":
                continue
            try:
                record = parse_response(line)
            except Exception:  # noqa: BLE001 - one unparsable line must not end the session
                record = {"type": "output", "message": None, "payload": line}
            token = record.get("token")
            if record.get("type") == "result" and token is not None:
                with self._lock:
                    future = self._pending.pop(token, None)
                if future is not None and not future.done():
                    if record.get("message") == "error":
                        payload = record.get("payload") or {}
                        future.set_exception(MiError(str(payload.get("msg", "gdb error")).strip()))
                    else:
                        future.set_result(record)
                continue
            self._deliver(record)
        self.proc.wait()
        self._gdb_gone(f"gdb exited (status {self.proc.returncode})")

    def _deliver(self, record: Record) -> None:
        try:
            self.on_record(record)
        except Exception:  # noqa: BLE001 - a UI callback's bug must not stop the reader
            pass

    def _gdb_gone(self, why: str) -> None:
        with self._lock:
            self.gone = why
            pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(GdbGone(why))
        self._deliver({"type": "gdb-exit", "message": why, "payload": None})

    # --- ending ---------------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.gone is None and self.proc.poll() is None

    def close(self, timeout: float = 3.0) -> None:
        """Ask gdb to exit, then end it by its PID if it does not."""
        if self.proc.poll() is None:
            try:
                self.request("-gdb-exit")
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self._reader.join(timeout)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass

"""gdb/MI commands for MI clients (`xendbg attach`, an IDE): the `--json` data of the `xen` commands,
without scraping console text.  gdb 13 and later (`gdb.MICommand`); older gdbs get none.

    -xen-hypercall | -xen-multicall [ADDR COUNT] [--results] | -xen-traps [ADDR] [--registered]
    -xen-callbacks [--registered] | -xen-vcpus | -xen-check | -xen-events

Each runs `xen NAME ARGS --json` (commands.run_json) and answers

    ^done,json="{...}"

MI values are strings, lists and tuples only (no numbers, booleans or null), so the JSON object travels
whole, as one string field: a client `json.loads` it and gets exactly what `--json` prints
(docs/json-schema.md).  With `--text COLUMNS` first, the answer also has text="...": the same command's
text output rendered by xendbg/render/text.py at that width with ANSI colours (`-xen-hypercall --text N
--brief` leaves out the call's detail: a client shows it in a pane of its own); `--text-only COLUMNS`
leaves the JSON out (a client that only shows it saves a second decoding).  An error is one line, as in
the console: ^error,msg="...".

`-xen-events [--text COLUMNS]` answers json="{"schema": 1, "events": [...]}": what happened since the
last call, each once, in order: the trace's records (their docs/json-schema.md form), then
{"event": "catch", "cpu", "continuation", "hypercall"}, {"event": "entry", "cpu", "address", "what",
"frame"} (a `xen break` entry point and its bounce frame), {"event": "catch_error", "message"} and
{"event": "lost", "file"} (more records than the trace keeps in memory came in between: the trace file
has them).  With --text, text=[...] has one entry per event: an entry's bounce frame rendered, "" for
the others (a trace record's "line" is its text; a catch's call is what -xen-hypercall shows).
"""

from __future__ import annotations

import gdb

from xendbg.errors import XendbgError

TYPE_CHECKING = False  # not typing's: importing typing alone costs milliseconds at gdb start-up
if TYPE_CHECKING:
    from xendbg.decode import Hypercall
    from xendbg.decode.bounce import BounceFrame

# MI command name -> the xen command it answers for
COMMANDS = {"-xen-hypercall": "hypercall", "-xen-multicall": "multicall", "-xen-traps": "traps",
            "-xen-callbacks": "callbacks", "-xen-vcpus": "vcpus", "-xen-check": "check"}
_MAX_COLUMNS = 1000


def _columns(argv: list[str]) -> tuple[int | None, list[str]]:
    """`--text COLUMNS` (or `--text-only COLUMNS`) at the front: the width to render text at."""
    if not argv or argv[0] not in ("--text", "--text-only"):
        return None, argv
    if len(argv) < 2 or not argv[1].isdigit() or not 20 <= int(argv[1]) <= _MAX_COLUMNS:
        raise XendbgError(f"--text wants COLUMNS, 20 to {_MAX_COLUMNS}")
    return int(argv[1]), argv[2:]


def _render(renderables: list[object], columns: int) -> str:
    from xendbg.render import text

    return "".join(text.to_string(r, width=columns, color=True) for r in renderables)  # type: ignore[arg-type]


def _run(name: str, argv: list[str]) -> dict[str, object]:
    import json
    import shlex

    from xendbg.gdb import commands, context

    text_only = bool(argv) and argv[0] == "--text-only"
    columns, words = _columns(argv)
    brief = name == "hypercall" and "--brief" in words
    words = [w for w in words if w != "--brief"] if name == "hypercall" else words
    if brief and columns is not None and not words:
        # The head, arguments and findings (the detail, a batch or a table, goes in a pane of its own):
        # decoded once for both forms, as `xen hypercall` decodes it.
        from dataclasses import replace

        from xendbg.gdb.target import GdbTarget
        from xendbg.render import json as render_json
        from xendbg.render import text

        hc = context.decode_here(GdbTarget())
        return {"json": json.dumps(render_json.hypercall(hc), separators=(",", ":")),
                "text": _render([text.hypercall(replace(hc, detail=None, findings=hc.all_findings()))], columns)}
    arg = " ".join(shlex.quote(w) for w in words)
    result: dict[str, object] = {}
    if not text_only:
        result["json"] = json.dumps(commands.run_json(name, arg), separators=(",", ":"))
    if columns is not None:
        with context.capture_text() as rendered:
            commands.COMMANDS[name].invoke(arg, False)
        result["text"] = _render(rendered, columns)
    return result


def _events(argv: list[str]) -> dict[str, object]:
    import json
    from typing import cast

    from xendbg.gdb import monitor
    from xendbg.render import json as render_json
    from xendbg.render import text

    columns, rest = _columns(argv)
    if rest:
        raise XendbgError(f"unexpected {' '.join(rest)!r} (usage: -xen-events [--text COLUMNS])")
    events: list[dict[str, object]] = []
    texts: list[str] = []
    for kind, payload in monitor.MONITOR.events.take([monitor.MONITOR.finished_trace, monitor.MONITOR.trace]):
        shown: object = None
        if kind == "record":
            event = dict(payload)  # type: ignore[call-overload]
        elif kind == "catch":
            cpu, hc, continuation = cast("tuple[int, Hypercall, bool]", payload)
            event = {"event": "catch", "cpu": cpu, "continuation": continuation,
                     "hypercall": render_json.hypercall(hc)}
        elif kind == "entry":
            cpu, address, what, frame = cast("tuple[int, int, str, BounceFrame]", payload)
            event = {"event": "entry", "cpu": cpu, "address": address, "what": what,
                     "frame": render_json.bounce_frame(frame)}
            shown = text.bounce_frame(frame)
        elif kind == "lost":
            event = {"event": "lost", "file": payload}
        else:
            event = {"event": "catch_error", "message": str(payload)}
        events.append(event)
        texts.append(_render([shown], columns) if columns is not None and shown is not None else "")
    result: dict[str, object] = {"json": json.dumps({"schema": render_json.SCHEMA_VERSION, "events": events},
                                                    separators=(",", ":"))}
    if columns is not None:
        result["text"] = texts
    return result


def _mi_error(exc: Exception) -> gdb.GdbError:
    return gdb.GdbError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def register() -> None:
    """Register the -xen-* MI commands when this gdb has gdb.MICommand (gdb 13 and later)."""
    base = getattr(gdb, "MICommand", None)
    if base is None:
        return

    class XenMiCommand(base):  # type: ignore[misc, valid-type]
        def __init__(self, name: str) -> None:
            super().__init__(name)
            self.mi_name = name

        def invoke(self, argv: list[str]) -> dict[str, object]:
            try:
                if self.mi_name == "-xen-events":
                    return _events(argv)
                return _run(COMMANDS[self.mi_name], argv)
            except (XendbgError, gdb.GdbError, gdb.error) as exc:
                raise _mi_error(exc) from None

    for name in [*COMMANDS, "-xen-events"]:
        XenMiCommand(name)

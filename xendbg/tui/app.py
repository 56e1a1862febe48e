"""`xendbg attach`: a full-screen debugger for Xen PV guests over gdb/MI (prompt_toolkit).

Every pane shows what the project's renderers (xendbg/render/text.py, rich) produced, as ANSI text
that gdb's -xen-* MI commands return (xendbg/gdb/mi_commands.py): this module decodes nothing, it
lays panes out and moves between them.  The trace pane uses trace.show_lines over the trace's
records, the status line arch.vcpu_mode over registers read with MiTarget.

MI is read by the client's own thread; its records are handed to the UI loop, where `*stopped`
schedules a refresh (a coroutine awaiting MI answers), so the UI never waits for gdb or the guest.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prompt_toolkit.application import Application
from prompt_toolkit.buffer import Buffer
from prompt_toolkit.completion import Completer, Completion, ThreadedCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.filters import Condition
from prompt_toolkit.formatted_text import ANSI, StyleAndTextTuples, to_formatted_text
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.layout import (
    ConditionalContainer,
    Float,
    FloatContainer,
    HSplit,
    Layout,
    Window,
)
from prompt_toolkit.layout.controls import BufferControl, FormattedTextControl
from prompt_toolkit.layout.dimension import Dimension
from prompt_toolkit.layout.menus import CompletionsMenu
from prompt_toolkit.layout.processors import BeforeInput
from prompt_toolkit.styles import Style
from prompt_toolkit.widgets import Frame

from xendbg import arch
from xendbg.errors import XendbgError
from xendbg.mi.client import MiClient, Record, mi_quote
from xendbg.mi.target import MiTarget
from xendbg.trace import show_lines

HELP = """\
Typing goes to the command line: any gdb command or xen command (Tab completes, Up/Down history).

F1        this help (Esc closes it)          F5   continue          Ctrl-C  interrupt the guest
F7        step one instruction               F8   catch a hypercall by name (fills the command line)
F9        trace on/off (xen trace)           F6   detail pane: follow the call / registered trap table /
F11 F12   previous / next vCPU                    callbacks and fast trap / vCPUs / check
Esc f/t/c/v/k  detail: follow, traps, callbacks, vCPUs, check
F2        choose the pane to scroll          PgUp PgDn  scroll it (Esc Up / Esc Down: a line)
F10       quit (also Ctrl-Q, `quit`)         quitting ends the platform's QEMU (--platform), else detaches
"""

DETAIL_MODES = ("follow", "traps", "callbacks", "vcpus", "check")
DETAIL_TITLES = {"follow": "follows the call", "traps": "registered trap table",
                 "callbacks": "registered callbacks and fast trap", "vcpus": "vCPUs", "check": "xen check"}
PANES = ("pending", "detail", "trace", "console")
_ERROR_LINE = re.compile(r"= -\d+ \(E[A-Z0-9]+\)$|could not decode|<preempted")
_TRACE_KEEP = 3000  # records kept for the trace pane (the --trace file keeps them all)
POLL_SECONDS = 0.25  # how often trace records are fetched while the guest runs
MI_TIMEOUT = 30.0

STYLE = Style.from_dict({
    "status": "reverse",
    "status.gone": "bg:ansired ansiwhite bold",
    "status.running": "bg:ansigreen ansiblack",
    "title": "bg:ansiblue ansiwhite",
    "title.focused": "bg:ansicyan ansiblack bold",
    "trace.error": "ansired bold",
    "console.error": "ansired",
    "console.echo": "bold",
    "console.log": "ansiyellow",
    "keys": "reverse",
})


def _ansi_lines(text: str) -> list[StyleAndTextTuples]:
    return [to_formatted_text(ANSI(line)) for line in text.rstrip("\n").split("\n")] if text else []


@dataclass
class Pane:
    """Lines of one pane (ANSI text or plain), scrolled by an offset; tail panes follow new lines."""

    title: str
    tail: bool = False
    lines: list[StyleAndTextTuples] = field(default_factory=list)
    offset: int = 0
    height: int = 10
    pinned: bool = False  # a tail pane scrolled back by the user stays put

    def set_ansi(self, text: str) -> None:
        self.lines = _ansi_lines(text)
        self.offset = 0 if not self.tail else self.offset
        self._clamp()

    def set_lines(self, lines: list[StyleAndTextTuples]) -> None:
        self.lines = lines
        self._clamp()

    def add(self, line: StyleAndTextTuples) -> None:
        self.lines.append(line)
        if len(self.lines) > 5000:
            del self.lines[:1000]
        self._clamp()

    def _clamp(self) -> None:
        bottom = max(0, len(self.lines) - self.height)
        if self.tail and not self.pinned:
            self.offset = bottom
        self.offset = max(0, min(self.offset, bottom))

    def scroll(self, delta: int) -> None:
        self.offset += delta
        bottom = max(0, len(self.lines) - self.height)
        self.pinned = self.tail and self.offset < bottom
        self._clamp()

    def visible(self) -> StyleAndTextTuples:
        out: StyleAndTextTuples = []
        for line in self.lines[self.offset:]:  # the window clips what does not fit
            out += line
            out.append(("", "\n"))
        return out[:-1] if out else out


class GdbCompleter(Completer):
    """gdb's own completion (-complete): gdb commands, the xen subcommands, hypercall names, vectors."""

    def __init__(self, client: MiClient) -> None:
        self.client = client

    def get_completions(self, document: Document, complete_event: object):  # noqa: ANN201 - a generator
        line = document.text_before_cursor
        if not line.strip() or not self.client.alive:
            return
        try:
            payload = self.client.command(f"-complete {mi_quote(line)}", timeout=3).get("payload") or {}
        except XendbgError:
            return
        for match in payload.get("matches", []):
            if match.startswith(line[: len(line) - len(line.split(" ")[-1])]):
                word = line.split(" ")[-1]
                rest = match[len(line) - len(word):]
                yield Completion(rest, start_position=-len(word))


@dataclass
class Timings:
    """When things happened (time.monotonic), for bench/ (XENDBG_TUI_TIMINGS names a file)."""

    started: float = 0.0  # the command began
    reachable: float = 0.0  # the target could be attached to
    path: str | None = None

    def write(self, what: str, seconds: float) -> None:
        if self.path:
            with open(self.path, "a", encoding="utf-8") as out:
                out.write(json.dumps({"what": what, "seconds": round(seconds, 6)}) + "\n")


class AttachApp:
    """The screen and its behaviour; `client` is a connected gdb with xendbg loaded."""

    def __init__(self, client_factory: Callable[[Callable[[Record], None]], MiClient], target_desc: str,
                 commands: list[str], on_quit: Callable[[MiClient], None], timings: Timings) -> None:
        self.target_desc = target_desc
        self.startup_commands = list(commands)
        self.on_quit = on_quit
        self.timings = timings
        self.loop: asyncio.AbstractEventLoop | None = None
        self._early: list[Record] = []
        self.client = client_factory(self._record_from_thread)
        self.panes = {"pending": Pane("pending hypercall"), "detail": Pane("detail"),
                      "trace": Pane("trace", tail=True), "console": Pane("console", tail=True)}
        self.focus = "detail"
        self.detail_mode = "follow"
        self.help_visible = False
        self.running = False
        self.stop_reason = "attached: the guest is stopped"
        self.gone: str | None = None
        self._going = False  # the target went away; its last records are being fetched
        self.threads: list[int] = []
        self.thread: int | None = None
        self.mode = ""
        self.where = ""
        self.tracing = False
        self.records: list[dict[str, Any]] = []
        self.pending_json: dict[str, Any] | None = None
        self.last_multicall: tuple[int, int] | None = None  # (call_list, nr_calls) of the last one seen
        self.entry_text: str | None = None  # the bounce frame of an entry stop
        self._next_reason: str | None = None  # why it stopped, shown with the refreshed panes
        self._console_partial = ""
        self._refresh_task: asyncio.Task | None = None
        self._refresh_again = False
        self._stopped_at: float | None = None
        self._mark: tuple[str, float] | None = None
        self._first_screen = False
        self._poller: asyncio.Task | None = None
        self.app = self._build()

    # --- layout ---------------------------------------------------------------------------------------

    def _title(self, name: str) -> Window:
        def text() -> StyleAndTextTuples:
            pane = self.panes[name]
            style = "class:title.focused" if self.focus == name else "class:title"
            title = pane.title
            if name == "detail":
                title = f"detail: {DETAIL_TITLES[self.detail_mode]} (F6, Esc f/t/c/v/k)"
            if name == "trace":
                title = f"trace: {'on' if self.tracing else 'off'} (F9)"
            more = ""
            if pane.lines and (pane.offset > 0 or pane.offset + pane.height < len(pane.lines)):
                more = f"  [{pane.offset + 1}-{min(len(pane.lines), pane.offset + pane.height)} of {len(pane.lines)}]"
            return [(style, f" {title}{more} ")]

        return Window(FormattedTextControl(text), height=1, style="class:title")

    def _pane(self, name: str, height: Dimension | Callable[[], Dimension]) -> Window:
        pane = self.panes[name]

        def text() -> StyleAndTextTuples:
            window = self._windows[name]
            if window.render_info is not None:
                pane.height = max(1, window.render_info.window_height)
                pane._clamp()
            return pane.visible()

        window = Window(FormattedTextControl(text), height=height, wrap_lines=False)
        self._windows[name] = window
        return window

    def _build(self) -> Application:
        self._windows: dict[str, Window] = {}
        self.input = Buffer(multiline=False, history=InMemoryHistory(), accept_handler=self._accept,
                            completer=ThreadedCompleter(GdbCompleter(self.client)), complete_while_typing=False)
        status = Window(FormattedTextControl(self._status), height=1)
        keys = Window(FormattedTextControl(lambda: [("class:keys",
                      " F1 help  F5 cont  ^C interrupt  F7 stepi  F8 catch  F9 trace  F6 detail  "
                      "F11/F12 vCPU  F2 pane  PgUp/PgDn scroll  F10 quit ")]), height=1)
        body = HSplit([
            status,
            self._title("pending"), self._pane("pending", lambda: Dimension.exact(
                min(10, max(2, len(self.panes["pending"].lines))))),
            self._title("detail"), self._pane("detail", Dimension(min=3, weight=6)),
            self._title("trace"), self._pane("trace", Dimension(min=2, preferred=8, weight=2)),
            self._title("console"), self._pane("console", Dimension(min=2, preferred=8, weight=2)),
            Window(BufferControl(self.input, input_processors=[BeforeInput("(xendbg) ")]), height=1),
            keys,
        ])
        help_box = ConditionalContainer(Frame(Window(FormattedTextControl(HELP), width=104, height=12),
                                              title="xendbg attach: keys"),
                                        filter=Condition(lambda: self.help_visible))
        root = FloatContainer(body, floats=[Float(help_box),
                                            Float(xcursor=True, ycursor=True, content=CompletionsMenu(max_height=12))])
        app: Application[None] = Application(layout=Layout(root, focused_element=self.input), key_bindings=self._keys(),
                          style=STYLE, full_screen=True, mouse_support=False)
        app.ttimeoutlen = 0.05  # Esc combinations without waiting half a second
        app.after_render += self._after_render
        return app

    def _status(self) -> StyleAndTextTuples:
        vcpu = (f"vCPU {self.threads.index(self.thread)} of {len(self.threads)}"
                if self.thread in self.threads else "vCPU ?")
        if self.gone:
            state, style = f"GONE: {self.gone}", "class:status.gone"
        elif self.running:
            state, style = "RUNNING (Ctrl-C stops it)", "class:status.running"
        else:
            state, style = f"STOPPED: {self.stop_reason}{self.where}", "class:status"
        parts = [self.target_desc, vcpu, self.mode or "mode ?", state]
        if self.tracing:
            parts.append(f"trace on, {sum(r.get('event') == 'call' for r in self.records)} calls")
        columns = self.app.output.get_size().columns if self.app else 160
        line = " " + " | ".join(parts)
        return [(style, line.ljust(columns))]

    # --- keys -----------------------------------------------------------------------------------------

    def _keys(self) -> KeyBindings:
        kb = KeyBindings()

        @kb.add("f1")
        def _(event: KeyPressEvent) -> None:
            self.help_visible = not self.help_visible

        @kb.add("escape", "escape")  # a bare Esc: prompt_toolkit sees it as a prefix; Esc Esc closes help
        @kb.add("escape", eager=False)
        def _(event: KeyPressEvent) -> None:
            self.help_visible = False

        @kb.add("f5")
        def _(event: KeyPressEvent) -> None:
            self._resume("-exec-continue", "continue")

        @kb.add("f7")
        def _(event: KeyPressEvent) -> None:
            self._resume("-exec-step-instruction", "stepi")

        @kb.add("c-c", eager=True)
        def _(event: KeyPressEvent) -> None:
            if self.running:
                self._send("-exec-interrupt", echo="interrupt")
            else:
                self.input.reset()

        @kb.add("f8")
        def _(event: KeyPressEvent) -> None:
            self.input.set_document(Document("xen catch hypercall "))

        @kb.add("f9")
        def _(event: KeyPressEvent) -> None:
            self.run_line("xen trace stop" if self.tracing else "xen trace start")

        @kb.add("f6")
        def _(event: KeyPressEvent) -> None:
            self.detail_mode = DETAIL_MODES[(DETAIL_MODES.index(self.detail_mode) + 1) % len(DETAIL_MODES)]
            self.refresh()

        for key, mode in (("f", "follow"), ("t", "traps"), ("c", "callbacks"), ("v", "vcpus"), ("k", "check")):
            @kb.add("escape", key)
            def _(event: KeyPressEvent, mode: str = mode) -> None:
                self.detail_mode = mode
                self.refresh()

        @kb.add("f11")
        @kb.add("escape", "p")
        def _(event: KeyPressEvent) -> None:
            self._switch_vcpu(-1)

        @kb.add("f12")
        @kb.add("escape", "n")
        def _(event: KeyPressEvent) -> None:
            self._switch_vcpu(1)

        @kb.add("f2")
        def _(event: KeyPressEvent) -> None:
            self.focus = PANES[(PANES.index(self.focus) + 1) % len(PANES)]

        @kb.add("pageup")
        def _(event: KeyPressEvent) -> None:
            pane = self.panes[self.focus]
            pane.scroll(-max(1, pane.height - 1))

        @kb.add("pagedown")
        def _(event: KeyPressEvent) -> None:
            pane = self.panes[self.focus]
            pane.scroll(max(1, pane.height - 1))

        @kb.add("escape", "up")
        def _(event: KeyPressEvent) -> None:
            self.panes[self.focus].scroll(-1)

        @kb.add("escape", "down")
        def _(event: KeyPressEvent) -> None:
            self.panes[self.focus].scroll(1)

        @kb.add("f10")
        @kb.add("c-q")
        def _(event: KeyPressEvent) -> None:
            self.quit()

        @kb.add("c-d")
        def _(event: KeyPressEvent) -> None:
            if not self.input.text:
                self.quit()

        return kb

    # --- MI records (reader thread -> UI loop) --------------------------------------------------------

    def _record_from_thread(self, record: Record) -> None:
        if record.get("type") == "notify" and record.get("message") == "stopped":
            record = {**record, "_at": time.monotonic()}
        loop = self.loop
        if loop is None:
            self._early.append(record)
            return
        try:
            loop.call_soon_threadsafe(self._on_record, record)
        except RuntimeError:
            pass  # the loop has ended: the screen is gone

    def _on_record(self, record: Record) -> None:
        kind, message, payload = record.get("type"), record.get("message"), record.get("payload")
        if kind in ("console", "target"):
            self._console_text(str(payload or ""))
        elif kind == "log":
            for line in str(payload or "").rstrip("\n").split("\n"):
                if line:
                    self.panes["console"].add([("class:console.log", line)])
        elif kind == "output":
            self.panes["console"].add([("class:console.log", str(payload or ""))])
        elif kind == "notify" and message == "running":
            self.running = True
            self.entry_text = None
            if self._poller is None or self._poller.done():
                self._poller = asyncio.ensure_future(self._poll_while_running())
        elif kind == "notify" and message == "stopped":
            self.running = False
            self._stopped_at = record.get("_at")
            self.stop_reason, self.where = _stop_reason(payload or {})
            if payload and payload.get("thread-id"):
                try:
                    self.thread = int(payload["thread-id"])
                except ValueError:
                    pass
            self.refresh()
        elif kind == "notify" and message in ("thread-group-exited",):
            self._target_gone("the target is gone (QEMU exited or closed the connection)")
        elif kind == "gdb-exit":
            self._target_gone(str(message))
        if self._refresh_task is None or self._refresh_task.done():
            self.app.invalidate()  # else the refresh draws it all at once: no half-drawn screens, less work

    def _console_text(self, text: str) -> None:
        text = self._console_partial + text
        lines = text.split("\n")
        self._console_partial = lines.pop()
        for line in lines:
            self.panes["console"].add(to_formatted_text(ANSI(line)))

    def _target_gone(self, why: str) -> None:
        """The target (or gdb) is gone: the screen keeps the last stop; the trace gets the records the
        trace made before the end (none is lost), then the status line says so."""
        if self.gone is not None or self._going:
            return
        self._going = True
        self.running = False

        async def last_records() -> None:
            if self.client.alive:
                await self._collect_events()
            self.gone = why
            self.panes["console"].add([("class:console.error", f"xendbg: {why}; the screen keeps the last "
                                        "stop and the trace; F10 quits")])
            self.app.invalidate()

        asyncio.ensure_future(last_records())

    # --- talking to gdb -------------------------------------------------------------------------------

    async def mi(self, command: str, timeout: float = MI_TIMEOUT) -> dict[str, Any]:
        future = asyncio.wrap_future(self.client.request(command))
        try:
            record = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise XendbgError(f"gdb did not answer {command.split()[0]} within {timeout:g} s") from None
        return record.get("payload") or {}

    def _send(self, command: str, echo: str | None = None, after: Callable[[], None] | None = None) -> None:
        async def run() -> None:
            try:
                await self.mi(command)
            except XendbgError as exc:
                self.panes["console"].add([("class:console.error", str(exc))])
            else:
                if after is not None:
                    after()
            self.app.invalidate()

        if echo:
            self.panes["console"].add([("class:console.echo", f"(xendbg) {echo}")])
        asyncio.ensure_future(run())

    def _resume(self, command: str, what: str) -> None:
        if self.gone:
            return
        if self.running:
            self.panes["console"].add([("class:console.error", f"{what}: the guest is running (Ctrl-C stops it)")])
            return
        self._send(command, echo=what)

    def _accept(self, buffer: Buffer) -> bool:
        line = buffer.text.strip()
        if line:
            self.run_line(line)
        return False  # clears the line, keeps history

    def run_line(self, line: str) -> None:
        """A command line: quit, or any gdb / xen command, run through gdb's console interpreter."""
        if line in ("q", "quit", "exit"):
            self.quit()
            return
        words = line.split()
        starts = words[:3] == ["xen", "trace", "start"]
        stops = words[:3] == ["xen", "trace", "stop"]

        def done() -> None:
            if starts:
                self.tracing = True
            elif stops:
                self.tracing = False
            if not self.running:
                self.refresh()

        self._send(f"-interpreter-exec console {mi_quote(line)}", echo=line, after=done)

    def _switch_vcpu(self, step: int) -> None:
        if self.running or not self.threads:
            return
        index = self.threads.index(self.thread) if self.thread in self.threads else 0
        self.thread = self.threads[(index + step) % len(self.threads)]
        self.stop_reason = f"vCPU {self.threads.index(self.thread)} selected"
        self.where = ""
        self._send(f"-thread-select {self.thread}", after=self.refresh)

    def quit(self) -> None:
        if self.app.is_running:
            self.app.exit()

    # --- refreshing -----------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Redraw every pane from gdb; one refresh at a time, the last request wins."""
        if self._refresh_task is not None and not self._refresh_task.done():
            self._refresh_again = True
            return
        self._refresh_task = asyncio.ensure_future(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while True:
            self._refresh_again = False
            stopped_at = self._stopped_at
            try:
                await self._refresh()
            except XendbgError as exc:
                self.panes["console"].add([("class:console.error", f"xendbg: {exc}")])
            if stopped_at is not None:
                self._mark = ("refresh-at-catch" if self.stop_reason.startswith("caught ") else "refresh", stopped_at)
                self._stopped_at = None
            self.app.invalidate()
            if not self._refresh_again:
                return

    def _columns(self) -> int:
        return max(40, self.app.output.get_size().columns - 1)

    async def _refresh(self) -> None:
        if self.gone or self.running:
            return
        columns = self._columns()

        async def pending() -> dict[str, Any] | XendbgError:
            try:
                return await self.mi(f"-xen-hypercall --text {columns} --brief")
            except XendbgError as exc:
                return exc

        # Sent together: gdb answers them in turn, without a round trip between them.
        info, _, self.mode, answer = await asyncio.gather(
            self.mi("-thread-info"), self._collect_events(columns),
            asyncio.to_thread(_mode_of, self.client, None), pending())
        self.threads = sorted(int(t["id"]) for t in info.get("threads", []) if str(t.get("id", "")).isdigit())
        current = info.get("current-thread-id")
        if current and str(current).isdigit():
            self.thread = int(current)
        if isinstance(answer, XendbgError):
            self.pending_json = None
            pending_lines: list[StyleAndTextTuples] = [[("", str(answer))]]
        else:
            self.pending_json = json.loads(answer["json"])
            pending_lines = _ansi_lines(answer.get("text", ""))
            if self.pending_json.get("name") == "multicall":
                args = self.pending_json["args"]
                self.last_multicall = (args[0]["value"], args[1]["value"])
        detail = await self._detail(columns)
        # The screen changes at once: the status line with the panes it speaks of.
        self.panes["detail"].set_ansi(detail)
        self.panes["pending"].set_lines(pending_lines)
        if self._next_reason:
            self.stop_reason, self._next_reason = self._next_reason, None

    async def _detail(self, columns: int) -> str:
        mode = self.detail_mode
        commands = {"traps": "-xen-traps --registered", "callbacks": "-xen-callbacks --registered",
                    "vcpus": "-xen-vcpus", "check": "-xen-check"}
        if mode == "follow":
            if self.entry_text:
                return self.entry_text
            pending = self.pending_json or {}
            detail = (pending.get("detail") or {}).get("type")
            if detail == "multicall":
                command = "-xen-multicall"
            elif detail == "trap_table":
                command = "-xen-traps"
            elif detail == "callbacks":
                command = "-xen-callbacks"
            elif detail is not None:
                command = "-xen-hypercall"
            elif self.last_multicall is not None:
                address, count = self.last_multicall
                command = f"-xen-multicall {address:#x} {count} --results"
            else:
                command = "-xen-check"
        else:
            command = commands[mode]
        head, rest = command.split(" ", 1) if " " in command else (command, "")
        try:
            answer = await self.mi(f"{head} --text-only {columns} {rest}".rstrip())
        except XendbgError as exc:
            return str(exc)
        text = answer.get("text", "")
        if mode == "follow" and "--results" in command:
            text = "\x1b[2mthe last multicall, as Xen left it:\x1b[0m\n" + text
        return text

    async def _collect_events(self, columns: int | None = None) -> None:
        text = f" --text {columns}" if columns else ""
        try:
            answer = await self.mi(f"-xen-events{text}")
        except XendbgError:
            return
        events = json.loads(answer["json"]).get("events", [])
        texts = answer.get("text") or [""] * len(events)
        new_records = False
        for event, rendered in zip(events, texts, strict=False):
            kind = event.get("event")
            if kind == "catch":
                hc = event["hypercall"]
                self._next_reason = f"caught {hc['name'] or hc['nr']} ({hc['site']})"
            elif kind == "entry":
                self._next_reason = f"entered {event['what']}"
                self.entry_text = rendered or None
            elif kind == "catch_error":
                self.panes["console"].add([("class:console.error", event.get("message", ""))])
            elif kind == "lost":
                where = f": {event['file']}" if event.get("file") else ""
                self.panes["trace"].add([("class:trace.error",
                                          f"... records dropped from memory (the trace file has them{where})")])
            else:
                self.records.append(event)
                new_records = True
                if kind == "start":
                    self.tracing = True
        if new_records:
            del self.records[:-_TRACE_KEEP]
            self.panes["trace"].set_lines([[("class:trace.error" if _ERROR_LINE.search(line) else "", line)]
                                           for line in show_lines(self.records)])

    async def _poll_while_running(self) -> None:
        while self.running and not self.gone:
            await asyncio.sleep(POLL_SECONDS)
            if self.running and self.tracing:
                await self._collect_events()
                self.app.invalidate()

    def _after_render(self, app: Application) -> None:
        stale = False
        for name, window in self._windows.items():  # a pane whose size changed: draw it again at its size
            if window.render_info is not None and window.render_info.window_height != self.panes[name].height:
                self.panes[name].height = max(1, window.render_info.window_height)
                self.panes[name]._clamp()
                stale = True
        if stale:
            app.invalidate()
            return
        if self._mark is not None:
            what, since = self._mark
            self._mark = None
            now = time.monotonic()
            if not self._first_screen:
                self._first_screen = True
                self.timings.write("first-screen", now - self.timings.reachable)
                self.timings.write("first-screen-from-start", now - self.timings.started)
            else:
                self.timings.write(what, now - since)

    # --- running --------------------------------------------------------------------------------------

    async def _start(self) -> None:
        self.loop = asyncio.get_running_loop()
        for record in self._early:
            self._on_record(record)
        self._early.clear()
        self._stopped_at = time.monotonic()
        self.refresh()
        await asyncio.sleep(0)
        if self._refresh_task is not None:
            await self._refresh_task
        for line in self.startup_commands:
            self.run_line(line)

    def run(self) -> None:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            for number in (signal.SIGTERM, signal.SIGHUP):  # a closed terminal or a kill: end cleanly
                loop.add_signal_handler(number, self.quit)
            loop.call_soon(lambda: asyncio.ensure_future(self._start()))
            await self.app.run_async()

        try:
            asyncio.run(main())
        finally:
            self.on_quit(self.client)


def _stop_reason(payload: dict[str, Any]) -> tuple[str, str]:
    """Why gdb stopped ("interrupted", "stepped one instruction", ...) and where, from *stopped."""
    reason = payload.get("reason")
    if reason == "signal-received":
        name = payload.get("signal-name", "")
        why = "interrupted (Ctrl-C)" if name in ("SIGINT", "0") else f"signal {name}"
    elif reason == "end-stepping-range":
        why = "stepped one instruction"
    elif reason == "breakpoint-hit":
        why = f"breakpoint {payload.get('bkptno', '?')}"
    elif reason in ("exited", "exited-normally", "exited-signalled"):
        why = "the target exited"
    elif reason:
        why = reason.replace("-", " ")
    else:
        why = "stopped"
    frame = payload.get("frame") or {}
    where = ""
    if frame.get("addr"):
        func = frame.get("func")
        where = f" at {frame['addr']}" + (f" <{func}>" if func and func != "??" else "")
    return why, where


def _mode_of(client: MiClient, thread: int | None) -> str:
    """The vCPU's mode from its code selector and control registers (arch.vcpu_mode), read over MI."""
    try:
        return arch.vcpu_mode(MiTarget(client, thread)).description
    except XendbgError:
        return "mode unknown"

"""The `xendbg` command: offline decoding and the ABI tables, for people and scripts.

  xendbg abi [--xen VERSION] [--width 32|64] [--json]
  xendbg decode [--width 32|64] [--xen VERSION] --reg NAME=VALUE ... [--mem ADDR:HEX | --mem ADDR@FILE ...] [--json]
  xendbg traps ADDR ... / xendbg multicall ADDR COUNT ...   (the same options as decode)
  xendbg core FILE [summary|vcpus|hypercall|multicall|traps|callbacks|check] [--symbols ELF ...]
              [--xen-syms FILE] [--xen VERSION] [--domain ID] [--vcpu N] [--json] [--to-gdb OUT]
  xendbg trace FILE.jsonl [--stats] [--errors] [NAME ...] [--json]
  xendbg attach HOST:PORT|PORT | --platform PLATFORM ...   the full-screen debugger (xendbg/tui/)

Arguments can also be read from a file, one a line (lines starting with # are comments):
`xendbg decode @examples/linux-multicall.args`.
Errors are one line on stderr and a non-zero exit: 2 for a usage error, 1 for anything else.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from itertools import pairwise
from pathlib import Path
from typing import BinaryIO

from xendbg.abi import GENERATIONS, NEWEST, Abi, get_abi, guest_widths, resolve_generation
from xendbg.arch import cpu_mode
from xendbg.decode import decode_multicall, decode_pending, decode_trap_table
from xendbg.decode.rules import MAX_MULTICALL_ENTRIES
from xendbg.errors import DecodeError, UsageError, XendbgError
from xendbg.files import open_stream, read_limited
from xendbg.mi import PLATFORMS
from xendbg.render import json as render_json
from xendbg.render import text as render_text
from xendbg.session import AbiChoice
from xendbg.target import InMemoryTarget

# Piped output is for scripts and files: rich must not fold it at 80 columns.
_PIPE_WIDTH = 10_000
# What xendbg reads from a stream: an @FILE of arguments, and guest memory for --mem ADDR@FILE.
_MAX_ARGS_FILE = 1 << 20
_MAX_MEM_FILE = 64 << 20
_MAX_VERSION_TEXT = 16  # "4.17.0-rc3" fits; Python's int() refuses 4,300 digits with an error of its own
_SHOWN = 40  # characters of a bad value echoed in an error
# nr_calls was a 32-bit count up to Xen 4.17 (an unsigned long in 4.22's do_multicall): a larger
# count is no real batch.
_MAX_COUNT = 0xFFFFFFFF

_EXAMPLES = """\
numbers are unsigned: an address, a register value or a memory range must fit the guest width
(0 .. 0xffffffff for 32-bit, 0 .. 0xffffffffffffffff for 64-bit); a negative or wider value is
rejected, never masked.

examples (from the repository's root):
  xendbg abi --xen 4.22 --width 64
  xendbg decode @examples/linux-multicall.args
  xendbg traps 0xc0300000 @examples/xen20-trap-table.args --json
  xendbg multicall 0xffffc90000a00000 4 --results @examples/linux-multicall.args
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and raises instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")

    def convert_arg_line_to_args(self, arg_line: str) -> list[str]:
        # An @FILE may carry comments (how to run it) and blank lines.
        line = arg_line.strip()
        return [] if not line or line.startswith("#") else [line]

    def _value_options(self) -> set[str]:
        """The options of this parser and its subcommands that take a value (--mem, --reg, ...)."""
        found: set[str] = set()
        for action in self._actions:
            if action.option_strings and action.nargs != 0:
                found.update(action.option_strings)
            for sub in (action.choices or {}).values() if isinstance(action.choices, dict) else ():
                if isinstance(sub, _Parser):
                    found |= sub._value_options()
        return found

    def _read_args_from_files(self, arg_strings: list[str]) -> list[str]:
        # argparse's own reader (a private hook, the same in Python 3.11-3.13) decodes with the locale's
        # encoding, raises on bytes that are not text, and takes the value of an option (`--mem @F`) for
        # an arguments file too.
        values = self._value_options()
        out: list[str] = []
        for i, arg in enumerate(arg_strings):
            if not arg.startswith("@") or (i and arg_strings[i - 1] in values):
                out.append(arg)
                continue
            try:
                data = read_limited(arg[1:], _MAX_ARGS_FILE, "an arguments file")
            except OSError as exc:
                raise UsageError(f"cannot read the arguments file {_shown(arg[1:])}: {exc.strerror or exc}") from None
            except DecodeError as exc:
                raise UsageError(str(exc)) from None
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UsageError(f"{_shown(arg[1:])}: an arguments file must be UTF-8 text; byte {exc.start} is "
                                 f"{data[exc.start]:#04x}") from None
            lines = [a for line in text.splitlines() for a in self.convert_arg_line_to_args(line)]
            out += self._read_args_from_files(lines)
        return out


def _shown(text: str) -> str:
    """`text` as an error echoes it: cut to its first characters, saying how long it was."""
    return text if len(text) <= _SHOWN else f"{text[:_SHOWN]}...({len(text)} characters)"


def _number(text: str) -> int:
    if len(text) > 100:  # also Python's int() refuses 4,300 decimal digits
        raise UsageError(f"not a number xendbg takes: {_shown(text)!r} is wider than any address or register")
    try:
        return int(text, 0)
    except ValueError:
        raise UsageError(f"not a number: {_shown(text)!r} (use decimal or 0x-prefixed hex)") from None


def _register(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise UsageError(f"--reg wants NAME=VALUE, got {_shown(text)!r}")
    return name.strip().lower(), _number(value.strip())


def _memory(text: str, base_dir: Path) -> tuple[int, bytes]:
    """ADDR:HEXBYTES or ADDR@FILE (a relative FILE is taken from the current directory)."""
    if "@" in text:
        address, _, filename = text.partition("@")
        if not address.strip():
            raise UsageError(f"--mem {_shown(text)}: give the address the bytes are at: --mem ADDR@FILE")
        path = Path(filename)
        if not path.is_absolute() and not path.exists():
            path = base_dir / filename
        try:
            data = read_limited(str(path), _MAX_MEM_FILE, "guest memory for --mem")
        except OSError as exc:
            raise UsageError(f"--mem {_shown(text)}: cannot read {filename}: {exc.strerror or exc}") from None
        except DecodeError as exc:
            raise UsageError(f"--mem {_shown(text)}: {exc}") from None
        if not data:
            raise UsageError(f"--mem {_shown(text)}: {filename} is empty")
        return _number(address), data
    address, sep, hexbytes = text.partition(":")
    if not sep:
        raise UsageError(f"--mem wants ADDR:HEXBYTES or ADDR@FILE, got {_shown(text)!r}")
    try:
        data = bytes.fromhex(hexbytes.replace(" ", "").replace("_", ""))
    except ValueError:
        raise UsageError(f"--mem {_shown(address)}: not hex bytes: {hexbytes[:40]!r}") from None
    if not data:
        raise UsageError(f"--mem {_shown(text)}: no bytes after ':' (give ADDR:HEXBYTES, e.g. {_shown(address)}:cd82)")
    return _number(address), data


# Registers the decoders read, per guest width; those not given on the command line are 0.
_REGISTERS = {32: ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp", "eip", "cs"),
              64: ("rax", "rdi", "rsi", "rdx", "r10", "r8", "r9", "rcx", "r11", "rsp", "rip", "cs")}

_GROUP_HELP = ("Numbers are unsigned and must fit the guest width: a negative or wider address, "
               "register value or memory range is rejected, never masked.")


def _add_target_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("guest state", _GROUP_HELP)
    group.add_argument("--width", type=int, choices=(32, 64),
                       help="guest width (default: from --reg cs=..., else 32 with --xen 2.0, which had no "
                            "64-bit PV guests; else required)")
    group.add_argument("--xen", default=NEWEST, metavar="VERSION",
                       help=f"Xen version or ABI generation (default: {NEWEST}, the newest)")
    group.add_argument("--reg", action="append", default=[], metavar="NAME=VALUE",
                       help="a register of the stopped vCPU (repeatable; not given: 0): "
                            f"32-bit {' '.join(_REGISTERS[32])}; 64-bit {' '.join(_REGISTERS[64])}")
    group.add_argument("--mem", action="append", default=[], metavar="ADDR:HEX|ADDR@FILE",
                       help="guest memory at ADDR, as hex bytes or from a file (repeatable; ranges "
                            "must not overlap)")
    group.add_argument("--json", action="store_true", help="print JSON (see docs/json-schema.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="xendbg",
                     description="Debugger for Xen PV guests: offline decoding, ABI tables, the full-screen debugger.",
                     epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                     fromfile_prefix_chars="@")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("abi", help="list the hypercalls of a Xen ABI generation")
    p.add_argument("--xen", default=NEWEST, metavar="VERSION", help=f"Xen version (default: {NEWEST})")
    p.add_argument("--width", type=int, choices=(32, 64),
                   help="guest width (default: 64; 32 with --xen 2.0, which had no 64-bit PV guests)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("decode", help="decode the pending hypercall from registers and memory")
    _add_target_options(p)

    p = sub.add_parser("traps", help="decode a trap table (trap_info array) in memory")
    p.add_argument("address", type=_number, help="address of the first trap_info")
    _add_target_options(p)

    p = sub.add_parser("multicall", help="decode a multicall batch in memory")
    p.add_argument("address", type=_number, help="address of the first multicall_entry")
    p.add_argument("count", type=_number, help=f"number of entries (nr_calls, 0 .. {_MAX_COUNT:#x}; xendbg "
                                               f"decodes at most the first {MAX_MULTICALL_ENTRIES} and says so)")
    p.add_argument("--results", action="store_true", help="the batch has run: show the results Xen wrote")
    _add_target_options(p)
    _add_postmortem(sub)

    p = sub.add_parser("attach", help="the full-screen debugger: attach to a QEMU gdbstub (or boot a bundled "
                                      "platform) through gdb/MI", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="keys: F1 help, F5 continue, Ctrl-C interrupt, F7 stepi, F8 catch, F9 trace, "
                              "F6 detail pane, F11/F12 vCPU, F10 quit")
    p.add_argument("target", nargs="?", metavar="HOST:PORT|PORT", help="the gdbstub to attach to")
    p.add_argument("--platform", choices=PLATFORMS,
                   help="boot this bundled platform (fixtures/run) and attach to it; quitting ends it")
    p.add_argument("--abi", help="with --platform: the Xen ABI it emulates or expects")
    p.add_argument("--faulty", action="store_true", help="with --platform: the guest with deliberate mistakes")
    p.add_argument("--symbols", action="append", default=[], metavar="FILE",
                   help="a symbol file (the guest kernel ELF, xen-syms); repeatable")
    p.add_argument("--arch", choices=("i386", "x86-64"), help="gdb's architecture for the target")
    p.add_argument("--xen", metavar="VERSION", help="the Xen ABI to decode with, as `set xen abi`")
    p.add_argument("--gdb", default="gdb", metavar="PATH", help="the gdb to drive (13 or later; default: gdb)")
    p.add_argument("--trace", metavar="FILE.jsonl", help="trace every hypercall from the start into FILE")
    p.add_argument("--ex", action="append", default=[], metavar="COMMAND",
                   help="a gdb or xen command to run once attached, as if typed (repeatable)")
    return parser


def _add_postmortem(sub: argparse._SubParsersAction) -> None:
    from xendbg.dump.commands import SUBCOMMANDS

    p = sub.add_parser("core", help="decode a QEMU memory dump (dump-guest-memory FILE or -z FILE)",
                       description="What every vCPU of a QEMU dump was doing, with the JSON of the live xen "
                                   "commands.  SUBCOMMAND defaults to summary.")
    p.add_argument("file", help="the dump")
    p.add_argument("subcommand", nargs="?", default="summary", choices=SUBCOMMANDS, metavar="SUBCOMMAND",
                   help=f"one of {', '.join(SUBCOMMANDS)} (default: summary)")
    p.add_argument("--symbols", action="append", default=[], metavar="ELF",
                   help="the guest kernel's ELF file: symbols and evidence of the Xen version (repeatable)")
    p.add_argument("--xen-syms", metavar="FILE", help="Xen's xen-syms: its version, symbols and data (the vCPUs of "
                                                      "a domain and what each registered)")
    p.add_argument("--xen", metavar="VERSION", help="Xen version or ABI generation (default: from the evidence)")
    p.add_argument("--domain", type=_number, metavar="ID", help="with --xen-syms: the domain (default: dom0)")
    p.add_argument("--vcpu", type=_number, metavar="N",
                   help="the vCPU (default: the first with a pending hypercall)")
    p.add_argument("--results", action="store_true", help="multicall: the batch has run, show its results")
    p.add_argument("--to-gdb", metavar="OUT", help="write an ELF core of one vCPU's virtual address space "
                                                   "that gdb opens (gdb GUEST_ELF OUT)")
    p.add_argument("--json", action="store_true", help="print JSON (see docs/json-schema.md)")

    p = sub.add_parser("trace", help="filter and count a recorded trace (xen trace start --file F.jsonl, or a "
                                     "xentrace file)")
    p.add_argument("file", help="the JSONL trace, or a binary file of xentrace (xen trace start --buffers "
                                "--xentrace-out, or xentrace on a real host)")
    p.add_argument("--xentrace-out", metavar="OUT", help="a xentrace file: write its records again to OUT, "
                                                         "one window per CPU (what xentrace_format reads)")
    p.add_argument("--xen", metavar="VERSION", help="a xentrace file: the Xen version whose ABI names its "
                                                    "records (the file does not say; default: the newest, "
                                                    "marked as a guess)")
    p.add_argument("names", nargs="*", metavar="NAME", help="only these hypercalls (names or numbers)")
    p.add_argument("--stats", action="store_true", help="counts like strace -c (the xen stats table)")
    p.add_argument("--errors", action="store_true", help="only calls that failed")
    p.add_argument("--json", action="store_true", help="print JSON (see docs/json-schema.md)")


def _core(args: argparse.Namespace) -> int:
    from xendbg.dump import open_core
    from xendbg.dump.commands import COMMANDS

    with open_core(args.file, args.symbols, args.xen_syms, args.xen, args.domain) as core:
        if args.to_gdb:
            from xendbg.dump.gdbcore import write_gdb_core

            print(write_gdb_core(core, args.vcpu, args.to_gdb))
            return 0
        COMMANDS[args.subcommand](core, args, lambda data, renderable: _emit(args, data, renderable))
    return 0


def _trace(args: argparse.Namespace) -> int:
    from xendbg.dump.tracefile import read_trace, select, stats
    from xendbg.trace import show_lines
    from xendbg.xentrace.xtfile import CPU_CHANGE_HEADER

    try:  # opened once: a pipe or FIFO (xentrace writing into it) can be read only once
        head, stream = open_stream(args.file, 4)
    except OSError as exc:
        raise UsageError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    with stream:
        if len(head) == 4 and int.from_bytes(head, "little") == CPU_CHANGE_HEADER:
            return _trace_xentrace(args, stream)
        if args.xentrace_out:
            raise UsageError(f"--xentrace-out takes a xentrace file; {args.file} is a JSONL trace, which holds no "
                             f"raw records (trace with xen trace start --buffers --xentrace-out)")
        trace = read_trace(args.file, stream)
    for warning in trace.warnings():
        print(f"xendbg: warning: {warning}", file=sys.stderr)
    records = select(trace.records, args.names, args.errors)
    if args.stats:
        rows = stats(records).rows()
        _emit(args, {"schema": render_json.SCHEMA_VERSION, "hypercalls": rows}, render_text.stats_table(rows))
        return 0
    if args.json:
        print(render_json.dumps(records))
        return 0
    lines = show_lines(records)
    print("\n".join(lines) if lines else "(no hypercalls in the trace match)")
    return 0


def _trace_xentrace(args: argparse.Namespace, stream: BinaryIO) -> int:
    """A xentrace file (or the pipe xentrace writes into), read as a stream in bounded memory, decoded
    as the live buffer trace decodes it; with --xentrace-out its raw records are written again."""
    from collections import deque

    from xendbg.dump.tracefile import select_stream, stats
    from xendbg.trace import Stats, TraceLog, iter_lines
    from xendbg.xentrace.merge import BufferFeed, StreamMerge
    from xendbg.xentrace.xtfile import XentraceWriter, read_windows

    out = XentraceWriter(args.xentrace_out) if args.xentrace_out else None

    def windows() -> Iterator[tuple[int, list]]:
        for cpu, records in read_windows(stream, args.file):
            if out is not None:
                out.write({cpu: records})
            yield cpu, records

    log = TraceLog(None, ())
    log.recent = deque()  # taken as it fills, below
    log.recent.clear()  # the log's own start record
    merged = StreamMerge(windows())
    feed = BufferFeed(log, Stats(), lambda: _xentrace_abi(args.xen))

    def logged() -> Iterator[dict]:
        for _ in feed.feed_stream(merged):
            while log.recent:
                yield log.recent.popleft()

    records = select_stream(logged(), args.names, args.errors) if args.names or args.errors else logged()
    if args.stats:
        rows = stats(records).rows()
        _emit(args, {"schema": render_json.SCHEMA_VERSION, "hypercalls": rows}, render_text.stats_table(rows))
    elif args.json:
        _write_json_array(records)
    else:
        shown = 0
        for line in iter_lines(records):
            sys.stdout.write(line + "\n")
            shown += 1
        if not shown:
            print("(no hypercalls in the trace match)")
    if out is not None:
        out.close()
    warning = merged.warning(args.file)
    if warning:
        print(f"xendbg: warning: {warning}", file=sys.stderr)
    return 0


def _write_json_array(items: Iterable[dict]) -> None:
    """What print(render_json.dumps(list(items))) prints, one item at a time.  A trace repeats a few
    calls: the `hypercall` object records share (xentrace/merge.py) is formatted once."""
    formatted: dict[int, tuple[object, str]] = {}  # id -> (the object, kept alive; its text)
    first = True
    for item in items:
        shared = item.get("hypercall")
        if isinstance(shared, dict):
            if id(shared) not in formatted:
                if len(formatted) > 4096:
                    formatted.clear()
                formatted[id(shared)] = (shared, render_json.dumps(shared).replace("\n", "\n  "))
            text = render_json.dumps({**item, "hypercall": _PLACE}).replace(_PLACE_JSON, formatted[id(shared)][1])
        else:
            text = render_json.dumps(item)
        sys.stdout.write(("[\n  " if first else ",\n  ") + text.replace("\n", "\n  "))
        first = False
    sys.stdout.write("[]\n" if first else "\n]\n")


_PLACE = "\0hypercall\0"  # no text xendbg writes holds a NUL
_PLACE_JSON = '"\\u0000hypercall\\u0000"'


def _xentrace_abi(version: str | None) -> tuple[Abi, AbiChoice]:
    """The ABI a xentrace file's records are named with: --xen, else the newest as a stated guess (a
    64-bit Xen: its compat guests' hypercalls have the same numbers)."""
    if version is not None:
        generation = resolve_generation(version)
        width = 64 if 64 in guest_widths(generation) else 32  # a 64-bit Xen, unless there was none
        return get_abi(generation, width), AbiChoice(generation, f"--xen {version}", None, (generation,))
    warning = (f"decoding with Xen {NEWEST}'s ABI, a guess: a xentrace file does not record Xen's version; "
               f"give --xen VERSION")
    return get_abi(NEWEST, 64), AbiChoice(NEWEST, "guessed: a xentrace file does not say (--xen VERSION)",
                                          warning, tuple(reversed(GENERATIONS)))


_DROP_WIDTH = "drop --width (Xen {version}'s only width, {only}, is the default)"


def _abi(version: str, width: int | None) -> Abi:
    """The ABI of Xen `version` for `width` (None: the generation's only width, else 64)."""
    widths = guest_widths(resolve_generation(version))
    if width is None:
        width = widths[0] if len(widths) == 1 else 64
    _refuse_width(version, width, f"--width is {width}", _DROP_WIDTH.format(version=version, only=widths[0]))
    return get_abi(version, width)


def _refuse_width(version: str, width: int, source: str, fix: str) -> None:
    """A guest width the Xen version never ran is refused, saying where the width came from."""
    if width not in guest_widths(resolve_generation(version)):  # 64-bit PV arrived with RELEASE-3.0.0
        raise UsageError(f"Xen {version} had no {width}-bit PV guests (64-bit PV came with Xen 3.0), but {source}: "
                         f"{fix} or give a newer --xen")


def _cs_width(cs: int) -> int | None:
    """The guest width a code selector implies on its own, None when it does not say."""
    if cpu_mode(cs, long_mode=False).width != cpu_mode(cs, long_mode=True).width:
        return None  # a ring-3 selector xendbg does not know: 32- or 64-bit code alike
    return cpu_mode(cs).width


def _guest_width(width: int | None, registers: dict[str, int], version: str) -> int:
    """--width, else the width the code selector says, else the only width of Xen `version`; a selector
    that contradicts --width, or a width that version never ran, is an error."""
    cs = registers.get("cs")
    if cs is not None and not 0 <= cs <= 0xFFFF:
        raise UsageError(f"cs={_shown(f'{cs:#06x}')} is not a 16-bit selector")
    widths = guest_widths(resolve_generation(version))
    if width is not None:
        implied = _cs_width(cs) if cs is not None else None
        if cs is not None and implied is not None and implied != width:
            raise UsageError(f"cs={cs:#06x} says {cpu_mode(cs).description}, but --width is {width}: "
                             "drop one or make them agree")
        _refuse_width(version, width, f"--width is {width}", _DROP_WIDTH.format(version=version, only=widths[0]))
        return width
    mode = cpu_mode(cs) if cs is not None else None
    if mode is not None and mode.width is not None:
        _refuse_width(version, mode.width, f"cs={cs:#06x} says {mode.description}",
                      "give the registers of a 32-bit guest")
        return mode.width
    if len(widths) == 1:
        return widths[0]
    if cs is None:
        raise UsageError("give --width 32|64 (or --reg cs=... to tell it from the code selector)")
    raise UsageError(f"cs={cs:#06x} is a ring-0 selector: give --width for the guest")


def _unsigned(what: str, value: int, width: int) -> int:
    if not 0 <= value < 1 << width:
        sign = "-" if value < 0 else ""
        raise UsageError(f"{what} {sign}{_shown(f'{abs(value):#x}')} does not fit a {width}-bit guest "
                         f"(0 .. {(1 << width) - 1:#x}; negative values are not masked)")
    return value


def _registers(given: list[tuple[str, int]], width: int) -> dict[str, int]:
    """The registers of a `width`-bit guest: only names it has, each once; those not given are 0."""
    known = _REGISTERS[width]
    registers: dict[str, int] = {}
    for name, value in given:
        if name not in known:
            other = 64 if width == 32 else 32
            why = (f"{name} is a {other}-bit register" if name in _REGISTERS[other]
                   else f"unknown register {_shown(name)!r}")
            raise UsageError(f"--reg {_shown(name)}: {why}; a {width}-bit guest takes {' '.join(known)}")
        if name in registers:
            raise UsageError(f"--reg {name} is given twice")
        registers[name] = _unsigned(f"--reg {name}", value, width)
    for name in known:
        registers.setdefault(name, 0)
    return registers


def _regions(given: list[str], width: int, base_dir: Path) -> list[tuple[int, bytes]]:
    regions = sorted(_memory(m, base_dir) for m in given)
    for address, data in regions:
        _unsigned("--mem address", address, width)
        _unsigned(f"--mem {address:#x}: its last byte", address + len(data) - 1, width)
    for (a, a_data), (b, b_data) in pairwise(regions):
        if b < a + len(a_data):
            raise UsageError(f"--mem ranges overlap: {a:#x}-{a + len(a_data) - 1:#x} and "
                             f"{b:#x}-{b + len(b_data) - 1:#x} (give each byte once)")
    return regions


def _target(args: argparse.Namespace, base_dir: Path) -> tuple[InMemoryTarget, Abi]:
    """The offline target and ABI the options describe, after checking that they agree."""
    given = [_register(r) for r in args.reg]
    width = _guest_width(args.width, dict(given), args.xen)
    abi = _abi(args.xen, width)
    target = InMemoryTarget(_registers(given, width), _regions(args.mem, width, base_dir))
    return target, abi


def _emit(args: argparse.Namespace, data: object, renderable: object) -> None:
    if args.json:
        print(render_json.dumps(data))
        return
    console = render_text.console()
    if not console.is_terminal:
        console.width = _PIPE_WIDTH
    console.print(renderable)


def run(argv: Sequence[str] | None = None, base_dir: Path | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        where = f"xendbg {args.command}" if args.command else "xendbg"
        raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see '{where} --help')")
    base_dir = base_dir or Path.cwd()
    version = getattr(args, "xen", None)
    if version is not None and len(version) > _MAX_VERSION_TEXT:
        raise UsageError(f"--xen {_shown(version)}: not a Xen version (give one such as 4.17, or an ABI generation)")
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "core":
        return _core(args)
    if args.command == "trace":
        return _trace(args)
    if args.command == "attach":
        from xendbg.tui.main import attach

        return attach(args)
    if args.command == "abi":
        abi = _abi(args.xen, args.width)
        _emit(args, render_json.abi_listing(abi), render_text.abi_listing(abi))
        return 0
    target, abi = _target(args, base_dir)
    if args.command == "decode":
        hc = decode_pending(target, abi)
        _emit(args, render_json.hypercall(hc), render_text.hypercall(hc))
        return 0
    address = _unsigned(f"{args.command} address", args.address, abi.width)
    if args.command == "traps":
        table, found = decode_trap_table(target, abi, address)
        _emit(args, render_json.trap_table_report(table, found), render_text.trap_table_report(table, found))
        return 0
    count = args.count
    if not 0 <= count <= _MAX_COUNT:
        raise UsageError(f"multicall count {_shown(str(count))} is not a batch size: give 0 .. {_MAX_COUNT:#x} "
                         f"(xendbg decodes at most the first {MAX_MULTICALL_ENTRIES} entries and says so)")
    batch, found = decode_multicall(target, abi, address, count, results=args.results)
    _emit(args, render_json.multicall_report(batch, found), render_text.multicall_report(batch, found))
    return 0


# What a write to a full or failing disk raises (stdout on /dev/full, a size limit); EPIPE is a reader gone.
_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)


def _output_failed(exc: OSError) -> int:
    """Output that cannot be written (a full disk, /dev/full): one line, and what is still buffered
    dropped, so that Python's own flush at exit does not fail a second time."""
    print(f"xendbg: error: cannot write the output: {exc.strerror or exc}", file=sys.stderr)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass  # stdout is no file descriptor (a test's capture): nothing is flushed at exit
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    try:
        status = run(argv)
        sys.stdout.flush()
        return status
    except XendbgError as exc:
        print(f"xendbg: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:
        if exc.filename is not None:  # a file xendbg opened
            print(f"xendbg: error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        if exc.errno in _WRITE_ERRORS:
            return _output_failed(exc)
        return _internal(exc)
    except Exception as exc:  # noqa: BLE001 - a bug must still be one line; XENDBG_DEBUG=1 shows the traceback
        return _internal(exc)


def _internal(exc: Exception) -> int:
    if os.environ.get("XENDBG_DEBUG"):
        raise exc
    print(f"xendbg: internal error: {type(exc).__name__}: {exc} (set XENDBG_DEBUG=1 for details)",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

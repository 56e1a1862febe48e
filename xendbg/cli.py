"""The `xendbg` command: offline decoding and the ABI tables, for people and scripts.

  xendbg abi [--xen VERSION] [--width 32|64] [--json]
  xendbg decode --width 32|64 [--xen VERSION] --reg NAME=VALUE ... [--mem ADDR:HEX | --mem ADDR@FILE ...] [--json]
  xendbg traps ADDR ... / xendbg multicall ADDR COUNT ...   (the same memory options)

Arguments can also be read from a file: `xendbg decode @examples/linux-multicall.args`.
Errors are one line on stderr and a non-zero exit: 2 for a usage error, 1 for anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from xendbg.abi import NEWEST, get_abi
from xendbg.arch import cpu_mode
from xendbg.decode import decode_multicall, decode_pending, decode_trap_table
from xendbg.errors import UsageError, XendbgError
from xendbg.render import json as render_json
from xendbg.render import text as render_text
from xendbg.target import InMemoryTarget


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and raises instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _number(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise UsageError(f"not a number: {text!r} (use decimal or 0x-prefixed hex)") from None


def _register(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise UsageError(f"--reg wants NAME=VALUE, got {text!r}")
    return name.strip().lower(), _number(value.strip())


def _memory(text: str, base_dir: Path) -> tuple[int, bytes]:
    """ADDR:HEXBYTES or ADDR@FILE (a relative FILE is taken from the current directory)."""
    if "@" in text:
        address, _, filename = text.partition("@")
        path = Path(filename)
        if not path.is_absolute() and not path.exists():
            path = base_dir / filename
        try:
            return _number(address), path.read_bytes()
        except OSError as exc:
            raise UsageError(f"--mem {text}: cannot read {filename}: {exc.strerror}") from None
    address, sep, data = text.partition(":")
    if not sep:
        raise UsageError(f"--mem wants ADDR:HEXBYTES or ADDR@FILE, got {text!r}")
    try:
        return _number(address), bytes.fromhex(data.replace(" ", "").replace("_", ""))
    except ValueError:
        raise UsageError(f"--mem {address}: not hex bytes: {data[:40]!r}") from None


def _add_target_options(parser: argparse.ArgumentParser, width_required: bool) -> None:
    parser.add_argument("--width", type=int, choices=(32, 64), required=width_required,
                        help="guest width (default: from --reg cs=..., else required)")
    parser.add_argument("--xen", default=NEWEST, metavar="VERSION",
                        help=f"Xen version or ABI generation (default: {NEWEST}, the newest)")
    parser.add_argument("--reg", action="append", default=[], metavar="NAME=VALUE",
                        help="a register of the stopped vCPU (repeatable); registers not given are 0")
    parser.add_argument("--mem", action="append", default=[], metavar="ADDR:HEX|ADDR@FILE",
                        help="guest memory at ADDR, as hex bytes or from a file (repeatable)")
    parser.add_argument("--json", action="store_true", help="print JSON (see docs/json-schema.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="xendbg", description="Debugger for Xen PV guests: offline decoding and ABI tables.",
                     fromfile_prefix_chars="@")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("abi", help="list the hypercalls of a Xen ABI generation")
    p.add_argument("--xen", default=NEWEST, metavar="VERSION", help=f"Xen version (default: {NEWEST})")
    p.add_argument("--width", type=int, choices=(32, 64), default=64, help="guest width (default: 64)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("decode", help="decode the pending hypercall from registers and memory",
                       fromfile_prefix_chars="@")
    _add_target_options(p, width_required=False)

    p = sub.add_parser("traps", help="decode a trap table (trap_info array) in memory", fromfile_prefix_chars="@")
    p.add_argument("address", type=_number, help="address of the first trap_info")
    _add_target_options(p, width_required=True)

    p = sub.add_parser("multicall", help="decode a multicall batch in memory", fromfile_prefix_chars="@")
    p.add_argument("address", type=_number, help="address of the first multicall_entry")
    p.add_argument("count", type=_number, help="number of entries")
    p.add_argument("--results", action="store_true", help="the batch has run: show the results Xen wrote")
    _add_target_options(p, width_required=True)
    return parser


# Registers the decoders may read; those not given on the command line are 0.
_REGISTERS = {32: ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp", "eip", "cs"),
              64: ("rax", "rdi", "rsi", "rdx", "r10", "r8", "r9", "rcx", "r11", "rsp", "rip", "cs")}


def _target(args: argparse.Namespace, base_dir: Path) -> tuple[InMemoryTarget, int]:
    registers = dict(_register(r) for r in args.reg)
    width = args.width
    if width is None:
        if "cs" not in registers:
            raise UsageError("give --width 32|64 (or --reg cs=... to tell it from the code selector)")
        mode = cpu_mode(registers["cs"])
        if mode.width is None:
            raise UsageError(f"cs={registers['cs']:#x} is a ring-0 selector: give --width for the guest")
        width = mode.width
    for name in _REGISTERS[width]:
        registers.setdefault(name, 0)
    return InMemoryTarget(registers, [_memory(m, base_dir) for m in args.mem]), width


def _emit(args: argparse.Namespace, data: object, renderable: object) -> None:
    if args.json:
        print(render_json.dumps(data))
    else:
        render_text.console().print(renderable)


def run(argv: Sequence[str] | None = None, base_dir: Path | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    base_dir = base_dir or Path.cwd()
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "abi":
        abi = get_abi(args.xen, args.width)
        _emit(args, render_json.abi_listing(abi), render_text.abi_listing(abi))
        return 0
    target, width = _target(args, base_dir)
    abi = get_abi(args.xen, width)
    if args.command == "decode":
        hc = decode_pending(target, abi)
        _emit(args, render_json.hypercall(hc), render_text.hypercall(hc))
        return 0
    if args.command == "traps":
        table, found = decode_trap_table(target, abi, args.address)
        _emit(args, render_json.trap_table_report(table, found), render_text.trap_table_report(table, found))
        return 0
    batch, found = decode_multicall(target, abi, args.address, args.count, results=args.results)
    _emit(args, render_json.multicall_report(batch, found), render_text.multicall_report(batch, found))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(argv)
    except XendbgError as exc:
        prog = "xendbg"
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # noqa: BLE001 - a bug must still be one line; XENDBG_DEBUG=1 shows the traceback
        if os.environ.get("XENDBG_DEBUG"):
            raise
        print(f"xendbg: internal error: {type(exc).__name__}: {exc} (set XENDBG_DEBUG=1 for details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""`xendbg attach`: check the options, boot a platform if asked, start gdb over MI, open the screen.

Every failure before the screen opens is one line (XendbgError) and leaves no gdb or QEMU behind;
quitting ends gdb, and QEMU too when xendbg booted it (--platform), else gdb detaches from the guest.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from argparse import Namespace

from xendbg.errors import UsageError, XendbgError
from xendbg.mi import PLATFORMS
from xendbg.mi import attach as launch
from xendbg.mi.client import MiClient, MiError


def options(args: Namespace) -> launch.AttachOptions:
    if (args.target is None) == (args.platform is None):
        raise UsageError(f"give HOST:PORT (or PORT) to attach to, or --platform {'|'.join(PLATFORMS)} to boot one")
    if args.platform is None and (args.abi or args.faulty):
        raise UsageError("--abi and --faulty choose a bundled platform: give --platform too")
    return launch.AttachOptions(target=args.target, platform=args.platform, abi=args.abi, faulty=args.faulty,
                                symbols=list(args.symbols), arch=args.arch, xen=args.xen, gdb=args.gdb,
                                trace=args.trace, commands=list(args.ex))


def attach(args: Namespace, started: float | None = None) -> int:
    from xendbg.tui.app import AttachApp, Timings

    started = started if started is not None else time.monotonic()
    opts = options(args)
    host, port = launch.parse_target(opts.target) if opts.target else ("127.0.0.1", 0)
    launch.check_symbols(opts.symbols)
    if opts.trace:
        _check_writable(opts.trace)
    gdb = launch.find_gdb(opts.gdb)
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("xendbg attach is a full-screen program: run it in a terminal")
    platform = None
    client: list[MiClient] = []
    try:
        if opts.platform:
            platform = launch.Platform(opts.platform, opts.abi, opts.faulty)
            platform.start()  # QEMU boots while gdb loads xendbg and the symbols
            port = platform.port
            opts.symbols = platform.symbols + opts.symbols
            opts.arch = opts.arch or ("x86-64" if platform.artifacts.get("arch") == "i386:x86-64" else
                                      platform.artifacts.get("arch"))
        timings = Timings(started=started, path=os.environ.get("XENDBG_TUI_TIMINGS"))
        where = f"{host}:{port}" + (f" ({opts.platform}{' abi ' + opts.abi if opts.abi else ''}"
                                    f"{' faulty' if opts.faulty else ''})" if opts.platform else "")

        def quit_(gdb_client: MiClient) -> None:
            _end(gdb_client, detach=platform is None)
            if platform is not None:
                platform.stop()

        def factory(on_record):  # noqa: ANN001, ANN202 - the app's record callback
            client.append(launch.start_gdb(gdb, on_record))
            return client[-1]

        app = AttachApp(factory, where, opts.commands, quit_, timings)
        launch.prepare(app.client, opts.symbols, opts.arch, columns=max(40, shutil.get_terminal_size().columns - 1))
        if platform is not None:
            platform.wait()
        timings.reachable = time.monotonic() if platform is not None else started
        launch.connect(app.client, host, port, opts.xen, opts.trace)
        app.run()
        if app.gone:
            print(f"xendbg attach: {app.gone}", file=sys.stderr)
        return 0
    except BaseException:
        for c in client:
            _end(c, detach=False)
        if platform is not None:
            platform.stop()
        raise


def _check_writable(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise UsageError(f"--trace {path}: cannot write in {directory}")


def _end(client: MiClient, detach: bool) -> None:
    if detach and client.alive:
        try:
            client.command("-target-detach", timeout=5)
        except (MiError, XendbgError):
            pass
    client.close()

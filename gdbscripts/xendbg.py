"""Load xendbg into gdb:  (gdb) source gdbscripts/xendbg.py   (also from ~/.gdbinit, gdb -x, or a gdb
Python script: gdb.execute("source .../xendbg.py") or exec() of this file's text).

gdb embeds the system Python, not the project's virtual environment: this file puts the project and
its .venv's site-packages on gdb's path, registers the `xen` commands, and says in one line whether
xendbg is ready.  The heavy imports (the ABI tables, capstone, rich) wait until a command needs them.

The project is the directory above this file's.  Environment variables:
  XENDBG_VENV   the virtual environment to take capstone and rich from (default: the project's .venv)
  XENDBG_ROOT   the project directory, used only when this file runs without its file name (exec() of
                its text from elsewhere than the project directory)
"""

import os
import sys


def _load() -> None:
    # The file this code was compiled from: gdb keeps an outer script's __file__ when it sources this
    # one from a Python script, and exec() of the text sets none.
    here = _load.__code__.co_filename
    if os.path.isfile(here):
        root = os.path.dirname(os.path.dirname(os.path.realpath(here)))
    elif os.environ.get("XENDBG_ROOT"):
        root = os.path.realpath(os.environ["XENDBG_ROOT"])
    elif os.path.isfile(os.path.join("gdbscripts", "xendbg.py")):
        root = os.path.realpath(os.curdir)  # exec(open("gdbscripts/xendbg.py").read()) from the project
    else:
        print("xendbg: not loaded: cannot tell where the project is (this file ran without its name); "
              "set XENDBG_ROOT to the project directory, or `source` the file")
        return
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    default = os.path.join(root, ".venv")
    venv = os.environ.get("XENDBG_VENV") or default
    packages = os.path.join(os.path.realpath(venv), "lib", f"python{version}", "site-packages")
    if venv != default and not os.path.isdir(packages):
        print(f"xendbg: not loaded: XENDBG_VENV is {venv}, which has no {packages} for gdb's Python {version}; "
              f"point it at a venv built on that Python, or unset it to use {default}")
        return
    # Straight onto sys.path, not site.addsitedir: the venv's .pth files (setuptools' editable finder,
    # distutils' shim) import pathlib, urllib... for nothing; the project root makes xendbg importable.
    # The venv's packages go before the system's, as in the venv's own Python.
    if os.path.isdir(packages) and packages not in sys.path:
        at = next((i for i, p in enumerate(sys.path) if p.endswith(("site-packages", "dist-packages"))),
                  len(sys.path))
        sys.path.insert(at, packages)
    if root not in sys.path:
        sys.path.insert(0, root)

    from importlib.machinery import PathFinder  # importlib.util costs more and is not needed

    missing = [name for name in ("capstone", "rich") if PathFinder.find_spec(name) is None]
    try:
        import xendbg.gdb
    except ImportError as exc:
        missing.insert(0, str(exc))
    if missing:
        fix = (f"install them in XENDBG_VENV ({venv}), or unset it to use {default}" if venv != default
               else f"run ./setup.sh env in {root} (creates {packages})")
        print(f"xendbg: not loaded: missing {', '.join(missing)} for gdb's Python {version}; {fix}")
        return
    xendbg.gdb.register()
    print("xendbg ready: 'help xen' lists the commands")


_load()

"""Load xendbg into gdb:  (gdb) source gdbscripts/xendbg.py   (also from ~/.gdbinit or gdb -x).

gdb embeds the system Python, not the project's virtual environment: this file puts the project and
its .venv's site-packages on gdb's path, registers the `xen` commands, and says in one line whether
xendbg is ready.  The heavy imports (capstone, rich) wait until a command needs them.
"""

import importlib.util
import os
import site
import sys


def _load() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(os.path.realpath(__file__))))
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    venv = os.environ.get("XENDBG_VENV", os.path.join(root, ".venv"))
    packages = os.path.join(venv, "lib", version, "site-packages")
    if os.path.isdir(packages):
        site.addsitedir(packages)
    if root not in sys.path:
        sys.path.insert(0, root)
    missing = [name for name in ("capstone", "rich") if importlib.util.find_spec(name) is None]
    try:
        import xendbg.gdb
    except ImportError as exc:
        missing.insert(0, str(exc))
    if missing:
        print(f"xendbg: not loaded: missing {', '.join(missing)} for gdb's Python {version}; "
              f"run ./setup.sh env in {root} (creates {packages})")
        return
    xendbg.gdb.register()
    print("xendbg ready: 'help xen' lists the commands")


_load()

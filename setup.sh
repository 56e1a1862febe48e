#!/usr/bin/env bash
# Set up everything xendbg needs on a Debian 12 or 13 machine, then run the main job or the tests.
#
#   ./setup.sh demo [--gdb | --batch] [--platform P] [--abi A]
#                      boot the bundled test guest under QEMU and open the full-screen debugger
#                      (xendbg attach) stopped at its first multicall; --gdb: gdb's own prompt with
#                      xendbg loaded instead; --batch, or no terminal: run the gdb walkthrough and exit
#   ./setup.sh test    the whole test suite (unit tests and the QEMU platform tests)
#   ./setup.sh env     set up only
#
# Installs (as root, only what is missing): the Debian packages below and in fixtures/apt-packages.txt;
# a virtual environment in .venv built on the system Python (the one gdb embeds); the fixtures.
set -euo pipefail
cd "$(dirname "$0")"
mode=${1:-demo}
shift || true

apt_packages() {
    # The project's own needs; the fixtures list theirs in fixtures/apt-packages.txt.
    echo python3 python3-venv libxen-dev
    echo tmux  # the terminal tests of xendbg attach run it in tmux
    grep -v '^\s*#' fixtures/apt-packages.txt | grep -v '^\s*$'
}

install_packages() {
    local missing=()
    for pkg in $(apt_packages); do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    # The fixtures fetch Debian's Xen and Linux with `apt-get download`, which needs package lists.
    local have_lists=0
    compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null && have_lists=1
    if [ ${#missing[@]} -eq 0 ] && [ $have_lists -eq 1 ]; then
        return
    fi
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup.sh: missing Debian packages: ${missing[*]:-(package lists)}; run as root to install them" >&2
        exit 1
    fi
    echo "setup.sh: installing ${missing[*]:-package lists}"
    apt-get update -q >/dev/null
    if [ ${#missing[@]} -gt 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

make_venv() {
    # gdb embeds the system Python: build the venv on it so gdb can load the same packages.
    if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import xendbg, capstone, rich, pygdbmi, pytest, mypy' 2>/dev/null
    then
        echo "setup.sh: creating .venv"
        /usr/bin/python3 -m venv .venv
        .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    fi
    # Bytecode for what gdb imports, so loading xendbg into gdb does not compile it each time where
    # PYTHONDONTWRITEBYTECODE is set (gdb compiles a sourced gdbscripts/ file from its text anyway).
    .venv/bin/python -m compileall -q xendbg
}

build_fixtures() {
    # shim32 is built from source; xen64/linux64 also fetch the Xen and Linux of the machine's Debian
    # release (12: Xen 4.17, Linux 6.1; 13: Xen 4.20, Linux 6.12) into the cache; xen32 builds that
    # Xen from Debian's source package with 32-bit PV guests (a few minutes, once; then cached), which
    # xen32shared shares.
    for platform in shim32 xen64 linux64 xen32 xen32shared; do
        /usr/bin/python3 fixtures/run "$platform" --build-only --quiet
    done
}

install_packages
make_venv
build_fixtures

case "$mode" in
    env)
        echo "setup.sh: ready (.venv/bin/xendbg, fixtures/run)"
        ;;
    demo)
        exec /usr/bin/python3 tools/walkthrough.py "$@"
        ;;
    test)
        # The house checks first (lint, types), then every test.
        .venv/bin/ruff check --quiet .
        .venv/bin/mypy --no-error-summary
        exec .venv/bin/python -m pytest -q -p no:cacheprovider tests
        ;;
    *)
        echo "usage: ./setup.sh demo|test|env" >&2
        exit 2
        ;;
esac

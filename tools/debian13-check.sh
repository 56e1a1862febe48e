#!/usr/bin/env bash
# Prove the README's two commands on Debian 13 ("trixie"): build a Debian 13 root with debootstrap,
# copy this project (and ../shared, when there is one) into it, and run, as root inside it,
#
#     ./setup.sh demo --batch      then      ./setup.sh test
#
# with /proc, /sys, /dev and /dev/pts mounted, so QEMU runs inside the root. Exits 0 only when both
# pass; the last line says what happened. Not part of CI (slow: downloads, then the whole suite).
#
#   tools/debian13-check.sh [ROOT_DIR]
#
# ROOT_DIR: where the root is built. Given and already built by this script, it is reused (its
# packages and download cache stay; the project copy is always fresh). Not given: a new root under
# /var/tmp, removed at the end. Needs root. The Debian mirror is the one apt uses here (override:
# MIRROR=URL); the host's own local CA certificates are trusted inside too (for HTTPS through a proxy).
set -euo pipefail

SUITE=trixie
HERE=$(cd "$(dirname "$0")/.." && pwd)
log() { echo "debian13-check: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "needs root (debootstrap, chroot, mounts)"
    exit 2
fi

made_root=0
if [ $# -ge 1 ]; then
    ROOT=$(realpath -m "$1")
else
    ROOT=$(mktemp -d /var/tmp/xendbg-debian13.XXXXXX)
    made_root=1
fi

mounted=()
child=
cleanup() {
    local status=$?
    # What runs inside has its own process group (setsid below): end it first, by its id.
    if [ -n "$child" ] && kill -0 "$child" 2>/dev/null; then
        kill -TERM -- "-$child" 2>/dev/null || true
        sleep 2
        kill -KILL -- "-$child" 2>/dev/null || true
    fi
    # Unmount in reverse order; lazily, in case a process inside still holds something.
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
        umount -l "${mounted[i]}" 2>/dev/null || log "could not unmount ${mounted[i]}"
    done
    if [ $made_root -eq 1 ] && ! findmnt -rn -o TARGET | grep -q "^$ROOT/"; then
        rm -rf --one-file-system "$ROOT" "$ROOT.debootstrap.log"
    fi
    exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mirror() {
    # The first Debian archive URI apt is configured with (deb822 .sources or one-line .list).
    if [ -n "${MIRROR:-}" ]; then echo "$MIRROR"; return; fi
    local uri
    uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's/^URIs:[[:space:]]*//p' |
          tr ' ' '\n' | grep -E '/debian/?$' | head -n1 || true)
    if [ -z "$uri" ]; then
        uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
              awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }' |
              grep -E '/debian/?$' | head -n1 || true)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
fi

# A root this script finished before is reused; anything else in ROOT_DIR is refused.
DONE_MARK="$ROOT/var/lib/xendbg-debian13-root"
if [ ! -e "$DONE_MARK" ]; then
    if [ -e "$ROOT" ] && [ -n "$(ls -A "$ROOT")" ] && [ $made_root -eq 0 ]; then
        if [ ! -e "$ROOT/debootstrap" ]; then
            log "$ROOT is not empty and is not a root this script built; give an empty or new directory"
            exit 2
        fi
        log "resuming an unfinished debootstrap in $ROOT"
    fi
    url=$(mirror)
    log "debootstrap $SUITE from $url into $ROOT"
    # minbase plus what apt needs for HTTPS; setup.sh installs everything else itself.
    debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$ROOT" "$url" >"$ROOT.debootstrap.log" 2>&1 ||
        { log "debootstrap failed (see $ROOT.debootstrap.log)"; exit 1; }
    printf 'deb %s %s main\ndeb %s %s-updates main\n' "$url" "$SUITE" "$url" "$SUITE" >"$ROOT/etc/apt/sources.list"
    # No services start inside the root when packages are installed.
    printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
    chmod +x "$ROOT/usr/sbin/policy-rc.d"
    touch "$DONE_MARK"
fi

# The host's network settings and local CAs (a proxy's), so apt and pip reach their registries.
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
    chroot "$ROOT" update-ca-certificates >/dev/null 2>&1 || log "update-ca-certificates failed inside the root"
fi

for m in proc sys dev dev/pts; do
    mkdir -p "$ROOT/$m"
    case $m in
        proc) mount -t proc proc "$ROOT/proc" ;;
        sys) mount -t sysfs sysfs "$ROOT/sys" ;;
        *) mount --bind "/$m" "$ROOT/$m" ;;
    esac
    mounted+=("$ROOT/$m")
done

# A fresh copy of the project (without its virtualenv and build outputs) and ../shared beside it.
rm -rf "$ROOT/src/xendbg"
mkdir -p "$ROOT/src/xendbg"
tar -C "$HERE" --exclude=./.venv --exclude=./.git --exclude=./fixtures/build --exclude='__pycache__' \
    --exclude=.mypy_cache --exclude=.ruff_cache --exclude=.pytest_cache --exclude='*.egg-info' -cf - . |
    tar -C "$ROOT/src/xendbg" -xf -
if [ -d "$HERE/../shared" ]; then
    rm -rf "$ROOT/src/shared"
    cp -r "$HERE/../shared" "$ROOT/src/shared"
fi

inside() {
    # A clean environment, as on a fresh machine; no terminal on stdin (setup.sh demo then runs batch).
    # In the background and in its own process group, so a TERM to this script ends it too.
    setsid chroot "$ROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        bash -c "cd /src/xendbg && $1" </dev/null &
    child=$!
    local status=0
    wait "$child" || status=$?
    child=
    return $status
}

release=$(cat "$ROOT/etc/debian_version")
log "Debian $release root ready; running ./setup.sh demo --batch"
demo=FAIL test=FAIL
if inside "./setup.sh demo --batch"; then demo=PASS; fi
log "running ./setup.sh test"
test_out="$ROOT/src/setup-test.log"
if inside "./setup.sh test" > >(tee "$test_out") 2>&1; then test=PASS; fi
summary=$(grep -E '^[0-9]+ (passed|failed)|[0-9]+ passed' "$test_out" | tail -n1 || true)
versions=$(inside "/usr/bin/python3 fixtures/run linux64 --artifacts" 2>/dev/null |
    /usr/bin/python3 -c 'import json, sys; a = json.load(sys.stdin); print("Xen", a.get("xen_version"), "Linux", a.get("linux_release"))' 2>/dev/null || true)
xensrc=$(inside "/usr/bin/python3 fixtures/run xen32 --artifacts" 2>/dev/null |
    /usr/bin/python3 -c 'import json, sys; print("Xen source", json.load(sys.stdin).get("xen_version"))' 2>/dev/null || true)
if [ -n "$xensrc" ]; then versions="${versions:+$versions, }$xensrc"; fi
gdbv=$(inside "gdb --version | head -n1" 2>/dev/null || true)

echo "debian13-check: Debian $release: setup.sh demo --batch $demo, setup.sh test $test${summary:+ ($summary)}; ${versions:+$versions, }$gdbv"
[ $demo = PASS ] && [ $test = PASS ]

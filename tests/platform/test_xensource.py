"""Xen built from Debian's source package (fixtures/platforms/xensource.py): the deb-src list derived from
the system's apt sources, the configuration rules, the cache, and the built hypervisor itself (32-bit PV,
gdbsx, DWARF, no debug build).

The first test that needs the build makes it when the cache has none (a few minutes); afterwards the
build is a cache hit and these tests take seconds.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, build

sys.path.insert(0, str(FIXTURES))
from platforms import xensource  # noqa: E402

pytestmark = pytest.mark.platform

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Enabled: no

Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
Components: main
"""

ONE_LINE = """\
# a comment
deb http://deb.debian.org/debian trixie main
deb [arch=amd64 signed-by=/etc/apt/keyrings/x.gpg] http://mirror.example/debian trixie-updates main non-free
deb-src http://deb.debian.org/debian trixie main
deb https://packages.cloud.google.com/apt cloud-sdk-trixie main
"""


def test_deb822_entries_become_deb_src_lines_of_the_release() -> None:
    sources = xensource.parse_sources(DEB822, deb822=True)
    # Disabled entries and deb-src entries are not binary sources; each suite is one entry.
    assert [(s.uri, s.suite) for s in sources] == [
        ("http://deb.debian.org/debian", "bookworm"),
        ("http://deb.debian.org/debian", "bookworm-updates"),
        ("https://deb.nodesource.com/node_20.x", "nodistro"),
    ]
    assert xensource.deb_src_lines(sources, "bookworm") == [
        "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm "
        "main contrib",
        "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian "
        "bookworm-updates main contrib",
    ]


def test_one_line_entries_keep_their_keyring_and_drop_other_repositories() -> None:
    sources = xensource.parse_sources(ONE_LINE, deb822=False)
    assert xensource.deb_src_lines(sources, "trixie") == [
        "deb-src http://deb.debian.org/debian trixie main",
        "deb-src [signed-by=/etc/apt/keyrings/x.gpg] http://mirror.example/debian trixie-updates main non-free",
    ]


def test_system_sources_read_both_formats_and_skip_other_file_names(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(ONE_LINE)
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822)
    (tmp_path / "sources.list.d" / "old.list.disabled").write_text("deb http://nowhere.example/debian trixie main\n")
    uris = {s.uri for s in xensource.system_sources(tmp_path)}
    assert "http://nowhere.example/debian" not in uris
    assert {"http://mirror.example/debian", "https://deb.nodesource.com/node_20.x"} <= uris


def test_debian_kconfig_is_the_file_debian_rules_copies(tmp_path: Path) -> None:
    (tmp_path / "debian").mkdir()
    (tmp_path / "debian" / "xen-kconfig").write_text("CONFIG_DEBUG=n\n")
    (tmp_path / "debian" / "rules").write_text(
        "override_dh_auto_configure:\n\tcp debian/xen-kconfig xen/.config\n\tmake -C xen olddefconfig\n")
    assert xensource.debian_kconfig(tmp_path) == tmp_path / "debian" / "xen-kconfig"
    (tmp_path / "debian" / "rules").write_text("override_dh_auto_configure:\n\tmake -C xen defconfig\n")
    with pytest.raises(RuntimeError, match="cannot find the hypervisor configuration"):
        xensource.debian_kconfig(tmp_path)


def test_config_rules() -> None:
    good = "CONFIG_PV32=y\nCONFIG_GDBSX=y\nCONFIG_DEBUG_INFO=y\n# CONFIG_DEBUG is not set\n"
    xensource.check_config(good)
    with pytest.raises(RuntimeError, match="has CONFIG_DEBUG=y"):
        xensource.check_config(good + "CONFIG_DEBUG=y\n")
    with pytest.raises(RuntimeError, match="lacks CONFIG_PV32=y"):
        xensource.check_config(good.replace("CONFIG_PV32=y", "# CONFIG_PV32 is not set"))
    # The key ignores kconfig's comments (they name the version) but not a setting.
    assert xensource.config_hash("# Xen/x86 4.17.5\n" + good) == xensource.config_hash("# Xen/x86 4.17.6\n" + good)
    assert xensource.config_hash(good) != xensource.config_hash(good + "CONFIG_EXPERT=y\n")


def test_a_failed_build_names_its_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XENDBG_CACHE", str(tmp_path))
    tree = tmp_path / "tree"
    (tree / "xen").mkdir(parents=True)
    monkeypatch.setattr(xensource, "_prepare_apt", lambda log: [])
    monkeypatch.setattr(xensource, "_fetch_source", lambda options, log: ("4.17.5-1", tree))
    monkeypatch.setattr(xensource, "_configure", lambda tree, log: "CONFIG_PV32=y\n")

    def make_fails(argv: list[str], log: Path, **kw: object) -> int:
        with log.open("a") as f:
            f.write("arch/x86/foo.c:1: error: boom\n")
        return 2

    monkeypatch.setattr(xensource, "_log_run", make_fails)
    with pytest.raises(RuntimeError) as err:
        xensource.xen()
    log = tmp_path / "xen-src-build" / "build.log"
    assert str(err.value) == f"building Xen 4.17.5-1 from source failed; its messages are in {log}"
    assert "error: boom" in log.read_text()
    assert not (tmp_path / "xen-src-build" / xensource.STAMP).exists()


def test_the_newest_fetchable_version_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A suite may list a newer source than it serves (404): the next older one is taken, and the log says so.
    monkeypatch.setenv("XENDBG_CACHE", str(tmp_path))
    monkeypatch.setattr(xensource, "source_versions", lambda options: ["4.17.7-0+deb12u1", "4.17.5-1"])

    def fake_run(argv: list[str], log: Path, cwd: Path | None = None, **kw: object) -> int:
        if argv[0] == "apt-get":
            if argv[-1] != "xen=4.17.5-1":
                return 100
            assert cwd is not None
            (cwd / "xen_4.17.5-1.dsc").write_text("")
        elif argv[0] == "dpkg-source":
            (Path(argv[-1]) / "debian").mkdir(parents=True)
            (Path(argv[-1]) / "debian" / "rules").write_text("")
        return 0

    monkeypatch.setattr(xensource, "_log_run", fake_run)
    log = tmp_path / "log"
    log.write_text("")
    version, tree = xensource._fetch_source([], log)
    assert version == "4.17.5-1"
    assert tree == tmp_path / "xen-src" / "xen-4.17.5-1"
    assert log.read_text() == "xen source: 4.17.5-1 (not fetchable: 4.17.7-0+deb12u1)\n"


# --- the real build ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built() -> xensource.XenBuild:
    return xensource.xen()


def _symbols(elf: Path) -> set[str]:
    out = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout
    return {parts[2] for line in out.splitlines() if len(parts := line.split()) == 3}


def test_config_has_pv32_gdbsx_and_dwarf_and_no_debug(built: xensource.XenBuild) -> None:
    lines = set(built.config.read_text().splitlines())
    assert {"CONFIG_PV32=y", "CONFIG_GDBSX=y", "CONFIG_DEBUG_INFO=y", "CONFIG_EXPERT=y"} <= lines
    assert "CONFIG_DEBUG=y" not in lines
    # The build directory's key is the version and the configuration's hash.
    assert built.xen.parent.name == f"{built.version}-{xensource.config_hash(built.config.read_text())}"


def test_xen_syms_has_the_compat_entry_and_gdbsx(built: xensource.XenBuild) -> None:
    names = _symbols(built.syms)
    # 32-bit PV (CONFIG_PV32): the int $0x82 entry and the compat handlers; CONFIG_GDBSX: its memory access.
    for name in ("entry_int82", "do_entry_int82", "compat_multicall", "compat_set_trap_table",
                 "compat_set_callbacks", "compat_iret", "gdbsx_guest_mem_io"):
        assert name in names, name


def test_xen_syms_has_dwarf_that_gdb_reads(built: xensource.XenBuild) -> None:
    out = subprocess.run(["gdb", "-nx", "-batch", "-ex", "ptype struct vcpu", "-ex", "ptype struct pv_vcpu",
                          "-ex", "print (long)&((struct pv_vcpu *)0)->event_callback_cs",
                          str(built.syms)], capture_output=True, text=True, timeout=300).stdout
    assert re.search(r"^type = struct vcpu \{", out, re.M), out[:500]
    assert re.search(r"struct domain \*domain;", out), out[:500]
    # The trap table and the callbacks of a PV vCPU (the compat selector in an anonymous union member).
    assert re.search(r"struct trap_info \*trap_ctxt;", out), out[:2000]
    assert re.search(r"^\$1 = \d+$", out, re.M), out[-500:]


def test_image_and_symbols_belong_together(built: xensource.XenBuild) -> None:
    header = built.xen.read_bytes()[:5]
    assert header == b"\x7fELF\x01", "QEMU's multiboot loader boots the 32-bit ELF"

    def build_id(elf: Path) -> str:
        out = subprocess.run(["readelf", "-n", str(elf)], capture_output=True, text=True, check=True).stdout
        m = re.search(r"Build ID: ([0-9a-f]+)", out)
        assert m, out
        return m.group(1)

    assert build_id(built.xen) == build_id(built.syms)


def test_second_request_is_a_cache_hit(built: xensource.XenBuild, monkeypatch: pytest.MonkeyPatch) -> None:
    mtime = built.syms.stat().st_mtime_ns

    def no_subprocess(*a: object, **kw: object) -> None:
        raise AssertionError(f"a cache hit runs nothing: {a}")

    monkeypatch.setattr(xensource.subprocess, "run", no_subprocess)
    assert xensource.xen() == built
    assert built.syms.stat().st_mtime_ns == mtime


def test_other_overrides_are_not_a_cache_hit(built: xensource.XenBuild, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xensource, "CONFIG_OVERRIDES", (*xensource.CONFIG_OVERRIDES, "CONFIG_HVM=n"))
    assert xensource._from_stamp() is None


def test_version_is_the_newest_apt_could_fetch(built: xensource.XenBuild) -> None:
    m = re.search(r"^xen source: (\S+)(?: \(not fetchable: (.*)\))?$", built.log.read_text(), re.M)
    assert m and m.group(1) == built.version
    skipped = m.group(2).split(", ") if m.group(2) else []
    # What the cache's lists offer (apt-cache, no download): everything newer was tried and refused.
    offered = xensource.source_versions(xensource._apt_options(xensource.source_root() / "apt"))
    assert built.version in offered
    assert offered[: offered.index(built.version)] == skipped


def test_debian_binary_is_why() -> None:
    # Debian's own hypervisor (xen64's, from the binary package) is built without 32-bit PV guests; the
    # same release's source, configured here, has them.
    art = build("xen64")
    lines = set(Path(art["xen_config"]).read_text().splitlines())
    assert "# CONFIG_PV32 is not set" in lines and "CONFIG_PV32=y" not in lines


def test_a_missing_tool_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"^no-such-tool-xendbg is not installed \(fixtures/apt-packages.txt"):
        xensource._log_run(["no-such-tool-xendbg", "-x"], tmp_path / "log")

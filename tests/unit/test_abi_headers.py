"""Cross-check xendbg.abi against Debian's libxen-dev headers (Xen 4.17 on Debian 12, 4.20 on 13) with
compiled probes, as the generation whose span holds the headers' Xen.

A probe is compiled with `gcc -S` for -m32 and -m64: every value is emitted as an assembler string
("@@key=value@@"), so no 32-bit libraries are needed and nothing is linked or run.  The macro names
come from the preprocessor itself (`gcc -dM -E`), so a name the headers define and xendbg lacks, or a
name xendbg has and the headers lack, fails here unless it is listed below with its reason.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xendbg.abi import NEWEST, _layouts, _tables, get_abi, resolve_generation
from xendbg.abi.hypercalls import FORMER_NAMES
from xendbg.abi.layouts import GENERATION_LAYOUTS, Layout, field_size

HEADERS = Path("/usr/include/xen")

def _headers_release() -> str:
    """The installed libxen-dev's Xen X.Y (Debian 12: 4.17, Debian 13: 4.20)."""
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "libxen-dev"], capture_output=True,
                             text=True).stdout
    m = re.match(r"\d+\.\d+", version)
    assert m, f"cannot tell libxen-dev's Xen version from dpkg ({version!r})"
    return m.group(0)


HEADERS_RELEASE = _headers_release()
GENERATION = resolve_generation(HEADERS_RELEASE)
ROOT = Path(__file__).resolve().parents[2]

# Xen's public x86 headers at RELEASE-4.17.0, the ones tools/gen_abi_tables.py reads (no io/, hvm/ or
# other architectures).  dom0_ops.h is left out: it is a compatibility stub that #errors when included.
PUBLIC_HEADERS = [
    "xen.h", "arch-x86/xen.h", "arch-x86/xen-mca.h", "arch-x86/cpuid.h", "arch-x86/pmu.h",
    "arch-x86/guest-acpi.h", "arch-x86_32.h", "arch-x86_64.h", "argo.h", "callback.h", "device_tree_defs.h",
    "domctl.h", "elfnote.h", "errno.h", "event_channel.h", "features.h", "grant_table.h", "hypfs.h", "kexec.h",
    "memory.h", "nmi.h", "physdev.h", "platform.h", "pmu.h", "sched.h", "sysctl.h", "tmem.h", "trace.h",
    "vcpu.h", "version.h", "vm_event.h", "xen-compat.h", "xencomm.h", "xenoprof.h", "xsm/flask_op.h",
]
# The newest interface, as Xen and its tools see the headers (__XEN_TOOLS__ also shows the tools-only
# values tools/gen_abi_tables.py reads), and the oldest a guest can ask for, which still gets the old
# spellings of renamed hypercalls (`#if __XEN_INTERFACE_VERSION__ < 0x00030101` and the like).  The
# tools-only headers #error without __XEN_TOOLS__, and __XEN_TOOLS__ forces the newest interface.
LATEST = "__XEN_LATEST_INTERFACE_VERSION__"
OLDEST = "0x00000000"
TOOLS_ONLY_HEADERS = {"domctl.h", "sysctl.h", "vm_event.h"}

# Hypercall names xendbg knows for 4.17 that libxen-dev does not define, and why.
NOT_PUBLIC = {
    "paging_domctl_cont": "hypervisor-internal: xen/arch/x86/include/asm/hypercall.h (arch_1), RELEASE-4.17.0",
}
# Former names that no 4.17 header defines at any interface version, and why.
FORMER_ONLY_OLDER = {
    "acm_op": "hypercall 27 was __HYPERVISOR_acm_op up to 3.x; 4.0 renamed it xsm_op and kept no alias",
}
# Values xendbg knows that the headers define only for the hypervisor itself (#ifdef __XEN__, which
# cannot be compiled outside Xen's tree), and why xendbg keeps them.
XEN_ONLY = {
    "EVTCHNOP_reset_cont": "a continuation Xen creates for EVTCHNOP_reset (event_channel.h, RELEASE-4.17.0)",
}


def _generator():
    spec = importlib.util.spec_from_file_location("gen_abi_tables", ROOT / "tools" / "gen_abi_tables.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FAMILIES = _generator().FAMILIES  # family -> (macro regex, names that are not values)


def _gcc(args: list[str], source: Path) -> str:
    result = subprocess.run(["gcc", *args, "-ffreestanding", str(source)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _probe(width: int, interface: str, tmp_path: Path) -> dict[str, int]:
    """Every object-like macro of the headers that names a hypercall or a family value -> its value."""
    tools = interface == LATEST
    flags = [f"-m{width}", f"-D__XEN_INTERFACE_VERSION__={interface}", *(["-D__XEN_TOOLS__"] if tools else [])]
    headers = [h for h in PUBLIC_HEADERS if tools or h not in TOOLS_ONLY_HEADERS]
    source = tmp_path / f"names{width}{interface}.c"
    source.write_text("#include <stdint.h>\n" + "".join(f"#include <xen/{h}>\n" for h in headers))
    # Object-like macros whose body is integer arithmetic (not GNTTABOP_error_msgs' string table).
    macros = re.findall(r"^#define (\w+) [\w\s()<>|&+\-*~]+$", _gcc([*flags, "-dM", "-E"], source), re.M)
    patterns = [re.compile(p) for p, _ in FAMILIES.values()]
    wanted = sorted({m for m in macros if any(p.fullmatch(m) for p in patterns)})
    emit = '#define EMIT(key, value) asm volatile(".ascii \\"@@" key "=%c0@@\\"" :: "i"((long long)(value)));'
    body = "\n".join(f'EMIT("{name}", {name})' for name in wanted)
    source.write_text(source.read_text() + f"{emit}\nvoid probe(void) {{\n{body}\n}}\n")
    values = {k: int(v) for k, v in re.findall(r"@@(\w+)=(-?\d+)@@", _gcc([*flags, "-S", "-o", "-"], source))}
    assert set(values) == set(wanted)
    return values


@pytest.fixture(scope="module", params=[32, 64])
def probes(request, tmp_path_factory) -> tuple[int, dict[str, int], dict[str, int]]:
    assert shutil.which("gcc"), "gcc is needed (installed by setup.sh)"
    assert HEADERS.is_dir(), "Debian's libxen-dev headers are needed (installed by setup.sh)"
    tmp = tmp_path_factory.mktemp("probe")
    return request.param, _probe(request.param, LATEST, tmp), _probe(request.param, OLDEST, tmp)


def _hypercalls(values: dict[str, int]) -> dict[str, int]:
    return {k.removeprefix("__HYPERVISOR_"): v for k, v in values.items() if k.startswith("__HYPERVISOR_")}


def test_every_hypercall_name_xendbg_knows_matches_headers(probes):
    width, latest, oldest = probes
    now, old = _hypercalls(latest), _hypercalls(oldest)
    abi = get_abi(GENERATION, width)
    primary = {hc.name for hc in abi.hypercalls()}
    checked: set[str] = set()
    for hc in abi.hypercalls():
        if hc.name in NOT_PUBLIC:
            assert hc.name not in now, f"{hc.name} is public now: drop it from NOT_PUBLIC"
        else:
            assert now.get(hc.name) == hc.nr, f"__HYPERVISOR_{hc.name} is {now.get(hc.name)}, xendbg says {hc.nr}"
        checked.add(hc.name)
        for name in hc.former_names:
            # A former name that is another call's name today (sched_op) is checked at the old interface.
            value = now.get(name) if name not in primary else None
            value = old.get(name) if value is None else value
            if value is None:
                assert name in NOT_PUBLIC or name in FORMER_ONLY_OLDER, f"{name} ({hc.name}) is in no header"
            else:
                assert value == hc.nr, f"former name {name} of {hc.name}: headers {value}, xendbg {hc.nr}"
            checked.add(name)
    # Every name of the 4.17 table and every alias xendbg accepts was looked at (width-only ones
    # only for their width).
    others = {n for n in _tables.HYPERCALL[GENERATION] if n == "set_segment_base"} if width == 32 else set()
    assert set(_tables.HYPERCALL[GENERATION]) - others <= checked
    formers = {n for names in FORMER_NAMES.values() for n in names}
    assert formers <= checked | set(FORMER_ONLY_OLDER)
    assert {"mca", "arch_0", "arch_1", "sched_op", "dom0_op"} <= checked


def test_every_hypercall_in_the_headers_is_known(probes):
    width, latest, _ = probes
    assert _hypercalls(latest) == {n: v for n, v in _tables.HYPERCALL[GENERATION].items() if n not in NOT_PUBLIC}


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "HYPERCALL"])
def test_enum_family_matches_headers(probes, family):
    _, latest, _ = probes
    skip = FAMILIES[family][1]
    rx = re.compile(FAMILIES[family][0])
    theirs = {k: v for k, v in latest.items() if rx.fullmatch(k) and k not in skip and not k.startswith("_")}
    ours = getattr(_tables, family)[GENERATION]
    assert ours, f"xendbg has no {family} values for {GENERATION}"
    for name in XEN_ONLY:
        assert name not in theirs, f"{name} is visible outside Xen now: drop it from XEN_ONLY"
    ours = {k: v for k, v in ours.items() if k not in XEN_ONLY}
    if HEADERS_RELEASE == GENERATION:
        assert ours == theirs
        return
    # Headers newer than the generation's tag (4.20's against RELEASE-4.17.0): Xen only adds values in
    # between (e.g. XENVER_extraversion2, VCPUOP_register_runstate_phys_area), which the newest
    # generation's tables have with the same numbers.
    assert ours.items() <= theirs.items()
    added = {k: v for k, v in theirs.items() if k not in ours}
    assert added.items() <= getattr(_tables, family)[NEWEST].items(), added


def test_abi_object_agrees_with_tables():
    abi = get_abi(GENERATION, 64)
    assert {h.name: h.nr for h in abi.hypercalls()}["multicall"] == _tables.HYPERCALL[GENERATION]["multicall"]



# xendbg layout name -> C type in the headers (written independently of tools/gen_abi_layouts.py).
C_TYPES = {"trap_info": "struct trap_info", "multicall_entry": "struct multicall_entry",
           "mmu_update": "struct mmu_update", "mmuext_op": "struct mmuext_op",
           "callback_register": "struct callback_register", "callback_unregister": "struct callback_unregister",
           "cpu_user_regs": "struct cpu_user_regs", "vcpu_guest_context": "struct vcpu_guest_context",
           "start_info": "struct start_info", "sched_shutdown": "struct sched_shutdown",
           "evtchn_op": "struct evtchn_op", "evtchn_port": "struct evtchn_send", "evtchn_close": "struct evtchn_close",
           "evtchn_bind_virq": "struct evtchn_bind_virq", "evtchn_alloc_unbound": "struct evtchn_alloc_unbound",
           "evtchn_bind_ipi": "struct evtchn_bind_ipi", "evtchn_bind_interdomain": "struct evtchn_bind_interdomain",
           "vcpu_set_singleshot_timer": "struct vcpu_set_singleshot_timer",
           "vcpu_register_vcpu_info": "struct vcpu_register_vcpu_info"}
# xendbg flattens a few unions to the member it decodes.
C_FIELDS = {("callback_register", "cs", 32): "address.cs", ("callback_register", "address", 32): "address.eip",
            ("start_info", "console_mfn", 0): "console.domU.mfn",
            ("start_info", "console_evtchn", 0): "console.domU.evtchn"}


def _layouts_of(generation: str, width: int) -> dict[str, Layout]:
    return {name: lay for (name, w, gen), lay in GENERATION_LAYOUTS.items() if gen == generation and w == width}


def _layout_probe(width: int, tmp_path: Path) -> dict[str, int]:
    lines = ["#include <stddef.h>", "#include <stdint.h>"]
    lines += [f"#include <xen/{h}>" for h in ("xen.h", "event_channel.h", "sched.h", "vcpu.h", "callback.h")]
    lines += ['#define EMIT(key, value) asm volatile(".ascii \\"@@" key "=%c0@@\\"" :: "i"((long long)(value)));',
              "void probe(void) {"]
    for name, lay in _layouts_of(GENERATION, width).items():
        ctype = C_TYPES[name]
        lines.append(f'EMIT("size.{name}", sizeof({ctype}))')
        for f in lay.fields:
            member = C_FIELDS.get((name, f.name, width)) or C_FIELDS.get((name, f.name, 0)) or f.name
            lines.append(f'EMIT("off.{name}.{f.name}", offsetof({ctype}, {member}))')
            lines.append(f'EMIT("bytes.{name}.{f.name}", sizeof((({ctype} *)0)->{member}))')
    lines.append("}")
    source = tmp_path / f"layouts{width}.c"
    source.write_text("\n".join(lines))
    out = _gcc([f"-m{width}", f"-D__XEN_INTERFACE_VERSION__={LATEST}", "-S", "-o", "-"], source)
    return {k: int(v) for k, v in re.findall(r"@@([\w.]+)=(-?\d+)@@", out)}


@pytest.mark.parametrize("width", [32, 64])
def test_generated_layouts_match_libxen_dev(width, tmp_path):
    """Every field of every 4.17 layout: offset and size in bytes, against the installed headers."""
    ours = _layouts_of(GENERATION, width)
    assert set(ours) == set(C_TYPES), "every layout xendbg has for 4.17 is checked"
    values = _layout_probe(width, tmp_path)
    checked = 0
    for name, lay in ours.items():
        assert values[f"size.{name}"] == lay.size, f"sizeof {name} ({width}-bit)"
        for f in lay.fields:
            assert values[f"off.{name}.{f.name}"] == f.offset, f"offsetof {name}.{f.name} ({width}-bit)"
            size = f.count if f.kind == "bytes" else f.count * field_size(f.kind, width, GENERATION)
            assert values[f"bytes.{name}.{f.name}"] == size, f"sizeof {name}.{f.name} ({width}-bit)"
            checked += 1
    assert checked > 85


def _layout_generator():
    tools = str(ROOT / "tools")
    sys.path.insert(0, tools)  # the generator imports its sibling gen_abi_tables
    try:
        spec = importlib.util.spec_from_file_location("gen_abi_layouts", ROOT / "tools" / "gen_abi_layouts.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(tools)
    return module


def _as_probed(generation: str) -> dict[tuple[str, int], tuple[int, tuple[tuple[str, int, str, int], ...]]]:
    return {(name, w): (lay.size, tuple((f.name, f.offset, f.kind, f.count) for f in lay.fields))
            for (name, w, gen), lay in GENERATION_LAYOUTS.items() if gen == generation}


@pytest.mark.parametrize("width", [32, 64])
def test_generator_on_libxen_dev_gives_the_4_17_layouts(width, tmp_path):
    """The generator itself, run on Debian's 4.17 headers, reproduces the committed 4.17 layouts."""
    probed = _layout_generator().probe_layouts(HEADERS, width, tmp_path)
    assert probed == {k: v for k, v in _as_probed(GENERATION).items() if k[1] == width}


def test_committed_module_is_what_the_generator_renders():
    generator = _layout_generator()
    assert _layouts.SOURCE_TAGS == _tables.GENERATION_TAGS == generator.GENERATIONS
    text = generator.render(_layouts.SOURCE_TAGS, {gen: _as_probed(gen) for gen in _layouts.SOURCE_TAGS})
    assert text == (ROOT / "xendbg" / "abi" / "_layouts.py").read_text()
    assert set(generator.STRUCTS) == {name for name, _, _ in GENERATION_LAYOUTS}

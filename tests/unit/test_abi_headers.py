"""Cross-check xendbg.abi against Debian's libxen-dev headers (Xen 4.17) with a compiled probe.

The probe is compiled with `gcc -S` for -m32 and -m64: every value is emitted as an assembler
string ("@@key=value@@"), so no 32-bit libraries are needed and nothing is linked or run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from xendbg.abi import _tables, get_abi
from xendbg.abi.layouts import ERA_3, LAYOUTS

HEADERS = Path("/usr/include/xen")
GENERATION = "4.17"  # the libxen-dev version Debian 12 ships

# Enum families and the header each lives in (for the #include list).
FAMILY_HEADERS = ["xen/xen.h", "xen/vcpu.h", "xen/sched.h", "xen/event_channel.h", "xen/grant_table.h",
                  "xen/memory.h", "xen/callback.h", "xen/version.h", "xen/physdev.h", "xen/elfnote.h",
                  "xen/nmi.h"]
FAMILIES = ["VCPUOP", "SCHEDOP", "SHUTDOWN", "EVTCHNOP", "GNTTABOP", "XENMEM", "MMUEXT", "MMU", "CALLBACKOP",
            "CALLBACKTYPE", "CALLBACKF", "VMASST_CMD", "VMASST_TYPE", "XENVER", "CONSOLEIO", "PHYSDEVOP", "UVMF",
            "VIRQ", "ELFNOTE"]

# xendbg layout name -> C type in the headers.
C_TYPES = {"trap_info": "struct trap_info", "multicall_entry": "struct multicall_entry",
           "mmu_update": "struct mmu_update", "mmuext_op": "struct mmuext_op",
           "callback_register": "struct callback_register", "callback_unregister": "struct callback_unregister",
           "cpu_user_regs": "struct cpu_user_regs", "vcpu_guest_context": "struct vcpu_guest_context",
           "start_info": "struct start_info", "sched_shutdown": "struct sched_shutdown",
           "evtchn_op": "struct evtchn_op", "evtchn_port": "struct evtchn_send",
           "evtchn_bind_virq": "struct evtchn_bind_virq", "evtchn_alloc_unbound": "struct evtchn_alloc_unbound",
           "evtchn_bind_ipi": "struct evtchn_bind_ipi", "evtchn_bind_interdomain": "struct evtchn_bind_interdomain",
           "vcpu_set_singleshot_timer": "struct vcpu_set_singleshot_timer",
           "vcpu_register_vcpu_info": "struct vcpu_register_vcpu_info"}
# xendbg flattens a few unions to the member it decodes.
C_FIELDS = {("callback_register", "cs", 32): "address.cs", ("callback_register", "address", 32): "address.eip",
            ("start_info", "console_mfn", 0): "console.domU.mfn",
            ("start_info", "console_evtchn", 0): "console.domU.evtchn"}


def _probe_source(width: int) -> str:
    lines = ["#include <stddef.h>", "#include <stdint.h>"]
    lines += [f"#include <{h}>" for h in FAMILY_HEADERS]
    emit = '#define EMIT(key, value) asm volatile(".ascii \\"@@" key "=%c0@@\\"" :: "i"((long long)(value)));'
    lines += [emit, "void probe(void) {"]
    for name in _tables.HYPERCALL[GENERATION]:
        macro = f"__HYPERVISOR_{name}"
        lines.append(f"#ifdef {macro}\nEMIT(\"hc.{name}\", {macro})\n#endif")
    for family in FAMILIES:
        for name in getattr(_tables, family)[GENERATION]:
            lines.append(f"#ifdef {name}\nEMIT(\"enum.{family}.{name}\", {name})\n#endif")
    for (name, w, era), lay in LAYOUTS.items():
        if w != width or era != ERA_3 or name not in C_TYPES:
            continue
        ctype = C_TYPES[name]
        lines.append(f'EMIT("size.{name}", sizeof({ctype}))')
        for f in lay.fields:
            member = C_FIELDS.get((name, f.name, width)) or C_FIELDS.get((name, f.name, 0)) or f.name
            lines.append(f'EMIT("off.{name}.{f.name}", offsetof({ctype}, {member}))')
    lines.append("}")
    return "\n".join(lines)


def _run_probe(width: int, tmp_path: Path) -> dict[str, int]:
    source = tmp_path / f"probe{width}.c"
    source.write_text(_probe_source(width))
    # The newest interface version, as a guest built today would see the headers.
    latest = "-D__XEN_INTERFACE_VERSION__=__XEN_LATEST_INTERFACE_VERSION__"
    result = subprocess.run(["gcc", f"-m{width}", "-ffreestanding", latest, "-S", "-o", "-", str(source)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return {k: int(v) for k, v in re.findall(r"@@([\w.]+)=(-?\d+)@@", result.stdout)}


@pytest.fixture(scope="module", params=[32, 64])
def probe(request, tmp_path_factory) -> tuple[int, dict[str, int]]:
    assert shutil.which("gcc"), "gcc is needed (installed by setup.sh)"
    assert HEADERS.is_dir(), "Debian's libxen-dev headers are needed (installed by setup.sh)"
    return request.param, _run_probe(request.param, tmp_path_factory.mktemp("probe"))


def test_hypercall_numbers_match_headers(probe):
    _, values = probe
    found = {k[3:]: v for k, v in values.items() if k.startswith("hc.")}
    assert len(found) >= 45, "the probe should see nearly every hypercall"
    assert found == {name: nr for name, nr in _tables.HYPERCALL[GENERATION].items() if name in found}


def test_enum_values_match_headers(probe):
    _, values = probe
    for family in FAMILIES:
        ours = getattr(_tables, family)[GENERATION]
        theirs = {k.split(".", 2)[2]: v for k, v in values.items() if k.startswith(f"enum.{family}.")}
        assert theirs, f"the headers define none of {family}"
        mismatched = {n: (ours[n], v) for n, v in theirs.items() if ours[n] != v}
        assert not mismatched, f"{family}: {mismatched}"


def test_layouts_match_headers(probe):
    width, values = probe
    checked = 0
    for (name, w, era), lay in LAYOUTS.items():
        if w != width or era != ERA_3 or name not in C_TYPES:
            continue
        assert values[f"size.{name}"] == lay.size, f"sizeof {name} ({width}-bit)"
        for f in lay.fields:
            assert values[f"off.{name}.{f.name}"] == f.offset, f"offsetof {name}.{f.name} ({width}-bit)"
            checked += 1
    assert checked > 80


def test_abi_object_agrees_with_tables():
    abi = get_abi(GENERATION, 64)
    assert {h.name: h.nr for h in abi.hypercalls()}["multicall"] == _tables.HYPERCALL[GENERATION]["multicall"]

"""`xl dump-core` files (libxenguest's xg_core.c layout, built by tests/unit/xccorefiles.py): registers
and registered state from each vcpu_guest_context, memory through .xen_p2m (a PV guest's page tables
hold machine frames) or .xen_pfn, the `xendbg core` subcommands, struct sizes against libxen-dev, and
bad files in one line each."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit import dumpfiles as df
from tests.unit import xccorefiles as xcf
from tests.unit.test_abi_headers import _gcc
from tests.unit.test_dump import BIG64, DATA64, K32, K64, expected, pv32, pv64, write
from tests.unit.test_dump_errors import _exercise, one_line_error
from xendbg.abi.layouts import layout
from xendbg.cli import main
from xendbg.dump import open_core, xccore
from xendbg.errors import UnreadableMemory, XendbgError
from xendbg.render import json as render_json

PAGE = xcf.PAGE
TRAPS64 = [{"vector": 3, "flags": 3, "cs": 0xE033, "address": K64 + 0x110},
           {"vector": 14, "flags": 0, "cs": 0xE033, "address": K64 + 0x140}]
CALLBACKS64 = {"event": (0, K64 + 0x200), "failsafe": (0, K64 + 0x240), "syscall": (0, K64 + 0x280)}
FLAGS = xcf.VGCF_ONLINE | xcf.VGCF_IN_KERNEL | xcf.VGCF_FAILSAFE_DISABLES_EVENTS


def scrambled(ram: df.Ram) -> list[tuple[int, int, bytes]]:
    """Every page of `ram` (machine memory) as (pfn, gmfn, page) with pfn != gmfn: the page tables
    only work if the reader maps machine frames through .xen_p2m."""
    frames = len(ram.data) // PAGE
    return [(frames - 1 - mfn, mfn, bytes(ram.data[mfn * PAGE:(mfn + 1) * PAGE])) for mfn in range(frames)]


def pv64_core(**overrides) -> tuple[bytes, df.Cpu, dict[int, bytes]]:
    ram, cpus, virtual = pv64()
    cpu = cpus[0]
    regs = cpu.regs | {"cs": cpu.cs, "ss": cpu.ss, "rflags": 0x246}
    root = cpu.cr[3]
    online = xcf.context(64, regs, root >> 12, traps=TRAPS64, callbacks=CALLBACKS64, flags=FLAGS,
                         kernel_ss=0xE02B, kernel_sp=K64 + 0x8000)
    offline = xcf.context(64, {"rip": K64 + 0x1000, "cs": 0xE033}, root >> 12, flags=0)
    contexts = overrides.pop("contexts", [online, offline])
    return xcf.xc_core(contexts, scrambled(ram), **overrides), cpu, virtual


def test_pv64_reads_like_a_live_stop(tmp_path):
    data, cpu, virtual = pv64_core()
    path = write(tmp_path, "pv64.core", data)
    with open_core(path) as core:
        assert core.format == "xl dump-core" and len(core.vcpus) == 2
        v0, v1 = core.vcpus
        assert v0.registers["rip"] == cpu.regs["rip"] and v0.registers["rdi"] == DATA64 and v0.cs == 0xE033
        assert v0.registers_source == "from the dump's vcpu_guest_context 0 (user_regs, as Xen saved them)"
        # CR3 is the machine address of the top table; every table and page goes through .xen_p2m
        assert v0.target.paging.describe() == f"4-level paging, CR3 {cpu.cr[3]:#x}"
        assert v0.target.read_memory(BIG64 + 0x1230, 8) == b"[guest] "
        assert v0.target.physical(K64 + 0x1000) == 0x1000  # machine address 0x1000 is pfn 1022's page
        assert core.memory.read(0x1000 + 13 * 32, 32) == virtual[cpu.regs["rip"] - 8]
        assert core.memory.has(0x3FF000) and not core.memory.has(0x400000)
        hc = v0.pending()
        assert hc is not None and hc.name == "multicall" and hc.site == "at syscall"
        assert render_json.hypercall(hc) | {"xen_source": None} == expected(cpu, 64, virtual, "4.17") | {
            "xen_source": None}
        # the dump's xen_version note is the evidence a live xen_version() call would be
        assert hc.generation == "4.17" and "xen_version() = 4.17" in hc.abi_reason
        assert v1.registers_source.startswith("offline (no VGCF_online)")
        assert v1.pending() is None and "the vCPU is offline" in v1.why_not_pending
        assert v1.physical_cpu is None and v0.physical_cpu is None


def test_pv64_registered_state_prints_the_live_schema(tmp_path, capsys):
    data, cpu, _ = pv64_core()
    path = write(tmp_path, "pv64.core", data)
    source = "from the dump's vcpu_guest_context 0 (.xen_prstatus)"

    def run(*argv: str) -> dict:
        assert main(["core", path, *argv, "--json"]) == 0, capsys.readouterr().err
        return json.loads(capsys.readouterr().out)

    traps = run("traps")
    assert traps["registered_from"] == source and traps["width"] == 64 and traps["findings"] == []
    assert [(e["vector"], e["cs"], e["address"], e["dpl"]) for e in traps["entries"]] == [
        (3, 0xE033, K64 + 0x110, 3), (14, 0xE033, K64 + 0x140, 0)]
    callbacks = run("callbacks")
    assert callbacks["registered_from"] == source
    assert [(c["kind"], c["address"], c["flag_names"]) for c in callbacks["callbacks"]["callbacks"]] == [
        ("event", K64 + 0x200, []), ("failsafe", K64 + 0x240, ["CALLBACKF_mask_events"]), ("syscall", K64 + 0x280, [])]
    check = run("check")
    assert check["pending"] == "multicall" and check["registered_from"] == source
    summary = run()
    row = summary["vcpus"][0]
    assert row["registered"]["cr3"] == cpu.cr[3] and row["registered"]["kernel_sp"] == K64 + 0x8000
    assert row["registered_traps"] == 2 and row["registered_callbacks"] == 3 and row["physical_cpu"] is None
    assert summary["format"] == "xl dump-core"
    assert summary["registered_state"] == "registered state: from the dump's vcpu_guest_context"
    assert run("traps", "--vcpu", "1")["entries"] == []  # the offline vCPU registered nothing
    assert main(["core", path]) == 0 and "xl dump-core dump, 2 vCPU(s)" in capsys.readouterr().out


def pv32_core(**overrides) -> tuple[bytes, df.Cpu, dict[int, bytes]]:
    ram, cpus, virtual = pv32(df.PAE)
    cpu = cpus[0]
    regs = {"e" + k[1:]: v for k, v in cpu.regs.items()} | {"cs": cpu.cs, "ss": 0xE021}
    traps = [{"vector": 0x80, "flags": 3, "cs": 0xE019, "address": K32 + 0x300}]
    callbacks = {"event": (0xE019, K32 + 0x400), "failsafe": (0xE019, K32 + 0x440)}
    ctx = xcf.context(32, regs, cpu.cr[3] >> 12, traps=traps, callbacks=callbacks,
                      flags=xcf.VGCF_ONLINE | xcf.VGCF_FAILSAFE_DISABLES_EVENTS, kernel_ss=0xE021,
                      kernel_sp=K32 + 0x9000)
    return xcf.xc_core([ctx], scrambled(ram), width=32, **overrides), cpu, virtual


def test_pv32_context_pae_and_selectors(tmp_path, capsys):
    data, cpu, virtual = pv32_core()
    path = write(tmp_path, "pv32.core", data)
    with open_core(path) as core:
        v0 = core.vcpus[0]
        assert v0.width == 32 and v0.registers["eip"] == cpu.regs["rip"] and "rax" not in v0.registers
        assert v0.target.paging.describe() == f"PAE paging, CR3 {cpu.cr[3]:#x}"
        hc = v0.pending()
        assert render_json.hypercall(hc) | {"xen_source": None, "xen": None} == \
            expected(cpu, 32, virtual, "4.17") | {"xen_source": None, "xen": None}
    assert main(["core", path, "callbacks", "--json"]) == 0
    cbs = json.loads(capsys.readouterr().out)
    assert cbs["width"] == 32 and [(c["kind"], c["selector"], c["rpl"], c["address"], c["flags"])
                                   for c in cbs["callbacks"]["callbacks"]] == [
        ("event", 0xE019, 1, K32 + 0x400, 0), ("failsafe", 0xE019, 1, K32 + 0x440, 1)]
    assert main(["core", path, "traps", "--json"]) == 0
    traps = json.loads(capsys.readouterr().out)
    assert [(e["vector"], e["cs"], e["address"]) for e in traps["entries"]] == [(0x80, 0xE019, K32 + 0x300)]


def test_cr3_rotation_of_32bit_guests():
    # xen_pfn_to_cr3 / xen_cr3_to_pfn: frames above 4 GiB keep their high bits in CR3's low bits
    for frame in (0x1234, 0x123456, 0xFFFFF, 0x100000, 0xABCDE12):
        assert xccore.cr3_to_frame(xcf.pfn_to_cr3(frame, 32), 32) == frame
        assert xccore.cr3_to_frame(xcf.pfn_to_cr3(frame, 64), 64) == frame
    assert xcf.pfn_to_cr3(0x100001, 32) == 0x1001 | 1


def test_hvm_memory_by_pfn(tmp_path, capsys):
    ram, cpus, _ = pv64()
    cpu = cpus[0]
    regs = cpu.regs | {"cs": 0x10, "ss": 0x18}
    ctx = xcf.context(64, regs, 0, cr3=cpu.cr[3], flags=xcf.VGCF_ONLINE)
    pages = [(pfn, 0, bytes(ram.data[pfn * PAGE:(pfn + 1) * PAGE])) for pfn in range(len(ram.data) // PAGE)
             if pfn not in (0xA0, 0xA1)]  # a hole, as xg_core_x86.c leaves the VGA range out
    path = write(tmp_path, "hvm.core", xcf.xc_core([ctx], pages, hvm=True, shared_info=None))
    with open_core(path) as core:
        v0 = core.vcpus[0]
        assert v0.target.read_memory(BIG64 + 0x1230, 8) == b"[guest] "  # cr0/cr4 of the context: 4-level
        with pytest.raises(UnreadableMemory, match="guest-physical frame 0xa0 is not in the dump's .xen_pfn"):
            core.memory.read(0xA0FF8, 16)
        assert not v0.registered and v0.why_not_registered() == "an HVM guest registers no PV trap table or callbacks"
    assert "an HVM guest registers no PV trap table" in one_line_error(capsys, ["core", path, "traps"])


def test_struct_sizes_against_libxen_dev(tmp_path):
    """vcpu_guest_context_any_t, the contexts of each width, the xen_version descriptor's parts and the
    note numbers, compiled from Debian's libxen-dev (xenctrl.h, xen/foreign/, xen/version.h)."""
    source = tmp_path / "xccore.c"
    values = {"any": "sizeof(vcpu_guest_context_any_t)", "x32": "sizeof(vcpu_guest_context_x86_32_t)",
              "x64": "sizeof(vcpu_guest_context_x86_64_t)",
              "version": "16 + sizeof(xen_extraversion_t) + sizeof(xen_compile_info_t)"
                         " + sizeof(xen_capabilities_info_t) + sizeof(xen_changeset_info_t)"
                         " + sizeof(xen_platform_parameters_t) + 8",
              "none": "XEN_ELFNOTE_DUMPCORE_NONE", "header": "XEN_ELFNOTE_DUMPCORE_HEADER",
              "xen_version": "XEN_ELFNOTE_DUMPCORE_XEN_VERSION", "format": "XEN_ELFNOTE_DUMPCORE_FORMAT_VERSION"}
    emit = '#define EMIT(key, value) asm volatile(".ascii \\"@@" key "=%c0@@\\"" :: "i"((long long)(value)));'
    source.write_text("#include <stdint.h>\n#include <xenctrl.h>\n#include <xen/foreign/x86_32.h>\n"
                      "#include <xen/foreign/x86_64.h>\n#include <xen/version.h>\n#include <xen/elfnote.h>\n"
                      f"{emit}\nvoid probe(void) {{\n"
                      + "".join(f'EMIT("{k}", {v})\n' for k, v in values.items()) + "}\n")
    found = {k: int(v) for k, v in re.findall(r"@@(\w+)=(-?\d+)@@", _gcc(["-m64", "-S", "-o", "-"], source))}
    assert found == {"any": xccore.ANY_CONTEXT_SIZE, "x32": layout("vcpu_guest_context", 32, "3.0").size,
                     "x64": layout("vcpu_guest_context", 64, "3.0").size, "version": xcf.XEN_VERSION_DESC,
                     "none": xccore.XEN_ELFNOTE_DUMPCORE_NONE, "header": xccore.XEN_ELFNOTE_DUMPCORE_HEADER,
                     "xen_version": xccore.XEN_ELFNOTE_DUMPCORE_XEN_VERSION,
                     "format": xccore.XEN_ELFNOTE_DUMPCORE_FORMAT_VERSION}
    assert (found["x64"], found["x32"]) == (5168, 2800)


def test_the_file_has_xg_cores_section_order(tmp_path):
    data, _, _ = pv64_core()
    out = subprocess.run(["readelf", "-S", "-W", write(tmp_path, "pv64.core", data)], capture_output=True, text=True)
    names = re.findall(r"\]\s+(\.\S+)", out.stdout)
    assert names == [".shstrtab", ".note.Xen", ".xen_prstatus", ".xen_shared_info", ".xen_pages", ".xen_p2m"]


def _bad_cr3() -> bytes:
    ram, cpus, _ = pv64()
    ctx = xcf.context(64, cpus[0].regs | {"cs": 0xE033}, 0x7FFF0, traps=TRAPS64)
    return xcf.xc_core([ctx], scrambled(ram))


@pytest.mark.parametrize("name, build, message", [
    ("magic", lambda: pv64_core(magic=0xDEADBEEF)[0], "dump-core header magic 0xdeadbeef, not 0xf00febed"),
    ("truncated", lambda: pv64_core()[0][:300000], "lies beyond the end of the file"),
    ("vcpus-absurd", lambda: pv64_core(nr_vcpus=1 << 40)[0], "says 1099511627776 vCPUs: corrupt header"),
    ("vcpus-mismatch", lambda: pv64_core(nr_vcpus=3)[0], "not the header's 3 vCPU contexts of 5168 bytes"),
    ("p2m-past-pages", lambda: pv64_core(p2m_extra=bytes(16))[0], ".xen_p2m has 1025 entries for .xen_pages' 1024"),
    ("p2m-twice", lambda: xcf.xc_core([xcf.context(64, {}, 5)], [(0, 5, bytes(PAGE)), (1, 5, bytes(PAGE))]),
     "names frame 0x5 twice"),
    ("p2m-wild", lambda: xcf.xc_core([xcf.context(64, {}, 5)], [(0, 1 << 50, bytes(PAGE))]), "beyond 52-bit"),
    ("format", lambda: pv64_core(format_version=1 << 32 | 1)[0], "dump-core format version 1.x"),
    ("pages-short", lambda: pv64_core(nr_pages=2000)[0], "section .xen_pages (8192000 bytes at offset 0x4000) lies "
                                                         "beyond the end of the file"),
])
def test_bad_xc_core_is_one_line(tmp_path, capsys, name, build, message):
    path = write(tmp_path, name, build())
    with pytest.raises(XendbgError, match=re.escape(message)):
        open_core(path).close()
    assert message in one_line_error(capsys, ["core", path])


def test_cr3_outside_the_dump_and_doors_that_need_a_qemu_dump(tmp_path, capsys):
    path = write(tmp_path, "cr3.core", _bad_cr3())
    with open_core(path) as core:
        v0 = core.vcpus[0]
        assert not v0.registered and "ctrlreg[3] (0x7fff0000) is not a frame of the dump" in v0.why_not_registered()
        assert v0.pending() is None and "page table outside the dump's RAM" in v0.why_not_pending
    assert "ctrlreg[3] (0x7fff0000) is not a frame" in one_line_error(capsys, ["core", path, "traps"])
    good = write(tmp_path, "pv64.core", pv64_core()[0])
    assert "an xl dump-core file has no QEMU CPU notes" in one_line_error(capsys, ["core", good, "--to-gdb",
                                                                                  str(tmp_path / "g.core")])
    assert main(["core", good, "--domain", "1"]) == 2
    assert "an xl dump-core file is one domain" in capsys.readouterr().err


_SEED: list[bytes] = []


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.one_of(st.none(), st.integers(0, 40000)),
       edits=st.lists(st.tuples(st.integers(0, 20000), st.integers(0, 255)), max_size=8))
def test_mutated_xc_core_raises_only_xendbg_errors(tmp_path, cut, edits):
    if not _SEED:
        ram, cpus, _ = pv32(df.PAE, ram_size=64 << 10)
        ctx = xcf.context(32, {"eip": cpus[0].regs["rip"], "cs": 0xE019}, cpus[0].cr[3] >> 12)
        _SEED.append(xcf.xc_core([ctx], scrambled(ram), width=32))
    data = bytearray(_SEED[0])
    for offset, value in edits:
        if offset < len(data):
            data[offset] = value
    _exercise(write(tmp_path, "mutated", bytes(data[:cut] if cut is not None else data)))

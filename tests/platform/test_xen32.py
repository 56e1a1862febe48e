"""xen32: our 32-bit PAE PV test kernel as dom0 on the Xen built from Debian's source (CONFIG_PV32), under
QEMU (TCG).

Each transcript step is checked against what Xen 4.17 does for a compat (32-bit) PV guest, with the rule
cited next to the check, and against Xen's own console lines about the domain it built.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, RUN, SYSTEM_PYTHON, build

sys.path.insert(0, str(FIXTURES))
from platforms import common, xensource  # noqa: E402

pytestmark = pytest.mark.platform

EINVAL, ENOSYS = -22, -38
# FLAT_RING1_CS of a 32-bit PV guest (arch-x86/xen-x86_32.h, RELEASE-4.17.0)
RING1_CS = 0xE019
HC_console_io, HC_xen_version, HC_vcpu_op, HC_sched_op, HC_event_channel_op = 18, 17, 24, 29, 32


def xen_version_word() -> int:
    major, minor = build("xen32")["xen_release"].split(".")
    return int(major) << 16 | int(minor)


def rc(t: common.Transcript, step: str) -> int:
    assert step in t.steps, f"step {step!r} missing from the transcript:\n{t.text()}"
    return t.steps[step].rc


def field(t: common.Transcript, step: str, key: str) -> int:
    return int(t.steps[step].fields[key], 0)


@pytest.fixture(scope="module")
def transcript(platform_run) -> common.Transcript:
    res = platform_run("xen32")
    assert res.ok, res.stderr + res.stdout[-3000:]
    return res.transcript


def test_scenario_done_in_ring1(transcript: common.Transcript) -> None:
    t = transcript
    assert t.done and t.failed is None
    # Xen's own account of the domain it built: a 32-bit PAE kernel on a 64-bit Xen with compat32.
    assert any(re.search(r"\(XEN\)\s+Xen\s+kernel: 64-bit, lsb, compat32", line) for line in t.lines)
    assert any(re.search(r"\(XEN\)\s+Dom0 kernel: 32-bit, PAE, lsb", line) for line in t.lines)
    # Through the hypercall page and through the guest's own int $0x82 alike.
    assert rc(t, "xen_version") == rc(t, "xen_version.inline") == xen_version_word()
    assert field(t, "xen_version", "cs") == RING1_CS
    assert "magic=xen-3.0-x86_32p" in next(line for line in t.lines if "PV guest up" in line)


def test_registrations(transcript: common.Transcript) -> None:
    t = transcript
    for step in ("update_va_mapping", "set_callbacks", "callback_op.event", "callback_op.failsafe",
                 "set_trap_table", "console_io"):
        assert rc(t, step) == 0, step
    # Xen 4.17 raises an RPL-0 code selector to RPL 1 without a word (fixup_guest_code_selector,
    # pv/traps.c via compat_set_trap_table, RELEASE-4.17.0): vector 6's handler runs with 0xe019.
    assert field(t, "trap.invalid_op", "vector") == 6
    assert field(t, "trap.invalid_op", "handler_cs") == RING1_CS


def test_multicalls(transcript: common.Transcript) -> None:
    t = transcript
    assert rc(t, "multicall#1") == 0 and rc(t, "multicall#2") == 0
    # Results entry by entry: closing a port that does not exist is -EINVAL (evtchn_close,
    # common/event_channel.c); an unknown xen_version command -ENOSYS (common/kernel.c).
    assert [rc(t, f"multicall#1.entry{i}") for i in range(4)] == [xen_version_word(), 1, EINVAL, 0]
    assert [field(t, f"multicall#1.entry{i}", "op") for i in range(4)] == [
        HC_xen_version, HC_vcpu_op, HC_event_channel_op, HC_xen_version]
    assert [rc(t, f"multicall#2.entry{i}") for i in range(3)] == [0, ENOSYS, 0]
    assert [field(t, f"multicall#2.entry{i}", "op") for i in range(3)] == [HC_console_io, HC_xen_version,
                                                                            HC_sched_op]
    # console_io inside the batch printed its text on Xen's console, before the batch's report.
    inside = t.lines.index(next(line for line in t.lines if "(printed from inside multicall#2)" in line))
    assert inside < t.lines.index(t.steps["multicall#2"].line)


def test_event_and_traps(transcript: common.Transcript) -> None:
    t = transcript
    # The event arrived through the event callback on the bound IPI port; the compat bounce frame's CS
    # word carries the saved upcall mask in its upper half (0: events were on), the selector below.
    assert field(t, "event", "count") == 1 and field(t, "event", "port") == field(t, "evtchn.bind_ipi", "port")
    assert field(t, "event", "frame_cs") == RING1_CS
    assert field(t, "event", "handler_cs") == RING1_CS
    # Xen masks events during the delivery and puts !mask into the frame's EFLAGS.IF; the handler's iret
    # hypercall restores the mask from it (compat_iret, pv/iret.c, RELEASE-4.17.0).
    assert field(t, "event", "mask_inside") == 1
    assert field(t, "event", "frame_eflags") & 0x200
    assert field(t, "event", "mask_after") == 0
    # Traps through the trap table, the interrupted ring-1 CS in the frame as it was.
    assert field(t, "trap.int3", "cs") == RING1_CS and field(t, "trap.int3", "handler_cs") == RING1_CS
    assert field(t, "trap.page_fault", "cr2") == 0x80000000  # the address the guest read, from vcpu_info
    assert field(t, "trap.page_fault", "error") == 0  # a supervisor (ring-1) read of a not-present page
    assert field(t, "int80", "eax") == 0x80BEEF


def xen_notes(elf: str, tmp: Path) -> dict[int, bytes]:
    """The Xen ELF notes of a file by type, from the raw note section (readelf names them as other notes)."""
    raw = tmp / "notes"
    subprocess.run(["objcopy", "-O", "binary", "--only-section=.note.Xen", elf, str(raw)], check=True)
    data, notes, off = raw.read_bytes(), {}, 0
    while off + 12 <= len(data):
        namesz, descsz, kind = struct.unpack_from("<III", data, off)
        name_end = off + 12 + (namesz + 3) // 4 * 4
        assert data[off + 12:off + 12 + namesz] == b"Xen\0"
        notes[kind] = data[name_end:name_end + descsz]
        off = name_end + (descsz + 3) // 4 * 4
    return notes


def test_memory(transcript: common.Transcript) -> None:
    t = transcript
    # A dom0 without a HV_START_LOW note sees the compat M2P at __HYPERVISOR_COMPAT_VIRT_START
    # (asm/config.h, RELEASE-4.17.0).
    assert rc(t, "memory_op.machphys_mapping") == 0
    assert field(t, "memory_op.machphys_mapping", "v_start") == 0xF5800000
    # mmu_update wrote one PTE (present, RW, accessed, dirty) that aliases scratch_page onto alias_page;
    # the guest then read alias_page's first word through it (read here from the ELF, by gdb).
    assert rc(t, "mmu_update") == 0 and field(t, "mmu_update", "done") == 1
    assert field(t, "mmu_update", "val") & 0xFFF == 0x063
    guest = build("xen32")["guest"]
    out = subprocess.run(["gdb", "-nx", "-batch", "-ex", "x/wx &alias_page", guest], capture_output=True,
                         text=True, timeout=60).stdout
    m = re.search(r":\s+(0x[0-9a-f]{8})$", out, re.M)
    assert m, out
    assert field(t, "mmu_update", "seen") == int(m.group(1), 16)


def test_preempted_multicall(transcript: common.Transcript) -> None:
    t = transcript
    # Entry 1 sends an event to ourselves; do_multicall's preempt check before entry 2 makes a
    # continuation (common/multicall.c, RELEASE-4.17.0): the event's frame points at the stub's int $0x82
    # (hypercall page + 13 * 32 + 5), not past it, and the rest of the batch ran after it.
    assert rc(t, "multicall#3") == 0
    assert [rc(t, f"multicall#3.entry{i}") for i in range(4)] == [xen_version_word(), 0, xen_version_word(), 0]
    assert field(t, "event.preempt", "count") == 1
    assert field(t, "event.preempt", "frame_eip") == build("xen32")["hypercall_page"] + 13 * 32 + 5
    text = t.lines.index(next(line for line in t.lines if "(console_io in the continued multicall)" in line))
    assert t.lines.index(t.steps["event.preempt"].line) > text


def test_second_vcpu(transcript: common.Transcript) -> None:
    t = transcript
    # Down, initialised from a compat vcpu_guest_context, up (in ring 1, with its own copy of the trap
    # table: its int3 reached the handler), then down again (do_vcpu_op, common/domain.c).
    assert rc(t, "vcpu_op.is_up") == 0
    assert rc(t, "vcpu_op.initialise") == 0 and rc(t, "vcpu_op.up") == 0
    assert rc(t, "vcpu1") == 0 and field(t, "vcpu1", "is_up") == 1
    assert field(t, "vcpu1", "cs") == RING1_CS and field(t, "vcpu1", "ss") == RING1_CS + 8
    assert field(t, "vcpu1", "int3") == 1
    assert rc(t, "vcpu_op.is_up#2") == 1
    assert rc(t, "vcpu_op.down") == 0 and rc(t, "vcpu_op.is_up#3") == 0


def test_guest_elf_is_a_32bit_pae_kernel(tmp_path: Path) -> None:
    guest = build("xen32")["guest"]
    header = subprocess.run(["readelf", "-h", guest], capture_output=True, text=True, check=True).stdout
    assert re.search(r"Class:\s+ELF32", header) and re.search(r"Machine:\s+Intel 80386", header)
    # XEN_ELFNOTE_PAE_MODE 9, XEN_ELFNOTE_XEN_VERSION 5, XEN_ELFNOTE_GUEST_OS 6 (public/elfnote.h,
    # RELEASE-4.17.0): what makes Xen build a compat dom0 (pv/dom0_build.c).
    notes = xen_notes(guest, tmp_path)
    assert notes[9] == b"yes\0" and notes[5] == b"xen-3.0\0" and notes[6] == b"xendbg-test\0"


def test_runner_artifacts_name_the_build() -> None:
    built = xensource.xen()
    r = subprocess.run([SYSTEM_PYTHON, str(RUN), "xen32", "--artifacts"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    art = json.loads(r.stdout)
    assert art["xen"] == str(built.xen)
    assert art["xen_syms"] == str(built.syms)
    assert art["xen_config"] == str(built.config)
    assert art["xen_version"] == built.version
    assert art["xen_release"] == built.release == ".".join(built.version.split(".")[:2])
    assert art["symbols"] == [art["guest"], art["xen_syms"]]
    # The guest symbols a debugger stops at: the hypercall page and the inline int $0x82.
    nm = subprocess.run(["nm", art["guest"]], capture_output=True, text=True, check=True).stdout
    assert f"{art['hypercall_page']:08x} T hypercall_page" in nm
    assert f"{art['xen_int82']:08x} T xen_int82" in nm


def test_faulty_is_refused_in_one_line() -> None:
    r = subprocess.run([SYSTEM_PYTHON, str(RUN), "xen32", "--faulty", "--timeout", "5"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 3
    assert r.stderr == ("fixtures/run: xen32 has no faulty variant (xen32shared --faulty runs shim32's faulty "
                        "guest on this Xen)\n")

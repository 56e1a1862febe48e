"""An `xl dump-core` file of the xen64 dom0, built from a live session as libxenguest's xg_core.c lays
it out (tests/unit/xccorefiles.py), read back by `xendbg core`.

gdb catches the guest's set_callbacks, callback_op and set_trap_table calls (their arguments read raw),
then its next multicall (so set_trap_table has completed).  There: the live registers and CR3,
start_info's mfn_list (read raw), and a QEMU dump of the machine for the page contents.  vCPU 0's
vcpu_guest_context is filled as Xen's arch_get_info_guest fills it (xen/arch/x86/domctl.c and
pv/callback.c, RELEASE-4.17.0): trap_ctxt by vector with RPL raised to 3, the three callbacks, the
failsafe/syscall "disables events" flags, ctrlreg[3] = xen_pfn_to_cr3.  Each dom0 page goes in at its
pfn with its machine frame in .xen_p2m.  `xendbg core` must give back the raw trap table, callbacks
and CR3, and the same pending multicall as the live `xen hypercall --json`.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys

import pytest
from conftest import ROOT, json_blocks
from conftest import XENDBG_SCRIPT as SCRIPT
from test_postmortem_xen import RawDump

sys.path.insert(0, str(ROOT))
from tests.unit import xccorefiles as xcf  # noqa: E402

pytestmark = pytest.mark.platform

ENV = os.environ | {"PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
        "r15", "rip", "eflags", "cs", "ss", "ds", "es", "fs", "gs", "fs_base", "gs_base", "cr0", "cr3", "cr4")
# start_info (public/xen.h, RELEASE-4.17.0, 64-bit): nr_pages @32, shared_info @40, mfn_list @104
SI_NR_PAGES, SI_SHARED_INFO, SI_MFN_LIST = 32, 40, 104
CALLBACK_TYPES = {0: "event", 1: "failsafe", 2: "syscall"}  # CALLBACKTYPE_* (public/callback.h)
CALLBACKF_MASK_EVENTS = 1


def marked(out: str, tag: str) -> list[list[int]]:
    return [[int(v, 0) for v in m.split()] for m in re.findall(rf"^@@{tag} (.*)$", out, re.M)]


def core(path: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xendbg.cli", "core", path, *args], capture_output=True, text=True,
                          env=ENV, timeout=120)


def core_json(path: str, *args: str) -> dict:
    r = core(path, *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_xl_dump_core_of_dom0_reads_back_the_live_state(boot_gdb, tmp_path):
    booted = boot_gdb("xen64", timeout=180)
    guest = booted.artifacts["guest"]
    # The Xen the platform runs (Debian 12: 4.17, 13: 4.20), for the file's xen_version note.
    xen = tuple(int(n) for n in re.match(r"(\d+)\.(\d+)", booted.artifacts["xen_version"]).groups())
    dump = tmp_path / "machine.dump"
    cb_op = 'printf "@@callback_op %u %u %lu\\n", *(unsigned short *)$rsi, *(unsigned short *)($rsi + 2), ' \
            '*(unsigned long *)($rsi + 8)'
    si = "(*(unsigned long *)&si)"
    out = booted.gdb_batch(
        f"source {SCRIPT}", "set xen color off", "set xen abi auto",
        "xen catch hypercall --guest set_callbacks callback_op set_trap_table",
        "continue", 'printf "@@set_callbacks %lu %lu %lu\\n", $rdi, $rsi, $rdx',
        "continue", cb_op, "continue", cb_op, "continue", cb_op,
        "continue", 'printf "@@set_trap_table %lu\\n", $rdi', "x/12gx $rdi",
        # Xen may preempt set_trap_table and re-execute its syscall: catch only the next multicall
        "xen catch delete", "xen catch hypercall --guest multicall", "continue", "xen hypercall --json",
        *[f'printf "@@reg {name} %lu\\n", ${name}' for name in REGS],
        f'printf "@@start_info %lu %lu %lu\\n", *(unsigned long *)({si} + {SI_NR_PAGES}), '
        f'*(unsigned long *)({si} + {SI_SHARED_INFO}), *(unsigned long *)({si} + {SI_MFN_LIST})',
        f"xen dump {dump}", "kill", timeout=180)
    live = json_blocks(out)
    assert live and live[0]["name"] == "multicall", out
    (event, failsafe, syscall), = marked(out, "set_callbacks")
    registrations = marked(out, "callback_op")
    assert [CALLBACK_TYPES[t] for t, _, _ in registrations] == ["event", "failsafe", "syscall"], out
    (table_at,), = marked(out, "set_trap_table")
    words = [int(w, 16) for line in re.findall(r"^0x[0-9a-f]+ <trap_table(?:\+\d+)?>:(.*)$", out, re.M)
             for w in line.split()]
    assert table_at == int(re.search(r"^(0x[0-9a-f]+) <trap_table>:", out, re.M).group(1), 16), out
    regs = {name: int(value) for name, value in re.findall(r"^@@reg (\w+) (\d+)$", out, re.M)}
    (nr_pages, shared_info, mfn_list), = marked(out, "start_info")
    assert f"wrote {dump}" in out and len(words) == 12 and set(regs) == set(REGS), out

    # The trap table as the guest gave it (trap_info: vector, flags, cs, address), up to the zero address,
    # and the callbacks as Xen 4.17 and later keep them (the last registration wins; only failsafe and syscall
    # keep CALLBACKF_mask_events, as VGCF_*_disables_events).
    raw_traps = []
    for i in range(0, 12, 2):
        vector, flags, cs = words[i] & 0xFF, words[i] >> 8 & 0xFF, words[i] >> 16 & 0xFFFF
        if not words[i + 1]:
            break
        raw_traps.append((vector, flags, cs | 3, words[i + 1]))
    assert [t[0] for t in raw_traps] == [3, 6, 13, 14, 0x80]
    callbacks = {"event": event, "failsafe": failsafe, "syscall": syscall}
    masks = set()
    for kind, flags, address in registrations:
        callbacks[CALLBACK_TYPES[kind]] = address
        if flags & CALLBACKF_MASK_EVENTS and kind:
            masks.add(CALLBACK_TYPES[kind])

    raw = RawDump(str(dump))
    try:
        cr3 = regs["cr3"] & ~0xFFF
        p2m = b"".join(raw.virtual(cr3, mfn_list + at, min(4096, nr_pages * 8 - at)) for at in range(0, nr_pages * 8,
                                                                                                        4096))
        frames = struct.unpack(f"<{nr_pages}Q", p2m)
        assert cr3 >> 12 in frames, "CR3 is not a frame of dom0"
        pages = [(pfn, mfn, raw.physical(mfn << 12, 4096)) for pfn, mfn in enumerate(frames)]
        shared = raw.physical(shared_info, 4096)
    finally:
        raw.file.close()
    user_regs = {n: regs[n] for n in REGS[:17]} | {"rflags": regs["eflags"]} | \
        {n: regs[n] for n in ("cs", "ss", "ds", "es", "fs", "gs")}
    flags = xcf.VGCF_ONLINE | xcf.VGCF_IN_KERNEL | (xcf.VGCF_FAILSAFE_DISABLES_EVENTS if "failsafe" in masks else 0) \
        | (xcf.VGCF_SYSCALL_DISABLES_EVENTS if "syscall" in masks else 0)
    context = xcf.context(64, user_regs, cr3 >> 12, flags=flags, callbacks={k: (0, v) for k, v in callbacks.items()},
                          traps=[{"vector": v, "flags": f, "cs": cs, "address": a} for v, f, cs, a in raw_traps])
    context = bytearray(context)
    # fs_base / gs_base_kernel (vcpu_guest_context, public/arch-x86/xen-x86_64.h: +5144, +5152)
    struct.pack_into("<QQ", context, 5144, regs["fs_base"], regs["gs_base"])
    # dom0 has two vCPUs, but the second is not initialised yet: getvcpucontext gives no context for it
    path = str(tmp_path / "dom0.core")
    with open(path, "wb") as file:
        file.write(xcf.xc_core([bytes(context)], pages, shared_info=shared, version=xen))
    os.unlink(dump)

    readelf = subprocess.run(["readelf", "-S", "-W", path], capture_output=True, text=True).stdout
    assert re.findall(r"\]\s+(\.\S+)", readelf) == [".shstrtab", ".note.Xen", ".xen_prstatus", ".xen_shared_info",
                                                    ".xen_pages", ".xen_p2m"]
    source = "from the dump's vcpu_guest_context 0 (.xen_prstatus)"
    traps = core_json(path, "traps", "--symbols", guest)
    assert traps["registered_from"] == source and traps["findings"] == []
    assert [(e["vector"], e["flags"], e["cs"], e["address"]) for e in traps["entries"]] == raw_traps
    cbs = core_json(path, "callbacks", "--symbols", guest)
    assert cbs["registered_from"] == source
    assert {c["kind"]: (c["address"], bool(c["flag_names"])) for c in cbs["callbacks"]["callbacks"]} == {
        kind: (address, kind in masks) for kind, address in callbacks.items()}
    summary = core_json(path, "--symbols", guest)
    assert summary["format"] == "xl dump-core" and len(summary["vcpus"]) == 1
    assert summary["vcpus"][0]["registered"]["cr3"] == cr3
    assert summary["vcpus"][0]["paging"] == f"4-level paging, CR3 {cr3:#x}"
    # memory through the guest's page tables (machine frames -> .xen_p2m -> .xen_pages): the same
    # multicall, batch and all, as live; Xen's version comes from the file's xen_version note
    hc = core_json(path, "hypercall", "--symbols", guest)
    assert hc | {"xen_source": None} == live[0] | {"xen_source": None}
    assert hc["xen_source"].startswith(f"from xen_version() = {xen[0]}.{xen[1]}")
    assert core_json(path, "check", "--symbols", guest)["findings"] == []

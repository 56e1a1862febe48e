"""Preempted calls and iret on xen64, against gdb's own breakpoint at pv_hypercall in the same boot.

The guest's last steps (fixtures/xen64/guest.c, do_preemption_and_iret) make Xen preempt a long
console write and a big mmu_update batch (a timer falls due while Xen runs them), then iret three
times, twice from the same stack pointer.  A raw breakpoint at pv_hypercall(regs) reads every entry
into Xen from the guest frame, with no xendbg code: each continuation is one more entry.  xendbg's
trace (guest-side probes) must count the same calls and continuations, and its decode of an iret at
the stub's entry must show what the stub is about to push (registers), not what lies below RSP."""

from __future__ import annotations

import json
import re

import pytest
from conftest import XENDBG_SCRIPT as SCRIPT
from conftest import frame_recorder, json_blocks

pytestmark = pytest.mark.platform

CONSOLE_IO, MMU_UPDATE, IRET = 18, 1, 23
# struct cpu_user_regs offsets (xen/include/public/arch-x86/xen-x86_64.h, RELEASE-4.17.0): r15 first,
# 8 bytes each; after error_code and entry_vector (4 bytes each) rip, cs, rflags, rsp, ss.
REGS_AT = {"rax": 80, "rdi": 112, "rsi": 104, "rdx": 96, "r10": 56, "r8": 72, "rip": 128, "rsp": 152}
RAW_RECORDER = frame_recorder("pv_hypercall", tuple(REGS_AT.values()), stack_word=True)


def without_repeats(entries: list[list[int]]) -> list[list[int]]:
    """The raw breakpoint's entries less gdb's duplicate reports of one stop (an entry equal to the one
    before it, the word at the guest's stack included: the irets differ there)."""
    return [e for i, e in enumerate(entries) if i == 0 or e != entries[i - 1]]


def test_continuations_and_irets_counted_as_xen_saw_them(boot_gdb, tmp_path) -> None:
    log, recorder = tmp_path / "trace.jsonl", tmp_path / "raw.py"
    recorder.write_text(RAW_RECORDER)
    booted = boot_gdb("xen64", timeout=200, extra=("--hold",))
    iret_stub = booted.artifacts["hypercall_page"] + IRET * 32
    out = booted.gdb_batch(
        f"source {SCRIPT}", "set xen color off", f"xen trace start --file {log}", f"source {recorder}",
        f"thbreak *{iret_stub:#x}", "continue",
        # At the stub's entry: rcx, r11 and rax are still registers; the rest of the frame is at RSP.
        "p/x $rcx", "p/x $r11", "p/x $rax", "x/6gx $rsp", "xen hypercall --json",
        "hbreak domain_shutdown", "continue",
        "python print('RAWCALLS', json.dumps(RAW.seen))", "xen stats --json", "xen trace stop", "delete",
        "detach", timeout=190)
    assert "Traceback" not in out and "RAWCALLS" in out, out[-3000:]

    # The iret at its stub's entry.
    regs = [int(v, 16) for v in re.findall(r"^\$\d+ = (0x[0-9a-f]+)$", out, re.M)[:3]]
    stack = [int(v, 16) for v in re.findall(r"0x[0-9a-f]+:\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)", out)
             for v in v]  # x/6gx: three lines of two words
    hc = next(b for b in json_blocks(out) if b.get("name") == "iret")
    frame = hc["detail"]["fields"]
    assert (frame["rcx"], frame["r11"], frame["rax"]) == tuple(regs), (frame, regs)
    assert [frame[k] for k in ("flags", "rip", "cs", "rflags", "rsp", "ss")] == stack[:6]

    raw = without_repeats(json.loads(re.search(r"^RAWCALLS (.*)$", out, re.M).group(1)))
    records = [json.loads(line) for line in log.read_text().splitlines()]
    calls = [r for r in records if r["event"] == "call"]
    stats = {row["name"]: row for row in next(b for b in json_blocks(out) if "hypercalls" in b)["hypercalls"]}

    # Every entry into Xen for these calls is one traced call: the first of each, or its continuation.
    for nr, name in ((CONSOLE_IO, "console_io"), (MMU_UPDATE, "mmu_update"), (IRET, "iret")):
        entries = [e for e in raw if e[0] == nr]
        traced = [r for r in calls if r["nr"] == nr]
        assert len(traced) == len(entries) == stats[name]["calls"], (name, len(traced), len(entries))
        assert "uncertain" not in stats[name]
    # The scenario's three irets (the guest's trap and event returns are irets too): the word at the
    # guest's stack pointer is the RAX the stub pushed, 0x1111 and 0x2222 from the same stack pointer.
    ours = [e for e in raw if e[0] == IRET and e[-1] in (0x1111, 0x2222, 0x3333)]
    assert [e[-1] for e in ours] == [0x1111, 0x2222, 0x3333] and ours[0][7] == ours[1][7] != ours[2][7]
    traced = [r for r in calls if r["nr"] == IRET]
    assert [r["hypercall"]["detail"]["fields"]["rax"] for r in traced][-3:] == [0x1111, 0x2222, 0x3333]

    # Xen preempted the long write and the batch (the raw entries say how often), and xendbg says which
    # records continue which.  A console_io continuation carries the rest of the text: count down and
    # buffer up by what was written (guest_console_write, drivers/char/console.c at RELEASE-4.17.0).
    writes = [e for e in raw if e[0] == CONSOLE_IO]
    start = next(i for i, e in enumerate(writes) if e[2] == 8192)
    chain = [writes[start]]
    for e in writes[start + 1:]:
        if 0 < chain[-1][2] - e[2] == e[3] - chain[-1][3]:
            chain.append(e)
    assert len(chain) > 1, "Xen did not preempt the 8 KiB console write: the test cannot show its continuations"
    traced = [r for r in calls if r["nr"] == CONSOLE_IO]
    assert len([r for r in traced if r.get("continues") is not None]) == len(chain) - 1
    marked = [e for e in raw if e[0] == MMU_UPDATE and e[2] & 1 << 31]  # MMU_UPDATE_PREEMPTED in the count
    assert marked, "Xen did not preempt the 8192-entry mmu_update: the test cannot show its continuations"
    traced = [r for r in calls if r["nr"] == MMU_UPDATE]
    assert len([r for r in traced if r.get("continues") is not None]) == len(marked)

"""xendbg's gdb commands on xen32 (our 32-bit PAE PV kernel in ring 1 on the Xen built from Debian's
source, through QEMU's 64-bit gdbstub), each against an independent reading in the same session: the
C arguments of Xen's compat handlers read raw from the registers, the guest memory they point to read
with `x/`, gdb's own CS, and the guest's transcript (which says what Xen returned and with which CS it
entered the guest's handlers)."""

from __future__ import annotations

import json
import re

import pytest
from conftest import XENDBG_SCRIPT as SCRIPT
from conftest import frame_recorder, json_blocks

pytestmark = pytest.mark.platform

RING1_CS = 0xE019  # FLAT_RING1_CS (public arch-x86/xen-x86_32.h, RELEASE-4.17.0)


def values(out: str) -> list[int]:
    """gdb's `p/x` answers, in order."""
    return [int(v, 16) for v in re.findall(r"^\$\d+ = (0x[0-9a-f]+)$", out, re.M)]


def words(out: str, marker: str) -> list[int]:
    """The 32-bit words of the `x/Nwx` dump that follows `marker` in the output."""
    part = out.split(marker, 1)[1]
    found = []
    for line in part.splitlines()[1:]:
        if not re.match(r"^0x[0-9a-f]+( <[^>]*>)?:\s", line):
            if found:
                break
            continue
        found += [int(w, 16) for w in line.split(":", 1)[1].split()]
    return found


def test_every_command_on_a_32_bit_ring_1_guest(boot_gdb) -> None:
    booted = boot_gdb("xen32", timeout=120, extra=("--hold",))
    out = booted.gdb_batch(
        f"source {SCRIPT}", "set xen color off",
        "xen catch hypercall set_callbacks", "continue",
        "p/x $rdi", "p/x $rsi", "p/x $rdx", "p/x $rcx", "xen hypercall --json", "xen catch delete",
        "xen catch hypercall set_trap_table", "continue", "echo TRAPS\\n", "x/12wx $rdi", "xen traps --json",
        "xen catch delete", "xen catch hypercall multicall", "continue", "p/x $rsi", "echo BATCH\\n",
        "x/32wx $rdi", "xen multicall --json", "xen callbacks --registered --json", "xen traps --registered --json",
        "xen check --json", "p/x $cs", "xen vcpus --json", "xen catch delete",
        "xen catch hypercall --guest console_io", "continue", "p/x $eax", "p/x $ebx", "p/x $ecx", "p/x $edx",
        "p/x $cs", "xen hypercall --json", "xen catch delete", "detach", timeout=110)
    assert "Traceback" not in out and "no thread selected" not in out, out[-3000:]
    run = booted.finish()
    transcript = run.stdout
    raw = values(out)
    (callbacks_call, traps, batch, registered_callbacks, registered_traps, check, vcpus, console) = json_blocks(out)

    # set_callbacks(event_cs, event_eip, failsafe_cs, failsafe_eip): 4 arguments on a 32-bit guest, at
    # compat_set_callbacks in the C argument registers.
    event_cs, event_eip, failsafe_cs, failsafe_eip = raw[0:4]
    assert [a["value"] for a in callbacks_call["args"]] == [event_cs, event_eip, failsafe_cs, failsafe_eip]
    pairs = {c["kind"]: (c["selector"], c["address"]) for c in callbacks_call["detail"]["callbacks"]}
    said = re.search(r"\[guest\] set_callbacks: rc=0 \(OK\) event=(0x\w+):(0x\w+) failsafe=(0x\w+):(0x\w+)", transcript)
    assert said, transcript[-2000:]
    assert pairs == {"event": (int(said[1], 16), int(said[2], 16)), "failsafe": (int(said[3], 16), int(said[4], 16))}
    assert pairs["event"] == (event_cs, event_eip) and event_cs == RING1_CS

    # The trap table, read raw at compat_set_trap_table: vector, flags, cs (16 bits), then the address.
    table = words(out, "TRAPS")
    rows = [(table[i] & 0xFF, table[i] >> 8 & 0xFF, table[i] >> 16, table[i + 1]) for i in range(0, len(table), 2)]
    rows = rows[:next(i for i, r in enumerate(rows) if r[3] == 0)]
    assert [(e["vector"], e["flags"], e["cs"], e["address"]) for e in traps["entries"]] == rows
    assert traps["terminated"]
    rpl0 = [r for r in rows if r[2] & 3 == 0]
    assert rpl0, "the scenario hands Xen one RPL-0 selector"
    # Xen 4.17 raises RPL 0 to 1 without a word: info, never error (fixup_guest_code_selector).
    assert {(f["rule"], f["severity"]) for f in traps["findings"]} == {("selector-rpl", "info")}

    # The first multicall, read raw at compat_multicall: compat multicall_entry is 8 words (op, result,
    # args[6]).
    count = raw[4]
    entries = words(out, "BATCH")
    assert count == len(batch["entries"]) == 4
    for index, entry in enumerate(batch["entries"]):
        op, *args = entries[8 * index], *entries[8 * index + 2:8 * index + 8]
        assert entry["op"] == op
        assert [a["value"] for a in entry["args"]] == args[:len(entry["args"])]

    # What Xen holds after those calls: the handlers' CS is the one Xen entered them with (the guest's
    # own reading), also for the RPL-0 entry, whose passed selector stays beside it.
    handler_cs = {int(v, 16) for v in re.findall(r"\[guest\] trap\.\S+: .*handler_cs=(0x[0-9a-f]+)", transcript)}
    assert handler_cs == {RING1_CS}
    held = {e["vector"]: (e["cs"], e.get("passed_cs")) for e in registered_traps["entries"]}
    for vector, _, cs, _ in rows:
        assert held[vector] == (RING1_CS, cs if cs != RING1_CS else None)
    kinds = {c["kind"]: (c["selector"], c["address"]) for c in registered_callbacks["callbacks"]["callbacks"]}
    assert kinds == pairs
    assert not [f for f in check["findings"] if f["severity"] == "error"]

    # At compat_multicall the vCPU is in Xen, as gdb's own CS says (Xen's ring-0 selector).
    xen_cs = raw[5]
    assert xen_cs & 3 == 0
    row = next(v for v in vcpus["vcpus"] if v["vcpu"] == 0)
    assert row["mode"] == "in Xen (ring 0)" and row["width"] is None and row["pending"] == "multicall"

    # Guest side: at the compat hypercall page's int $0x82, with the arguments in EBX, ECX, EDX.
    eax, ebx, ecx, edx, cs = raw[6:11]
    assert cs == RING1_CS and console["width"] == 32 and console["nr"] == eax == 18
    assert [a["value"] for a in console["args"][:3]] == [ebx, ecx, edx]
    assert console["detail"]["text"] and len(console["detail"]["text"]) <= ecx


IRET, MULTICALL, CONSOLE_IO = 23, 13, 18
# do_entry_int82(struct cpu_user_regs *regs): Xen's 64-bit frame, a compat guest's registers in the low
# halves (public arch-x86/xen-x86_64.h, RELEASE-4.17.0): rax 80, rbx 40, rcx 88, rdx 96, rip 128, rsp 152.
RAW_RECORDER = frame_recorder("do_entry_int82", (80, 40, 88, 96, 128, 152), word=4, stack_word=True)


def test_irets_and_continuations_on_a_32_bit_guest(boot_gdb, tmp_path) -> None:
    """Every int $0x82 into Xen (gdb's own breakpoint at do_entry_int82, reading the compat frame) is one
    call or continuation in xendbg's trace, and an iret at its stub's entry (`push %eax; mov $23,%eax;
    int $0x82`) takes the frame's EAX from the register the stub pushes."""
    log, recorder = tmp_path / "trace.jsonl", tmp_path / "raw.py"
    recorder.write_text(RAW_RECORDER)
    booted = boot_gdb("xen32", timeout=120, extra=("--hold",))
    stub = booted.artifacts["hypercall_page"] + IRET * 32
    out = booted.gdb_batch(
        f"source {SCRIPT}", "set xen color off", f"xen trace start --file {log}", f"source {recorder}",
        f"thbreak *{stub:#x}", "continue", "p/x $eax", "echo FRAME\\n", "x/5wx $rsp", "xen hypercall --json",
        "hbreak domain_shutdown", "continue", "python print('RAWCALLS', json.dumps(RAW.seen))",
        "xen stats --json", "xen trace stop", "delete", "detach", timeout=110)
    assert "Traceback" not in out and "RAWCALLS" in out, out[-3000:]
    iret = next(b for b in json_blocks(out) if b.get("name") == "iret")
    frame = iret["detail"]["fields"]
    assert frame["eax"] == values(out)[0]
    stack = words(out, "FRAME")
    assert [frame["eip"], frame["cs"], frame["eflags"]] == stack[:3]
    # Back to ring 1 (the scenario's irets return to the kernel): the frame ends there, no ESP/SS.
    assert stack[1] & 3 == 1 and "esp" not in frame and "ss" not in frame

    seen = json.loads(re.search(r"^RAWCALLS (.*)$", out, re.M).group(1))
    raw = [e for i, e in enumerate(seen) if i == 0 or e != seen[i - 1]]  # less gdb's duplicate reports
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    calls = [r for r in calls if r["event"] == "call"]
    stats = {row["name"]: row for row in next(b for b in json_blocks(out) if "hypercalls" in b)["hypercalls"]}
    for nr, name in ((MULTICALL, "multicall"), (IRET, "iret"), (CONSOLE_IO, "console_io")):
        entries = [e for e in raw if e[0] == nr]
        traced = [r for r in calls if r["nr"] == nr]
        assert len(traced) == len(entries) == stats[name]["calls"], (name, len(traced), len(entries))
    # The scenario's multicall#3 is preempted by a pending event and continued: one entry more than calls.
    assert len([r for r in calls if r["nr"] == MULTICALL and r.get("continues") is not None]) >= 1


def frame_slots(out: str) -> list[dict[str, int]]:
    """The slots of each bounce frame xendbg printed at an entry breakpoint: {slot: value}."""
    frames = []
    for block in re.split(r"^\w+ frame (?:for vector \S+ \(\S+\) )?at 0x", out, flags=re.M)[1:]:
        table = block.split("\ninterrupted guest")[0]
        slots = dict(re.findall(r"^0x[0-9a-f]+\s+(\w+)\s+(0x[0-9a-f]+)", table, re.M))
        frames.append({k: int(v, 16) for k, v in slots.items()})
    return frames


def test_break_on_the_event_callback_and_a_trap_shows_xens_compat_bounce_frames(boot_gdb) -> None:
    """`xen break` on the 32-bit guest: at each entry, the frame compat_create_bounce_frame built
    (EIP, CS with the saved upcall mask, EFLAGS; no ESP/SS within ring 1) equals the stack read raw, and
    what the guest's handlers then reported in the transcript."""
    booted = boot_gdb("xen32", timeout=120, extra=("--hold",))
    out = booted.gdb_batch(
        f"source {SCRIPT}", "set xen color off", "xen break callback event", "xen break trap 3",
        "continue", "continue",  # each registration moves its breakpoint (a stop to do it)
        "continue", "echo RAW1\\n", "x/3wx $rsp", "continue", "echo RAW2\\n", "x/3wx $rsp",
        "continue", "echo RAW3\\n", "x/3wx $rsp", "delete", "detach", timeout=110)
    assert "Traceback" not in out, out[-3000:]
    transcript = booted.finish().stdout
    frames = frame_slots(out)
    assert len(frames) == 3, out[-3000:]
    for index, frame in enumerate(frames, 1):
        raw = words(out, f"RAW{index}")[:3]
        assert [frame["eip"], frame["cs"], frame["eflags"]] == raw
        assert "esp" not in frame and frame["cs"] & 0xFFFF == RING1_CS
    event = re.search(r"\[guest\] event: .* frame_cs=(0x\w+) frame_eflags=(0x\w+)", transcript)
    preempt = re.search(r"\[guest\] event\.preempt: .* frame_eip=(0x\w+)", transcript)
    int3 = re.search(r"\[guest\] trap\.int3: .* eip=(0x\w+) cs=(0x\w+)", transcript)
    assert event and preempt and int3, transcript[-2000:]
    assert (frames[0]["cs"] & 0xFFFF, frames[0]["eflags"]) == (int(event[1], 16), int(event[2], 16))
    assert frames[1]["eip"] == int(preempt[1], 16)
    assert (frames[2]["eip"], frames[2]["cs"] & 0xFFFF) == (int(int3[1], 16), int(int3[2], 16))


def test_xens_trace_buffers_name_a_32_bit_guests_calls(boot_gdb, tmp_path) -> None:
    """`xen trace start --buffers` on xen32: Xen's buffers (64-bit pointers) hold the compat guest's
    calls; each record is named with the 32-bit guest's ABI (the width from a vCPU's CS or Xen's own flag,
    never assumed from Xen's), and per hypercall there are as many records as gdb's own breakpoint at
    do_entry_int82 saw entries (continuations included), in the same boot."""
    log, recorder = tmp_path / "buffers.jsonl", tmp_path / "raw.py"
    recorder.write_text(frame_recorder("do_entry_int82", (80,), word=4, cpu=True))
    booted = boot_gdb("xen32", timeout=120, extra=("--xentrace", "--hold"))
    out = booted.gdb_batch(
        f"source {SCRIPT}", "set xen color off", f"xen trace start --buffers --only hypercalls --file {log}",
        f"source {recorder}", "hbreak domain_shutdown", "continue", "python print('RAWCALLS', json.dumps(RAW.seen))",
        "xen trace stop", "delete", "detach", timeout=110)
    assert "Traceback" not in out and "RAWCALLS" in out, out[-3000:]
    seen = json.loads(re.search(r"^RAWCALLS (.*)$", out, re.M).group(1))
    calls = [r for r in (json.loads(line) for line in log.read_text().splitlines()) if r["event"] == "call"]
    assert calls and {r["hypercall"]["width"] for r in calls} == {32}
    assert not any(f["rule"] == "abi-evidence" for r in calls for f in r["hypercall"]["findings"])
    # Per CPU (the buffers are per physical CPU, QEMU's CPUs here), each record one entry, in order; an
    # entry the records do not account for repeats the one before it (gdb's duplicate report of a stop).
    for cpu in {c for c, _ in seen} | {r["cpu"] for r in calls}:
        entries = [nr for c, nr in seen if c == cpu]
        records = [r["nr"] for r in calls if r["cpu"] == cpu]
        at = 0
        for index, nr in enumerate(entries):
            if at < len(records) and nr == records[at]:
                at += 1
            else:
                assert index and nr == entries[index - 1], (cpu, index, nr, records[at:at + 1])
        assert at == len(records), (cpu, at, len(records))
    assert len([r for r in calls if r["nr"] == MULTICALL]) >= 4  # 3 batches, the third continued at least once

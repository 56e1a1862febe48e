"""When gdb connects: a 32-bit guest ELF loaded before `target remote` to a 64-bit QEMU (xen64's
qemu-system-x86_64), and what xendbg calls a vCPU that is still at reset (QEMU started with -S).

The independent side is gdb's own: `info registers` (cr0, cs, rip) and `show architecture` in the same
session.  Each QEMU here stays at reset: nothing boots.
"""

from __future__ import annotations

import re
import subprocess

import pytest
from conftest import XENDBG_SCRIPT as SCRIPT
from conftest import build, json_blocks

pytestmark = pytest.mark.platform

X86_64 = "i386:x86-64"
REAL_MODE = "in real mode, paging off (firmware or boot code)"


def gdb(port: int, *commands: str, timeout: float = 60) -> str:
    """A batch gdb of our own: these tests choose what is loaded before `target remote`."""
    argv = ["gdb", "-nx", "-batch", "-ex", "set pagination off", "-ex", "set confirm off"]
    for command in commands:
        argv += ["-ex", command.replace("PORT", str(port))]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    return r.stdout + r.stderr


def registers(out: str, *names: str) -> list[dict[str, int]]:
    """gdb's `info registers NAME ...` answers, one dict per command, in order."""
    rows: list[dict[str, int]] = []
    current: dict[str, int] = {}
    for line in out.splitlines():
        m = re.match(r"^(\w+)\s+(0x[0-9a-f]+)\s", line)
        if m and m.group(1) in names:
            if m.group(1) in current:
                rows.append(current)
                current = {}
            current[m.group(1)] = int(m.group(2), 16)
    return rows + ([current] if current else [])


def guest32() -> str:
    return build("shim32", "4.0")["guest"]  # a 32-bit x86 ELF (ELFCLASS32, EM_386)


@pytest.mark.parametrize("by_hand", [False, True], ids=["arch-from-the-elf", "i386-set-by-hand"])
def test_a_32_bit_elf_before_target_remote_to_a_64_bit_qemu(boot_gdb, by_hand: bool) -> None:
    """gdb would take i386 and fail with "Remote 'g' packet reply is too long": xendbg sets the target's
    architecture itself, in one line, and every xen command then reads the vCPUs."""
    booted = boot_gdb("xen64", timeout=60)
    elf = guest32()
    out = gdb(booted.port, f"source {SCRIPT}", *(["set architecture i386"] if by_hand else []), f"file {elf}",
              "target remote 127.0.0.1:PORT", "show architecture", "info registers cr0 cs rip",
              "xen vcpus --json", "kill")
    assert "Remote 'g' packet reply is too long" not in out and "no thread selected" not in out.lower(), out
    said = [line for line in out.splitlines() if line.startswith("xendbg: set architecture")]
    whence = "set by hand" if by_hand else "from guest-normal.elf"
    assert said == [f"xendbg: set architecture {X86_64}: the target's registers are 64-bit ({X86_64}), which "
                    f"gdb's architecture i386 ({whence}) cannot read; xendbg takes a guest's width from its code "
                    f"selector"], out
    assert re.search(rf'The target architecture is set to "{X86_64}"', out), out
    (regs,) = registers(out, "cr0", "cs", "rip")  # gdb's own 64-bit register file, at the reset vector
    assert (regs["cs"], regs["rip"]) == (0xF000, 0xFFF0) and not regs["cr0"] & 1
    (vcpus,) = json_blocks(out)
    assert len(vcpus["vcpus"]) == 2 and vcpus["vcpus"][0]["pc"] == regs["rip"]
    assert vcpus["vcpus"][0]["mode"] == REAL_MODE


def test_loaded_after_the_failed_connection_xendbg_names_the_fix(boot_gdb) -> None:
    """xendbg sourced after gdb's failed `target remote`: its commands say what happened and the one
    command that fixes it, never "no thread selected"; that command then works."""
    booted = boot_gdb("xen64", timeout=60)
    out = gdb(booted.port, f"file {guest32()}", "target remote 127.0.0.1:PORT", f"source {SCRIPT}",
              "xen vcpus", "xen hypercall", "xen traps", "xen dump /dev/null",
              f"set architecture {X86_64}", "target remote 127.0.0.1:PORT", "info registers rip", "kill")
    assert "Remote 'g' packet reply is too long" in out  # gdb's own failure, before xendbg was loaded
    assert "no thread selected" not in out.lower(), out
    answers = [line for line in out.splitlines() if line.startswith("no target: ")]
    assert len(answers) == 4, out
    for line in answers:
        assert line.endswith(f"the target's registers are 64-bit and gdb's architecture is i386 (from "
                             f"guest-normal.elf): set architecture {X86_64}, then target remote again"), line
    (regs,) = registers(out, "rip")
    assert regs["rip"] == 0xFFF0  # the fix connected


def test_shim32_keeps_its_32_bit_registers_with_a_32_bit_elf(boot_gdb) -> None:
    """qemu-system-i386 sends i386 registers: gdb's architecture from the 32-bit ELF fits, xendbg leaves
    it alone, and decodes as before."""
    booted = boot_gdb("shim32", abi="4.0", timeout=60)
    out = gdb(booted.port, f"source {SCRIPT}", f"file {booted.artifacts['guest']}", "target remote 127.0.0.1:PORT",
              "show architecture", "hbreak *xen_int82", "continue", "info registers eax", "xen hypercall --json",
              "kill")
    assert "xendbg: set architecture" not in out and "Remote 'g' packet" not in out, out
    assert 'The target architecture is set to "auto" (currently "i386")' in out, out
    (regs,) = registers(out, "eax")
    (hc,) = json_blocks(out)
    assert hc["width"] == 32 and hc["nr"] == regs["eax"] and hc["site"] == "at int 0x82"


def test_vcpus_at_reset_are_in_real_mode_as_gdbs_registers_say(boot_gdb) -> None:
    """`xen vcpus` on xen64 before its first instruction: per vCPU, the mode agrees with gdb's own CR0
    and CS (real mode, paging off), never "in Xen"."""
    booted = boot_gdb("xen64", timeout=60)
    out = booted.gdb_batch(f"source {SCRIPT}", "set xen color off", "thread 1", "info registers cr0 cs rip",
                           "thread 2", "info registers cr0 cs rip", "xen vcpus --json", "xen vcpus", "xen hypercall",
                           "kill")
    per_thread = registers(out, "cr0", "cs", "rip")
    (vcpus,) = json_blocks(out)
    assert len(per_thread) == 2 == len(vcpus["vcpus"]), out
    for regs, row in zip(per_thread, vcpus["vcpus"], strict=True):
        assert row["pc"] == regs["rip"] and row["width"] is None
        real = not regs["cr0"] & 1 and not regs["cr0"] & 1 << 31  # CR0.PE and CR0.PG clear
        assert real and row["mode"] == REAL_MODE, (regs, row)
    table = [line for line in out.splitlines() if re.match(r"^[01]\s+[12]\s+", line)]
    assert len(table) == 2 and all(REAL_MODE in line for line in table), out
    assert "in Xen" not in out
    assert (f"no pending hypercall: the selected vCPU is {REAL_MODE} at {per_thread[1]['rip']:#x}, not in a PV "
            f"guest") in out

"""Bad dumps: each is one line (a XendbgError), from the API and from `xendbg core` (exit 1); random
bytes and random mutations of a small dump raise nothing else."""

from __future__ import annotations

import re
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit import dumpfiles as df
from tests.unit.test_dump import pv32, pv64, write
from xendbg.cli import main
from xendbg.dump import open_core
from xendbg.dump.commands import COMMANDS
from xendbg.dump.gdbcore import runs
from xendbg.errors import XendbgError


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("xendbg: error: "), err
    return err


def small32() -> tuple[df.Ram, list[df.Cpu]]:
    ram, cpus, _ = pv32(df.TWO_LEVEL, ram_size=64 << 10)
    return ram, cpus


def qemu_note_with(size: int) -> bytes:
    return df.note(b"CORE", 1, bytes(144)) + df.note(b"QEMU", 0, df.qemu_state({}, (0,) * 5, size=size)[:size])


@pytest.mark.parametrize("name, build, message", [
    ("empty", lambda r, c: b"", "empty file"),
    ("text", lambda r, c: b"hello, not a dump\n", "not a memory dump"),
    ("truncated", lambda r, c: df.elf_core(bytes(r.data), c, False)[:40000], "truncated"),
    ("arm", lambda r, c: df.elf_core(bytes(r.data), c, False, machine=40), "ELF machine 40 is not x86"),
    ("executable", lambda r, c: df.elf_core(bytes(r.data), c, False, etype=2),
     "executable (ET_EXEC), not a memory dump"),
    ("paging", lambda r, c: df.elf_core(bytes(r.data), c, False, vaddr_shift=0xC0000000), "paging dump"),
    ("no-notes", lambda r, c: df.elf_core(bytes(r.data), c, False, note_area=b""), "no CPU notes"),
    ("note-size", lambda r, c: df.elf_core(bytes(r.data), c, False, note_area=qemu_note_with(100)), "corrupt notes"),
    ("note-past-end", lambda r, c: df.elf_core(bytes(r.data), c, False,
                                               note_area=struct.pack("<III", 5, 4000, 1) + b"CORE\0\0\0\0"),
     "runs past the end of its note area"),
    ("cpu-count", lambda r, c: df.elf_core(bytes(r.data), c, False, note_area=df.note(b"CORE", 1, bytes(144))
                                           + df.notes(c + c, False)), "corrupt notes"),
    ("kdump-cut", lambda r, c: df.kdump(bytes(r.data), c, False)[:9000], "truncated"),
    ("kdump-lzo", lambda r, c: df.kdump(bytes(r.data), c, False, status=2), "lzo are not supported"),
    ("kdump-snappy", lambda r, c: df.kdump(bytes(r.data), c, False, status=4), "snappy are not supported"),
])
def test_bad_dump_is_one_line(tmp_path, capsys, name, build, message):
    ram, cpus = small32()
    path = write(tmp_path, name, build(ram, cpus))
    with pytest.raises(XendbgError, match=re.escape(message)):
        open_core(path)
    assert message in one_line_error(capsys, ["core", path])


def test_missing_file_and_missing_vcpu(tmp_path, capsys):
    assert "cannot read" in one_line_error(capsys, ["core", str(tmp_path / "nope")])
    ram, cpus = small32()
    path = write(tmp_path, "d.elf", df.elf_core(bytes(ram.data), cpus, False))
    assert main(["core", path, "hypercall", "--vcpu", "5"]) == 2
    assert "no vCPU 5: the dump has 1" in capsys.readouterr().err


def test_page_tables_that_loop_or_leave_ram(tmp_path, capsys):
    ram, cpus, _ = pv64()
    root = cpus[0].cr[3]
    ram.set_entry(root, 0, 8, root | df.P | df.RW | df.US)  # slot 0 points back at the PML4 itself
    ram.set_entry(root, 1, 8, 0x7FFF0000 | df.P | df.RW | df.US)  # slot 1: a table far outside RAM
    path = write(tmp_path, "loop.elf", df.elf_core(bytes(ram.data), cpus, True))
    with open_core(path) as core:
        target = core.target(0)
        with pytest.raises(XendbgError, match="page-table walk loops: level-4 entry 0"):
            target.read_memory(0x1000, 4)
        with pytest.raises(XendbgError, match="page table outside the dump's RAM: level-3 entry 0 of the table at "
                                              "physical 0x7fff0000"):
            target.read_memory(1 << 39, 4)
        assert any(v == 0xFFFFFFFF80001000 for v, _ in runs(core, core.vcpus[0]))  # the rest still maps
    cpus[0].regs["rip"] = 0x1000  # the vCPU's PC in the looping slot: no pending call, and why
    path = write(tmp_path, "loop-pc.elf", df.elf_core(bytes(ram.data), cpus, True))
    assert "page-table walk loops" in one_line_error(capsys, ["core", path, "hypercall", "--vcpu", "0"])


def test_kdump_page_compressed_with_lzo_is_unreadable_in_one_line(tmp_path):
    ram, cpus = small32()
    path = write(tmp_path, "lzo.kz", df.kdump(bytes(ram.data), cpus, False, page_flags=2))
    with open_core(path) as core, pytest.raises(XendbgError, match="lzo or snappy.*not supported"):
        core.memory.read(0x1000, 4)


def _exercise(path: str) -> None:
    try:
        with open_core(path) as core:
            for command in COMMANDS.values():
                try:
                    command(core, type("Args", (), {"vcpu": None, "results": False})(), lambda *_: None)
                except XendbgError:
                    pass
            for vcpu in core.vcpus:
                try:
                    runs(core, vcpu)
                except XendbgError:
                    pass
    except XendbgError:
        pass


_SEEDS: dict[bool, bytes] = {}


def _seed(kdump: bool) -> bytes:
    if kdump not in _SEEDS:
        ram, cpus = small32()
        _SEEDS[kdump] = df.kdump(bytes(ram.data), cpus, False) if kdump else df.elf_core(bytes(ram.data), cpus, False)
    return _SEEDS[kdump]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096))
def test_random_bytes_raise_only_xendbg_errors(tmp_path, data):
    _exercise(write(tmp_path, "random", data))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kdump=st.booleans(), cut=st.one_of(st.none(), st.integers(0, 70000)),
       edits=st.lists(st.tuples(st.one_of(st.integers(0, 2048), st.integers(0, 70000)), st.integers(0, 255)),
                      max_size=8))
def test_mutated_dumps_raise_only_xendbg_errors(tmp_path, kdump, cut, edits):
    data = bytearray(_seed(kdump))
    for offset, value in edits:
        if offset < len(data):
            data[offset] = value
    _exercise(write(tmp_path, "mutated", bytes(data[:cut] if cut is not None else data)))

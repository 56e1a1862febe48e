"""The 13 causes a fuzz campaign found in xendbg's input readers, one regression test each, and the
messages it found misleading.  Runs that used to hang or run out of memory go through
tests/unit/fuzzrun.py: a child process with 2 GiB of address space and a time limit per run."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.unit import dumpfiles as df
from tests.unit.fuzzrun import ROOT, problems, run_cases
from tests.unit.test_dump import pv64
from xendbg.cli import main
from xendbg.errors import DecodeError
from xendbg.sites import MAX_NOTES, parse_notes
from xendbg.trace import TraceLog
from xendbg.xentrace import events as ev
from xendbg.xentrace.merge import StreamMerge, merge
from xendbg.xentrace.records import Record
from xendbg.xentrace.xtfile import read_bytes, window

EHDR64, PHDR64, SHDR64 = "<16sHHIQQQIHHHHHH", "<IIQQQQQQ", "<IIQQQQIIQQ"
IDENT64 = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)


def one_line_error(capsys, argv: list[str], status: int, *fragments: str) -> str:
    assert main(argv) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("xendbg: error: ") and "internal error" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def bounded(tmp_path: Path, *cases: list[str]) -> list[dict]:
    results = run_cases(tmp_path, [list(c) for c in cases])
    assert problems(results) == []
    return results


def a_trace(tmp_path: Path) -> Path:
    """A JSONL trace as xendbg writes it: a start record, then what each test appends."""
    path = tmp_path / "t.jsonl"
    TraceLog(str(path), ()).close()
    return path


def with_lines(path: Path, *lines: str) -> Path:
    with open(path, "a") as file:
        file.writelines(line + "\n" for line in lines)
    return path


# --- 1. JSONL records are checked, key by key --------------------------------------------------------

@pytest.mark.parametrize("record", [
    '{"event":"return"}',
    '{"event":"call","seq":1,"t":"now","line":"x()","name":"x","hypercall":{"name":"x","nr":1}}',
    '{"event":"return","seq":1,"name":"x","result":"-22"}',
    '{"event":"call","seq":1,"line":"x()","name":"x"}',
    '{"event":"call","seq":1,"line":"x()","name":"x","hypercall":{"name":"x","nr":1,"detail":{"type":"multicall"}}}',
    '{"event":"error","seq":3}',
    '{"event":"gap"}',
    '[1, 2]',
])
def test_a_record_that_is_not_what_xendbg_writes_is_skipped_naming_its_line(tmp_path, capsys, record):
    path = with_lines(a_trace(tmp_path), record, '{"event":"stop","t":1}')
    for extra in ([], ["--stats"], ["--json"], ["--errors"], ["x"]):
        assert main(["trace", str(path), *extra]) == 0
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{path}:3: skipped" in err, err


def test_deeply_nested_json_is_one_line(tmp_path, capsys):
    path = with_lines(a_trace(tmp_path), "[" * 100_000, '{"event":"stop","t":1}')
    one_line_error(capsys, ["trace", str(path)], 1, f"{path}:3: not a trace record (nested too deeply)")
    lone = tmp_path / "lone.jsonl"
    lone.write_text("[" * 100_000)
    one_line_error(capsys, ["trace", str(lone)], 1, "not a JSONL trace")


def test_many_bad_records_are_counted_not_listed(tmp_path, capsys):
    path = with_lines(a_trace(tmp_path), *['{"event":"return"}'] * 50)
    assert main(["trace", str(path)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 6 and "and 45 more records skipped" in err[-1] and "(50 in all)" in err[-1]


# --- 2. @FILE ------------------------------------------------------------------------------------------

def test_an_arguments_file_must_be_utf8(tmp_path, capsys):
    args = tmp_path / "bad.args"
    args.write_bytes(b"--width\n\xff\xfe32\n")
    one_line_error(capsys, ["decode", f"@{args}"], 2, "must be UTF-8 text; byte 8 is 0xff")


def test_mem_at_file_wants_an_address_and_is_no_arguments_file(tmp_path, capsys):
    image = tmp_path / "mem.bin"
    image.write_text("--width\n32\n")  # as an arguments file it would parse
    one_line_error(capsys, ["decode", "--width", "32", "--mem", f"@{image}"], 2, "give the address", "ADDR@FILE")
    one_line_error(capsys, ["decode", "--width", "32", "--mem", f"0x7000@{image}", "--reg", "eip=0x7000"], 1,
                   "the code at 0x7000 is not a hypercall instruction")  # read as memory


def fifo(tmp_path: Path, name: str, data: bytes | None = None) -> tuple[Path, threading.Thread]:
    """A FIFO and the thread that writes `data` into it (or reads it to the end when data is None)."""
    path = tmp_path / name
    os.mkfifo(path)
    got: list[bytes] = []

    def serve() -> None:
        if data is None:
            with open(path, "rb") as f:
                got.append(f.read())
        else:
            with open(path, "wb") as f:
                f.write(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.got = got  # type: ignore[attr-defined]
    thread.start()
    return path, thread


def test_streams_work_where_a_stream_makes_sense(tmp_path):
    """@FILE, --mem ADDR@FILE, `xendbg trace` of xentrace and JSONL, and --xentrace-out, each a FIFO
    (read in the bounded child: a reader that opens a FIFO twice waits for ever)."""
    args, _ = fifo(tmp_path, "args", b"--width\n32\n--reg\neip=0x7000\n")
    mem, _ = fifo(tmp_path, "mem", bytes.fromhex("cd82"))
    records = [Record(0, ev.HYPERCALL_V2, 10, (29 | ev.ARG_32 << ev.ARG_SHIFT, 1))]
    trace, _ = fifo(tmp_path, "trace", window(0, records))
    out, reader = fifo(tmp_path, "out")
    jsonl, _ = fifo(tmp_path, "jsonl", b'{"event":"start","t":0}\n{"event":"stop","t":1}\n')
    results = bounded(tmp_path, ["decode", f"@{args}", "--mem", f"0x7000@{mem}", "--reg", "eax=17", "--json"],
                      ["trace", str(trace), "--xen", "4.17", "--xentrace-out", str(out)], ["trace", str(jsonl)])
    assert [r["status"] for r in results] == [0, 0, 0], results
    assert json.loads(results[0]["stdout"])["name"] == "xen_version"
    assert "sched_op(cmd=SCHEDOP_block)" in results[1]["stdout"]
    reader.join(5)
    assert read_bytes(reader.got[0]) == {0: records}  # type: ignore[attr-defined]
    assert results[2]["stdout"].strip() == "(no hypercalls in the trace match)"


# --- 3. long numbers -----------------------------------------------------------------------------------

def test_a_long_xen_version_and_long_values_are_cut_when_echoed(capsys):
    digits = "4" * 5000
    for argv in (["abi", "--xen", digits], ["decode", "--width", "32", "--xen", digits]):
        err = one_line_error(capsys, argv, 2, "not a Xen version")
        assert len(err) < 300
    for value in (digits, "0x" + digits, "-0x" + digits):
        err = one_line_error(capsys, ["decode", "--width", "32", "--reg", f"eax={value}"], 2, "(500")
        assert len(err) < 300
    err = one_line_error(capsys, ["decode", "--width", "32", "--reg", f"{'e' * 5000}=1"], 2, "unknown register")
    assert len(err) < 300
    err = one_line_error(capsys, ["multicall", "0", "0x" + digits, "--width", "32"], 2)
    assert len(err) < 300


# --- 4. write errors -----------------------------------------------------------------------------------

def test_write_errors_are_one_line(tmp_path, capsys):
    path = tmp_path / "t.xt"
    path.write_bytes(window(0, [Record(0, ev.HYPERCALL_V2, 10, (29 | ev.ARG_32 << ev.ARG_SHIFT, 1))]))
    one_line_error(capsys, ["trace", str(path), "--xentrace-out", "/dev/full"], 1,
                   "cannot write xentrace file /dev/full: No space left on device")
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "xendbg.cli", "abi", "--xen", "4.17"], stdout=full,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 1 and proc.stderr == "xendbg: error: cannot write the output: No space left on device\n"


# --- 5. reads are bounded ------------------------------------------------------------------------------

def test_endless_inputs_are_refused_at_a_stated_limit(tmp_path):
    results = bounded(tmp_path, ["trace", "/dev/zero"], ["decode", "--width", "32", "--mem", "0@/dev/zero"],
                      ["decode", "@/dev/zero"])
    assert [r["status"] for r in results] == [1, 2, 2]
    assert "more than 16 MiB" in results[0]["stderr"] and "more than 64 MiB" in results[1]["stderr"]
    assert "more than 1 MiB" in results[2]["stderr"]


# --- 6. what xendbg maps must be a regular file --------------------------------------------------------

def test_a_fifo_where_a_file_is_mapped_is_refused(tmp_path):
    dump = tmp_path / "dump"
    dump.write_bytes(df.elf_core(bytes(pv64()[0].data), pv64()[1], True))
    for name in ("fifo-core", "fifo-sym", "fifo-xen"):
        os.mkfifo(tmp_path / name)
    results = bounded(tmp_path, ["core", str(tmp_path / "fifo-core")],
                      ["core", str(dump), "--symbols", str(tmp_path / "fifo-sym")],
                      ["core", str(dump), "--xen-syms", str(tmp_path / "fifo-xen")])
    assert all(r["status"] == 1 and "a FIFO or pipe, not" in r["stderr"] for r in results), results


def test_files_that_report_no_size_are_not_called_empty(capsys):
    one_line_error(capsys, ["core", "/dev/zero"], 1, "/dev/zero: a character device, not a memory dump")
    one_line_error(capsys, ["core", "/proc/version"], 1, "reports a size of 0 bytes but has data")
    one_line_error(capsys, ["trace", "/proc/version"], 1, "/proc/version:1: not a JSONL trace")


# --- 7, 8, 9. notes ------------------------------------------------------------------------------------

def elf_with_notes(path: Path, notes: list[tuple[int, int]], size: int) -> Path:
    """A sparse ET_CORE of `size` bytes: one PT_LOAD, and PT_NOTEs of (offset, size)."""
    count = 1 + len(notes)
    out = struct.pack(EHDR64, IDENT64, 4, 62, 1, 0, 64, 0, 0, 64, 56, count, 0, 0, 0)
    out += struct.pack(PHDR64, 1, 7, 0x1000, 0, 0, 0x1000, 0x1000, 0)
    for offset, length in notes:
        out += struct.pack(PHDR64, 4, 0, offset, 0, 0, length, length, 4)
    with open(path, "wb") as file:
        file.write(out)
        file.truncate(size)
    return path


def test_note_segments_are_bounded_in_bytes(tmp_path):
    many = elf_with_notes(tmp_path / "many.elf", [(0, 64 << 20)] * 40, 64 << 20)
    huge = elf_with_notes(tmp_path / "huge.elf", [(0x2000, 256 << 20)], 0x2000 + (256 << 20))
    results = bounded(tmp_path, ["core", str(many)], ["core", str(huge)])
    assert "40 note segments of 2684354560 bytes, more than the 16 MiB of notes xendbg reads" in results[0]["stderr"]
    assert "more than the 16 MiB" in results[1]["stderr"]


def test_the_cpus_a_dump_claims_are_bounded(tmp_path):
    ram, cpus, _ = pv64()
    one = df.notes(cpus[:1], True)  # the NT_PRSTATUS note, then the QEMU note
    prstatus, qemu = one[:one.index(b"QEMU") - 12], one[one.index(b"QEMU") - 12:]

    def claiming(n: int) -> bytes:
        return df.elf_core(bytes(ram.data[:1 << 16]), cpus, True, note_area=prstatus * n + qemu * n)

    many = tmp_path / "many.elf"
    many.write_bytes(claiming(65533))
    some = tmp_path / "some.elf"
    some.write_bytes(claiming(4097))
    results = bounded(tmp_path, ["core", str(many)], ["core", str(some)])
    assert "more than the 16 MiB" in results[0]["stderr"]
    assert "4097 QEMU CPU notes, more than the 4096 CPUs xendbg reads" in results[1]["stderr"]


def test_a_note_area_of_zeros_is_bounded_in_notes_and_offsets_are_file_offsets():
    with pytest.raises(DecodeError, match=f"more than {MAX_NOTES} ELF notes in the note area at file offset 0x40"):
        parse_notes(bytes(12 * (MAX_NOTES + 1)), "f", 0x40)
    with pytest.raises(DecodeError, match="ELF note at file offset 0x1018 runs past"):
        parse_notes(bytes(24) + struct.pack("<III", 0, 100, 1), "f", 0x1000)


def test_a_note_offset_in_a_dump_is_its_file_offset(tmp_path, capsys):
    ram, cpus, _ = pv64()
    area = df.notes(cpus, True)
    bad = area + struct.pack("<III", 4, 1000, 1) + b"CORE"
    data = df.elf_core(bytes(ram.data), cpus, True, note_area=bad)
    path = tmp_path / "d.elf"
    path.write_bytes(data)
    at = data.index(bad) + len(area)
    one_line_error(capsys, ["core", str(path)], 1, f"ELF note at file offset {at:#x} runs past")


# --- 10. section names are read once -------------------------------------------------------------------

def many_sections(path: Path, count: int, names: int = 1 << 20) -> Path:
    """An ET_CORE with no program headers and `count` sections (e_shnum 0, the count in section 0), all
    named from offset 0 of a name table of `names` bytes without a NUL."""
    shoff = 64
    strtab_at = shoff + count * 64
    out = bytearray(struct.pack(EHDR64, IDENT64, 4, 62, 1, 0, 0, shoff, 0, 64, 56, 0, 64, 0, 1))
    out += struct.pack(SHDR64, 0, 0, 0, 0, 0, count, 0, 0, 0, 0)
    out += struct.pack(SHDR64, 0, 3, 0, 0, strtab_at, names, 0, 0, 1, 0)
    out += struct.pack(SHDR64, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0) * (count - 2)
    out += b"a" * names
    path.write_bytes(bytes(out))
    return path


def test_many_sections_are_looked_up_once(tmp_path):
    core = many_sections(tmp_path / "many.elf", 130_000)
    results = bounded(tmp_path, ["core", str(core)], ["core", "/dev/null", "--symbols", str(core)])
    assert "ET_CORE" not in results[0]["stderr"] and results[0]["status"] == 1
    assert results[1]["status"] == 1


# --- 11, 12. kdump runs and page-table aliases ---------------------------------------------------------

def kdump_with_bitmap(bitmap: bytes) -> bytes:
    """A plain kdump file whose dump bitmap is `bitmap` and whose pages are not there."""
    block = df.PAGE
    ram, cpus, _ = pv64()
    area = df.notes(cpus[:1], True)
    sub_size = 104
    sub_hdr_size = -(-(sub_size + len(area)) // block)
    bitmap_len = -(-len(bitmap) // block) * block
    header = bytearray(424 + 40)
    header[:8] = b"KDUMP   "
    struct.pack_into("<I", header, 8, 6)
    struct.pack_into("<10I", header, 424, 1, block, sub_hdr_size, bitmap_len // block * 2, len(bitmap) * 8,
                     0, 0, 0, 0, 1)
    sub = struct.pack("<QIIQQQQQQQQQQQ", 0, 1, 0, 0, 0, 0, 0, block + sub_size, len(area), 0, 0, 0, 0, 0)
    out = bytearray((1 + sub_hdr_size) * block + 2 * bitmap_len)
    out[:len(header)] = header
    out[block:block + sub_size + len(area)] = sub + area
    at = (1 + sub_hdr_size) * block
    out[at:at + len(bitmap)] = bitmap
    out[at + bitmap_len:at + bitmap_len + len(bitmap)] = bitmap
    return bytes(out)


def test_kdump_runs_are_found_in_linear_time(tmp_path):
    path = tmp_path / "alt.kdump"
    path.write_bytes(kdump_with_bitmap(b"\x55" * (140 << 10)))
    out = tmp_path / "out.core"
    results = bounded(tmp_path, ["core", str(path), "--to-gdb", str(out)])
    assert results[0]["status"] == 1 and "page descriptor" in results[0]["stderr"]


def aliased_dump() -> bytes:
    """A 4 MiB 64-bit dump whose L4, L3, L2 and L1 each point all 512 entries at one table, the last at one
    page: 512^4 virtual pages of one physical page."""
    ram, cpus, _ = pv64()
    root, l3, l2, l1 = (ram.alloc() for _ in range(4))
    flags = df.P | df.RW | df.US
    for table, child in ((root, l3), (l3, l2), (l2, l1), (l1, 0x1000)):
        ram.write(table, struct.pack("<Q", child | flags) * 512)
    cr = list(cpus[0].cr)
    cr[3] = root
    cpus[0].cr = tuple(cr)  # type: ignore[assignment]
    return df.elf_core(bytes(ram.data), cpus, True)


def test_to_gdb_leaves_out_aliases_of_shared_page_tables_and_says_so(tmp_path):
    path = tmp_path / "alias.elf"
    path.write_bytes(aliased_dump())
    out = tmp_path / "out.core"
    results = bounded(tmp_path, ["core", str(path), "--to-gdb", str(out), "--vcpu", "0"])
    assert results[0]["status"] == 0, results
    assert "left out" in results[0]["stdout"] and "aliases" in results[0]["stdout"]
    assert out.stat().st_size < 1 << 20  # 8 copies of the page, not 512^4


# --- 13. xentrace files are streamed -------------------------------------------------------------------

def test_a_large_xentrace_file_is_read_in_bounded_memory(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from xentrace_file import generate

    path = tmp_path / "big.xt"
    size = generate(path, 3 << 20, 4)
    result = bounded(tmp_path, ["trace", str(path), "--xen", "4.17", "--stats"])[0]
    assert result["status"] == 0 and "sched_op" in result["stdout"]
    assert result["rss_grown_kib"] < 16 * size // 1024, result["rss_grown_kib"]  # was about 115 times the file


def test_the_stream_merge_orders_as_merge_does():
    per_cpu = {cpu: [Record(cpu, ev.HYPERCALL_V2, tsc, (29,)) for tsc in range(cpu, 3000, 3 + cpu)]
               for cpu in range(3)}
    windows = []  # drains of 100 records per CPU in turn, as xentrace writes them
    for start in range(0, 3000, 100):
        windows += [(cpu, records[start:start + 100]) for cpu, records in per_cpu.items() if records[start:start + 100]]
    streamed = StreamMerge(windows, lookahead=400)
    assert list(streamed) == merge(per_cpu) and streamed.late == 0
    late = StreamMerge([(0, per_cpu[0]), (1, per_cpu[1])], lookahead=10)
    assert len(list(late)) == len(per_cpu[0]) + len(per_cpu[1]) and late.late > 0
    assert "records came after records with a later TSC" in (late.warning("f") or "")


def test_a_one_line_file_that_is_not_json_is_refused(tmp_path, capsys):
    path = tmp_path / "one.txt"
    path.write_text("hello world\n")
    one_line_error(capsys, ["trace", str(path)], 1, "not a JSONL trace")
    path.write_text('{"a": 1}\n')
    one_line_error(capsys, ["trace", str(path)], 1, "not a JSONL trace: its one line is a JSON object without")

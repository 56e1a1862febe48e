"""Xen's trace buffers read through a Target: buffers built from the layout (xendbg/xentrace/buffers.py),
filled by a small producer that follows Xen's rules (records whole, a wrap record at the end of the
data area, the newest records dropped when full, then a LOST_RECORDS record)."""

from __future__ import annotations

import json
import struct

import pytest

from xendbg.abi import NEWEST, get_abi
from xendbg.errors import UnreadableMemory, UsageError, XendbgError
from xendbg.session import AbiChoice
from xendbg.trace import Stats, TraceLog, show_lines
from xendbg.xentrace import events as ev
from xendbg.xentrace.buffers import PAGE, TraceBuffers
from xendbg.xentrace.merge import BufferFeed, Folder, merge
from xendbg.xentrace.records import Record, call_of, hypercall_of, parse
from xendbg.xentrace.xtfile import read_bytes, window

ABI = get_abi("4.17", 64)
CHOSEN = (ABI, AbiChoice("4.17", "set by hand", None, ("4.17",)))
DIRECTMAP = 0xFFFF830000000000
SYMS = {"t_info": 0xFFFF82D040600000, "per_cpu__t_bufs": 0x1000, "__per_cpu_offset": 0xFFFF82D040601000,
        "opt_tbuf_size": 0xFFFF82D040602000, "opt_tevt_mask": 0xFFFF82D040602004,
        "init_trace_bufs": 0xFFFF82D040400000}
PER_CPU_AREA = 0xFFFF830000A00000
T_INFO = DIRECTMAP + 0x5000000


class Syms:
    def __init__(self, names: dict[str, int]) -> None:
        self.names = names

    def symbol_at(self, address: int) -> None:
        return None

    def address_of(self, name: str) -> int | None:
        return self.names.get(name)


def hypercall(op: int, *args: tuple[int, int], subcall: bool = False) -> tuple[int, ...]:
    """The payload of a HYPERCALL_V2 record: op with the argument-presence bits, then 32-bit args."""
    first = op
    for index, _ in args:
        first |= ev.ARG_32 << (ev.ARG_SHIFT + 2 * index)
    return (first, *(v for _, v in args))


class PagedMemory:
    """A sparse Target: 4 KiB pages created on write (the producer writes byte by byte)."""

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}

    def write(self, address: int, data: bytes) -> None:
        for i in range(0, len(data)):
            page, at = divmod(address + i, PAGE)
            self.pages.setdefault(page, bytearray(PAGE))[at] = data[i]

    def read_register(self, name: str) -> int:
        raise AssertionError("the buffers are read without registers")

    def read_memory(self, address: int, size: int) -> bytes:
        out = bytearray()
        while size > 0:
            page, at = divmod(address, PAGE)
            if page not in self.pages:
                raise UnreadableMemory(address, size, "not mapped")
            n = min(size, PAGE - at)
            out += self.pages[page][at:at + n]
            address, size = address + n, size - n
        return bytes(out)


# A 32-bit Xen (shim32's layout): 4-byte pointers and per-CPU offsets, frames identity-mapped.
SYMS32 = {"t_info": 0x10C420, "per_cpu__t_bufs": 0x10C000, "__per_cpu_offset": 0x10C020,
          "opt_tbuf_size": 0x1034C8, "opt_tevt_mask": 0x1034CC, "init_trace_bufs": 0x100E8C}


class FakeXen:
    """A Xen with `cpus` trace buffers of `pages` pages each, its pages scattered in descending order
    (`width` 32: a 32-bit Xen with SYMS32 and no direct-map offset)."""

    def __init__(self, pages: int = 2, cpus: int = 2, width: int = 64) -> None:
        syms, directmap, per_cpu_area, t_info = ((SYMS, DIRECTMAP, PER_CPU_AREA, T_INFO) if width == 64 else
                                                 (SYMS32, 0, 0x200000, 0x300000))
        pointer = "<Q" if width == 64 else "<I"
        self.directmap = directmap
        self.target = PagedMemory()
        self.pages = pages
        self.data_size = pages * PAGE - 8
        self.mfns: dict[int, list[int]] = {}
        self.lost: dict[int, int] = {}
        first = 129  # words: u16 tbuf_size + u16 mfn_offset[256], rounded up to u32
        info = struct.pack("<H", pages) + b"".join(struct.pack("<H", first + cpu * pages) for cpu in range(cpus))
        info = info.ljust(4 * first, b"\0")
        mfn = 0x9000
        for cpu in range(cpus):
            self.mfns[cpu] = [mfn - 2 * i for i in range(pages)]  # not contiguous, descending
            mfn -= 2 * pages + 7
            info += b"".join(struct.pack("<I", m) for m in self.mfns[cpu])
            per_cpu = per_cpu_area + cpu * 0x10000 - syms["per_cpu__t_bufs"]
            self.write(syms["__per_cpu_offset"] + width // 8 * cpu, struct.pack(pointer, per_cpu % (1 << width)))
            self.write(per_cpu_area + cpu * 0x10000, struct.pack(pointer, self.page(cpu, 0)))
            for i in range(pages):
                self.write(self.page(cpu, i), bytes(PAGE))
        self.write(t_info, info)
        self.write(syms["t_info"], struct.pack(pointer, t_info))
        self.write(syms["opt_tbuf_size"], struct.pack("<I", pages))
        self.write(syms["opt_tevt_mask"], struct.pack("<I", ev.TRC_PV))

    def write(self, address: int, data: bytes) -> None:
        self.target.write(address, data)

    def page(self, cpu: int, index: int) -> int:
        return self.directmap + (self.mfns[cpu][index] << 12)

    def positions(self, cpu: int) -> tuple[int, int]:
        return struct.unpack("<II", self.target.read_memory(self.page(cpu, 0), 8))

    def _put(self, cpu: int, offset: int, data: bytes) -> None:
        pos = offset % self.data_size + 8
        for i, byte in enumerate(data):
            page, at = divmod(pos + i, PAGE)
            self.write(self.page(cpu, page) + at, bytes([byte]))

    def _insert(self, cpu: int, record: Record) -> None:
        cons, prod = self.positions(cpu)
        self._put(cpu, prod, record.to_bytes())
        prod = (prod + record.size) % (2 * self.data_size)
        self.write(self.page(cpu, 0) + 4, struct.pack("<I", prod))

    def emit(self, cpu: int, event: int, words: tuple[int, ...], tsc: int) -> None:
        record = Record(cpu, event, tsc, words)
        cons, prod = self.positions(cpu)
        used = (prod - cons) % (2 * self.data_size)
        to_wrap = self.data_size - prod % self.data_size
        need = record.size + (28 if self.lost.get(cpu) else 0)
        if need > to_wrap:
            need += to_wrap
        if need > self.data_size - used:
            self.lost[cpu] = self.lost.get(cpu, 0) + 1
            return
        if self.lost.get(cpu):
            self._wrap_if(cpu, 28)
            n = self.lost.pop(cpu)
            self._insert(cpu, Record(cpu, ev.LOST_RECORDS, tsc, (n, 0, tsc & 0xFFFFFFFF, tsc >> 32)))
        self._wrap_if(cpu, record.size)
        self._insert(cpu, record)

    def _wrap_if(self, cpu: int, size: int) -> None:
        _, prod = self.positions(cpu)
        left = self.data_size - prod % self.data_size
        if size > left:  # a record filling the rest of the data area, so the next starts at 0
            words = (left - 4) // 4
            tsc = None
            if words > ev.EXTRA_MAX:
                words, tsc = words - 2, 0
            self._insert(cpu, Record(cpu, ev.WRAP_BUFFER, tsc, (0,) * words))


def buffers(xen: FakeXen) -> TraceBuffers:
    return TraceBuffers(xen.target, Syms(SYMS))


def advance(xen: FakeXen):  # noqa: ANN201 - a Writer
    return lambda address, data: xen.write(address, data)


MULTICALL, MMU_UPDATE, VCPU_OP, SCHED_OP = 13, 1, 24, 29


def test_parse_header_fields() -> None:
    data = Record(1, ev.HYPERCALL_V2, 0x1122334455, hypercall(SCHED_OP, (0, 2))).to_bytes()
    assert struct.unpack_from("<I", data)[0] == 0x0020100D | 2 << 28 | 1 << 31
    records, used = parse(data + b"\x01\x00", 1)
    assert used == len(data) and records[0].tsc == 0x1122334455 and records[0].words == (SCHED_OP | 1 << 20, 2)


def test_hypercall_named_with_only_recorded_arguments() -> None:
    call = call_of(Record(0, ev.HYPERCALL_V2, 5, hypercall(VCPU_OP, (0, 0), (1, 1))))
    assert call is not None and call.args == ((0, 0), (1, 1)) and not call.subcall
    hc = hypercall_of(call, ABI)
    assert hc.name == "vcpu_op" and [a.name for a in hc.args] == ["cmd", "vcpuid"]
    assert hc.subop == "VCPUOP_initialise" and hc.args[1].value == 1
    shutdown = hypercall_of(call_of(Record(0, ev.SUBCALL, 5, hypercall(SCHED_OP, (0, 2)))), ABI)
    assert shutdown.subop == "SCHEDOP_shutdown" and shutdown.detail is None
    mmu = hypercall_of(call_of(Record(0, ev.HYPERCALL_V2, 5, hypercall(MMU_UPDATE, (1, 3)))), ABI)
    assert [(a.name, a.value) for a in mmu.args] == [("count", 3)]


def test_64_bit_argument_field() -> None:
    record = Record(0, ev.HYPERCALL_V2, 1, (VCPU_OP | ev.ARG_64 << 20, 0x1, 0x2))
    assert call_of(record).args == ((0, 0x200000001),)


def test_pv_records_labelled() -> None:
    trap = Record(0, ev.TRC_PV_ENTRY + 3 + ev.TRC_64_FLAG, 1, (0x1000, 0xFFFFFFFF, 14 | 1 << 15 | 2 << 16))
    assert trap.name == "trap64"
    assert ev.pv_fields(trap.event, trap.words) == {"rip": 0xFFFFFFFF00001000, "vector": 14, "has_error_code": 1,
                                                    "error_code": 2}
    assert ev.event_name(ev.TRC_PV_ENTRY + 6 + ev.TRC_64_FLAG) == "emulate_privop64"
    assert ev.event_name(ev.TRC_SCHED_MIN + 1) == "runstate_change"
    assert ev.event_name(ev.LOST_RECORDS) == "lost_records"


def test_drain_reads_records_across_scattered_pages() -> None:
    xen = FakeXen(pages=2)
    tb = buffers(xen)
    sent = [hypercall(MMU_UPDATE, (1, n)) for n in range(300)]  # 20-byte records: some straddle a page
    for n, words in enumerate(sent):
        xen.emit(0, ev.HYPERCALL_V2, words, 1000 + n)
    got = tb.drain(advance(xen))
    assert [r.words for r in got[0]] == sent
    assert [r.tsc for r in got[0]] == list(range(1000, 1300))
    cons, prod = xen.positions(0)
    assert cons == prod  # xendbg consumed what it read
    assert tb.drain(advance(xen)) == {}


def test_drain_follows_the_wrap() -> None:
    xen = FakeXen(pages=1)  # 4088 bytes of data: 20-byte records wrap after 204
    tb = buffers(xen)
    seen: list[int] = []
    for n in range(1000):
        xen.emit(0, ev.HYPERCALL_V2, hypercall(MMU_UPDATE, (1, n)), n)
        if n % 150 == 149:
            seen += [r.words[1] for r in tb.drain(advance(xen))[0] if r.event == ev.HYPERCALL_V2]
    seen += [r.words[1] for r in tb.drain(advance(xen)).get(0, []) if r.event == ev.HYPERCALL_V2]
    assert seen == list(range(1000))


def test_full_buffer_reported_as_a_gap() -> None:
    xen = FakeXen(pages=1)
    tb = buffers(xen)
    for n in range(250):  # 204 fit: the rest are dropped
        xen.emit(0, ev.HYPERCALL_V2, hypercall(MMU_UPDATE, (1, n)), n)
    first = tb.drain(advance(xen))[0]
    xen.emit(0, ev.HYPERCALL_V2, hypercall(MMU_UPDATE, (1, 999)), 999)
    log = TraceLog(None, ())
    stats = Stats()
    feed = BufferFeed(log, stats, lambda: CHOSEN)
    feed.feed({0: first})
    feed.feed(tb.drain(advance(xen)))
    gaps = [r for r in log.recent if r["event"] == "gap"]
    assert len(gaps) == 1 and gaps[0]["lost"] == 250 - len(first) and feed.lost == gaps[0]["lost"]
    lines = show_lines(list(log.recent))
    assert any(f"<gap: Xen lost {gaps[0]['lost']} trace records" in line for line in lines)
    assert [r["line"] for r in log.recent if r["event"] == "call"][-1] == "mmu_update(count=0x3e7)"
    assert stats.calls["mmu_update"] == len(first) + 1


def test_locate_needs_allocated_buffers_and_symbols() -> None:
    xen = FakeXen()
    xen.write(SYMS["t_info"], bytes(8))
    with pytest.raises(UsageError, match="tbuf_size=PAGES tevt_mask=0x0020f000"):
        buffers(xen).locate()
    with pytest.raises(UsageError, match="no symbol t_info"):
        TraceBuffers(xen.target, Syms({k: v for k, v in SYMS.items() if k != "t_info"}))


def test_merge_by_tsc_and_fold_continuations() -> None:
    cpu0 = [Record(0, ev.HYPERCALL_V2, 10, hypercall(MULTICALL, (1, 5))),
            Record(0, ev.SUBCALL, 11, hypercall(MMU_UPDATE, (1, 1))),
            Record(0, ev.SUBCALL, 12, hypercall(MMU_UPDATE, (1, 1))),
            Record(0, ev.HYPERCALL_V2, 20, hypercall(MULTICALL, (1, 3))),  # continues: 2 entries done
            Record(0, ev.HYPERCALL_V2, 40, hypercall(MMU_UPDATE, (1, 8))),
            Record(0, ev.HYPERCALL_V2, 41, hypercall(MMU_UPDATE, (1, 5 | 1 << 31)))]  # preempted bit
    cpu1 = [Record(1, ev.HYPERCALL_V2, 15, hypercall(SCHED_OP, (0, 1))),
            Record(1, ev.HYPERCALL_V2, 30, hypercall(SCHED_OP, (0, 1)))]  # the same call again: new
    merged = merge({0: cpu0, 1: cpu1})
    assert [r.tsc for r in merged] == [10, 11, 12, 15, 20, 30, 40, 41]
    events = Folder().events(merged, ABI)
    assert [(e.kind, e.continues) for e in events] == [
        ("call", False), ("subcall", False), ("subcall", False), ("call", False), ("call", True),
        ("call", False), ("call", False), ("call", True)]
    log, stats = TraceLog(None, ()), Stats()
    BufferFeed(log, stats, lambda: CHOSEN).feed({0: cpu0, 1: cpu1})
    assert stats.calls == {"multicall": 1, "sched_op": 2, "mmu_update": 1}
    assert stats.batched == {"mmu_update": 2}
    calls = [r for r in log.recent if r["event"] == "call"]
    assert all(r["source"] == "xen-buffers" for r in calls) and calls[2]["continues"] == calls[0]["seq"]
    assert calls[2]["tsc"] == 20 and log.calls == 4


def test_only_hypercalls_and_skip() -> None:
    records = {0: [Record(0, ev.TRC_PV_ENTRY + 6 + ev.TRC_64_FLAG, 1, (0x1000, 0)),
                   Record(0, ev.HYPERCALL_V2, 2, hypercall(SCHED_OP, (0, 1))),
                   Record(0, ev.HYPERCALL_V2, 3, hypercall(VCPU_OP, (0, 0), (1, 1)))]}
    log = TraceLog(None, ())
    BufferFeed(log, Stats(), lambda: CHOSEN).feed(records)
    assert [r["event"] for r in log.recent][1:] == ["xen", "call", "call"]
    assert log.recent[1]["name"] == "emulate_privop64" and log.recent[1]["fields"] == {"rip": 0x1000}
    log = TraceLog(None, ())
    BufferFeed(log, Stats(), lambda: CHOSEN, only_hypercalls=True, skip=frozenset({"vcpu_op"})).feed(records)
    assert [r.get("name") for r in log.recent][1:] == ["sched_op"]


def test_xentrace_file_round_trip() -> None:
    cpu0 = [Record(0, ev.HYPERCALL_V2, 10, hypercall(SCHED_OP, (0, 2))), Record(0, ev.WRAP_BUFFER, None, (0, 0))]
    cpu1 = [Record(1, ev.SUBCALL, 12, hypercall(MMU_UPDATE, (1, 1)))]
    data = window(0, cpu0) + window(1, cpu1) + window(0, cpu0[:1])
    assert struct.unpack_from("<IiI", data) == (0x0001F003 | 2 << 28, 0, sum(r.size for r in cpu0))
    assert read_bytes(data) == {0: cpu0 + cpu0[:1], 1: cpu1}


def test_cli_reads_and_rewrites_xentrace_files(tmp_path, capsys) -> None:
    from xendbg.cli import run

    path, copy = tmp_path / "trace.bin", tmp_path / "copy.bin"
    path.write_bytes(window(0, [Record(0, ev.HYPERCALL_V2, 10, hypercall(VCPU_OP, (0, 0), (1, 1))),
                                Record(0, ev.LOST_RECORDS, 11, (7, 0, 0, 0))])
                     + window(1, [Record(1, ev.HYPERCALL_V2, 5, hypercall(SCHED_OP, (0, 2)))]))
    assert run(["trace", str(path), "--xentrace-out", str(copy)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "sched_op(cmd=SCHEDOP_shutdown)" in lines[0] and "cpu1" in lines[0]
    assert "vcpu_op(cmd=VCPUOP_initialise, vcpuid=0x1)" in lines[1] or "vcpu_op(cmd=VCPUOP_initialise" in lines[1]
    assert "<gap: Xen lost 7 trace records" in lines[2]
    assert read_bytes(copy.read_bytes()) == read_bytes(path.read_bytes())
    assert run(["trace", str(path), "--stats", "--json"]) == 0
    assert '"name": "sched_op"' in capsys.readouterr().out


def test_a_32_bit_xen_has_4_byte_pointers() -> None:
    """shim32's buffers: the same layout with 32-bit pointers and per-CPU offsets."""
    xen = FakeXen(pages=2, width=32)
    for n in range(3):
        xen.emit(n % 2, ev.HYPERCALL_V2, hypercall(SCHED_OP, (0, n)), 100 + n)
    tb = TraceBuffers(xen.target, Syms(SYMS32), width=32)
    got = tb.drain(advance(xen))
    assert tb.directmap == 0 and [b.t_buf for b in tb.cpus] == [xen.page(0, 0), xen.page(1, 0)]
    assert {cpu: [r.tsc for r in records] for cpu, records in got.items()} == {0: [100, 102], 1: [101]}
    with pytest.raises(XendbgError):  # read as a 64-bit Xen, the pointers are garbage
        TraceBuffers(xen.target, Syms(SYMS32)).drain()


def test_each_call_says_why_its_abi_and_warns_when_guessed() -> None:
    records = {0: [Record(0, ev.HYPERCALL_V2, 2, hypercall(SCHED_OP, (0, 1)))]}
    guess = AbiChoice(NEWEST, "guessed: no evidence of the Xen version", "decoding with Xen 4.22, a guess",
                      ("4.22", "4.17"))
    log = TraceLog(None, ())
    BufferFeed(log, Stats(), lambda: (get_abi(NEWEST, 64), guess)).feed(records)
    call = next(r for r in log.recent if r["event"] == "call")
    assert call["hypercall"]["xen"] == NEWEST
    assert call["hypercall"]["xen_source"] == "guessed: no evidence of the Xen version"
    assert [f["rule"] for f in call["hypercall"]["findings"]] == ["abi-evidence"]
    log = TraceLog(None, ())
    BufferFeed(log, Stats(), lambda: CHOSEN).feed(records)
    call = next(r for r in log.recent if r["event"] == "call")
    assert call["hypercall"]["xen_source"] == "set by hand" and call["hypercall"]["findings"] == []


def test_cli_names_xentrace_records_by_xen_version(tmp_path, capsys) -> None:
    from xendbg.cli import run

    path = tmp_path / "trace.bin"
    path.write_bytes(window(0, [Record(0, ev.HYPERCALL_V2, 10, hypercall(6, (0, 0)))]))
    assert run(["trace", str(path), "--json"]) == 0
    guessed = json.loads(capsys.readouterr().out)[0]["hypercall"]
    assert guessed["name"] == "sched_op_compat" and guessed["xen"] == NEWEST
    assert guessed["xen_source"].startswith("guessed: a xentrace file does not say")
    assert run(["trace", str(path), "--json", "--xen", "3.0"]) == 0
    exact = json.loads(capsys.readouterr().out)[0]["hypercall"]
    assert (exact["name"], exact["xen"], exact["xen_source"], exact["findings"]) == ("sched_op", "3.0", "--xen 3.0", [])


def test_buffer_records_take_the_guests_width_from_a_code_selector():
    """Xen's hypercall records do not say the guest's width (common/trace.c __trace_hypercall,
    RELEASE-4.17.0): the first PV guest selector gives it; Xen's ring-0 CS gives nothing; without any,
    Xen's width is used and each record says it is a guess."""
    from xendbg.session import Session
    from xendbg.xentrace.merge import records_abi

    session = Session()
    abi, choice = records_abi(session.abi, [(0xE008, "Xen"), (0xE019, "vCPU 1")], 64)
    assert abi.width == 32 and "width is a guess" not in (choice.warning or "")
    abi, choice = records_abi(session.abi, [(0xE033, "vCPU 0")], 64)
    assert abi.width == 64 and "width is a guess" not in (choice.warning or "")
    abi, choice = records_abi(session.abi, [(0xE008, "Xen"), (0xF000, "reset")], 64)
    assert abi.width == 64 and "the guest's width is a guess" in choice.warning

"""A fuzz test per input kind: valid files the tests build, mutated from a fixed seed, read by the `xendbg`
command in a child bounded in memory and in time per run (tests/unit/fuzzrun.py).  Each run must end
with exit 0, or 1 or 2 and one line on stderr; never an internal error, a traceback or a hang.

The mutations aim where readers trust the file: header fields set to 0, to all ones or to large counts,
bytes flipped, the file cut short, a block repeated or zeroed."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

from tests.unit import dumpfiles as df
from tests.unit.fuzzrun import problems, run_cases
from tests.unit.test_dump import pv32, pv64
from tests.unit.test_sites import full_image_32, full_image_64
from tests.unit.test_xc_core import pv64_core
from xendbg.dump.commands import SUBCOMMANDS
from xendbg.xentrace.records import Record
from xendbg.xentrace.xtfile import window

SEED = 20  # fixed: a failure is the same on every run
_EXTREMES = (0, 1, 0x7F, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 0x10000, 0xFFFE, 1 << 20, 0xFFFFFFFFFFFFFFFF)


def mutate(data: bytes, rng: random.Random, hot: int = 4096) -> bytes:
    """One to four mutations of `data`, most of them in its first `hot` bytes (the headers)."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not out:
            break
        where = rng.randrange(min(hot, len(out))) if rng.random() < 0.7 else rng.randrange(len(out))
        kind = rng.randrange(6)
        if kind == 0:  # a field set to an extreme
            size = rng.choice((1, 2, 4, 8))
            value = rng.choice(_EXTREMES) & ((1 << 8 * size) - 1)
            out[where:where + size] = value.to_bytes(size, "little")
        elif kind == 1:  # bytes flipped
            for _ in range(rng.randint(1, 8)):
                at = min(len(out) - 1, where + rng.randrange(64))
                out[at] ^= 1 << rng.randrange(8)
        elif kind == 2:  # cut short
            del out[rng.randrange(len(out)):]
        elif kind == 3:  # a block repeated
            block = out[where:where + rng.randint(1, 512)]
            out[where:where] = block * rng.randint(1, 8)
        elif kind == 4:  # a block zeroed
            n = rng.randint(1, 4096)
            out[where:where + n] = bytes(len(out[where:where + n]))
        else:  # a 32-bit count multiplied
            if where + 4 <= len(out):
                (value,) = struct.unpack_from("<I", out, where)
                struct.pack_into("<I", out, where, (value * rng.choice((2, 16, 4096)) + 1) & 0xFFFFFFFF)
    return bytes(out)


def corpus(tmp_path: Path, name: str, bases: list[bytes], count: int, hot: int = 4096) -> list[Path]:
    rng = random.Random(f"{SEED}-{name}")
    paths = []
    for i in range(count):
        path = tmp_path / f"{name}-{i}"
        path.write_bytes(mutate(rng.choice(bases), rng, hot))
        paths.append(path)
    return paths


def check(tmp_path: Path, cases: list[list[str]]) -> None:
    results = run_cases(tmp_path, cases, timeout=300)
    assert len(results) == len(cases)
    assert problems(results) == []


def core_cases(paths: list[Path], tmp_path: Path, seed: str) -> list[list[str]]:
    rng = random.Random(seed)
    cases = []
    for i, path in enumerate(paths):
        argv = ["core", str(path), rng.choice(SUBCOMMANDS[:-1])]
        if rng.random() < 0.3:
            argv += ["--to-gdb", str(tmp_path / f"out-{i}.core")]
        if rng.random() < 0.5:
            argv.append("--json")
        cases.append(argv)
    return cases


def test_fuzz_qemu_elf_dumps(tmp_path):
    ram64, cpus64, _ = pv64()
    ram32, cpus32, _ = pv32(df.PAE, 1 << 20)
    bases = [df.elf_core(bytes(ram64.data), cpus64, True), df.elf_core(bytes(ram32.data), cpus32, False)]
    check(tmp_path, core_cases(corpus(tmp_path, "elf", bases, 200), tmp_path, "elf"))


def test_fuzz_kdump_dumps(tmp_path):
    ram, cpus, _ = pv64()
    bases = [df.kdump(bytes(ram.data), cpus, True), df.kdump(bytes(ram.data), cpus, True, flattened=False)]
    check(tmp_path, core_cases(corpus(tmp_path, "kdump", bases, 200, hot=16384), tmp_path, "kdump"))


def test_fuzz_xl_dump_core_files(tmp_path):
    data, _, _ = pv64_core()
    check(tmp_path, core_cases(corpus(tmp_path, "xc", [data], 200, hot=16384), tmp_path, "xc"))


def test_fuzz_guest_elf_and_xen_syms(tmp_path):
    ram, cpus, _ = pv64()
    dump = tmp_path / "dump.elf"
    dump.write_bytes(df.elf_core(bytes(ram.data), cpus, True))
    paths = corpus(tmp_path, "guest", [full_image_64(), full_image_32()], 200)
    cases = [["core", str(dump), "summary", "--symbols" if i % 2 else "--xen-syms", str(p)]
             for i, p in enumerate(paths)]
    check(tmp_path, cases)


def _small_trace() -> bytes:
    from xendbg.xentrace import events as ev

    first = 29 | ev.ARG_32 << ev.ARG_SHIFT
    out = b""
    for n in range(6):
        out += window(n % 2, [Record(n % 2, ev.HYPERCALL_V2, 100 * n + i, (first, i % 3)) for i in range(20)]
                      + [Record(n % 2, ev.LOST_RECORDS, 100 * n + 50, (3, 0, 0, 0)),
                         Record(n % 2, ev.SUBCALL, None, (1 | ev.ARG_32 << ev.ARG_SHIFT, 2)),
                         Record(n % 2, ev.TRC_PV_ENTRY + 3, 100 * n + 60, (1, 2, 3, 4))])
    return out


def test_fuzz_xentrace_files(tmp_path):
    paths = corpus(tmp_path, "xt", [_small_trace()], 200, hot=1 << 16)
    rng = random.Random(f"{SEED}-xt-args")
    cases = []
    for i, path in enumerate(paths):
        extra = rng.choice([[], ["--stats"], ["--json"], ["--errors"], ["sched_op"], ["--xen", "3.0"],
                            ["--xentrace-out", str(tmp_path / f"copy-{i}")]])
        cases.append(["trace", str(path), *extra])
    check(tmp_path, cases)


_ODD_VALUES = ("now", "", -1, 1.5, True, None, [], {}, [1, [2]], {"a": {}}, 2 ** 80, "-22", "x" * 300)


def jsonl_base(tmp_path: Path) -> str:
    """A JSONL trace as xendbg writes it (TraceLog), with calls, results, a preemption and a gap."""
    from xendbg.abi import get_abi
    from xendbg.session import AbiChoice
    from xendbg.trace import Stats, TraceLog
    from xendbg.xentrace.merge import BufferFeed
    from xendbg.xentrace.xtfile import read_bytes

    path = tmp_path / "base.jsonl"
    log = TraceLog(str(path), ())
    chosen = (get_abi("4.17", 64), AbiChoice("4.17", "set by hand", None, ("4.17",)))
    BufferFeed(log, Stats(), lambda: chosen).feed(read_bytes(_small_trace()))
    log.result(0, 1, "sched_op", -22)
    log.error(0, "0x1000", "cannot read")
    log.close()
    return path.read_text()


def mutate_jsonl(text: str, rng: random.Random) -> str:
    lines = text.splitlines()
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(lines))
        try:
            record = json.loads(lines[i])
        except ValueError:
            continue
        kind = rng.randrange(5)
        if kind == 0 and record:  # a key dropped
            record.pop(rng.choice(sorted(record)))
        elif kind == 1 and record:  # a value of another type
            record[rng.choice(sorted(record))] = rng.choice(_ODD_VALUES)
        elif kind == 2 and isinstance(record.get("hypercall"), dict) and record["hypercall"]:
            record["hypercall"][rng.choice(sorted(record["hypercall"]))] = rng.choice(_ODD_VALUES)
        elif kind == 3:  # the line cut
            lines[i] = lines[i][:rng.randrange(len(lines[i]) + 1)]
            continue
        else:  # the event renamed
            record["event"] = rng.choice(("call", "return", "preempted", "gap", "subcall", "xen", "error", "stop"))
        lines[i] = json.dumps(record)
    if rng.random() < 0.2:
        lines.insert(rng.randrange(len(lines) + 1), "[" * rng.choice((10, 5000, 100_000)))
    return "\n".join(lines) + "\n"


def test_fuzz_jsonl_traces(tmp_path):
    base = jsonl_base(tmp_path)
    rng = random.Random(f"{SEED}-jsonl")
    cases = []
    for i in range(300):
        path = tmp_path / f"t-{i}.jsonl"
        path.write_text(mutate_jsonl(base, rng))
        cases.append(["trace", str(path), *rng.choice([[], ["--stats"], ["--json"], ["--errors"], ["sched_op"],
                                                       ["--stats", "--errors"]])])
    check(tmp_path, cases)


_NUMBERS = ("0", "1", "-1", "0x1000", "0xffffffff", "0x100000000", "0xffffffffffffffff", "0x10000000000000000",
            "abc", "", "0x", "1e3", "9" * 5000, "0x" + "f" * 5000, "0b101", "0o17", " 7 ")
_VERSIONS = ("4.17", "2.0", "3.0", "3.0.0", "4.22", "x", "", "9" * 30, "4.17.0-rc1", "5000" * 1000, "-1")


def argument_cases(tmp_path: Path, count: int) -> list[list[str]]:
    rng = random.Random(f"{SEED}-args")
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(rng.randrange(256) for _ in range(64)))
    text = tmp_path / "args.txt"
    text.write_text("--width\n32\n--reg\neax=17\n# comment\n\n")
    files = (str(blob), str(text), "/dev/null", str(tmp_path / "missing"), str(tmp_path))
    cases = []
    for _ in range(count):
        command = rng.choice(("decode", "multicall", "traps", "abi"))
        argv = [command]
        if command == "multicall":
            argv += [rng.choice(_NUMBERS), rng.choice(_NUMBERS)]
        elif command == "traps":
            argv.append(rng.choice(_NUMBERS))
        for _ in range(rng.randint(0, 6)):
            option = rng.randrange(7)
            if option == 0:
                argv += ["--width", rng.choice(("32", "64", "16", "x"))]
            elif option == 1:
                argv += ["--xen", rng.choice(_VERSIONS)]
            elif option == 2 and command != "abi":
                name = rng.choice(("eax", "rax", "cs", "rip", "eip", "r10", "xyz", "", "EAX"))
                argv += ["--reg", f"{name}={rng.choice(_NUMBERS)}"]
            elif option == 3 and command != "abi":
                spec = rng.choice((f"{rng.choice(_NUMBERS)}:{rng.choice(('cd82', 'zz', '', '0f05' * 300))}",
                                   f"{rng.choice(_NUMBERS)}@{rng.choice(files)}", f"@{rng.choice(files)}", ":", "@"))
                argv += ["--mem", spec]
            elif option == 4:
                argv.append("--json")
            elif option == 5:
                argv.append(f"@{rng.choice(files)}")
            elif command == "multicall":
                argv.append("--results")
        cases.append(argv)
    return cases


def test_fuzz_command_arguments(tmp_path):
    check(tmp_path, argument_cases(tmp_path, 600))

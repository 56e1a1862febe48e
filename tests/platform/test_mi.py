"""gdb/MI against real gdb and QEMU (shim32): MiTarget reads what gdb's own Python reads at the same
stop, the -xen-* MI commands give the --json data, -xen-events hands each record out once."""

from __future__ import annotations

import json
import re
import threading

import pytest
from conftest import XENDBG_SCRIPT as SCRIPT

from xendbg.errors import UnreadableMemory
from xendbg.mi.client import MiClient, MiError
from xendbg.mi.target import MiTarget
from xendbg.session import NoSymbols, Session
from xendbg.target import Target

pytestmark = pytest.mark.platform

REGISTERS = ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp", "eip", "eflags", "cs", "ss", "ds", "pc", "sp")


class Stops:
    """MI records the reader thread hands over; `wait_stopped` waits for the next *stopped."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.stopped = threading.Event()

    def __call__(self, record: dict) -> None:
        self.records.append(record)
        if record.get("type") == "notify" and record.get("message") == "stopped":
            self.stopped.set()

    def run(self, client: MiClient, command: str = "-exec-continue") -> None:
        self.stopped.clear()
        client.command(command)
        assert self.stopped.wait(30), self.records[-5:]


@pytest.fixture
def mi_at_multicall(boot_gdb):
    """gdb over MI, xendbg loaded, a trace running, stopped at shim32 (Xen 4.0)'s first multicall."""
    booted = boot_gdb("shim32", abi="4.0", timeout=90)
    stops = Stops()
    client = MiClient(["gdb", "--nx", "--quiet", "--interpreter=mi3"], stops)
    try:
        client.command("-gdb-set mi-async on")
        for line in [*booted.symbol_commands(), f"target remote 127.0.0.1:{booted.port}", f"source {SCRIPT}",
                     "set xen abi 4.0", "set xen color off", "xen trace start", "xen catch hypercall multicall"]:
            client.console(line)
        stops.run(client)
        yield client, stops
    finally:
        client.close()


def gdb_python(client: MiClient, expression: str) -> str:
    """What gdb's own Python prints for `expression` (the reference the MI reads are checked against)."""
    out = []
    client.on_record = lambda r: out.append(r["payload"]) if r.get("type") == "console" else None
    client.console(f"python print({expression})")
    return "".join(out).strip()


def test_mi_target_reads_what_gdb_reads(mi_at_multicall):
    client, _ = mi_at_multicall
    for thread in (1, 2):
        client.command(f"-thread-select {thread}")
        target = MiTarget(client, thread)
        assert isinstance(target, Target)
        for name in REGISTERS:
            expected = int(gdb_python(client, f"int(gdb.newest_frame().read_register('{name}')) & (2**64 - 1)"))
            assert target.read_register(name) == expected, (thread, name)
        pc = target.read_register("pc")
        for address, size in ((pc, 16), (0x405AE0, 3 * 32), (0x400000, 4096)):
            expected = gdb_python(client, f"bytes(gdb.selected_inferior().read_memory({address}, {size})).hex()")
            assert target.read_memory(address, size).hex() == expected
    with pytest.raises(UnreadableMemory):
        MiTarget(client, 1).read_memory(0xFFFFF000, 16)


def test_decoding_over_mi_target_matches_gdb(mi_at_multicall):
    """The core decoders over MiTarget, in this process, decode what gdb's -xen-hypercall did."""
    client, _ = mi_at_multicall
    client.command("-thread-select 1")
    ours = Session()
    ours.settings.abi = "4.0"
    from xendbg.render import json as render_json

    mine = render_json.hypercall(ours.decode_here(MiTarget(client, 1), NoSymbols(), 0))
    theirs = json.loads(client.command("-xen-hypercall")["payload"]["json"])
    assert mine["name"] == theirs["name"] == "multicall"
    assert mine["detail"] == theirs["detail"] and mine["args"] == theirs["args"]


def test_mi_commands_give_the_json_data(mi_at_multicall):
    client, _ = mi_at_multicall
    answers = {}
    for command in ("-xen-hypercall", "-xen-multicall", "-xen-traps --registered", "-xen-callbacks --registered",
                    "-xen-vcpus", "-xen-check"):
        payload = client.command(command)["payload"]
        assert set(payload) == {"json"}, payload
        answers[command] = json.loads(payload["json"])
    assert answers["-xen-hypercall"]["name"] == "multicall"
    assert [e["op"] for e in answers["-xen-multicall"]["entries"]] == [17, 18, 3]
    assert {e["vector"] for e in answers["-xen-traps --registered"]["entries"]} == {3, 6, 13, 14, 0x80, 0x81}
    assert answers["-xen-check"]["pending"] == "multicall"
    assert [v["vcpu"] for v in answers["-xen-vcpus"]["vcpus"]] == [0, 1]
    # The same object `xen multicall --json` prints in the console.
    out = []
    client.on_record = lambda r: out.append(r["payload"]) if r.get("type") == "console" else None
    client.console("xen multicall --json")
    assert json.loads("".join(out)) == answers["-xen-multicall"]
    # --text: the renderers' text with colours, at the width asked.
    text = client.command("-xen-multicall --text 100")["payload"]["text"]
    assert "multicall batch at 0x405ae0: 3 entries" in text and "\x1b[" in text
    assert set(client.command("-xen-multicall --text-only 100")["payload"]) == {"text"}
    brief = client.command("-xen-hypercall --text 100 --brief")["payload"]
    assert json.loads(brief["json"]) == answers["-xen-hypercall"]
    assert "nr_calls" in brief["text"] and "multicall batch" not in brief["text"]  # the detail left out
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    assert max(len(line) for line in plain.splitlines()) <= 100
    # Errors are MI errors, one line.
    with pytest.raises(MiError, match=r"^give both ADDR and COUNT"):
        client.command("-xen-multicall 0x405ae0")
    with pytest.raises(MiError, match="--text wants COLUMNS"):
        client.command("-xen-traps --text x")


def test_xen_events_each_record_once(mi_at_multicall):
    client, stops = mi_at_multicall
    first = json.loads(client.command("-xen-events")["payload"]["json"])["events"]
    kinds = [e["event"] for e in first]
    assert kinds[0] == "start" and "call" in kinds and "return" in kinds
    assert kinds[-1] == "catch" and first[-1]["hypercall"]["name"] == "multicall"
    assert json.loads(client.command("-xen-events")["payload"]["json"])["events"] == []
    stops.run(client, "-exec-continue")  # to the second multicall
    answer = client.command("-xen-events --text 120")["payload"]
    second = json.loads(answer["json"])["events"]
    seqs = [e["seq"] for e in second if e["event"] == "call"]
    assert seqs and min(seqs) > max(e["seq"] for e in first if e["event"] == "call")  # nothing twice
    assert second[-1]["event"] == "catch" and answer["text"] == [""] * len(second)  # only entries have text
    client.console("xen catch delete")
    client.console("xen trace stop")
    client.command("-exec-continue")

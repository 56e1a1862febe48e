"""shim32 against Xen's source at each tag, point by point (fixtures/README.md, "Which Xen the shim follows"):
each behaviour is exercised by a scenario step, read back from the guest's transcript and from raw memory,
and xendbg's decoder, stopped on the same call, must say what the shim did."""

from __future__ import annotations

import re

import pytest
from conftest import XENDBG_SCRIPT as SCRIPT
from conftest import json_blocks

pytestmark = pytest.mark.platform

ABIS = ("2.0", "3.0", "4.0")
ENOSYS = -38
KCS = {"2.0": 0x0819, "3.0": 0xE019, "4.0": 0xE019}


def setup(abi: str) -> tuple[str, ...]:
    return (f"source {SCRIPT}", "set xen color off", f"set xen abi {abi}")


def words(out: str) -> list[int]:
    """The words of every `x/Nwx` dump, in order."""
    return [int(w, 16) for line in out.splitlines() if re.match(r"^0x[0-9a-f]+( <[^>]*>)?:\s", line)
            for w in re.findall(r"0x([0-9a-f]+)", line.split(":", 1)[1])]


@pytest.mark.parametrize("abi", ABIS)
def test_hypercall_numbers_past_the_table(boot_gdb, abi):
    """Point 1: Xen 2.0 and 3.0.0 mask the number with 31, so 32 and 64 run set_trap_table; 4.0 refuses 64
    (-ENOSYS) and takes 32 for event_channel_op.  The decoder, stopped at each call, says the same."""
    booted = boot_gdb("shim32", abi=abi, timeout=60)
    out = booted.gdb_batch(
        *setup(abi), "hbreak *xen_int82 if $eax == 32", "continue", "xen hc --json", "x/2wx $ebx", "delete",
        "hbreak *xen_int82 if $eax == 64", "continue", "xen hc --json", "x/2wx $ebx", "delete", "continue")
    assert "Traceback" not in out
    at32, at64 = json_blocks(out)
    raw = words(out)
    t = booted.finish().transcript
    for hc, step, (head, address) in ((at32, "hypercall.32", raw[0:2]), (at64, "hypercall.64", raw[2:4])):
        rules = [f["rule"] for f in hc["findings"]]
        if abi == "4.0":
            assert t.steps[step].rc == ENOSYS and t.steps[step].fields["delivered"] == "0"
            assert hc["name"] == ("event_channel_op" if step == "hypercall.32" else None)
            if step == "hypercall.64":
                assert rules == ["unknown-hypercall"] and "-ENOSYS" in hc["findings"][0]["message"]
            continue
        # The shim ran set_trap_table: the guest's int $n reached the handler through the new entry.
        assert t.steps[step].rc == 0 and t.steps[step].fields["delivered"] == "1"
        assert hc["name"] == "set_trap_table" and "hypercall-number-wraps" in rules
        assert "runs set_trap_table (number 0)" in hc["findings"][0]["message"]
        (entry,) = hc["detail"]["entries"]
        assert (entry["vector"], entry["cs"], entry["address"]) == (head & 0xFF, head >> 16, address)
        assert entry["vector"] == int(t.steps[step].fields["vector"], 0) and entry["cs"] == KCS[abi]

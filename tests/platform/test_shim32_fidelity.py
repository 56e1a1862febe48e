"""shim32 against Xen's source at each tag, point by point (fixtures/README.md, "Which Xen the shim follows"):
each behaviour is exercised by a scenario step, read back from the guest's transcript and from raw memory,
and xendbg's decoder, stopped on the same call, must say what the shim did."""

from __future__ import annotations

import json
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


SEED = """
import gdb, json
from xendbg.abi import get_abi
from xendbg.decode import GuestState, decode_call
from xendbg.decode.state import seed_initialised_vcpu
from xendbg.gdb.target import GdbTarget
abi, target, states = get_abi("{abi}", 32), GdbTarget(), {{}}
vgc = int(gdb.parse_and_eval("(unsigned int)&vgc"))
hc = decode_call(target, abi, 24, [0, 1, vgc])
changes = seed_initialised_vcpu(lambda v: states.setdefault(v, GuestState()), target, abi, hc, 0)
new = states[1]
print("SEEDED " + json.dumps({{"changes": changes, "traps": {{v: [e.cs, e.address] for v, e in new.trap_table.items()}},
                              "event": [new.callbacks["event"].selector, new.callbacks["event"].address]}}))
"""


@pytest.mark.parametrize("abi", ["3.0", "4.0"])
def test_vcpu_initialise_checks_and_the_new_vcpus_own_context(boot_gdb, tmp_path, abi):
    """Point 2, faulty guest: no page table (-EINVAL), CS/SS with RPL 0 (3.0.0 -EINVAL, 4.0 fixed up), an
    unknown command (3.0.0: 0, 4.0: -ENOSYS), and an event callback selector with RPL 0 (not checked by
    3.0.0, fixed up by 4.0).  The decoder's findings at each call agree with the shim's result; vCPU 1 runs
    its context's int3 handler, and xendbg's state seeded from that context is what the shim holds."""
    script = tmp_path / "seed.py"
    script.write_text(SEED.format(abi=abi))
    booted = boot_gdb("shim32", abi=abi, faulty=True, timeout=60)
    out = booted.gdb_batch(
        *setup(abi), "hbreak *xen_int82 if $eax == 24 && ($ebx == 0 || $ebx == 99)",
        *("continue", "xen hc --json") * 4, "delete", "hbreak *xen_int82 if $eax == 24 && $ebx == 1", "continue",
        f"source {script}", "x/2wx &vcpus[1].traps[3]", "x/2hx &vcpus[1].event_cs", "x/1wx &vcpus[1].event_eip",
        "delete", "continue")
    assert "Traceback" not in out
    calls = json_blocks(out)
    t = booted.finish().transcript
    steps = ["vcpu_op.initialise.no_cr3", "vcpu_op.initialise.rpl0", "vcpu_op.bogus", "vcpu_op.initialise"]
    rcs = [t.steps[s].rc for s in steps]
    assert rcs == ([-22, -22, 0, 0] if abi == "3.0" else [-22, 0, ENOSYS, -17])
    for hc, rc in zip(calls, rcs, strict=True):
        errors = [f["rule"] for f in hc["findings"] if f["severity"] == "error"]
        # Xen refuses exactly what the decoder calls an error (-EEXIST: vCPU 1 was initialised already).
        assert bool(errors) == (rc < 0 and rc != -17), (hc["findings"], rc)
        if rc == -22:
            assert all("-EINVAL" in f["message"] for f in hc["findings"] if f["severity"] == "error")
    assert [f["rule"] for f in calls[0]["findings"] if f["severity"] == "error"] == ["vcpu-context-cr3"]
    assert "returns 0" in calls[2]["findings"][0]["message"] if abi == "3.0" else "-ENOSYS" in out
    # vCPU 1 took its trap table from the context: its int3 reached its own handler.
    assert t.steps["vcpu1"].fields["int3"] == "1" and int(t.steps["vcpu1"].fields["cs"], 0) == KCS[abi]
    seeded = json.loads(out.split("SEEDED ", 1)[1].splitlines()[0])
    raw = words(out)
    trap3, event_cs, event_eip = raw[0:2], raw[2] & 0xFFFF, raw[4]
    assert seeded["traps"] == {"3": [trap3[0] >> 16, trap3[1]]}
    assert seeded["event"] == [event_cs, event_eip]
    assert event_cs == (0xE018 if abi == "3.0" else 0xE019)  # 3.0.0 keeps RPL 0, 4.0 raised it

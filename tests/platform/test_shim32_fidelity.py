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


@pytest.mark.parametrize("abi", ABIS)
def test_null_trap_table(boot_gdb, abi):
    """Point 4: a NULL set_trap_table fails with -EFAULT on 2.0 and 3.0.0 and clears the whole virtual IDT
    from 3.0.2 (4.0 here).  The decoder says so at the pending call, xendbg's registered state (traced)
    follows, and the shim's table read raw agrees."""
    booted = boot_gdb("shim32", abi=abi, faulty=True, timeout=60)
    out = booted.gdb_batch(
        *setup(abi), "xen trace start", "hbreak *xen_int82 if $eax == 0 && $ebx == 0", "continue", "xen hc --json",
        "delete", "hbreak *xen_int82 if $eax == 0", "continue",
        # the registered state itself (`xen traps --registered` says "seen no trap table" when it is empty)
        "python import json; from xendbg.gdb import context; print('REGISTERED', json.dumps({'entries': [{'vector': v, "
        "'address': e.address} for v, e in context.SESSION.state(0).trap_table.items()], 'seen': "
        "context.SESSION.state(0).table is not None}))",
        "x/2wx &vcpus[0].traps[3]", "x/2wx &vcpus[0].traps[14]", "delete", "xen trace stop", "continue")
    assert "Traceback" not in out
    (null,) = json_blocks(out)
    registered = json.loads(out.split("REGISTERED ", 1)[1].splitlines()[0])
    raw = words(out)
    t = booted.finish().transcript
    assert null["name"] == "set_trap_table" and null["args"][0]["value"] == 0
    rules = [(f["rule"], f["severity"]) for f in null["findings"]]
    if abi == "4.0":
        assert t.steps["set_trap_table.null"].rc == 0
        assert rules == [("trap-table-null", "info")]
        assert raw == [0, 0, 0, 0]                      # vectors 3 and 14 gone from the shim's table
        assert registered == {"entries": [], "seen": True}  # and from xendbg's registered state
    else:
        assert t.steps["set_trap_table.null"].rc == -14
        assert rules == [("unreadable-memory", "error")] and "-EFAULT" in null["findings"][0]["message"]
        assert raw[1] and raw[3]                        # vectors 3 and 14 still installed
        kept = {e["vector"]: e["address"] for e in registered["entries"]}
        assert (kept[3], kept[14]) == (raw[1], raw[3])
    assert t.steps["set_trap_table.restore"].rc == 0 and t.done


@pytest.mark.parametrize("abi", ABIS)
def test_stack_switch_selector_rpl(boot_gdb, abi):
    """Point 5: stack_switch with an SS of RPL 0 (2.0, 3.0.0: -EPERM; 4.0: raised to 1) and RPL 3 (3.0.0:
    -EPERM; 2.0, 4.0: taken as is).  The decoder's errors are the calls the shim refused; the ring-1 stack
    selector in the TSS, read raw after each call, is what Xen would have loaded."""
    booted = boot_gdb("shim32", abi=abi, faulty=True, timeout=60)
    out = booted.gdb_batch(
        *setup(abi), "hbreak *xen_int82 if $eax == 3 && ($ebx & 3) != 1", "continue", "xen hc --json",
        "continue", "xen hc --json", "x/2wx &tss[0].esp1", "delete", "hbreak *xen_int82 if $eax == 3",
        "continue", "x/2wx &tss[0].esp1", "delete", "continue")
    assert "Traceback" not in out
    calls = json_blocks(out)
    ss_after = [w & 0xFFFF for w in words(out)[1::2]]
    t = booted.finish().transcript
    kds = KCS[abi] + 8
    rcs = [t.steps["stack_switch.rpl0"].rc, t.steps["stack_switch.rpl3"].rc]
    assert rcs == {"2.0": [-1, 0], "3.0": [-1, -1], "4.0": [0, 0]}[abi]
    for hc, rc in zip(calls, rcs, strict=True):
        errors = [f for f in hc["findings"] if f["severity"] == "error"]
        assert bool(errors) == (rc < 0) and all("-EPERM" in f["message"] for f in errors)
    assert ss_after == {"2.0": [kds, kds | 3], "3.0": [kds, kds], "4.0": [kds, kds | 3]}[abi]
    assert t.steps["stack_switch.restore"].rc == 0 and t.done


def gate(lo: int, hi: int) -> tuple[int, int, int, int]:
    """An IDT entry read as two words: (selector, offset, type, DPL)."""
    return lo >> 16, (lo & 0xFFFF) | (hi & 0xFFFF0000), (hi >> 8) & 0xF, (hi >> 13) & 3


def test_fast_trap_moves_and_goes(boot_gdb):
    """Point 6 (Xen 2.0): set_fast_trap(0x21) zeroes the 0x80 gate and installs 0x21; set_fast_trap(0) zeroes
    that one.  Read raw from the shim's IDT, from the guest's transcript (int $0x21 enters through the gate,
    then through the shim's #GP forwarding), and from xendbg's registered state, which must follow."""
    booted = boot_gdb("shim32", abi="2.0", faulty=True, timeout=60)
    out = booted.gdb_batch(
        *setup("2.0"), "xen trace start", "hbreak *xen_int82 if $eax == 11 && $ebx == 0", "continue",
        "xen hc --json", "xen callbacks --json", "x/2wx &idt[0x80]", "x/2wx &idt[0x21]", "p/x (unsigned int)trap_wrap",
        "delete", "hbreak *xen_int82 if $eax == 6", "continue", "xen callbacks --json", "x/2wx &idt[0x80]",
        "x/2wx &idt[0x21]", "delete", "xen trace stop", "continue")
    assert "Traceback" not in out
    off, moved, gone = json_blocks(out)
    raw = words(out)
    handler = int(re.findall(r"^\$\d+ = (0x[0-9a-f]+)$", out, re.M)[0], 16)
    t = booted.finish().transcript
    # After set_fast_trap(0x21): no gate at 0x80 any more, a DPL-3 trap gate at 0x21 to the handler.
    assert raw[0:2] == [0, 0]
    assert gate(*raw[2:4]) == (KCS["2.0"], handler, 0xF, 3)
    assert moved["fast_trap"]["vector"] == 0x21 and moved["fast_trap"]["handler"]["address"] == handler
    assert [f["rule"] for f in off["findings"]] == ["fast-trap-disable"]
    assert "vector 0x21" in off["findings"][0]["message"]
    # After set_fast_trap(0): both entries zero, and no fast trap registered.
    assert raw[4:8] == [0, 0, 0, 0] and gone["fast_trap"] is None
    lines = t.lines
    move, stop = lines.index(t.steps["set_fast_trap.move"].line), lines.index(t.steps["set_fast_trap.off"].line)
    bounced = [i for i, line in enumerate(lines) if "int $0x21 from ring 1 bounced" in line]
    assert t.steps["set_fast_trap.move"].rc == 0 and t.steps["set_fast_trap.move"].fields["delivered"] == "1"
    assert t.steps["set_fast_trap.off"].rc == 0 and t.steps["set_fast_trap.off"].fields["delivered"] == "1"
    assert len(bounced) == 1 and move < bounced[0] < stop  # the gate first, the shim's #GP path after


@pytest.mark.parametrize("abi", ["3.0", "4.0"])
def test_preempted_multicall_is_continued(boot_gdb, abi):
    """Point 8: an event sent to ourselves from entry 1 of multicall#4 is pending and unmasked, so Xen 3.0+
    preempts the batch (3.0.0 after entry 1, 4.0 before entry 2) and the guest re-executes int $0x82 with
    the list advanced by two entries and three left.  `xen catch hypercall multicall` calls exactly that stop
    Xen's continuation; the raw batch shows entries 0-1 done before it, the transcript one call of 5."""
    booted = boot_gdb("shim32", abi=abi, timeout=60)
    out = booted.gdb_batch(
        *setup(abi), "xen catch hypercall multicall",
        *("continue", "xen hc --json", "x/2wx $ebx - 64 + 4") * 4, "xen catch delete", "continue")
    assert "Traceback" not in out
    caught = re.findall(r"^xendbg: cpu 0 caught hypercall multicall \((.*)\)$", out, re.M)
    calls = json_blocks(out)
    t = booted.finish().transcript
    assert len(caught) == len(calls) == 4
    continued = [label.endswith("Xen's continuation of the preempted call") for label in caught]
    assert continued == [False, False, False, True]
    first, again = calls[2]["args"], calls[3]["args"]
    assert (again[0]["value"], again[1]["value"]) == (first[0]["value"] + 2 * 32, first[1]["value"] - 2)
    assert first[1]["value"] == int(t.steps["multicall#4"].fields["entries"]) == 5
    shim = [line for line in t.lines if line.startswith("[shim] preempted: hypercall 13")]
    assert shim == [f"[shim] preempted: hypercall 13 continues at {again[0]['value']:08x}, 3"]
    # at the continuation, entries 0 and 1 have their results already (raw, in the 3.0 layout)
    done = words(out)[6:8]
    assert done == [t.steps["multicall#4.entry0"].rc, t.steps["multicall#4.entry1"].rc]
    assert [e["op"] for e in calls[3]["detail"]["entries"]] == [17, 18, 17]
    assert t.steps["event.preempt"].rc == 0 and t.steps["event.preempt"].fields["count"] == "1"
    assert all(t.steps[f"multicall#4.entry{i}"].rc >= 0 for i in range(5)) and t.done


def test_nested_multicall_result_on_2_0(boot_gdb):
    """Point 3: Xen 2.0 skips a nested multicall and writes its own multicall_return_from_call, an address
    in its text from 0xFC500000, as that entry's result: negative as a signed value.  The shim writes such an
    address, the guest sees a failure, and the decoder says what the value is, before and after the call."""
    booted = boot_gdb("shim32", abi="2.0", faulty=True, timeout=60)
    out = booted.gdb_batch(
        *setup("2.0"), "hbreak *xen_int82 if $eax == 13", "continue", "continue", "continue", "xen hc --json",
        "delete", "hbreak *xen_int82 if $eax == 18", "continue", "xen multicall 0x405ae0 3 --results --json",
        "x/1wx 0x405ae0 + 32 + 24", "delete", "continue")
    assert "Traceback" not in out
    pending, ran = json_blocks(out)
    (raw,) = words(out)
    t = booted.finish().transcript
    assert pending["args"][0]["value"] == 0x405AE0 and pending["detail"]["entries"][1]["op"] == 13
    (nested,) = [f for f in pending["findings"] if f["rule"] == "multicall-nested"]
    assert "multicall_return_from_call" in nested["message"] and "negative" in nested["message"]
    assert raw >= 0xFC500000 and t.steps["multicall#3.entry1"].rc == raw - 2**32 < 0
    entry = ran["entries"][1]
    assert entry["result"] == raw - 2**32 and "multicall_return_from_call" in entry["result_name"]
    assert [e["result"] for e in ran["entries"]] == [t.steps[f"multicall#3.entry{i}"].rc for i in range(3)]


STATE = ("python import json; from xendbg.gdb import context; s = context.SESSION.state(0); "
         "print('STATE', json.dumps({'nmi': s.callbacks['nmi'].address if 'nmi' in s.callbacks else None, "
         "'trap2': s.trap_table[2].address if 2 in s.trap_table else None}))")


def test_callback_op_on_4_0(boot_gdb):
    """Point 9: under 4.0 unregistering the event or failsafe callback is -EINVAL; an NMI callback is
    registered as trap-table vector 2 (IF flag, flat kernel CS) and unregistered again; failsafe takes
    CALLBACKF_mask_events.  Decoder findings, xendbg's registered state and the shim's memory agree."""
    booted = boot_gdb("shim32", abi="4.0", faulty=True, timeout=60)
    out = booted.gdb_batch(
        *setup("4.0"), "xen trace start", "hbreak *xen_int82 if $eax == 30 && $ebx == 1",
        "continue", "xen hc --json", "continue", "xen hc --json", "continue", "xen hc --json", STATE,
        "x/2wx &vcpus[0].traps[2]", "x/1wx &vcpus[0].failsafe_masks_events", "p/x (unsigned int)trap_wrap", "delete",
        "hbreak *xen_int82 if $eax == 18", "continue", STATE, "x/2wx &vcpus[0].traps[2]", "delete",
        "xen trace stop", "continue")
    assert "Traceback" not in out
    calls = json_blocks(out)
    states = [json.loads(line.split("STATE ", 1)[1]) for line in out.splitlines() if line.startswith("STATE ")]
    raw = words(out)
    handler = int(re.findall(r"^\$\d+ = (0x[0-9a-f]+)$", out, re.M)[0], 16)
    t = booted.finish().transcript
    steps = ["callback_op.unregister_event", "callback_op.unregister_failsafe", "callback_op.unregister_nmi"]
    assert [t.steps[s].rc for s in steps] == [-22, -22, 0]
    for hc, step in zip(calls, steps, strict=True):
        errors = [f for f in hc["findings"] if f["severity"] == "error"]
        assert bool(errors) == (t.steps[step].rc < 0) and all("-EINVAL" in f["message"] for f in errors)
    assert t.steps["callback_op.nmi"].rc == 0 and t.steps["callback_op.failsafe_mask"].rc == 0
    # registered: vector 2 in the shim's table and in xendbg's state; failsafe masks events
    vector, flags, cs = raw[0] & 0xFF, (raw[0] >> 8) & 0xFF, raw[0] >> 16   # trap_info { vector, flags, cs, address }
    assert (vector, flags, cs, raw[1]) == (2, 4, KCS["4.0"], handler)
    assert raw[2] == 1
    assert states[0] == {"nmi": handler, "trap2": handler}
    # unregistered: gone from both
    assert raw[3:5] == [0, 0] and states[1] == {"nmi": None, "trap2": None}


@pytest.mark.parametrize("abi", ABIS)
def test_int80_gate_with_if_flag_and_block(boot_gdb, abi):
    """Point 7: vector 0x80 re-registered with the IF flag: 3.0.0 leaves the old direct gate (stale), 4.0
    clears it (the shim's own gate again) -- read raw from the IDT, as the decoder says at the call.
    SCHEDOP_block clears the event mask in every generation: the timer event pending while masked is
    delivered then (transcript), and the decoder says so at the block."""
    gate_steps = () if abi == "2.0" else (
        "hbreak *xen_int82 if $eax == 0 && *(unsigned char *)$ebx == 0x80 && *(unsigned char *)($ebx + 1) == 7",
        "continue", "xen hc --json", "delete", "hbreak *xen_int82 if $eax == 0 && $ebx == 0", "continue",
        "x/2wx &idt[0x80]", "p/x (unsigned int)int80_entry", "delete")
    booted = boot_gdb("shim32", abi=abi, faulty=True, timeout=60)
    out = booted.gdb_batch(*setup(abi), *gate_steps, "hbreak *xen_int82 if ($eax == 6 || $eax == 29) && $ebx == 1",
                           "continue", "xen hc --json", "delete", "continue")
    assert "Traceback" not in out
    blocks = json_blocks(out)
    t = booted.finish().transcript
    block = t.steps["sched_op.block"]
    assert block.rc == 0 and block.fields == {"masked_delivered": "0", "delivered": "1", "mask": "0"}
    assert [f["rule"] for f in blocks[-1]["findings"]] == ["block-unmasks"]
    if abi == "2.0":
        return
    at_call, raw = blocks[0], words(out)
    handler = int(re.findall(r"^\$\d+ = (0x[0-9a-f]+)$", out, re.M)[0], 16)
    assert t.steps["set_trap_table.int80_if"].rc == 0
    if abi == "3.0":
        assert gate(*raw) == (KCS[abi], handler, 0xF, 3)          # the old gate, to int80_entry
        assert [f["rule"] for f in at_call["findings"]] == ["int80-gate-stale"]
    else:
        assert gate(*raw)[0] == 0x08 and gate(*raw)[3] == 0      # the shim's own: int $0x80 goes to Xen
        assert [f["rule"] for f in at_call["findings"]] == ["int80-gate-none"]


NULL_DELIVERY = {  # abi -> (what the test clears, what happens)
    ("trap", "2.0"): ("vcpus[0].traps[3].address", "enters 0"),
    ("trap", "3.0"): ("vcpus[0].traps[3].address", "bounce to a null address"),
    ("trap", "4.0"): ("vcpus[0].traps[3].cs", "bounce with a null CS"),
    ("event", "2.0"): ("vcpus[0].event_eip", "enters 0"),
    ("event", "3.0"): ("vcpus[0].event_eip", "bounce to a null address"),
    ("event", "4.0"): ("vcpus[0].event_eip", "enters 0"),
}


@pytest.mark.parametrize("kind,abi", sorted(NULL_DELIVERY))
def test_delivery_to_nothing(boot_gdb, kind, abi):
    """Point 7: a trap or an event delivered where nothing is registered (the shim's table cleared by gdb,
    as if never registered): 2.0 checks nothing and enters address 0; 3.0.0 crashes the domain on a null
    address; 4.0 only on a null CS, entering address 0 otherwise.  The decoder's rule says the same."""
    from xendbg.abi import get_abi
    from xendbg.decode.rules import null_delivery

    field, outcome = NULL_DELIVERY[(kind, abi)]
    stop = "$eax == 13" if kind == "trap" else ("$eax == 32 && $ebx == 1" if abi == "4.0" else "$eax == 16")
    booted = boot_gdb("shim32", abi=abi, timeout=30)
    out = booted.gdb_batch(f"hbreak *xen_int82 if {stop}", "continue", f"set var {field} = 0", "delete",
                           "hbreak *0", "continue", "p/x $pc", "p/x $cs", timeout=30)
    says = null_delivery(get_abi(abi, 32), f"the {kind} handler")
    if outcome == "enters 0":
        assert re.findall(r"^\$\d+ = (0x[0-9a-f]+)$", out, re.M) == ["0x0", hex(KCS[abi])], out
        assert "enters" in says and "address 0" in says
        booted.stop()
        return
    res = booted.finish()
    assert not res.ok and f"[shim] domain crash: {outcome}" in res.transcript.text()
    assert "crashes the domain" in says
    assert ("null CS" in says) == (abi == "4.0")


@pytest.mark.parametrize("abi,magic", [("3.0", "xen-3.0-x86_32"), ("4.0", "xen-3.0-x86_32p")])
def test_start_info_magic(boot_gdb, abi, magic):
    """Point 10: start_info.magic as domain_build.c writes it (4.0: "xen-3.0-x86_%d%s", "p" for PAE)."""
    booted = boot_gdb("shim32", abi=abi, timeout=30)
    out = booted.gdb_batch("hbreak *xen_int82", "continue", "x/s (char *)&start_info", "delete", "continue")
    assert re.search(rf'<start_info>:\s+"{re.escape(magic)}"$', out, re.M), out
    assert booted.finish().ok

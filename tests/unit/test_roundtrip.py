"""Properties that assert meaning: what a guest hands Xen, packed with the public layouts for every
generation and width, decodes back to the same fields; and each way of getting it wrong gets exactly
the finding (rule and severity) that Xen's rule for that generation gives (decode/rules.py cites the
hypervisor code at each tag).  The expected findings are spelled out here, not computed by xendbg."""

from __future__ import annotations

from hypothesis import assume, given
from hypothesis import strategies as st

from tests.unit.budget import budget
from tests.unit.images import pack, pack_many
from xendbg.abi import GENERATIONS, get_abi
from xendbg.decode import Callbacks, StructFields, decode_call, decode_multicall, decode_trap_table
from xendbg.target import InMemoryTarget

TABLE, CTXT = 0x10000, 0x40000
SETTINGS = budget(100)
OLD = ("2.0", "3.0")  # refuse a wrong-RPL code selector with -EPERM; from 3.0.2 Xen raises the RPL itself
KERNEL_RPL = {32: 1, 64: 3}  # GUEST_KERNEL_RPL: ring 1 on x86_32, ring 3 on x86_64
# Before 3.0.3 the hypercall entry and do_multicall mask the number with NR_hypercalls-1 (32 hypercalls)
# instead of refusing it (x86_32/entry.S at RELEASE-2.0.0, RELEASE-3.0.0, 3.0.2-branched).
WRAPS = ("2.0", "3.0", "3.0.2")

abis = st.builds(get_abi, st.sampled_from(GENERATIONS), st.sampled_from([32, 64]))


def rpl_finding(generation: str, width: int, rpl: int) -> list[tuple[str, str]]:
    """Xen's verdict on a code selector of RPL `rpl` that is not the flat kernel CS."""
    kernel = KERNEL_RPL[width]
    if rpl == kernel:
        return []
    if generation in OLD:
        return [("selector-rpl", "error")]
    return [("selector-rpl", "info" if rpl < kernel else "warning")]


def int80_findings(abi, rows) -> list[tuple[str, str]]:
    """init_int80_direct_trap (x86_32/traps.c) on a vector-0x80 entry with the IF flag (4): RELEASE-3.0.0
    leaves the old direct gate (stale), 3.0.2 on give it none; 2.0 and 64-bit guests have no such gate."""
    if abi.width != 32 or abi.generation == "2.0":
        return []
    verdict = ("int80-gate-stale", "warning") if abi.generation == "3.0" else ("int80-gate-none", "info")
    return [verdict for r in rows if r["vector"] == 0x80 and r["flags"] & 4]


def rules_of(found) -> list[tuple[str, str]]:
    return [(f.rule, f.severity) for f in found]


def addresses(width: int, *, zero: bool = False):
    """Code addresses a guest may use: any 32-bit one, or a canonical 64-bit one."""
    low = 0 if zero else 1
    if width == 32:
        return st.integers(low, 2**32 - 1)
    return st.integers(low, 2**47 - 1) | st.integers(2**64 - 2**47, 2**64 - 1)


def non_canonical():
    return st.integers(2**47, 2**64 - 2**47 - 1)


@st.composite
def kernel_selectors(draw, abi):
    """A code selector Xen accepts in every generation: the flat kernel CS, or any GDT/LDT selector
    with the kernel's RPL below Xen's reserved GDT entries."""
    return draw(st.just(abi.kernel_cs) | st.builds(lambda i, ti: i << 3 | ti << 2 | abi.kernel_rpl,
                                                    st.integers(1, 255), st.integers(0, 1)))


@st.composite
def trap_rows(draw, abi):
    vectors = draw(st.lists(st.integers(0, 255), unique=True, min_size=1, max_size=24))
    return [{"vector": v, "flags": draw(st.integers(0, 7)), "cs": draw(kernel_selectors(abi)),
             "address": draw(addresses(abi.width))} for v in vectors]


TERMINATOR = {"vector": 0, "flags": 0, "cs": 0, "address": 0}


def decode_table(abi, rows, *, terminated: bool = True):
    data = pack_many(abi, "trap_info", rows + [TERMINATOR] * terminated)
    return decode_trap_table(InMemoryTarget(memory=[(TABLE, data)]), abi, TABLE)


# --- trap tables --------------------------------------------------------------------------------------

@SETTINGS
@given(st.data())
def test_valid_trap_table_round_trips(data):
    abi = data.draw(abis)
    rows = data.draw(trap_rows(abi))
    table, found = decode_table(abi, rows)
    assert table.terminated and rules_of(found) == int80_findings(abi, rows)
    assert [(e.index, e.vector, e.flags, e.cs, e.address) for e in table.entries] == [
        (i, r["vector"], r["flags"], r["cs"], r["address"]) for i, r in enumerate(rows)]
    assert [(e.dpl, e.interrupt_flag, e.rpl) for e in table.entries] == [
        (r["flags"] & 3, bool(r["flags"] & 4), r["cs"] & 3) for r in rows]


@SETTINGS
@given(st.data())
def test_wrong_rpl_in_a_trap_table_gets_the_generations_verdict(data):
    abi = data.draw(abis)
    rows = data.draw(trap_rows(abi))
    rpl = data.draw(st.integers(0, 3).filter(lambda r: r != abi.kernel_rpl))
    bad = data.draw(st.integers(0, len(rows) - 1))
    rows[bad]["cs"] = (data.draw(st.integers(1, 255)) << 3) | rpl
    assume(sum(r["cs"] == rows[bad]["cs"] for r in rows) == 1)
    table, found = decode_table(abi, rows)
    assert rules_of(found) == rpl_finding(abi.generation, abi.width, rpl) + int80_findings(abi, rows)
    assert table.entries[bad].rpl == rpl


@SETTINGS
@given(st.data())
def test_non_canonical_handler_is_an_error_for_64_bit_guests(data):
    abi = get_abi(data.draw(st.sampled_from(GENERATIONS)), 64)
    rows = data.draw(trap_rows(abi))
    bad = data.draw(st.integers(0, len(rows) - 1))
    rows[bad]["address"] = data.draw(non_canonical())
    table, found = decode_table(abi, rows)
    assert rules_of(found) == [("non-canonical", "error")]
    assert table.entries[bad].address == rows[bad]["address"]
    assert ("-EINVAL" in found[0].message) == (abi.generation not in ("2.0", "3.0", "3.0.2", "3.0.3"))


@SETTINGS
@given(st.data())
def test_missing_terminator(data):
    abi = data.draw(abis)
    rows = data.draw(trap_rows(abi))
    table, found = decode_table(abi, rows, terminated=False)  # the mapping ends after the last entry
    assert not table.terminated and len(table.entries) == len(rows)
    assert rules_of(found) == [("unreadable-memory", "error")]
    # 256 entries and still no terminator: Xen would read on; xendbg stops and says so.
    full = [{"vector": v, "flags": 0, "cs": abi.kernel_cs, "address": 0x1000 + v} for v in range(256)]
    table, found = decode_table(abi, full + rows, terminated=False)
    assert len(table.entries) == 256 and rules_of(found) == [("trap-table-unterminated", "error")]


# --- multicall batches --------------------------------------------------------------------------------

SIMPLE = ("xen_version", "stack_switch", "set_timer_op", "vm_assist", "fpu_taskswitch")  # no pointers followed


@st.composite
def batch_rows(draw, abi):
    mask = abi.address_mask
    rows = []
    for _ in range(draw(st.integers(1, 8))):
        op = abi.hypercall_named(draw(st.sampled_from(SIMPLE))).nr
        args = [draw(st.integers(0, 2**64 - 1)) & mask for _ in range(6 if abi.era == "3.0" else 7)]
        if op == abi.hypercall_named("stack_switch").nr and abi.width == 32:
            args[0] = args[0] & ~3 | 1  # a stack selector of the kernel's RPL: right in every generation
        result = draw(st.integers(0, mask))
        if abi.era == "3.0":
            rows.append({"op": op, "result": result, "args": args})
        else:
            args[5] = result  # Xen 2.0 writes the result into args[5]
            rows.append({"op": op, "args": args})
    return rows


def signed(value: int, width: int) -> int:
    return value - 2**width if value >= 2 ** (width - 1) else value


def run_batch(abi, rows, results=True):
    target = InMemoryTarget(memory=[(TABLE, pack_many(abi, "multicall_entry", rows))])
    return decode_multicall(target, abi, TABLE, len(rows), results=results)


@SETTINGS
@given(st.data())
def test_valid_multicall_batch_round_trips(data):
    abi = data.draw(abis)
    rows = data.draw(batch_rows(abi))
    batch, found = run_batch(abi, rows)
    assert found == () and batch.entry_findings() == () and not batch.truncated
    assert [e.call.nr for e in batch.entries] == [r["op"] for r in rows]
    for entry, row in zip(batch.entries, rows, strict=True):
        assert [a.value for a in entry.call.args] == row["args"][:len(entry.call.args)]
        raw = row["result"] if abi.era == "3.0" else row["args"][5]
        assert entry.result == signed(raw, abi.width)
        assert entry.address == TABLE + entry.index * abi.layout("multicall_entry").size
    pending, _ = run_batch(abi, rows, results=False)
    assert {e.result for e in pending.entries} == {None}


@SETTINGS
@given(st.data())
def test_nested_multicall_gets_the_generations_verdict(data):
    abi = data.draw(abis)
    rows = data.draw(batch_rows(abi))
    at = data.draw(st.integers(0, len(rows) - 1))
    rows[at]["op"] = abi.hypercall_named("multicall").nr
    batch, found = run_batch(abi, rows)
    assert rules_of(found) == [("multicall-nested", "error")] and batch.entry_findings() == ()
    assert found[0].message.startswith(f"entry {at} is itself a multicall")
    # 2.0 skips the entry (x86_32/entry.S); 3.0 on refuse it (common/multicall.c).
    assert ("skips it" in found[0].message) == (abi.generation == "2.0")
    assert ("-EINVAL" in found[0].message) == (abi.generation != "2.0")


@SETTINGS
@given(st.data())
def test_unknown_hypercall_in_a_batch(data):
    abi = data.draw(abis)
    rows = data.draw(batch_rows(abi))
    at = data.draw(st.integers(0, len(rows) - 1))
    wraps = abi.generation in WRAPS
    op = data.draw(st.integers(0, 31 if wraps else 63).filter(lambda n: abi.hypercall(n) is None))
    rows[at]["op"] = op
    batch, found = run_batch(abi, rows)
    removed = op == 11 and abi.generation != "2.0"  # set_fast_trap, gone from 3.0 on
    assert found == ()
    assert rules_of(batch.entry_findings()) == [("fast-trap-removed" if removed else "unknown-hypercall", "error")]
    assert batch.entries[at].call.name is None
    assert batch.entry_findings()[0].message.startswith(f"multicall entry {at}: ")
    if wraps:  # the same slot 32 higher lands on it again: still nothing to run, and said so
        rows[at]["op"] = op + 32
        batch, found = run_batch(abi, rows)
        assert found == () and rules_of(batch.entry_findings()) == [("hypercall-number-wraps", "error")]
        assert batch.entries[at].call.name is None


# --- vCPU contexts (VCPUOP_initialise, from 3.0) -----------------------------------------------------

@st.composite
def contexts(draw, abi):
    w = abi.width
    ip, sp = ("eip", "esp") if w == 32 else ("rip", "rsp")
    word = st.integers(0, 2**w - 1)
    traps = draw(trap_rows(abi))
    fields = {"flags": draw(st.integers(0, 0xFF)), "kernel_ss": draw(word), "kernel_sp": draw(word),
              "vm_assist": draw(word), "event_callback_eip": draw(addresses(w, zero=True)),
              "failsafe_callback_eip": draw(addresses(w, zero=True))}
    if w == 32:
        fields |= {"event_callback_cs": draw(kernel_selectors(abi)),
                   "failsafe_callback_cs": draw(kernel_selectors(abi))}
    else:
        fields |= {"syscall_callback_eip": draw(addresses(w, zero=True)), "fs_base": draw(word),
                   "gs_base_kernel": draw(word)}
    # a stack selector of the kernel's RPL (kernel_ss may also be 0, none given); Xen 3.0 refuses an SS
    # of RPL 0, 3.0.2 on raise it (arch_set_info_guest)
    stack = st.builds(lambda i: i << 2 | abi.kernel_rpl, st.integers(0, 0x3FFF))
    if w == 32:
        fields["kernel_ss"] = draw(st.just(0) | stack)
    regs = {ip: draw(addresses(w)), sp: draw(word), "cs": draw(kernel_selectors(abi)), "ss": draw(stack)}
    cr3 = draw(st.integers(1, 2**w - 1))  # 0 is no page directory: -EINVAL in every generation
    return fields, regs, cr3, traps


def initialise(abi, fields, regs, cr3, traps):
    ctxt = pack(abi, "vcpu_guest_context", user_regs=regs, ctrlreg=[0, 0, 0, cr3, 0, 0, 0, 0], trap_ctxt=traps,
                **fields)
    nr = abi.hypercall_named("vcpu_op").nr
    return decode_call(InMemoryTarget(memory=[(CTXT, ctxt)]), abi, nr, (0, 1, CTXT))


vcpu_abis = st.builds(get_abi, st.sampled_from([g for g in GENERATIONS if g != "2.0"]), st.sampled_from([32, 64]))


def test_no_vcpu_op_in_2_0():
    assert get_abi("2.0", 32).hypercall_named("vcpu_op") is None


@SETTINGS
@given(st.data())
def test_valid_vcpu_context_round_trips(data):
    abi = data.draw(vcpu_abis)
    fields, regs, cr3, traps = data.draw(contexts(abi))
    hc = initialise(abi, fields, regs, cr3, traps)
    assert hc.subop == "VCPUOP_initialise" and isinstance(hc.detail, StructFields)
    decoded = dict(hc.detail.fields)
    assert {k: decoded[k] for k in [*regs, *fields]} == regs | fields
    assert decoded["cr3"] == cr3 and decoded["trap_ctxt entries"] == len(traps)
    assert hc.findings == ()


@SETTINGS
@given(st.data())
def test_wrong_rpl_in_a_vcpu_context(data):
    abi = data.draw(vcpu_abis)
    fields, regs, cr3, traps = data.draw(contexts(abi))
    rpl = data.draw(st.integers(0, 3).filter(lambda r: r != abi.kernel_rpl))
    where = data.draw(st.sampled_from(["cs"] + (["event_callback_cs", "failsafe_callback_cs"] if abi.width == 32
                                                 else [])))
    selector = data.draw(st.integers(1, 255)) << 3 | rpl
    if where == "cs":
        regs["cs"] = selector
    else:
        fields[where] = selector
    hc = initialise(abi, fields, regs, cr3, traps)
    if abi.generation == "3.0":
        # RELEASE-3.0.0 arch_set_info_guest refuses only a CS (or SS) of RPL 0 and checks no callback CS
        expected = [("selector-rpl", "error")] if where == "cs" and rpl == 0 else []
    else:
        expected = rpl_finding(abi.generation, abi.width, rpl)
    assert rules_of(hc.findings) == expected


@SETTINGS
@given(st.data())
def test_vcpu_context_without_a_page_directory(data):
    abi = data.draw(vcpu_abis)
    fields, regs, _, traps = data.draw(contexts(abi))
    hc = initialise(abi, fields, regs, 0, traps)
    assert rules_of(hc.findings) == [("vcpu-context-cr3", "error")]


@SETTINGS
@given(st.data())
def test_unknown_vcpu_op(data):
    abi = data.draw(vcpu_abis)
    known = set(abi.enum("VCPUOP").values.values())
    cmd = data.draw(st.integers(0, 64).filter(lambda c: c not in known))
    hc = decode_call(InMemoryTarget(), abi, abi.hypercall_named("vcpu_op").nr, (cmd, 0, CTXT))
    # RELEASE-3.0.0 do_vcpu_op has no default case (returns 0); later ones fail with -ENOSYS
    severity = "warning" if abi.generation == "3.0" else "error"
    assert rules_of(hc.findings) == [("unknown-subop", severity)] and hc.detail is None


# --- callbacks ----------------------------------------------------------------------------------------

@SETTINGS
@given(st.data())
def test_set_callbacks_round_trips(data):
    abi = data.draw(abis)
    nr = abi.hypercall_named("set_callbacks").nr
    if abi.width == 32:
        sels = [data.draw(kernel_selectors(abi)) for _ in range(2)]
        addrs = [data.draw(addresses(32, zero=True)) for _ in range(2)]
        hc = decode_call(InMemoryTarget(), abi, nr, (sels[0], addrs[0], sels[1], addrs[1]))
        expected = [("event", addrs[0], sels[0], sels[0] & 3), ("failsafe", addrs[1], sels[1], sels[1] & 3)]
    else:
        addrs = [data.draw(addresses(64, zero=True)) for _ in range(3)]
        hc = decode_call(InMemoryTarget(), abi, nr, addrs)
        expected = [(k, a, None, None) for k, a in zip(("event", "failsafe", "syscall"), addrs, strict=True)]
    assert isinstance(hc.detail, Callbacks) and hc.detail.operation == "set_callbacks"
    assert [(c.kind, c.address, c.selector, c.rpl) for c in hc.detail.entries] == expected
    assert hc.findings == ()


@SETTINGS
@given(st.data())
def test_set_callbacks_wrong_rpl_or_non_canonical(data):
    abi = data.draw(abis)
    nr = abi.hypercall_named("set_callbacks").nr
    if abi.width == 32:
        rpl = data.draw(st.integers(0, 3).filter(lambda r: r != 1))
        args = [abi.kernel_cs, 0xC0100000, abi.kernel_cs, 0xC0100100]
        args[data.draw(st.sampled_from([0, 2]))] = data.draw(st.integers(1, 255)) << 3 | rpl
        expected = rpl_finding(abi.generation, 32, rpl)
    else:
        args = [0xFFFFFFFF81000000, 0xFFFFFFFF81000100, 0]
        args[data.draw(st.integers(0, 2))] = data.draw(non_canonical())
        expected = [("non-canonical", "error")]
    assert rules_of(decode_call(InMemoryTarget(), abi, nr, args).findings) == expected


callback_abis = st.builds(get_abi, st.sampled_from(["3.0.3", "4.0", "4.17", "4.22"]), st.sampled_from([32, 64]))


def register(abi, **fields):
    target = InMemoryTarget(memory=[(CTXT, pack(abi, "callback_register", **fields))])
    return decode_call(target, abi, abi.hypercall_named("callback_op").nr, (0, CTXT))


@SETTINGS
@given(st.data())
def test_callback_op_register_round_trips(data):
    abi = data.draw(callback_abis)
    types = abi.enum("CALLBACKTYPE").values
    kind = data.draw(st.sampled_from(sorted(types)))
    fields = {"type": types[kind], "flags": data.draw(st.integers(0, 1)), "address": data.draw(addresses(abi.width))}
    if abi.width == 32:
        fields["cs"] = data.draw(kernel_selectors(abi))
    hc = register(abi, **fields)
    # callback.h: CALLBACKF_mask_events is ignored for the event and NMI callbacks (always masked)
    ignored = fields["flags"] and kind in ("CALLBACKTYPE_event", "CALLBACKTYPE_nmi")
    assert hc.subop == "CALLBACKOP_register"
    assert rules_of(hc.findings) == ([("callback-mask-events", "info")] if ignored else [])
    (cb,) = hc.detail.entries
    assert (cb.kind, cb.address, cb.flags) == (kind.removeprefix("CALLBACKTYPE_"), fields["address"], fields["flags"])
    assert cb.flag_names == (("CALLBACKF_mask_events",) if fields["flags"] else ())
    assert (cb.selector, cb.rpl) == ((fields["cs"], fields["cs"] & 3) if abi.width == 32 else (None, None))


@SETTINGS
@given(st.data())
def test_callback_op_invalid_registrations(data):
    abi = data.draw(callback_abis)
    known = set(abi.enum("CALLBACKTYPE").values.values())
    fields = {"type": 0, "flags": 0, "address": 0xC0100000, "cs": abi.kernel_cs}
    mistake = data.draw(st.sampled_from(["rpl", "type", "subop"] + (["address"] if abi.width == 64 else [])))
    if mistake == "rpl":
        rpl = data.draw(st.integers(0, 3).filter(lambda r: r != abi.kernel_rpl))
        if abi.width == 32:
            fields["cs"] = data.draw(st.integers(1, 255)) << 3 | rpl
            expected = rpl_finding(abi.generation, 32, rpl)
        else:
            expected = []  # a 64-bit guest's callback has no selector: nothing to get wrong
    elif mistake == "type":
        fields["type"] = data.draw(st.integers(0, 0xFFFF).filter(lambda t: t not in known))
        expected = [("callback-type", "error")]
    elif mistake == "address":
        fields["address"] = data.draw(non_canonical())
        expected = [("non-canonical", "error")]
    else:
        cmd = data.draw(st.integers(2, 2**31))
        hc = decode_call(InMemoryTarget(), abi, abi.hypercall_named("callback_op").nr, (cmd, CTXT))
        assert rules_of(hc.findings) == [("unknown-subop", "error")] and hc.detail is None
        return
    if abi.width == 64:
        fields.pop("cs")
        fields["address"] = fields["address"] if mistake == "address" else 0xFFFFFFFF81000000
    assert rules_of(register(abi, **fields).findings) == expected

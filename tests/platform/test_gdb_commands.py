"""The `xen` commands' words, options, completion and help, in a real gdb with no target (fast)."""

from __future__ import annotations

import subprocess

import pytest
from conftest import XENDBG_SCRIPT as SCRIPT
from conftest import build

pytestmark = pytest.mark.platform


def gdb(*commands: str, guest: str | None = None) -> str:
    argv = ["gdb", "-nx", "-batch", "-ex", "set pagination off"]
    if guest:
        argv += ["-ex", f"file {guest}"]
    for c in [f"source {SCRIPT}", "set xen color off", *commands]:
        argv += ["-ex", c]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return r.stdout + r.stderr


def test_completion_offers_options_and_names_as_typed():
    out = gdb("complete xen multicall --", "complete xen catch hypercall --g", "complete xen trace start --f",
              "complete xen break trap P", "complete xen break trap p", "complete xen catch hypercall multi")
    lines = out.splitlines()
    assert "xen multicall --json" in lines and "xen multicall --results" in lines
    assert not any("----" in line for line in lines)
    assert "xen catch hypercall --guest" in lines
    assert "xen trace start --file" in lines
    assert "xen break trap PF" in lines and "xen break trap pf" in lines
    assert "xen catch hypercall multicall" in lines


def test_every_command_rejects_words_it_does_not_take():
    out = gdb("xen hypercall extra words", "xen trace show 1 2", "xen catch delete x", "xen break trap 0x80 --json",
              "xen vcpus --bogus", "xen multicall 0x1000")
    assert "unexpected 'extra words' (usage: xen hypercall [--json])" in out
    assert "unexpected '2' (usage: xen trace show [N] [--json])" in out
    assert "xendbg catches no hypercalls" in out
    assert "unknown option --json (usage: xen break trap VECTOR)" in out
    assert "unknown option --bogus (usage: xen vcpus [--json])" in out
    assert "give both ADDR and COUNT" in out
    assert "Traceback" not in out


def test_prefixes_alone_say_something_and_help_names_the_settings():
    out = gdb("xen", "xen trace", "set xen", "show xen", "help set xen", "xen vcpus")
    assert "Decoding:  xen hypercall (xen hc)" in out
    assert "no trace is running (xen trace start)" in out
    assert "set xen abi auto|2.0|..." in out
    assert "auto (now Xen 4.22: guessed: no evidence of the Xen version)" in out
    assert "GDB command object" not in out and "abi     the Xen ABI generation" in out
    assert "no target: connect gdb to the guest first" in out


def test_catches_add_up_and_delete_by_name():
    guest = build("shim32", "2.0")["guest"]
    out = gdb("xen catch hypercall multicall", "xen catch hypercall set_trap_table", "xen catch",
              "xen catch delete multicall", "xen catch", "xen catch delete sched_op", "xen catch delete", "xen catch",
              "xen catch hypercall no_such_call", guest=guest)
    assert "xendbg: catching multicall, set_trap_table, observing" in out
    assert "catching set_trap_table; observing" in out
    assert "not caught: sched_op (catching set_trap_table)" in out
    assert "xendbg catches no hypercalls" in out
    assert "has no hypercall 'no_such_call', and no other Xen has one" in out


def test_a_refused_name_says_which_xen_has_it():
    guest = build("shim32", "2.0")["guest"]
    out = gdb("set xen abi 4.17", "xen catch hypercall set_fast_trap", "set xen abi auto",
              "xen catch hypercall set_fast_trap", guest=guest)
    assert "Xen 4.17 (set by hand) has no hypercall 'set_fast_trap': only Xen 2.0 has it (set xen abi 2.0)" in out
    assert "xendbg: catching set_fast_trap" in out  # under a guess, every generation the evidence allows


def test_trace_show_counts_must_be_positive():
    guest = build("shim32", "2.0")["guest"]
    out = gdb("xen trace start", "xen trace show 0", "xen trace show -3", "xen trace stop", guest=guest)
    assert "N must be 1 or more, not 0" in out and "N must be 1 or more, not -3" in out
    assert "xendbg: trace stopped: 0 hypercalls traced" in out

"""Report assembly shared by every front end: what the `traps`, `callbacks` and `check` views show of
the registered state and a pending call, as decoded dataclasses and findings (the renderers in
xendbg/render turn them into text or JSON).  Nothing here reads the target.
"""

from __future__ import annotations

from dataclasses import replace

from xendbg.abi import Abi
from xendbg.decode.model import SEVERITIES, Callbacks, FastTrap, Finding, GuestState, Hypercall, TrapTable
from xendbg.decode.state import check_state

# Which findings each view shows, by Finding.subject.
TRAP_SUBJECTS = ("trap_table",)
CALLBACK_SUBJECTS = ("callbacks", "fast_trap")


def registered_trap_table(state: GuestState, abi: Abi) -> tuple[TrapTable, tuple[Finding, ...]]:
    """The virtual IDT as the guest's registrations left it (entries merged by vector, numbered anew)."""
    entries = tuple(replace(entry, index=i)
                    for i, entry in enumerate(sorted(state.trap_table.values(), key=lambda e: e.vector)))
    last = state.table.address if state.table else 0
    table = TrapTable(last, entries, True, note=f"registered: {len(entries)} vectors, merged from every "
                      f"set_trap_table xendbg saw (the last one's array at {last:#x})")
    return table, tuple(f for f in check_state(state, abi) if f.subject in TRAP_SUBJECTS)


def registered_callbacks(state: GuestState, abi: Abi) -> tuple[Callbacks, FastTrap | None, tuple[Finding, ...]]:
    """The callbacks and the fast trap the guest registered, with the findings about them."""
    found = tuple(f for f in check_state(state, abi) if f.subject in CALLBACK_SUBJECTS)
    return Callbacks("registered", tuple(state.callbacks.values())), state.fast_trap, found


def check(pending: Hypercall | None, state: GuestState, abi: Abi) -> list[Finding]:
    """Every finding over the pending call and the registered state, errors first, each once."""
    found = list(pending.all_findings()) if pending is not None else []
    found += check_state(state, abi)
    unique = list({(f.rule, f.severity, f.message): f for f in found}.values())
    return sorted(unique, key=lambda f: SEVERITIES.index(f.severity))

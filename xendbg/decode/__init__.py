"""Pure decoders: a stopped Target and an Abi in, frozen dataclasses out (see model.py)."""

from xendbg.decode.hypercall import (
    decode_call,
    decode_in_xen,
    decode_multicall,
    decode_pending,
    decode_trap_table,
)
from xendbg.decode.model import (
    Arg,
    Callback,
    Callbacks,
    FastTrap,
    Finding,
    GuestState,
    Hypercall,
    MulticallBatch,
    MulticallEntry,
    StructFields,
    TableOf,
    Text,
    TrapEntry,
    TrapTable,
)

__all__ = ["decode_call", "decode_in_xen", "decode_multicall", "decode_pending", "decode_trap_table", "Arg", "Callback",
           "Callbacks", "FastTrap", "Finding", "GuestState", "Hypercall", "MulticallBatch", "MulticallEntry",
           "StructFields", "TableOf", "Text", "TrapEntry", "TrapTable"]

"""Names the gdb commands need when they register, before any table or decoder loads.

`set xen abi` offers the generation names and `xen break trap` completes vector mnemonics the moment
xendbg is sourced into gdb.  This module imports nothing, so that loading xendbg stays cheap (see
bench/run.py startup); xendbg.abi and xendbg.arch take these names from here.
"""

# ABI generations, oldest first; the tables in xendbg/abi/_tables.py are keyed by these names
# (tests/platform/test_loading.py checks that the two agree).
GENERATIONS: tuple[str, ...] = ("2.0", "3.0", "3.0.2", "3.0.3", "4.0", "4.17", "4.22")
NEWEST: str = GENERATIONS[-1]

# x86 exception vectors (Intel SDM vol. 3, table 6-1): mnemonic and name.
TRAP_VECTORS: dict[int, tuple[str, str]] = {
    0: ("#DE", "divide error"), 1: ("#DB", "debug"), 2: ("NMI", "non-maskable interrupt"),
    3: ("#BP", "breakpoint"), 4: ("#OF", "overflow"), 5: ("#BR", "bound range exceeded"),
    6: ("#UD", "invalid opcode"), 7: ("#NM", "device not available"), 8: ("#DF", "double fault"),
    9: ("CSO", "coprocessor segment overrun"), 10: ("#TS", "invalid TSS"),
    11: ("#NP", "segment not present"), 12: ("#SS", "stack-segment fault"),
    13: ("#GP", "general protection"), 14: ("#PF", "page fault"), 15: ("--", "reserved (spurious)"),
    16: ("#MF", "x87 floating-point error"), 17: ("#AC", "alignment check"), 18: ("#MC", "machine check"),
    19: ("#XM", "SIMD floating-point"), 20: ("#VE", "virtualization exception"),
    21: ("#CP", "control protection"),
}

#!/usr/bin/env python3
"""Regenerate xendbg/abi/_layouts.py from Xen's public headers at each generation's tag.

Usage: tools/gen_abi_layouts.py XEN_GIT_DIR > xendbg/abi/_layouts.py

For every tag of tools/gen_abi_tables.py and both guest widths, the headers of xen/include/public/ are
copied into a temporary directory and a probe of sizeof/offsetof expressions is compiled with
`gcc -m32`/`-m64 -S`: each value is an assembler string ("@@key=value@@"), so nothing is linked and no
32-bit libraries are needed.  What a tag's headers lack (a struct, a member) is an error on that probe
line; such lines are dropped and the probe compiled again, so each generation gets the structs and
members its own headers define.  Only numbers are taken from the headers; the output is plain data.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

from gen_abi_tables import GENERATIONS

WIDTHS = (32, 64)

# xendbg layout -> (C type spellings, newest first; fields).  Fields are words
# NAME[=MEMBER|MEMBER...][:KIND], per width when the widths differ: NAME is xendbg's field name,
# MEMBER the C member (the first spelling a tag's headers accept wins), KIND `bytes` or a nested
# layout; otherwise the kind (u8..u64) and the array count come from sizeof.  A field no member
# spelling of a tag matches is left out of that tag's layout.
STRUCTS: dict[str, tuple[tuple[str, ...], str | dict[int, str]]] = {
    "trap_info": (("struct trap_info", "trap_info_t"), "vector flags cs address"),
    "multicall_entry": (("struct multicall_entry", "multicall_entry_t"), "op result args"),
    "mmu_update": (("struct mmu_update", "mmu_update_t"), "ptr val"),
    "mmuext_op": (("struct mmuext_op", "mmuext_op_t"), "cmd arg1 arg2"),
    # xen_callback_t is {cs, eip} for 32-bit guests, a bare address for 64-bit ones.
    "callback_register": (("struct callback_register", "callback_register_t"),
                          {32: "type flags cs=address.cs address=address.eip", 64: "type flags address"}),
    "callback_unregister": (("struct callback_unregister", "callback_unregister_t"), "type"),
    "cpu_user_regs": (("struct cpu_user_regs", "cpu_user_regs_t"), {
        32: "ebx ecx edx esi edi ebp eax error_code entry_vector eip cs saved_upcall_mask eflags esp "
            "ss es ds fs gs",
        64: "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi error_code entry_vector rip cs "
            "saved_upcall_mask rflags rsp ss es ds fs gs"}),
    "vcpu_guest_context": (("struct vcpu_guest_context", "vcpu_guest_context_t"), {
        32: "flags user_regs:cpu_user_regs trap_ctxt:trap_info ldt_base ldt_ents gdt_frames gdt_ents "
            "kernel_ss kernel_sp ctrlreg debugreg event_callback_cs event_callback_eip failsafe_callback_cs "
            "failsafe_callback_eip vm_assist",
        64: "flags user_regs:cpu_user_regs trap_ctxt:trap_info ldt_base ldt_ents gdt_frames gdt_ents "
            "kernel_ss kernel_sp ctrlreg debugreg event_callback_eip failsafe_callback_eip "
            "syscall_callback_eip vm_assist fs_base gs_base_kernel gs_base_user"}),
    "start_info": (("struct start_info", "start_info_t"),
                   "magic:bytes nr_pages shared_info flags domain_controller_evtchn store_mfn store_evtchn "
                   "console_mfn=console.domU.mfn|console_mfn console_evtchn=console.domU.evtchn|console_evtchn "
                   "pt_base nr_pt_frames mfn_list mod_start mod_len cmd_line:bytes first_p2m_pfn nr_p2m_frames"),
    "sched_shutdown": (("struct sched_shutdown", "sched_shutdown_t"), "reason"),
    # The pre-3.0.3 event_channel_op took one struct: the command, then the command's own struct.
    "evtchn_op": (("struct evtchn_op", "evtchn_op_t"), "cmd u:bytes"),
    # Xen 2.0 named a few members differently (dom1/port1, local_port); the names are its own.
    "evtchn_port": (("struct evtchn_send", "evtchn_send_t"), "port=port|local_port"),  # send, close, unmask
    "evtchn_close": (("struct evtchn_close", "evtchn_close_t"), "dom port"),
    "evtchn_bind_virq": (("struct evtchn_bind_virq", "evtchn_bind_virq_t"), "virq vcpu port"),
    "evtchn_alloc_unbound": (("struct evtchn_alloc_unbound", "evtchn_alloc_unbound_t"), "dom remote_dom port"),
    "evtchn_bind_ipi": (("struct evtchn_bind_ipi", "evtchn_bind_ipi_t"), "vcpu port"),
    "evtchn_bind_interdomain": (("struct evtchn_bind_interdomain", "evtchn_bind_interdomain_t"),
                                "remote_dom remote_port local_port dom1 dom2 port1 port2"),
    "vcpu_set_singleshot_timer": (("struct vcpu_set_singleshot_timer", "vcpu_set_singleshot_timer_t"),
                                  "timeout_abs_ns flags"),
    "vcpu_register_vcpu_info": (("struct vcpu_register_vcpu_info", "vcpu_register_vcpu_info_t"),
                                "mfn offset rsvd"),
}

# The headers that hold these structs; a tag includes those it has.
INCLUDES = ("xen.h", "event_channel.h", "sched.h", "vcpu.h", "callback.h")
# Xen 2.0's headers use the hypervisor's own integer types and PACKED (gcc's packed attribute).
PRELUDE = """#include <stddef.h>
#include <stdint.h>
typedef uint8_t u8; typedef uint16_t u16; typedef uint32_t u32; typedef uint64_t u64;
typedef int8_t s8; typedef int16_t s16; typedef int32_t s32; typedef int64_t s64;
#define PACKED __attribute__((packed))
"""
SCALARS = {1: "u8", 2: "u16", 4: "u32", 8: "u64"}


@dataclass(frozen=True)
class FieldSpec:
    name: str
    members: tuple[str, ...]
    kind: str | None  # None: an integer (or an array of them), sized by the compiler


def field_specs(name: str, width: int) -> list[FieldSpec]:
    spec = STRUCTS[name][1]
    words = (spec if isinstance(spec, str) else spec[width]).split()
    out = []
    for word in words:
        head, _, kind = word.partition(":")
        fname, _, members = head.partition("=")
        out.append(FieldSpec(fname, tuple(members.split("|")) if members else (fname,), kind or None))
    return out


def export_headers(git_dir: str, tag: str, into: Path) -> None:
    names = subprocess.run(
        ["git", "-C", git_dir, "ls-tree", "-r", "--name-only", tag, "xen/include/public/"],
        check=True, capture_output=True, text=True).stdout.split()
    for name in names:
        if not name.endswith(".h"):
            continue
        path = into / name.removeprefix("xen/include/public/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(subprocess.run(["git", "-C", git_dir, "show", f"{tag}:{name}"], check=True,
                                        capture_output=True).stdout)


def compile_probe(include_dir: Path, width: int, exprs: dict[str, str], work: Path) -> dict[str, int]:
    """Compile `key: C expression` pairs; return the keys that compiled, with their values.

    A line the headers cannot compile (a type or member this tag lacks) is dropped and the rest
    compiled again; an error anywhere else (in a header) stops the generator.
    """
    exprs = dict(exprs)
    interface = ["-D__XEN_INTERFACE_VERSION__=__XEN_LATEST_INTERFACE_VERSION__"] \
        if (include_dir / "xen-compat.h").exists() else []
    head = PRELUDE + "".join(f'#include "{h}"\n' for h in INCLUDES if (include_dir / h).exists())
    head += "void probe(void) {\n"
    first = head.count("\n") + 1
    source = work / f"probe{width}.c"
    for _ in range(10):
        keys = list(exprs)
        body = "".join(f'asm volatile(".ascii \\"@@{k}=%c0@@\\"" :: "i"((long long)({exprs[k]})));\n'
                       for k in keys)
        source.write_text(head + body + "}\n")
        result = subprocess.run(["gcc", f"-m{width}", "-ffreestanding", "-w", *interface, "-I", str(include_dir),
                                 "-S", "-o", "-", str(source)], capture_output=True, text=True)
        if result.returncode == 0:
            return {k: int(v) for k, v in re.findall(r"@@([\w.]+)=(-?\d+)@@", result.stdout)}
        bad = {int(n) for n in re.findall(rf"^{re.escape(str(source))}:(\d+):\d+: error:", result.stderr, re.M)}
        lines = {n - first for n in bad if first <= n < first + len(keys)}
        if not lines or len(lines) != len(bad):
            raise SystemExit(f"{include_dir} ({width}-bit): unexpected errors\n{result.stderr[-3000:]}")
        for index in lines:
            del exprs[keys[index]]
    raise SystemExit(f"{include_dir} ({width}-bit): the probe does not converge")


# (layout, width) -> (size, ((field, offset, kind, count), ...))
Probed = dict[tuple[str, int], tuple[int, tuple[tuple[str, int, str, int], ...]]]


def probe_layouts(include_dir: Path, width: int, work: Path) -> Probed:
    """The layouts one header tree gives one guest width."""
    types = compile_probe(include_dir, width, {
        f"t.{name}.{i}": f"sizeof({ctype})" for name, (ctypes, _) in STRUCTS.items()
        for i, ctype in enumerate(ctypes)}, work)
    chosen = {name: ctypes[min(int(k.split(".")[2]) for k in types if k.split(".")[1] == name)]
              for name, (ctypes, _) in STRUCTS.items() if any(k.split(".")[1] == name for k in types)}
    exprs = {}
    for name, ctype in chosen.items():
        exprs[f"size.{name}"] = f"sizeof({ctype})"
        for f in field_specs(name, width):
            for i, member in enumerate(f.members):
                exprs[f"off.{name}.{f.name}.{i}"] = f"offsetof({ctype}, {member})"
                exprs[f"size.{name}.{f.name}.{i}"] = f"sizeof((({ctype} *)0)->{member})"
                exprs[f"elem.{name}.{f.name}.{i}"] = f"sizeof((({ctype} *)0)->{member}[0])"
    values = compile_probe(include_dir, width, exprs, work)
    out: Probed = {}
    for name in chosen:
        fields = []
        for f in field_specs(name, width):
            found = [i for i in range(len(f.members)) if f"off.{name}.{f.name}.{i}" in values]
            if not found:
                continue
            i = found[0]
            offset, size = values[f"off.{name}.{f.name}.{i}"], values[f"size.{name}.{f.name}.{i}"]
            elem = values.get(f"elem.{name}.{f.name}.{i}", size)
            if f.kind == "bytes":
                kind, count = "bytes", size
            else:
                kind, count = f.kind or SCALARS.get(elem, ""), size // elem
                if not kind or size % elem:
                    raise SystemExit(f"{include_dir}: {name}.{f.name} is {size} bytes, not integers")
            fields.append((f.name, offset, kind, count))
        out[(name, width)] = (values[f"size.{name}"], tuple(sorted(fields, key=lambda f: f[1])))
    # A nested layout must be the one this tree defines, element for element.
    for (name, w), (_, fields) in out.items():
        for fname, _offset, kind, count in fields:
            if kind in STRUCTS:
                nested = values[f"size.{name}.{fname}.0"] // count
                if (kind, w) not in out or out[(kind, w)][0] != nested:
                    raise SystemExit(f"{include_dir}: {name}.{fname} is not a {kind}")
    return out


def probe_tag(git_dir: str, tag: str) -> Probed:
    with tempfile.TemporaryDirectory(prefix="xen-public-") as tmp:
        include = Path(tmp) / "public"
        export_headers(git_dir, tag, include)
        out: Probed = {}
        for width in WIDTHS:
            out.update(probe_layouts(include, width, Path(tmp)))
        return out


def spec_text(fields: tuple[tuple[str, int, str, int], ...]) -> str:
    return " ".join(f"{n}@{o}:{k}" + (f"x{c}" if c > 1 or k == "bytes" else "") for n, o, k, c in fields)


def render(tags: dict[str, str], per_generation: dict[str, Probed]) -> str:
    """The module text for probed layouts (also used by the tests to check the committed module)."""
    out = ['"""Xen struct layouts per ABI generation and guest width, generated by tools/gen_abi_layouts.py.',
           "",
           "Do not edit by hand.  Each generation's layouts come from compiling sizeof/offsetof probes with",
           *textwrap.wrap("gcc -m32 and -m64 against xen/include/public/ at its tag: " + ", ".join(tags.values())
                          + ".", 100),
           "A layout is (size, fields); a field is NAME@OFFSET:KIND[xCOUNT], KIND u8/u16/u32/u64, bytes",
           "(COUNT bytes) or a nested layout.  A generation repeats only what changed from the one before.",
           '"""', "",
           "SOURCE_TAGS: dict[str, str] = {", *(f"    {g!r}: {t!r}," for g, t in tags.items()), "}", "",
           "LAYOUTS: dict[str, dict[tuple[str, int], tuple[int, str]]] = {}"]
    previous: tuple[str, Probed] | None = None
    for gen, probed in per_generation.items():
        entries = sorted(probed.items())
        if previous is not None and set(previous[1]) <= set(probed):
            changed = [(key, value) for key, value in entries if previous[1].get(key) != value]
            opening = f"LAYOUTS[{gen!r}] = {{**LAYOUTS[{previous[0]!r}],  # {tags[gen]}"
        else:
            changed = entries
            opening = f"LAYOUTS[{gen!r}] = {{  # {tags[gen]}"
        if previous is not None and not changed and set(previous[1]) == set(probed):
            out.append(f"LAYOUTS[{gen!r}] = LAYOUTS[{previous[0]!r}]  # {tags[gen]}")
        else:
            out.append(opening)
            for (name, width), (size, fields) in changed:
                lead = f"    ({name!r}, {width}): ({size}, "
                chunks = textwrap.wrap(spec_text(fields), 116 - len(lead), break_on_hyphens=False)
                indent = " " * len(lead)
                body = f"\n{indent}".join(repr(c + (" " if i < len(chunks) - 1 else ""))
                                          for i, c in enumerate(chunks)) if chunks else "''"
                out.append(f"{lead}{body}),")
            out.append("}")
        previous = (gen, probed)
    return "\n".join(out) + "\n"


def main() -> None:
    git_dir = sys.argv[1]
    per_generation = {gen: probe_tag(git_dir, tag) for gen, tag in GENERATIONS.items()}
    missing = {name for name in STRUCTS if not any(name == n for p in per_generation.values() for n, _ in p)}
    if missing:
        raise SystemExit(f"no tag defines {sorted(missing)}: check STRUCTS")
    sys.stdout.write(render(GENERATIONS, per_generation))


if __name__ == "__main__":
    main()

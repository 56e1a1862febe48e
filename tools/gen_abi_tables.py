#!/usr/bin/env python3
"""Regenerate xendbg/abi/_tables.py from Xen's public headers at release tags.

Usage: tools/gen_abi_tables.py XEN_GIT_DIR > xendbg/abi/_tables.py

Only numbers and names are taken from the headers (object-like `#define NAME VALUE` lines and
`XEN_ERRNO(NAME, VALUE)` entries); the generated module is plain data.
"""

from __future__ import annotations

import re
import subprocess
import sys

# Generation name -> the tag its numbers are read from.  The 3.0.x generations exist because
# Xen renumbered sched_op (3.0.2) and event_channel_op/physdev_op (3.0.3) inside the 3.0 series.
GENERATIONS: dict[str, str] = {
    "2.0": "RELEASE-2.0.0",
    "3.0": "RELEASE-3.0.0",
    "3.0.2": "3.0.2-branched",
    "3.0.3": "3.0.3-branched",
    "4.0": "RELEASE-4.0.0",
    "4.17": "RELEASE-4.17.0",
    "4.20": "RELEASE-4.20.0",
    "4.22": "RELEASE-4.22.0",
}

# Enum family -> (regex on the macro name, names to leave out: masks, shifts and flag bits that
# are not sub-operation values).
FAMILIES: dict[str, tuple[str, set[str]]] = {
    "HYPERCALL": (r"__HYPERVISOR_[a-z][a-z0-9_]*", set()),
    "VCPUOP": (r"VCPUOP_\w+", set()),
    "SCHEDOP": (r"SCHEDOP_\w+", {"SCHEDOP_cmdmask", "SCHEDOP_reasonshift"}),
    "SHUTDOWN": (r"SHUTDOWN_\w+", {"SHUTDOWN_MAX"}),
    "EVTCHNOP": (r"EVTCHNOP_\w+", set()),
    "GNTTABOP": (r"GNTTABOP_\w+", set()),
    # Only memory_op commands, not the sub-commands of paging/access/sharing ops or resource ids.
    "XENMEM": (r"(?:XENMEM|MEMOP)_(?!\w*_op_)(?!resource_)[a-z]\w*", set()),
    "MMUEXT": (r"MMUEXT_\w+", {"MMUEXT_CMD_MASK", "MMUEXT_CMD_SHIFT"}),
    "MMU": (r"MMU_(?:NORMAL|MACHPHYS|EXTENDED|PT)_\w+", set()),
    "CALLBACKOP": (r"CALLBACKOP_\w+", set()),
    "CALLBACKTYPE": (r"CALLBACKTYPE_\w+", set()),
    "CALLBACKF": (r"CALLBACKF_\w+", set()),
    "VMASST_CMD": (r"VMASST_CMD_\w+", set()),
    "VMASST_TYPE": (r"VMASST_TYPE_\w+", set()),
    "XENVER": (r"XENVER_\w+", set()),
    "CONSOLEIO": (r"CONSOLEIO_\w+", set()),
    "PHYSDEVOP": (r"PHYSDEVOP_(?!DBGP_)\w+", {"PHYSDEVOP_IRQ_NEEDS_UNMASK_NOTIFY", "PHYSDEVOP_IRQ_SHARED"}),
    "UVMF": (r"UVMF_\w+", set()),
    "VIRQ": (r"VIRQ_[A-Z]\w*", {"VIRQ_ARCH_0", "VIRQ_ARCH_1", "VIRQ_ARCH_2", "VIRQ_ARCH_3",
                                "VIRQ_ARCH_4", "VIRQ_ARCH_5", "VIRQ_ARCH_6", "VIRQ_ARCH_7"}),
    "ELFNOTE": (r"XEN_ELFNOTE_\w+", {"XEN_ELFNOTE_MAX"}),
}

HYPERVISOR_HEADERS = ("xen/arch/x86/include/asm/hypercall.h", "xen/include/asm-x86/hypercall.h")

DEFINE = re.compile(r"^\s*#\s*define\s+(\w+)\s+(.+?)\s*(?:/\*.*)?$")
ERRNO = re.compile(r"XEN_ERRNO\(\s*(\w+)\s*,\s*(\d+)\s*\)")


def headers(git_dir: str, tag: str) -> str:
    names = subprocess.run(
        ["git", "-C", git_dir, "ls-tree", "-r", "--name-only", tag, "xen/include/public/"],
        check=True, capture_output=True, text=True).stdout.split()
    # Only the headers of the guest-visible ABI (x86 and common), not the tools' interfaces.
    wanted = [n for n in names if n.endswith(".h") and "/io/" not in n and "/hvm/" not in n
              and "arch-ia64" not in n and "arch-arm" not in n and "arch-ppc" not in n
              and "arch-riscv" not in n]
    text = "\n".join(
        subprocess.run(["git", "-C", git_dir, "show", f"{tag}:{n}"], check=True,
                       capture_output=True, text=True).stdout for n in wanted)
    # x86 hypercall numbers the hypervisor names outside the public headers (paging_domctl_cont,
    # arch_1, since 4.5): only its __HYPERVISOR_name lines are taken.
    for private in HYPERVISOR_HEADERS:
        shown = subprocess.run(["git", "-C", git_dir, "show", f"{tag}:{private}"],
                               capture_output=True, text=True)
        if shown.returncode == 0:
            text += "\n" + "\n".join(line for line in shown.stdout.splitlines()
                                      if re.match(r"\s*#\s*define\s+__HYPERVISOR_[a-z]", line))
    return text


def evaluate(expr: str, known: dict[str, int]) -> int | None:
    expr = re.sub(r"\b0[xX]([0-9a-fA-F]+)[uUlL]*\b", lambda m: str(int(m.group(1), 16)), expr.strip())
    expr = re.sub(r"(\d+)[uUlL]+\b", r"\1", expr)
    expr = re.sub(r"xen_mk_\w+\(([^)]*)\)", r"(\1)", expr)
    if not re.fullmatch(r"[\w\s()<>|+\-x]+", expr):
        return None
    tokens = re.findall(r"[A-Za-z_]\w*", expr)
    for tok in tokens:
        if tok not in known and not re.fullmatch(r"0x[0-9a-fA-F]+", tok):
            return None
    try:
        value = eval(expr, {"__builtins__": {}}, dict(known))  # noqa: S307 - header arithmetic only
    except Exception:
        return None
    return value if isinstance(value, int) else None


def current_interface_lines(text: str) -> list[str]:
    """Drop the lines that only guests built for an older interface version see.

    `#if __XEN_INTERFACE_VERSION__ < X` blocks hold compatibility spellings for old guests; the
    tables describe the ABI as the newest interface of that tag defines it (its `#else` branch).
    """
    stack: list[bool] = []  # True: this block's lines are for old interfaces only
    kept = []
    for line in text.splitlines():
        directive = line.strip().replace("# ", "#")
        if directive.startswith("#if"):
            stack.append(bool(re.match(r"#if\s+__XEN_INTERFACE_VERSION__\s*<", directive)))
            continue
        if directive.startswith("#else") or directive.startswith("#elif"):
            if stack:
                stack[-1] = False
            continue
        if directive.startswith("#endif"):
            if stack:
                stack.pop()
            continue
        if not any(stack):
            kept.append(line)
    return kept


def read_tag(git_dir: str, tag: str) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    text = headers(git_dir, tag)
    known: dict[str, int] = {}
    pending = [(m.group(1), m.group(2)) for m in map(DEFINE.match, current_interface_lines(text))
               if m and "(" not in m.group(1)]
    # Repeat until nothing new resolves: a header may name a number defined in a later header
    # (arch-x86/xen-mca.h: __HYPERVISOR_mca is __HYPERVISOR_arch_0, from xen.h).
    progress = True
    while progress:
        progress = False
        for name, expr in pending:
            if name not in known:
                value = evaluate(expr, known)
                if value is not None:
                    known[name] = value
                    progress = True
    families: dict[str, dict[str, int]] = {}
    for family, (pattern, skip) in FAMILIES.items():
        rx = re.compile(pattern)
        families[family] = {
            name: value for name, value in known.items()
            if rx.fullmatch(name) and name not in skip
            and (family == "HYPERCALL" or not name.startswith("_"))}
    # Hypercalls are keyed by their plain name ("multicall"), as Xen's own tables spell them.
    families["HYPERCALL"] = {k.removeprefix("__HYPERVISOR_"): v for k, v in families["HYPERCALL"].items()}
    errnos = {name: int(value) for name, value in ERRNO.findall(text)}
    return families, errnos


def _order(item: tuple[str, int]) -> tuple[int, bool]:
    """By value; a hypercall's own name (mca) before the generic arch_N slot it occupies, because
    the first name given a number is its primary name."""
    name, value = item
    return value, bool(re.fullmatch(r"arch_\d+", name))


def main() -> None:
    git_dir = sys.argv[1]
    out = ['"""Xen ABI numbers, generated by tools/gen_abi_tables.py from Xen\'s public headers.',
           "",
           "Do not edit by hand.  Each generation's values come from xen/include/public/ at the tag",
           "named in GENERATION_TAGS.",
           '"""', "",
           "GENERATION_TAGS: dict[str, str] = " + repr(GENERATIONS), ""]
    per_family: dict[str, dict[str, dict[str, int]]] = {f: {} for f in FAMILIES}
    errno_table: dict[str, int] = {}
    for gen, tag in GENERATIONS.items():
        families, errnos = read_tag(git_dir, tag)
        for family, values in families.items():
            per_family[family][gen] = values
        if errnos:
            errno_table = errnos  # the newest tag that has public/errno.h wins
    for family, gens in per_family.items():
        out.append(f"{family}: dict[str, dict[str, int]] = {{}}")
        previous: tuple[str, dict[str, int]] | None = None
        for gen, values in gens.items():
            if previous is not None and previous[1] == values:
                out.append(f"{family}[{gen!r}] = {family}[{previous[0]!r}]")
            else:
                body = ", ".join(f"{k!r}: {v}" for k, v in sorted(values.items(), key=_order))
                out.append(f"{family}[{gen!r}] = {{{body}}}  # {GENERATIONS[gen]}")
            previous = (gen, values)
        out.append("")
    body = ", ".join(f"{k!r}: {v}" for k, v in sorted(errno_table.items(), key=lambda kv: kv[1]))
    out.append("# xen/include/public/errno.h, RELEASE-4.22.0; older Xen returned the same x86 values.")
    out.append(f"ERRNO: dict[str, int] = {{{body}}}")
    print("\n".join(out))


if __name__ == "__main__":
    main()

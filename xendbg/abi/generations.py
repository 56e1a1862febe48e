"""Xen ABI generations and how a Xen version maps onto one.

A generation is a span of Xen releases with the same hypercall numbering and guest-visible rules.
Its numbers are read from the tag in `_tables.GENERATION_TAGS`.  The 3.0 series is split because
Xen renumbered hypercalls inside it: sched_op moved to 29 in 3.0.2 (6 became sched_op_compat), and
event_channel_op/physdev_op moved to 32/33 in 3.0.3 (16/19 became *_compat), when callback_op
arrived.  From 3.0.2 Xen fixes up a guest selector's RPL instead of refusing it.
"""

from __future__ import annotations

import re

from xendbg.abi._tables import GENERATION_TAGS
from xendbg.errors import UsageError
from xendbg.names import GENERATIONS, NEWEST  # the names, light enough for gdb start-up

# (first version of the span, generation), newest first.
_SPANS: tuple[tuple[tuple[int, int, int], str], ...] = (
    ((4, 22, 0), "4.22"),
    ((4, 20, 0), "4.20"),  # Debian 13
    ((4, 17, 0), "4.17"),  # Debian 12
    ((4, 0, 0), "4.0"),
    ((3, 0, 3), "3.0.3"),  # 3.0.3 .. 3.4.x
    ((3, 0, 2), "3.0.2"),
    ((3, 0, 0), "3.0"),
    ((2, 0, 0), "2.0"),
)

_VERSION = re.compile(r"(?:xen-?|release-)?(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:[-+~].*)?", re.IGNORECASE)


def resolve_generation(version: str) -> str:
    """Map a Xen version ("3.2", "4.17.3", "4.19-rc1", "newest") to its ABI generation."""
    text = version.strip()
    if text.lower() in ("newest", "latest"):
        return NEWEST
    match = _VERSION.fullmatch(text)
    if not match:
        raise UsageError(f"not a Xen version: {version!r} (expected e.g. 2.0, 3.2, 4.17)")
    key = tuple(int(part) if part else 0 for part in match.groups())
    for first, generation in _SPANS:
        if key >= first:
            return generation
    raise UsageError(f"Xen {version} is older than 2.0, which is the oldest ABI xendbg knows")


def generation_tag(generation: str) -> str:
    return GENERATION_TAGS[generation]


def at_least(generation: str, other: str) -> bool:
    """True when `generation` is `other` or newer."""
    return GENERATIONS.index(generation) >= GENERATIONS.index(other)

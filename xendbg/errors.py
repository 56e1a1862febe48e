"""The project's own error types.

Every failure a user can provoke (bad input, unreadable guest memory, a dead target) is raised as a
subclass of XendbgError, whose message is one line that says what went wrong and where.  Front ends
print that line; they never show a traceback for these.
"""

from __future__ import annotations


class XendbgError(Exception):
    """Base of every error xendbg reports to a user as one line."""


class UsageError(XendbgError):
    """The user asked for something malformed (bad option, unknown version, bad number)."""


class TargetError(XendbgError):
    """The target could not answer."""


class UnreadableMemory(TargetError):
    def __init__(self, address: int, size: int, why: str = "") -> None:
        self.address = address
        self.size = size
        suffix = f": {why}" if why else ""
        super().__init__(f"cannot read {size} byte(s) of guest memory at {address:#x}{suffix}")


class UnknownRegister(TargetError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"register {name} is not available")


class TargetGone(TargetError):
    """The target died or disconnected."""


class DecodeError(XendbgError):
    """The state cannot be decoded as a hypercall at all (as opposed to a finding about it)."""

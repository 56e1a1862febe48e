"""Build guest-memory images from xendbg's own ABI layouts, for InMemoryTarget tests."""

from __future__ import annotations

from xendbg.abi import Abi
from xendbg.abi.layouts import field_size, pack_u

STUB_64 = "514153b8{nr}0000000f05415b59c3"  # push rcx; push r11; mov $nr,%eax; syscall; pop; pop; ret
STUB_32 = "b8{nr}000000cd82c3"  # mov $nr,%eax; int $0x82; ret


def stub(width: int, nr: int) -> bytes:
    """A 32-byte hypercall-page stub for `nr`, padded with int3 as Xen pads them."""
    template = STUB_64 if width == 64 else STUB_32
    return bytes.fromhex(template.format(nr=f"{nr:02x}")).ljust(32, b"\xcc")


def pack(abi: Abi, name: str, **values: object) -> bytes:
    """Bytes of struct `name` with the given fields (arrays as lists); other fields are 0."""
    lay = abi.layout(name)
    out = bytearray(lay.size)
    for f in lay.fields:
        if f.name not in values:
            continue
        value = values[f.name]
        if f.kind == "bytes":
            data = bytes(value)  # type: ignore[arg-type]
            out[f.offset:f.offset + len(data)] = data
            continue
        size = field_size(f.kind, abi.width, abi.era)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            start = f.offset + i * size
            chunk = pack(abi, f.kind, **item) if isinstance(item, dict) else pack_u(int(item), size)  # type: ignore[arg-type]
            out[start:start + size] = chunk
    return bytes(out)


def pack_many(abi: Abi, name: str, rows: list[dict[str, object]]) -> bytes:
    return b"".join(pack(abi, name, **row) for row in rows)


def registers(width: int, nr: int, *args: int, pc: int = 0x7000) -> dict[str, int]:
    """A register file with hypercall `nr` and `args` in the PV convention of `width`."""
    names = ("ebx", "ecx", "edx", "esi", "edi") if width == 32 else ("rdi", "rsi", "rdx", "r10", "r8")
    regs = {name: 0 for name in names}
    regs.update(dict(zip(names, args, strict=False)))
    regs["eax" if width == 32 else "rax"] = nr
    regs["eip" if width == 32 else "rip"] = pc
    regs["cs"] = 0xE019 if width == 32 else 0xE033
    return regs

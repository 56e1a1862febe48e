"""The Debian package cache's bzImage unpacker, on a synthetic bzImage (no download, no QEMU)."""

from __future__ import annotations

import gzip
import lzma
import struct
import sys

import pytest
from conftest import FIXTURES

sys.path.insert(0, str(FIXTURES))
from platforms import debian  # noqa: E402

pytestmark = pytest.mark.platform

ELF = b"\x7fELF\x02\x01\x01" + bytes(57) + b"kernel text" * 100


def bzimage(payload: bytes, setup_sects: int = 27) -> bytes:
    """Boot header facts (Documentation/x86/boot.rst): setup_sects at 0x1f1, "HdrS" at 0x202,
    payload_offset/payload_length at 0x248/0x24c, relative to the protected-mode code at
    (setup_sects + 1) * 512."""
    img = bytearray((setup_sects + 1) * 512)
    img[0x1F1] = setup_sects
    img[0x202:0x206] = b"HdrS"
    payload += struct.pack("<I", len(ELF))  # the size word the kernel build appends
    struct.pack_into("<II", img, 0x248, 0x300, len(payload))
    pm = bytearray(0x300) + payload
    return bytes(img + pm)


@pytest.mark.parametrize("compress", [lambda b: lzma.compress(b, format=lzma.FORMAT_XZ), gzip.compress],
                         ids=["xz", "gzip"])
def test_extract_vmlinux(compress) -> None:
    assert debian.extract_vmlinux(bzimage(compress(ELF))) == ELF


def test_rejects_non_bzimage() -> None:
    with pytest.raises(ValueError):
        debian.extract_vmlinux(bytes(4096))

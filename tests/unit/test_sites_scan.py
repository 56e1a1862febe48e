"""sites.py finds hypercall instructions a guest issues inline, outside its hypercall page and known stubs,
by disassembling the functions that hold the instruction's bytes."""

from __future__ import annotations

from tests.unit.test_sites import PF_R, PF_X, TEXT32, TEXT64, Image, sites_of
from xendbg.sites import SOURCE_SCAN

INLINE_MULTICALL = bytes.fromhex("b80d000000 0f05 c3")  # mov $13,%eax; syscall; ret
DECOY = bytes.fromhex("b80f050000 c3")  # mov $0x50f,%eax; ret: the bytes 0f 05 inside an immediate
NUMBER_IN_RAX = bytes.fromhex("4889f8 0f05 c3")  # mov %rdi,%rax; syscall; ret


def _image(width: int, text: int, functions: list[tuple[str, bytes]], tail: bytes = b"") -> Image:
    code, strtab, rows = b"", bytearray(b"\0"), []
    for name, body in functions:
        rows.append((len(strtab), text + len(code), 1, len(body)))
        strtab.extend(name.encode() + b"\0")
        code += body
    return Image(width, segments=[(text, code + tail, PF_R | PF_X)], raw_symbols=(bytes(strtab), rows))


def test_an_inline_syscall_in_a_function_is_a_site(tmp_path):
    sites = sites_of(tmp_path, _image(64, TEXT64, [("decoy", DECOY), ("flush_batch", INLINE_MULTICALL),
                                                   ("raw_call", NUMBER_IN_RAX)]))
    found = {(s.name, s.instruction, s.nr, s.source) for s in sites.inline}
    assert found == {("flush_batch+0x5", TEXT64 + len(DECOY) + 5, 13, SOURCE_SCAN),
                     ("raw_call+0x3", TEXT64 + len(DECOY) + len(INLINE_MULTICALL) + 3, None, SOURCE_SCAN)}


def test_bytes_outside_any_function_are_not_taken(tmp_path):
    sites = sites_of(tmp_path, _image(64, TEXT64, [("decoy", DECOY)], tail=b"\x0f\x05\xc3"))
    assert sites.inline == ()


def test_an_inline_int82_in_a_32_bit_function(tmp_path):
    body = bytes.fromhex("b811000000 cd82 c3")  # mov $17,%eax; int $0x82; ret
    sites = sites_of(tmp_path, _image(32, TEXT32, [("version", body)]))
    ((name, instruction, nr),) = {(s.name, s.instruction, s.nr) for s in sites.inline}
    assert (name, instruction, nr) == ("version+0x5", TEXT32 + 5, 17)

"""The dump reader over dumps built from QEMU's layouts: registers from the notes, the page walk
(2-level, PAE, 4-level with Xen's PTE bits, large pages, paging off), kdump-zlib against plain ELF,
and the core decoders run unchanged on a DumpTarget."""

from __future__ import annotations

import pytest

from tests.unit import dumpfiles as df
from tests.unit.images import pack, stub
from xendbg.abi import get_abi
from xendbg.decode import decode_pending
from xendbg.dump import open_core
from xendbg.dump.paging import mappings
from xendbg.errors import UnreadableMemory
from xendbg.render import json as render_json
from xendbg.session import NoSymbols, Session
from xendbg.target import InMemoryTarget

K64 = 0xFFFFFFFF80000000
DATA64 = 0xFFFFFFFF80201FF0  # the batch straddles two pages mapped to unrelated frames
BIG64 = 0xFFFFFFFF80400000  # a 2M page
GIANT64 = 0xFFFFC90000000000  # a 1G page
K32 = 0xC0000000


def pv64(ram_size: int = 4 << 20) -> tuple[df.Ram, list[df.Cpu], dict[int, bytes]]:
    """A 64-bit PV guest stopped at the syscall of its multicall stub (vCPU 0) and a CPU in real mode
    (vCPU 1); returns the RAM, CPUs and the virtual memory the decoders should see."""
    abi = get_abi("4.17", 64)
    ram = df.Ram(ram_size)
    root = ram.alloc()
    extra = df.XEN_GUEST_KERNEL | df.NX
    page = b"".join(stub(64, nr) for nr in range(128))
    ram.write(0x1000, page)
    df.map_page(ram, root, df.FOUR_LEVEL, K64 + 0x1000, 0x1000, extra=extra)
    df.map_page(ram, root, df.FOUR_LEVEL, DATA64 & ~0xFFF, 0x5000, extra=extra)
    df.map_page(ram, root, df.FOUR_LEVEL, (DATA64 & ~0xFFF) + 0x1000, 0x3000, extra=extra)
    df.map_page(ram, root, df.FOUR_LEVEL, BIG64, 0x200000, leaf_level=2, extra=extra)
    df.map_page(ram, root, df.FOUR_LEVEL, GIANT64, 0, leaf_level=1, extra=extra)
    text = b"[guest] hello from a 2M page\n"
    ram.write(0x200000 + 0x1230, text)
    batch = pack(abi, "multicall_entry", op=17, args=[0, 0, 0, 0, 0, 0]) + \
        pack(abi, "multicall_entry", op=18, args=[0, len(text), BIG64 + 0x1230, 0, 0, 0])
    first = 0x1000 - (DATA64 & 0xFFF)
    ram.write(0x5000 + (DATA64 & 0xFFF), batch[:first])
    ram.write(0x3000, batch[first:])
    pc = K64 + 0x1000 + 13 * 32 + 8
    cpus = [df.Cpu({"rax": 13, "rdi": DATA64, "rsi": 2, "rip": pc, "rsp": K64 + 0x8000}, (0x80000011, 0, 0, root, 0x20),
                   0xE033, 0xE02B),
            df.Cpu({"rip": 0xFD09A}, (0x11, 0, 0, 0, 0), 0x0)]
    virtual = {pc - 8: page[13 * 32:14 * 32], DATA64: batch, BIG64 + 0x1230: text}
    return ram, cpus, virtual


def pv32(levels: tuple, ram_size: int = 4 << 20) -> tuple[df.Ram, list[df.Cpu], dict[int, bytes]]:
    """A 32-bit PV kernel in ring 1 at int $0x82 with a two-entry multicall, under 2-level or PAE paging."""
    abi = get_abi("4.0", 32)
    ram = df.Ram(ram_size)
    root = ram.alloc()
    ram.write(0x1000, stub(32, 13))
    df.map_page(ram, root, levels, K32 + 0x1000, 0x1000)
    text = b"[guest] hello\n"
    ram.write(0x7010, text)
    df.map_page(ram, root, levels, K32 + 0x7000, 0x7000)
    batch = pack(abi, "multicall_entry", op=17, args=[0, 0, 0, 0, 0, 0]) + \
        pack(abi, "multicall_entry", op=18, args=[0, len(text), K32 + 0x7010, 0, 0, 0])
    ram.write(0x6000, batch)
    if levels is df.TWO_LEVEL:  # and a 4M page (CR4.PSE) for the batch
        df.map_page(ram, root, levels, 0xC0400000, 0, leaf_level=0)
        call_list, cr4 = 0xC0400000 + 0x6000, 0x10
    else:
        df.map_page(ram, root, levels, 0xC0600000, 0, leaf_level=1)  # a 2M page
        call_list, cr4 = 0xC0600000 + 0x6000, 0x20
    pc = K32 + 0x1000 + 5
    cpus = [df.Cpu({"rax": 13, "rbx": call_list, "rcx": 2, "rip": pc}, (0x80000011, 0, 0, root, cr4), 0xE019)]
    return ram, cpus, {pc - 5: stub(32, 13), call_list: batch, K32 + 0x7010: text}


def write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def expected(cpu: df.Cpu, width: int, virtual: dict[int, bytes], generation: str) -> dict:
    """What decode_pending makes of the same registers and virtual memory."""
    names = ("rax", "rdi", "rsi", "rdx", "r10", "r8", "rip") if width == 64 else ("rax", "rbx", "rcx", "rdx", "rsi",
                                                                                  "rdi", "rip")
    regs = {(n if width == 64 else "e" + n[1:]): cpu.regs.get(n, 0) for n in names} | {"cs": cpu.cs}
    target = InMemoryTarget(regs, list(virtual.items()))
    return render_json.hypercall(decode_pending(target, get_abi(generation, width)))


def test_pv64_dump_registers_paging_and_the_pending_multicall(tmp_path):
    ram, cpus, virtual = pv64()
    path = write(tmp_path, "pv64.elf", df.elf_core(bytes(ram.data), cpus, True))
    with open_core(path, xen="4.17") as core:
        assert core.format == "ELF" and len(core.vcpus) == 2
        v0, v1 = core.vcpus
        assert v0.registers["rip"] == cpus[0].regs["rip"] and v0.registers["eax"] == 13 and v0.registers["cs"] == 0xE033
        assert v0.mode == "64-bit PV guest (ring 3)" and v0.width == 64
        assert v0.target.paging.describe().startswith("4-level paging")
        # Xen's bit 52 and NX are masked: 4K, 2M and 1G pages all translate
        assert v0.target.read_memory(BIG64 + 0x1230, 8) == b"[guest] "
        assert v0.target.physical(GIANT64 + 0x3000) == 0x3000
        hc = v0.pending()
        assert hc is not None and hc.name == "multicall" and hc.site == "at syscall"
        got = render_json.hypercall(hc)
        assert got | {"xen_source": None} == expected(cpus[0], 64, virtual, "4.17") | {"xen_source": None}
        assert got["detail"]["entries"][1]["detail"]["text"] == "[guest] hello from a 2M page\n"
        # vCPU 1 is in ring 0 with paging off: no pending call, and it says why (not "in Xen": no Xen runs
        # without paging)
        assert v1.pending() is None and "in protected mode, paging off" in v1.why_not_pending
        assert v1.mode == "in protected mode, paging off (ring 0, boot code)" and v1.width is None
        assert v1.target.paging.mode == "off" and v1.target.physical(0x1234) == 0x1234
        # the core's own entry point, unchanged
        assert Session().decode_here(core.target(0), NoSymbols(), 0).name == "multicall"


@pytest.mark.parametrize("levels", [df.TWO_LEVEL, df.PAE], ids=["2-level", "PAE"])
def test_pv32_dump_under_2level_and_pae_paging(tmp_path, levels):
    ram, cpus, virtual = pv32(levels)
    path = write(tmp_path, "pv32.elf", df.elf_core(bytes(ram.data), cpus, False))
    with open_core(path) as core:
        v0 = core.vcpus[0]
        assert set(v0.registers) >= {"eax", "eip", "cs", "cr3", "pc"} and "rax" not in v0.registers
        assert v0.target.paging.mode == ("2-level" if levels is df.TWO_LEVEL else "PAE")
        hc = v0.pending()
        assert hc is not None and hc.site == "at int 0x82" and hc.width == 32
        # the code selector is evidence, as live: 0xe019 says 3.0 or later, so a warned guess
        assert "CS 0xe019" in hc.abi_reason and hc.findings[-1].rule == "abi-evidence"
    with open_core(path, xen="4.0") as core:
        hc = core.vcpus[0].pending()
        assert render_json.hypercall(hc) | {"xen_source": None} == \
            expected(cpus[0], 32, virtual, "4.0") | {"xen_source": None}


def test_paging_off_reads_physical_memory(tmp_path):
    ram, cpus, _ = pv32(df.TWO_LEVEL)
    cpus[0].cr = (0x11, 0, 0, 0, 0)  # no paging, virtual = physical
    cpus[0].regs["rip"] = 0x1005
    path = write(tmp_path, "flat.elf", df.elf_core(bytes(ram.data), cpus, False))
    with open_core(path) as core:
        assert core.vcpus[0].target.read_memory(0x1000, 5) == stub(32, 13)[:5]
        # a ring-1 CS without paging is no PV guest (Xen runs its guests with paging): nothing pending
        vcpu = core.vcpus[0]
        assert vcpu.mode == "in protected mode, paging off (ring 1, boot code)" and vcpu.width is None
        assert vcpu.pending() is None and "paging off" in vcpu.why_not_pending


@pytest.mark.parametrize("flattened", [True, False], ids=["flattened", "plain-kdump"])
@pytest.mark.parametrize("long_mode", [True, False], ids=["x86_64", "i386"])
def test_kdump_reads_as_the_elf_dump_does(tmp_path, flattened, long_mode):
    ram, cpus, _ = pv64() if long_mode else pv32(df.TWO_LEVEL)
    ram.write(0x9000, bytes(range(256)) * 16)  # an incompressible-ish page next to zero pages
    elf = write(tmp_path, "d.elf", df.elf_core(bytes(ram.data), cpus, long_mode))
    kz = write(tmp_path, "d.kz", df.kdump(bytes(ram.data), cpus, long_mode, flattened=flattened))
    with open_core(elf) as a, open_core(kz) as b:
        assert b.format.startswith("kdump-compressed")
        assert b.memory.ranges() == a.memory.ranges() == [(0, len(ram.data))]
        for address, size in [(0, 64), (0x9000 - 3, 300), (0x5ff0, 0x30), (len(ram.data) - 16, 16)]:
            assert b.memory.read(address, size) == a.memory.read(address, size)
        assert [v.registers for v in b.vcpus] == [v.registers for v in a.vcpus]
        assert render_json.hypercall(b.vcpus[0].pending()) == render_json.hypercall(a.vcpus[0].pending())
        with pytest.raises(UnreadableMemory, match="not in the dump"):
            b.memory.read(len(ram.data) - 8, 16)


def test_mappings_list_each_page_once_with_large_pages(tmp_path):
    ram, cpus, _ = pv64()
    path = write(tmp_path, "pv64.elf", df.elf_core(bytes(ram.data), cpus, True))
    with open_core(path) as core:
        found = {(v, p, s) for v, p, s in mappings(core.memory, core.vcpus[0].target.paging)}
        assert (K64 + 0x1000, 0x1000, 0x1000) in found
        # a large page is cut to the RAM it maps: the 1G page over 4 MiB of RAM gives 4 MiB
        assert (BIG64, 0x200000, 2 << 20) in found and (GIANT64, 0, 4 << 20) in found


def test_symbols_and_the_guest_note_from_the_guest_elf(tmp_path):
    from tests.unit.test_sites import PF_R, PF_X, Image

    xen_version = get_abi("4.17", 64).enum("ELFNOTE").values["XEN_ELFNOTE_XEN_VERSION"]
    image = Image(64, segments=[(K64 + 0x1000, b"\xcc" * 0x1000, PF_R | PF_X)],
                  symbols={"hypercall_page": K64 + 0x1000, "after": K64 + 0x1800},
                  notes=[(b"Xen", xen_version, b"xen-3.0\0")])
    guest = write(tmp_path, "guest.elf", image.build())
    ram, cpus, _ = pv64()
    path = write(tmp_path, "pv64.elf", df.elf_core(bytes(ram.data), cpus, True))
    with open_core(path, symbols=guest) as core:
        v0 = core.vcpus[0]
        assert v0.symbol() == "<hypercall_page+424>"
        assert core.symbols.address_of("after") == K64 + 0x1800
        assert core.symbols.symbol_at(K64 + 0x1801) == ("after", 1)
        assert core.symbols.symbol_at(K64 + 0x3000) is None  # beyond the file's PT_LOADs
        reason = v0.pending().abi_reason
        assert "Xen ELF note XEN_VERSION (guest.elf) 'xen-3.0'" in reason and "hypercall page" in reason

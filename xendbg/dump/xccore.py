"""Xen's own dumps of one domain: `xl dump-core` files, as libxenguest's xg_core.c writes them.

The format (tools/libs/guest/xg_core.c, xg_core.h, xg_core_x86.h and docs/misc/dump-core-format.txt,
RELEASE-4.17.0) is an ELFCLASS64 ET_CORE with sections and no program headers; e_machine is EM_X86_64
for a 64-bit PV guest, EM_386 for a 32-bit one:

    .note.Xen         notes named "Xen": DUMPCORE_NONE, DUMPCORE_HEADER {u64 xch_magic (0xF00FEBED PV,
                      0xF00FEBEE HVM), xch_nr_vcpus, xch_nr_pages, xch_page_size}, DUMPCORE_XEN_VERSION
                      {u64 major, minor, ...}, DUMPCORE_FORMAT_VERSION {u64: major << 32 | minor, 0.1}
    .xen_prstatus     vcpu_guest_context[nr_vcpus] (XEN_DOMCTL_getvcpucontext, the guest's width)
    .xen_shared_info  the shared_info page (optional)
    .xen_pages        nr_pages pages
    .xen_p2m          PV: {u64 pfn, u64 gmfn}[nr_pages], page i of .xen_pages is machine frame gmfn
    .xen_pfn          HVM: u64 pfn[nr_pages], page i is guest-physical frame pfn
                      (~0 in either marks an unused slot, a zero page, at the end)

A PV guest's page tables hold machine frame numbers, so this file's memory is addressed by machine
address (frame gmfn -> its page in .xen_pages) and xendbg/dump/paging.py walks it unchanged; an HVM
guest's by guest-physical address.  The registers and what the guest registered come straight from
each vcpu_guest_context: `arch_get_info_guest` (xen/arch/x86/domctl.c, RELEASE-4.17.0) copies the
trap table by vector, the callbacks, kernel_ss/sp and the guest's top page table into it.
"""

from __future__ import annotations

import mmap
import struct

from xendbg.abi.layouts import ERA_3, Fields, layout, unpack
from xendbg.arch import CR0_PG
from xendbg.decode.model import Callback, GuestState, TrapTable
from xendbg.dump import xenlayout as xl
from xendbg.dump.cpus import CR4_PAE, CpuState, Segment
from xendbg.dump.xen import trap_entries
from xendbg.errors import DecodeError, UnreadableMemory
from xendbg.sites import ElfFile

SECTION_NOTE, SECTION_PRSTATUS, SECTION_SHARED_INFO = b".note.Xen", b".xen_prstatus", b".xen_shared_info"
SECTION_PAGES, SECTION_P2M, SECTION_PFN = b".xen_pages", b".xen_p2m", b".xen_pfn"
# public/elfnote.h and xg_core.h, RELEASE-4.17.0
XEN_ELFNOTE_DUMPCORE_NONE, XEN_ELFNOTE_DUMPCORE_HEADER = 0x2000000, 0x2000001
XEN_ELFNOTE_DUMPCORE_XEN_VERSION, XEN_ELFNOTE_DUMPCORE_FORMAT_VERSION = 0x2000002, 0x2000003
XC_CORE_MAGIC, XC_CORE_MAGIC_HVM = 0xF00FEBED, 0xF00FEBEE
FORMAT_MAJOR = 0  # XEN_DUMPCORE_FORMAT_MAJOR_CURRENT; a minor bump stays compatible (dump-core-format.txt)
INVALID = (1 << 64) - 1  # XC_CORE_INVALID_PFN / XC_CORE_INVALID_GMFN
PAGE_SIZE = 4096
ANY_CONTEXT_SIZE = 5168  # sizeof(vcpu_guest_context_any_t) on x86 (libxen-dev's xenctrl.h, Xen 4.17)
MAX_VCPUS = 8192  # far above any Xen's limit: a larger count is a corrupt header, not a domain
MAX_FRAME = 1 << 40  # 52-bit machine addresses
EM_386, EM_X86_64, ET_CORE = 3, 62, 4
SOURCE = "from the dump's vcpu_guest_context"
_HEADER = struct.Struct("<4Q")
_P2M = struct.Struct("<QQ")
_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
_WIDE = {"eax": "rax", "ebx": "rbx", "ecx": "rcx", "edx": "rdx", "esi": "rsi", "edi": "rdi", "esp": "rsp",
         "ebp": "rbp", "eip": "rip", "eflags": "rflags"}
_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")
CR0_PE = 1


def is_xc_core(elf: ElfFile) -> bool:
    """Whether an ELF file is an `xl dump-core` file: an ET_CORE with a .note.Xen section."""
    return elf.type == ET_CORE and not elf.segments and elf.section_named(SECTION_NOTE) is not None


def cr3_to_frame(cr3: int, width: int) -> int:
    """xen_cr3_to_pfn (public/arch-x86/xen-x86_64.h: cr3 >> 12; xen-x86_32.h: the frame rotated so that
    frames above 4 GiB fit, (cr3 >> 12) | (cr3 << 20) in 32 bits; RELEASE-4.17.0)."""
    if width == 64:
        return cr3 >> 12
    return ((cr3 >> 12) | (cr3 << 20)) & 0xFFFFFFFF


class XcCoreVcpu:
    """One vcpu_guest_context of the dump: the registers Xen saved and what the guest registered."""

    def __init__(self, index: int, raw: bytes, width: int, hvm: bool, has_frame: bool) -> None:
        lay = layout("vcpu_guest_context", width, ERA_3)
        context: Fields = unpack(lay, raw, width, ERA_3)
        table = lay.field("trap_ctxt")
        self._trap_ctxt = raw[table.offset:table.offset + table.count * layout("trap_info", width, ERA_3).size]
        self.index = index
        self.context = context
        self.state: GuestState | None = None  # what it registered, once read and checked (Core does)
        self.why_no_state = ""  # why its registered state is not shown, when it is not
        self.width = width
        flags = int(context["flags"])
        self.online = bool(flags & xl.VGCF_ONLINE)
        ctrlreg = [int(v) for v in context["ctrlreg"]]
        self.kernel_ss, self.kernel_sp = int(context["kernel_ss"]), int(context["kernel_sp"])
        root = ctrlreg[3] if hvm else cr3_to_frame(ctrlreg[3], width) << 12
        self.guest_cr3: int | None = root if has_frame and root else None
        regs = context["user_regs"]
        if width == 64:
            gprs = {name: int(regs[name]) for name in _GPRS}
        else:
            gprs = dict.fromkeys(_GPRS, 0) | {wide: int(regs[low]) for low, wide in _WIDE.items()}
        segments = {name: Segment(0, 0, 0, 0) for name in _SEGMENTS}
        for name in ("cs", "ds", "es", "fs", "gs", "ss"):
            segments[name] = Segment(int(regs[name]), 0xFFFFFFFF, 0, 0)
        if width == 64:
            segments["fs"] = Segment(int(regs["fs"]), 0xFFFFFFFF, 0, int(context["fs_base"]))
            kernel = bool(flags & (1 << 2))  # VGCF_in_kernel: gs_base_kernel is the live GS base
            gs_base = int(context["gs_base_kernel"] if kernel else context["gs_base_user"])
            segments["gs"] = Segment(int(regs["gs"]), 0xFFFFFFFF, 0, gs_base)
        if hvm:  # Xen's copy of the HVM guest's own control registers
            cr = (ctrlreg[0], 0, ctrlreg[2], ctrlreg[3], ctrlreg[4])
            long_mode = width == 64 and bool(cr[0] & CR0_PG and cr[4] & CR4_PAE)
        else:
            # A PV guest always runs with paging: 4-level when 64-bit, PAE when 32-bit (the only paging
            # a 64-bit Xen gives 32-bit PV guests); CR3 is the machine address of its top table.
            cr = (ctrlreg[0] | CR0_PG | CR0_PE, 0, ctrlreg[2], root, ctrlreg[4] | CR4_PAE)
            long_mode = width == 64
        self.cpu = CpuState(index, long_mode, gprs, segments, cr)

    @property
    def registers_from(self) -> str:
        if not self.online:
            return f"offline (no VGCF_online): the stale registers of vcpu_guest_context {self.index}"
        return f"{SOURCE} {self.index} (user_regs, as Xen saved them)"

    def registered(self) -> tuple[GuestState | None, str]:
        """The trap table (entries with an address, by vector), callbacks and flags of this context."""
        name = f"vCPU {self.index}"
        if self.guest_cr3 is None:
            return None, (f"{name}: ctrlreg[3] ({int(self.context['ctrlreg'][3]):#x}) is not a frame of the dump: "
                          f"its page tables cannot be read")
        width = self.width
        entries, wrong = trap_entries(self._trap_ctxt, width)
        if wrong:
            return None, f"{name}: trap_ctxt is not a trap table by vector ({wrong}): a corrupt context"
        flags = int(self.context["flags"])
        callbacks: dict[str, Callback] = {}
        disables = {"failsafe": bool(flags & xl.VGCF_FAILSAFE_DISABLES_EVENTS),
                    "syscall": bool(flags & xl.VGCF_SYSCALL_DISABLES_EVENTS)}
        kinds = ("event", "failsafe", "syscall") if width == 64 else ("event", "failsafe")
        for kind in kinds:
            address = int(self.context[f"{kind}_callback_eip"])
            selector = int(self.context[f"{kind}_callback_cs"]) if width == 32 else None
            if not address:
                continue
            masks = disables.get(kind, False)
            callbacks[kind] = Callback(kind, address, selector, None if selector is None else selector & 3,
                                       flags=1 if masks else 0, flag_names=("CALLBACKF_mask_events",) if masks else ())
        state = GuestState(trap_table=entries, callbacks=callbacks, width=width)
        state.table = TrapTable(0, tuple(entries.values()), True,
                                note=f"registered: {len(entries)} vectors, {SOURCE} {self.index} (trap_ctxt)")
        state.history.append(f"{SOURCE} {self.index}")
        return state, ""


class XcCoreDump:
    """An `xl dump-core` file: `read(address, size)` over the domain's pages (machine addresses for a PV
    guest, guest-physical for HVM), and one vCPU per vcpu_guest_context."""

    format = "xl dump-core"

    def __init__(self, path: str, data: mmap.mmap) -> None:
        self.path = path
        self.data = data
        elf = ElfFile(path, data)
        self.elf = elf
        if elf.cls != 64 or elf.type != ET_CORE:
            raise DecodeError(f"{path}: an xl dump-core file is an ELFCLASS64 ET_CORE (xg_core.c); this is not one")
        note = self._section(SECTION_NOTE)
        notes = {kind: desc for name, kind, desc in elf.notes(note.offset, note.size) if name == b"Xen"}
        if XEN_ELFNOTE_DUMPCORE_HEADER not in notes:
            raise DecodeError(f"{path}: .note.Xen has no dump-core header note (type {XEN_ELFNOTE_DUMPCORE_HEADER:#x}):"
                              f" not an xl dump-core file")
        header = notes[XEN_ELFNOTE_DUMPCORE_HEADER]
        if len(header) < _HEADER.size:
            raise DecodeError(f"{path}: the dump-core header note has {len(header)} bytes, not {_HEADER.size}: "
                              f"corrupt notes")
        magic, nr_vcpus, nr_pages, page_size = _HEADER.unpack_from(header)
        if magic not in (XC_CORE_MAGIC, XC_CORE_MAGIC_HVM):
            raise DecodeError(f"{path}: dump-core header magic {magic:#x}, not {XC_CORE_MAGIC:#x} (PV) or "
                              f"{XC_CORE_MAGIC_HVM:#x} (HVM): corrupt or not an xl dump-core file")
        self.hvm = magic == XC_CORE_MAGIC_HVM
        if page_size != PAGE_SIZE:
            raise DecodeError(f"{path}: page size {page_size} in the dump-core header; x86 pages are {PAGE_SIZE}")
        if not 0 < nr_vcpus <= MAX_VCPUS:
            raise DecodeError(f"{path}: the dump-core header says {nr_vcpus} vCPUs: corrupt header")
        version = notes.get(XEN_ELFNOTE_DUMPCORE_FORMAT_VERSION)
        if version is not None and len(version) >= 8 and struct.unpack_from("<Q", version)[0] >> 32 != FORMAT_MAJOR:
            major = struct.unpack_from("<Q", version)[0] >> 32
            raise DecodeError(f"{path}: dump-core format version {major}.x; xendbg reads {FORMAT_MAJOR}.x")
        self.xen_version: str | None = None
        xen_version = notes.get(XEN_ELFNOTE_DUMPCORE_XEN_VERSION)
        if xen_version is not None and len(xen_version) >= 16:
            major, minor = struct.unpack_from("<QQ", xen_version)
            if major or minor:
                self.xen_version = f"{major}.{minor}"
        self.width = 64 if elf.machine == EM_X86_64 else 32
        self.nr_pages = nr_pages

        # Each entry is a vcpu_guest_context_any_t (xenctrl.h: the union of the 64- and 32-bit contexts,
        # 5168 bytes on x86), sh_entsize, holding the context of the guest's width.
        ctx = layout("vcpu_guest_context", self.width, ERA_3)
        prstatus = self._section(SECTION_PRSTATUS)
        stride = prstatus.entsize or ANY_CONTEXT_SIZE
        if stride < ctx.size or prstatus.size != nr_vcpus * stride:
            raise DecodeError(f"{path}: .xen_prstatus holds {prstatus.size} bytes, not the header's {nr_vcpus} "
                              f"vCPU contexts of {stride} bytes (a {self.width}-bit vcpu_guest_context is {ctx.size}):"
                              f" corrupt or truncated")
        pages = self._section(SECTION_PAGES)
        if pages.size != nr_pages * PAGE_SIZE:
            raise DecodeError(f"{path}: .xen_pages holds {pages.size} bytes, not the header's {nr_pages} pages: "
                              f"corrupt or truncated")
        self._pages_at = pages.offset
        self._index = self._frames(nr_pages)
        self._ranges: list[tuple[int, int]] | None = None
        self.shared_info: bytes | None = None
        shared = elf.section_named(SECTION_SHARED_INFO)
        if shared is not None:
            self.shared_info = elf.read(shared.offset, shared.size, ".xen_shared_info")
        self.vcpus: list[XcCoreVcpu] = []
        ctrlreg, word = ctx.field("ctrlreg").offset, self.width // 8
        for i in range(nr_vcpus):
            raw = elf.read(prstatus.offset + i * stride, ctx.size, f"vcpu_guest_context {i}")
            cr3 = int.from_bytes(raw[ctrlreg + 3 * word:ctrlreg + 4 * word], "little")
            has = self.has(cr3 if self.hvm else cr3_to_frame(cr3, self.width) << 12)
            self.vcpus.append(XcCoreVcpu(i, raw, self.width, self.hvm, has))
        self.cpus = [v.cpu for v in self.vcpus]

    def _section(self, name: bytes):  # noqa: ANN202 - sites' private section record
        section = self.elf.section_named(name)
        if section is None:
            raise DecodeError(f"{self.path}: no {name.decode()} section: not a complete xl dump-core file")
        self.elf.check(section.offset, section.size, f"section {name.decode()}")
        return section

    def _frames(self, nr_pages: int) -> dict[int, int]:
        """frame -> index of its page in .xen_pages: machine frames (gmfn) of a PV guest, pfns of HVM."""
        name = SECTION_PFN if self.hvm else SECTION_P2M
        if self.elf.section_named(name) is None:
            other = SECTION_P2M if self.hvm else SECTION_PFN
            if self.elf.section_named(other) is not None:
                raise DecodeError(f"{self.path}: the header says {'HVM' if self.hvm else 'PV'} but the file has "
                                  f"{other.decode()}, not {name.decode()}: corrupt")
        table = self._section(name)
        entry = 8 if self.hvm else _P2M.size
        if table.size != nr_pages * entry:
            count = table.size // entry
            raise DecodeError(f"{self.path}: {name.decode()} has {count} entries for .xen_pages' {nr_pages} pages "
                              f"(entry {min(count, nr_pages)} has no page): corrupt or truncated")
        index: dict[int, int] = {}
        raw = self.data[table.offset:table.offset + table.size]
        for i in range(nr_pages):
            if self.hvm:
                frame = struct.unpack_from("<Q", raw, i * 8)[0]
                pfn = frame
            else:
                pfn, frame = _P2M.unpack_from(raw, i * entry)
            if frame == INVALID or pfn == INVALID:
                continue  # an unused slot (its page is zero)
            if frame >= MAX_FRAME:
                raise DecodeError(f"{self.path}: {name.decode()} entry {i} names frame {frame:#x}, beyond 52-bit "
                                  f"addresses: corrupt")
            if frame in index:
                raise DecodeError(f"{self.path}: {name.decode()} names frame {frame:#x} twice (entries {index[frame]} "
                                  f"and {i}): corrupt")
            index[frame] = i
        return index

    @property
    def notes(self) -> bytes:
        raise DecodeError(f"{self.path}: an xl dump-core file has no QEMU CPU notes for a gdb core; gdb reads "
                          f"QEMU dumps only")

    def ranges(self) -> list[tuple[int, int]]:
        """(start, end) of each run of consecutive frames the file holds (by address)."""
        if self._ranges is None:
            runs: list[tuple[int, int]] = []
            for frame in sorted(self._index):
                start = frame * PAGE_SIZE
                if runs and runs[-1][1] == start:
                    runs[-1] = (runs[-1][0], start + PAGE_SIZE)
                else:
                    runs.append((start, start + PAGE_SIZE))
            self._ranges = runs
        return self._ranges

    def has(self, address: int) -> bool:
        return address // PAGE_SIZE in self._index

    def read(self, address: int, size: int) -> bytes:
        kind = "guest-physical" if self.hvm else "machine"
        out = bytearray()
        at, left = address, size
        while left > 0:
            frame, offset = divmod(at, PAGE_SIZE)
            i = self._index.get(frame)
            if i is None:
                raise UnreadableMemory(address, size, f"{kind} frame {frame:#x} is not in the dump's "
                                                      f"{'.xen_pfn' if self.hvm else '.xen_p2m'}")
            n = min(left, PAGE_SIZE - offset)
            start = self._pages_at + i * PAGE_SIZE + offset
            out += self.data[start:start + n]
            at, left = at + n, left - n
        return bytes(out)

"""Struct layouts of the guest-visible Xen ABI, per guest width and layout era.

Offsets and sizes were read by compiling Xen's public headers with gcc -m32 and -m64 (offsetof and
sizeof) at RELEASE-2.0.0, RELEASE-3.0.0, RELEASE-4.0.0 and with Debian's libxen-dev 4.17 headers;
tests/unit/test_abi_headers.py checks every 3.0+ layout here against the installed libxen-dev headers.

Two eras differ: Xen 2.0 used `memory_t` words (multicall_entry is `op, args[7]`, the result written
to args[5]; mmu_update is two words), Xen 3.0 on use `op, result, args[6]` and 64-bit mmu_update
words.  Layouts that did not change are shared between eras.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from xendbg.errors import DecodeError

_SCALAR = {"u8": 1, "u16": 2, "u32": 4, "u64": 8}


@dataclass(frozen=True)
class Field:
    name: str
    offset: int
    kind: str  # u8/u16/u32/u64, bytes, or the name of a nested layout
    count: int = 1  # > 1 for an array; for `bytes`, the length


@dataclass(frozen=True)
class Layout:
    name: str
    size: int
    fields: tuple[Field, ...]

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.name} has no field {name}")


def _layout(name: str, size: int, spec: str) -> Layout:
    """Build a layout from 'name@offset:kind[xcount] ...' words."""
    fields = []
    for word in spec.split():
        fname, rest = word.split("@")
        offset, kind = rest.split(":")
        count = 1
        if "x" in kind:
            kind, n = kind.split("x")
            count = int(n)
        fields.append(Field(fname, int(offset), kind, count))
    return Layout(name, size, tuple(fields))


ERA_2 = "2.0"
ERA_3 = "3.0"

# (struct name, guest width, era) -> layout
LAYOUTS: dict[tuple[str, int, str], Layout] = {}


def _add(name: str, era: str, size32: int, spec32: str, size64: int, spec64: str) -> None:
    LAYOUTS[(name, 32, era)] = _layout(name, size32, spec32)
    LAYOUTS[(name, 64, era)] = _layout(name, size64, spec64)


# trap_info: the same in both eras.
for _era in (ERA_2, ERA_3):
    _add("trap_info", _era,
         8, "vector@0:u8 flags@1:u8 cs@2:u16 address@4:u32",
         16, "vector@0:u8 flags@1:u8 cs@2:u16 address@8:u64")

_add("multicall_entry", ERA_2,
     32, "op@0:u32 args@4:u32x7",
     64, "op@0:u64 args@8:u64x7")
_add("multicall_entry", ERA_3,
     32, "op@0:u32 result@4:u32 args@8:u32x6",
     64, "op@0:u64 result@8:u64 args@16:u64x6")
# Xen 2.0 wrote a multicall entry's result into args[5].
MULTICALL_2_0_RESULT_ARG = 5

_add("mmu_update", ERA_2, 8, "ptr@0:u32 val@4:u32", 16, "ptr@0:u64 val@8:u64")
_add("mmu_update", ERA_3, 16, "ptr@0:u64 val@8:u64", 16, "ptr@0:u64 val@8:u64")

_add("mmuext_op", ERA_3,
     12, "cmd@0:u32 arg1@4:u32 arg2@8:u32",
     24, "cmd@0:u32 arg1@8:u64 arg2@16:u64")

# callback_register: xen_callback_t is {cs, eip} for 32-bit guests, a bare address for 64-bit.
_add("callback_register", ERA_3,
     12, "type@0:u16 flags@2:u16 cs@4:u32 address@8:u32",
     16, "type@0:u16 flags@2:u16 address@8:u64")
_add("callback_unregister", ERA_3, 4, "type@0:u16", 4, "type@0:u16")

_add("cpu_user_regs", ERA_3,
     68, "ebx@0:u32 ecx@4:u32 edx@8:u32 esi@12:u32 edi@16:u32 ebp@20:u32 eax@24:u32 "
         "error_code@28:u16 entry_vector@30:u16 eip@32:u32 cs@36:u16 saved_upcall_mask@38:u8 "
         "eflags@40:u32 esp@44:u32 ss@48:u16 es@52:u16 ds@56:u16 fs@60:u16 gs@64:u16",
     200, "r15@0:u64 r14@8:u64 r13@16:u64 r12@24:u64 rbp@32:u64 rbx@40:u64 r11@48:u64 r10@56:u64 "
          "r9@64:u64 r8@72:u64 rax@80:u64 rcx@88:u64 rdx@96:u64 rsi@104:u64 rdi@112:u64 "
          "error_code@120:u32 entry_vector@124:u32 rip@128:u64 cs@136:u16 saved_upcall_mask@140:u8 "
          "rflags@144:u64 rsp@152:u64 ss@160:u16 es@168:u16 ds@176:u16 fs@184:u16 gs@192:u16")

_add("vcpu_guest_context", ERA_3,
     2800, "flags@512:u32 user_regs@516:cpu_user_regs trap_ctxt@584:trap_infox256 ldt_base@2632:u32 "
           "ldt_ents@2636:u32 gdt_frames@2640:u32x16 gdt_ents@2704:u32 kernel_ss@2708:u32 "
           "kernel_sp@2712:u32 ctrlreg@2716:u32x8 debugreg@2748:u32x8 event_callback_cs@2780:u32 "
           "event_callback_eip@2784:u32 failsafe_callback_cs@2788:u32 failsafe_callback_eip@2792:u32 "
           "vm_assist@2796:u32",
     5168, "flags@512:u64 user_regs@520:cpu_user_regs trap_ctxt@720:trap_infox256 ldt_base@4816:u64 "
           "ldt_ents@4824:u64 gdt_frames@4832:u64x16 gdt_ents@4960:u64 kernel_ss@4968:u64 "
           "kernel_sp@4976:u64 ctrlreg@4984:u64x8 debugreg@5048:u64x8 event_callback_eip@5112:u64 "
           "failsafe_callback_eip@5120:u64 syscall_callback_eip@5128:u64 vm_assist@5136:u64 "
           "fs_base@5144:u64 gs_base_kernel@5152:u64 gs_base_user@5160:u64")

# start_info as of 4.0 (3.0 lacks the trailing first_p2m_pfn/nr_p2m_frames).
_add("start_info", ERA_3,
     1112, "magic@0:bytesx32 nr_pages@32:u32 shared_info@36:u32 flags@40:u32 store_mfn@44:u32 "
           "store_evtchn@48:u32 console_mfn@52:u32 console_evtchn@56:u32 pt_base@60:u32 "
           "nr_pt_frames@64:u32 mfn_list@68:u32 mod_start@72:u32 mod_len@76:u32 cmd_line@80:bytesx1024 "
           "first_p2m_pfn@1104:u32 nr_p2m_frames@1108:u32",
     1168, "magic@0:bytesx32 nr_pages@32:u64 shared_info@40:u64 flags@48:u32 store_mfn@56:u64 "
           "store_evtchn@64:u32 console_mfn@72:u64 console_evtchn@80:u32 pt_base@88:u64 "
           "nr_pt_frames@96:u64 mfn_list@104:u64 mod_start@112:u64 mod_len@120:u64 "
           "cmd_line@128:bytesx1024 first_p2m_pfn@1152:u64 nr_p2m_frames@1160:u64")

# Sub-operation argument structs (xen/include/public/{sched,event_channel,vcpu}.h, RELEASE-4.17.0).
_add("sched_shutdown", ERA_3, 4, "reason@0:u32", 4, "reason@0:u32")
# The pre-3.0.3 event_channel_op took one struct: the command, then the command's own struct.
# Xen 2.0 had a reserved word before the union (RELEASE-2.0.0 event_channel.h).
_add("evtchn_op", ERA_2, 32, "cmd@0:u32 u@8:bytesx24", 32, "cmd@0:u32 u@8:bytesx24")
_add("evtchn_op", ERA_3, 28, "cmd@0:u32 u@4:bytesx24", 28, "cmd@0:u32 u@4:bytesx24")
_add("evtchn_port", ERA_3, 4, "port@0:u32", 4, "port@0:u32")  # send, close, unmask
_add("evtchn_bind_virq", ERA_3, 12, "virq@0:u32 vcpu@4:u32 port@8:u32",
     12, "virq@0:u32 vcpu@4:u32 port@8:u32")
_add("evtchn_alloc_unbound", ERA_3, 8, "dom@0:u16 remote_dom@2:u16 port@4:u32",
     8, "dom@0:u16 remote_dom@2:u16 port@4:u32")
_add("evtchn_bind_ipi", ERA_3, 8, "vcpu@0:u32 port@4:u32", 8, "vcpu@0:u32 port@4:u32")
_add("evtchn_bind_interdomain", ERA_3, 12, "remote_dom@0:u16 remote_port@4:u32 local_port@8:u32",
     12, "remote_dom@0:u16 remote_port@4:u32 local_port@8:u32")
_add("vcpu_set_singleshot_timer", ERA_3, 12, "timeout_abs_ns@0:u64 flags@8:u32",
     16, "timeout_abs_ns@0:u64 flags@8:u32")
_add("vcpu_register_vcpu_info", ERA_3, 16, "mfn@0:u64 offset@8:u32 rsvd@12:u32",
     16, "mfn@0:u64 offset@8:u32 rsvd@12:u32")


def layout(name: str, width: int, era: str) -> Layout:
    try:
        return LAYOUTS[(name, width, era)]
    except KeyError:
        other = ERA_3 if era == ERA_2 else ERA_2
        if (name, width, other) in LAYOUTS and name not in ("multicall_entry", "mmu_update"):
            return LAYOUTS[(name, width, other)]
        raise DecodeError(f"no layout of {name} for {width}-bit guests in the {era} era") from None


def field_size(kind: str, width: int, era: str) -> int:
    if kind in _SCALAR:
        return _SCALAR[kind]
    if kind == "bytes":
        return 1
    return layout(kind, width, era).size


def unpack(lay: Layout, data: bytes, width: int, era: str) -> dict[str, object]:
    """Unpack `data` (at least lay.size bytes) into {field: int | list | bytes | dict}."""
    out: dict[str, object] = {}
    for f in lay.fields:
        out[f.name] = _unpack_field(f, data, width, era)
    return out


def _unpack_field(f: Field, data: bytes, width: int, era: str) -> object:
    if f.kind == "bytes":
        return bytes(data[f.offset:f.offset + f.count])
    size = field_size(f.kind, width, era)
    values = []
    for i in range(f.count):
        start = f.offset + i * size
        chunk = data[start:start + size]
        if f.kind in _SCALAR:
            values.append(int.from_bytes(chunk, "little"))
        else:
            values.append(unpack(layout(f.kind, width, era), chunk, width, era))
    return values[0] if f.count == 1 else values


def pack_u(value: int, size: int) -> bytes:
    """Little-endian bytes of an unsigned value (used to build test images and probes)."""
    return struct.pack({1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[size], value & ((1 << (8 * size)) - 1))

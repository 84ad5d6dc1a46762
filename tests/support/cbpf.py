"""A classic BPF interpreter for the instructions ctbridge.conntrack.eventfilter emits, with the
kernel's netlink attribute loads (net/core/filter.c: bpf_skb_get_nlattr, _nest), so that a
program can be checked against the userspace selection on any message, label bits included.
The kernel test (tests/kernel/test_eventfilter.py) runs the same programs in the kernel."""

from __future__ import annotations

import struct

from ctbridge.conntrack import eventfilter as bpf

_NLA = struct.Struct("=HH")
_TYPE_MASK = 0x3FFF


def _nla_find(buf: bytes, start: int, end: int, want: int) -> int:
    """The offset of the first attribute of type ``want`` in buf[start:end] (nla_find), or 0."""
    off = start
    while off + 4 <= end:
        alen, atype = _NLA.unpack_from(buf, off)
        if alen < 4 or off + alen > end:
            return 0
        if atype & _TYPE_MASK == want:
            return off
        off += (alen + 3) & ~3
    return 0


def run(insns: list[tuple[int, int, int, int]], pkt: bytes) -> int:
    """What the program returns for ``pkt`` (0: dropped). A load beyond it returns 0, as in the kernel."""
    a = x = 0
    mem = [0] * 16
    pc = 0
    nlattr = (bpf.SKF_AD_OFF + bpf.SKF_AD_NLATTR) & 0xFFFFFFFF
    nest = (bpf.SKF_AD_OFF + bpf.SKF_AD_NLATTR_NEST) & 0xFFFFFFFF
    for _ in range(len(insns) + 1):  # forward jumps only: each instruction runs at most once
        code, jt, jf, k = insns[pc]
        pc += 1
        cls = code & 0x07
        if cls == bpf.BPF_RET:
            return k
        if cls == bpf.BPF_LD:
            mode, size = code & 0xE0, code & 0x18
            if mode == bpf.BPF_IMM:
                a = k
            elif mode == bpf.BPF_MEM:
                a = mem[k]
            elif mode == bpf.BPF_ABS and k == nlattr:
                a = 0 if a > len(pkt) - 4 else _nla_find(pkt, a, len(pkt), x)
            elif mode == bpf.BPF_ABS and k == nest:
                if a > len(pkt) - 4 or _NLA.unpack_from(pkt, a)[0] > len(pkt) - a:
                    a = 0
                else:
                    a = _nla_find(pkt, a + 4, a + _NLA.unpack_from(pkt, a)[0], x)
            else:
                at = k if mode == bpf.BPF_ABS else x + k
                n = {bpf.BPF_W: 4, bpf.BPF_H: 2, bpf.BPF_B: 1}[size]
                if at + n > len(pkt):
                    return 0
                a = int.from_bytes(pkt[at:at + n], "big")
        elif cls == bpf.BPF_LDX:
            x = k
        elif cls == bpf.BPF_ST:
            mem[k] = a
        elif cls == bpf.BPF_ALU and code & 0xF0 == bpf.BPF_AND:
            a &= k
        elif cls == bpf.BPF_MISC:
            x = a
        elif cls == bpf.BPF_JMP:
            op = code & 0xF0
            taken = {bpf.BPF_JEQ: a == k, bpf.BPF_JGT: a > k, bpf.BPF_JGE: a >= k, bpf.BPF_JSET: bool(a & k)}[op]
            pc += jt if taken else jf
        else:
            raise ValueError(f"instruction {code:#x} not interpreted")
    raise AssertionError("the program ran past its end")

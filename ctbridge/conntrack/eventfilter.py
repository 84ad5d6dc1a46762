"""The event socket's kernel-side filter: a classic BPF program (socket(7), SO_ATTACH_FILTER) that
drops, in the kernel, the events of flows the no-sync selection names (filter.no_sync_*), before
they are queued to the socket: they cost no receive buffer, no wake-up and no read.

Netlink hands a filter each message at offset 0 (nlmsghdr, then nfgenmsg, then the attributes),
and classic BPF finds attributes itself (the ancillary loads SKF_AD_NLATTR and
SKF_AD_NLATTR_NEST, include/uapi/linux/filter.h: A = the offset of attribute X within the
attributes from offset A, or 0). The program looks only at IPCTNL_MSG_CT_NEW messages (new flows
and updates): deletions always pass, so a flow that became no-sync after it was replicated still
ends on the peers, and expectation messages pass too. What it reads, each only where the
selection uses it:

- CTA_ZONE (be16; none: zone 0), CTA_MARK (be32; none: mark 0), CTA_LABELS (the kernel's
  bitmap of unsigned longs, in host order),
- CTA_TUPLE_ORIG > CTA_TUPLE_PROTO > CTA_PROTO_DST_PORT (be16; none, as for ICMP: no port).

A load beyond the message ends a classic BPF program with 0 (drop): the attributes read are
fixed-size in every message the kernel sends (ctnetlink_conntrack_event), and userspace checks
the same selection again (ctbridge.sync.filter.NoSync), so the filter only saves work.

Imports ctbridge.conntrack.abi.
"""

from __future__ import annotations

import ctypes
import socket
import struct
import sys
from collections.abc import Iterable

from ctbridge.conntrack import abi as ct

# include/uapi/linux/bpf_common.h and filter.h
BPF_LD, BPF_LDX, BPF_ST, BPF_ALU, BPF_JMP, BPF_RET, BPF_MISC = 0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x07
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_IMM, BPF_ABS, BPF_IND, BPF_MEM = 0x00, 0x20, 0x40, 0x60
BPF_AND = 0x50
BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET = 0x10, 0x20, 0x30, 0x40
BPF_K = 0x00
BPF_TAX = 0x00
SKF_AD_OFF = -0x1000
SKF_AD_NLATTR = 12
SKF_AD_NLATTR_NEST = 16
BPF_MAXINSNS = 4096
SO_ATTACH_FILTER = 26  # include/uapi/asm-generic/socket.h
SO_DETACH_FILTER = 27
PASS = 0xFFFFFFFF  # return: the whole message
DROP = 0
_ATTRS = 20  # the attributes follow the nlmsghdr (16) and the nfgenmsg (4)
_INSN = struct.Struct("=HBBI")  # struct sock_filter
_LONG = struct.calcsize("@L")

Insn = tuple[int, int | str, int | str, int]  # (code, jump if true, jump if false, k): a label or a count


def _host16(value: int) -> int:
    """A host-order 16-bit field as a BPF half-word load (network order) reads it."""
    return int.from_bytes(struct.pack("=H", value), "big")


def label_byte(bit: int) -> tuple[int, int]:
    """Where ct label ``bit`` lies in CTA_LABELS' payload (unsigned longs, host order): (byte
    offset, the bit's mask in that byte)."""
    word, within = divmod(bit, 8 * _LONG)
    raw = (1 << within).to_bytes(_LONG, sys.byteorder)
    index = next(i for i, b in enumerate(raw) if b)
    return word * _LONG + index, raw[index]


def _find(attr: int) -> list[Insn]:
    """A = the offset of top-level attribute ``attr`` (0: none)."""
    return [(BPF_LDX | BPF_IMM, 0, 0, attr), (BPF_LD | BPF_IMM, 0, 0, _ATTRS),
            (BPF_LD | BPF_W | BPF_ABS, 0, 0, (SKF_AD_OFF + SKF_AD_NLATTR) & 0xFFFFFFFF)]


def _nested(attr: int) -> list[Insn]:
    """A = the offset of ``attr`` within the attribute at offset A (0: none)."""
    return [(BPF_LDX | BPF_IMM, 0, 0, attr),
            (BPF_LD | BPF_W | BPF_ABS, 0, 0, (SKF_AD_OFF + SKF_AD_NLATTR_NEST) & 0xFFFFFFFF)]


def program(marks: Iterable[tuple[int, int]] = (), labels: Iterable[int] = (), zones: Iterable[int] = (),
            ports: Iterable[tuple[int, int]] = ()) -> list[tuple[int, int, int, int]]:
    """The filter's instructions (code, jt, jf, k) for this selection: ``marks`` (value, mask),
    label bits, zones, destination port ranges (low, high)."""
    marks, labels, zones, ports = list(marks), sorted(set(labels)), sorted(set(zones)), list(ports)
    code: list[Insn | str] = [(BPF_LD | BPF_H | BPF_ABS, 0, 0, 4),  # nlmsg_type
                              (BPF_JMP | BPF_JEQ | BPF_K, 0, "pass", _host16(ct.MSG_CT_NEW))]
    if zones:
        code += [*_find(ct.CTA_ZONE), (BPF_JMP | BPF_JEQ | BPF_K, "zone0", 0, 0),
                 (BPF_MISC | BPF_TAX, 0, 0, 0), (BPF_LD | BPF_H | BPF_IND, 0, 0, 4)]
        code += [(BPF_JMP | BPF_JEQ | BPF_K, "drop", 0, z) for z in zones]
        code += [(BPF_JMP | BPF_JEQ | BPF_K, "marks", "marks", 0), "zone0"]
        code += [(BPF_JMP | BPF_JEQ | BPF_K, "drop", "marks", 0)] if 0 in zones else []
    code.append("marks")
    if marks:
        code += [*_find(ct.CTA_MARK), (BPF_JMP | BPF_JEQ | BPF_K, "mark0", 0, 0),
                 (BPF_MISC | BPF_TAX, 0, 0, 0), (BPF_LD | BPF_W | BPF_IND, 0, 0, 4), (BPF_ST, 0, 0, 0)]
        for value, mask in marks:
            code += [(BPF_LD | BPF_MEM, 0, 0, 0), (BPF_ALU | BPF_AND | BPF_K, 0, 0, mask),
                     (BPF_JMP | BPF_JEQ | BPF_K, "drop", 0, value)]
        code += [(BPF_JMP | BPF_JEQ | BPF_K, "labels", "labels", 0), "mark0"]
        if any(value == 0 for value, _mask in marks):  # no CTA_MARK is mark 0
            code.append((BPF_JMP | BPF_JEQ | BPF_K, "drop", "drop", 0))
    code.append("labels")
    if labels:
        code += [*_find(ct.CTA_LABELS), (BPF_JMP | BPF_JEQ | BPF_K, "ports", 0, 0), (BPF_MISC | BPF_TAX, 0, 0, 0)]
        for bit in labels:
            offset, mask = label_byte(bit)
            code += [(BPF_LD | BPF_B | BPF_IND, 0, 0, 4 + offset), (BPF_JMP | BPF_JSET | BPF_K, "drop", 0, mask)]
    code.append("ports")
    if ports:
        code += [*_find(ct.CTA_TUPLE_ORIG), (BPF_JMP | BPF_JEQ | BPF_K, "pass", 0, 0), *_nested(ct.CTA_TUPLE_PROTO),
                 (BPF_JMP | BPF_JEQ | BPF_K, "pass", 0, 0), *_nested(ct.CTA_PROTO_DST_PORT),
                 (BPF_JMP | BPF_JEQ | BPF_K, "pass", 0, 0), (BPF_MISC | BPF_TAX, 0, 0, 0),
                 (BPF_LD | BPF_H | BPF_IND, 0, 0, 4)]
        for i, (low, high) in enumerate(ports):
            code += [(BPF_JMP | BPF_JGE | BPF_K, 0, f"range{i}", low),
                     (BPF_JMP | BPF_JGT | BPF_K, f"range{i}", "drop", high), f"range{i}"]
    code += ["pass", (BPF_RET | BPF_K, 0, 0, PASS), "drop", (BPF_RET | BPF_K, 0, 0, DROP)]
    return _assemble(code)


def _assemble(code: list[Insn | str]) -> list[tuple[int, int, int, int]]:
    """Labels (strings in the list, and as jump targets) resolved to relative jumps."""
    where: dict[str, int] = {}
    insns: list[Insn] = []
    for item in code:
        if isinstance(item, str):
            where[item] = len(insns)
        else:
            insns.append(item)
    out = []
    for i, (op, jt, jf, k) in enumerate(insns):
        jt = where[jt] - i - 1 if isinstance(jt, str) else jt
        jf = where[jf] - i - 1 if isinstance(jf, str) else jf
        if not (0 <= jt <= 255 and 0 <= jf <= 255):  # classic BPF jumps forward, at most 255
            raise ValueError("the no-sync selection is too long for one filter")
        out.append((op, jt, jf, k))
    if len(out) > BPF_MAXINSNS:
        raise ValueError("the no-sync selection is too long for one filter")
    return out


def attach(sock: socket.socket, insns: list[tuple[int, int, int, int]] | None) -> None:
    """Put ``insns`` on ``sock`` (replacing any filter), or take its filter off (None)."""
    if insns is None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
        except OSError:  # ENOENT: it had none
            pass
        return
    raw = b"".join(_INSN.pack(*insn) for insn in insns)
    buf = ctypes.create_string_buffer(raw, len(raw))  # the kernel copies it during the call
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("@HP", len(insns), ctypes.addressof(buf)))

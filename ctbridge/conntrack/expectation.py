"""Expectations: ctnetlink's IPCTNL_MSG_EXP_* messages <-> entries ctbridge replicates. Pure.

A connection-tracking helper (FTP, SIP: `ct helper set` in the ruleset) reads a control
connection and tells the kernel which connection comes next: an expectation, with the master
flow it belongs to, the tuple and mask it matches, and the NAT the new connection follows. The
connection that matches is RELATED; a new master without the expectation sees a passive FTP
data connection, or a SIP call's media, as NEW and a strict ruleset drops it.

An expectation is replicated like a flow, as an Entry: its key is its family with EXPECTATION
set, its zone, and its CTA_EXPECT_TUPLE payload (the kernel keeps one expectation per tuple and
zone, __nf_ct_expect_find); its attributes start with CTA_EXPECT_TUPLE, then the kernel's, less
CTA_EXPECT_ID (a hash of this kernel's pointer, meaningless elsewhere). Flow keys start with
AF_INET (2) or AF_INET6 (10), so the two never collide.

Writing one needs its master in the table first, with its helper (CTA_HELP, which a committed
flow carries): ctnetlink_alloc_expect refuses an expectation whose master has no helper
(EOPNOTSUPP) and ctnetlink_create_expect one whose master is missing (ENOENT). The kernel starts
a new expectation's timer from the helper's policy (nf_ct_expect_insert), so what is left of the
replicated one is set by a second request, which changes the existing one
(ctnetlink_change_expect).
"""

from __future__ import annotations

import struct

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack.codec import CodecError, Entry, Event, EventKind, align, attr, iter_attrs, make_key, message

EXPECTATION = 0x80  # set in the first byte of an expectation's key (and in its wire messages' family)
# No helper of the kernel's expects a connection for longer than 5 minutes (nf_conntrack_ftp.c,
# _irc.c, _tftp.c, _sane.c: 5 * 60; _sip.c 3 * 60, _h323_main.c 240): a peer's expectation is
# never written for longer, whatever it says.
TIMEOUT_MAX = 300
_BE16 = struct.Struct("!H")
_BE32 = struct.Struct("!I")
_NLMSG = struct.Struct("=IHHII")
_NEW_FLAGS = ct.NLM_F_CREATE | ct.NLM_F_EXCL
_REQUIRED = (ct.CTA_EXPECT_MASTER, ct.CTA_EXPECT_MASK)  # ctnetlink_new_expect answers EINVAL without them


def is_expectation(key: bytes) -> bool:
    return bool(key) and key[0] & EXPECTATION != 0


def family_of(key: bytes) -> int:
    return key[0] & ~EXPECTATION


def entry_from_attrs(family: int, buf: bytes, start: int, end: int) -> Entry:
    """An expectation as the kernel sent it (the attributes of one IPCTNL_MSG_EXP_* message)
    in replication form."""
    tup = b""
    zone = 0
    seen: set[int] = set()
    rest: list[bytes] = []
    for t, s, e in iter_attrs(buf, start, end):
        seen.add(t)
        if t == ct.CTA_EXPECT_TUPLE:
            tup = buf[s:e]
        elif t == ct.CTA_EXPECT_ID:
            continue
        else:
            if t == ct.CTA_EXPECT_ZONE:
                if e - s != 2:
                    raise CodecError("CTA_EXPECT_ZONE is not 2 bytes")
                zone = _BE16.unpack_from(buf, s)[0]
            rest.append(_whole(buf, s, e))
    if not tup or any(t not in seen for t in _REQUIRED):
        raise CodecError("expectation lacks its tuple, mask or master")
    key = make_key(EXPECTATION | family, zone, tup)
    return Entry(key, family, attr(ct.CTA_EXPECT_TUPLE, tup, nested=True) + b"".join(rest))


def decode_events(buf: bytes, skip_portid: int = -1) -> list[Event]:
    """The expectation events in one receive buffer (NFNLGRP_CONNTRACK_EXP_NEW and _DESTROY);
    those caused by port ``skip_portid`` (the reader's own writes) are left out undecoded."""
    out: list[Event] = []
    n = len(buf)
    off = 0
    while n - off >= 16:
        mlen, mtype, mflags, _seq, mpid = _NLMSG.unpack_from(buf, off)
        if mlen < 16 or off + mlen > n:
            raise CodecError(f"netlink message at offset {off} has bad length {mlen}")
        if mpid != skip_portid and mtype in (ct.MSG_EXP_NEW, ct.MSG_EXP_DELETE):
            if mlen < 20:
                raise CodecError("expectation message shorter than its nfgenmsg header")
            entry = entry_from_attrs(buf[off + 16], buf, off + 20, off + mlen)
            if mtype == ct.MSG_EXP_DELETE:
                kind = EventKind.DESTROY
            else:
                kind = EventKind.NEW if mflags & _NEW_FLAGS == _NEW_FLAGS else EventKind.UPDATE
            out.append(Event(kind, entry, mpid))
        off += (mlen + 3) & ~3
    return out


def master_key(entry: Entry) -> bytes:
    """The flow key of the expectation's master (CTA_EXPECT_MASTER is its original tuple)."""
    for t, s, e in iter_attrs(entry.attrs):
        if t == ct.CTA_EXPECT_MASTER:
            return make_key(entry.family, (entry.key[1] << 8) | entry.key[2], entry.attrs[s:e])
    raise CodecError("expectation lacks CTA_EXPECT_MASTER")


def timeout_offset(buf: bytes, start: int = 0) -> int:
    """Where the seconds of CTA_EXPECT_TIMEOUT lie in buf[start:], or -1 (none, or attributes
    that do not parse: a peer's message is never trusted to)."""
    try:
        for t, s, e in iter_attrs(buf, start):
            if t == ct.CTA_EXPECT_TIMEOUT:
                return s if e - s == 4 else -1
    except CodecError:
        pass
    return -1


def timeout_of(buf: bytes, start: int = 0) -> int:
    """CTA_EXPECT_TIMEOUT, seconds left when the kernel reported it (0 when absent or unreadable:
    such an expectation counts as run out)."""
    at = timeout_offset(buf, start)
    seconds: int = _BE32.unpack_from(buf, at)[0] if at >= 0 else 0
    return seconds


def with_timeout(buf: bytes, start: int, seconds: int) -> bytes:
    """buf with its CTA_EXPECT_TIMEOUT (at ``start`` on) set to ``seconds``; buf as it is without one."""
    at = timeout_offset(buf, start)
    if at < 0:
        return buf
    return buf[:at] + _BE32.pack(max(0, min(seconds, 0xFFFFFFFF))) + buf[at + 4:]


def _whole(buf: bytes, s: int, e: int) -> bytes:
    """The attribute whose payload is buf[s:e], header and padding included (the last one of a
    message may come without its padding)."""
    raw = bytes(buf[s - 4:e])
    return raw + bytes(align(len(raw)) - len(raw))


def _without(attrs: bytes, drop: int) -> bytes:
    return b"".join(_whole(attrs, s, e) for t, s, e in iter_attrs(attrs) if t != drop)


def dump_request(seq: int, family: int = 0) -> bytes:
    """Every expectation of this namespace (family 0: IPv4 and IPv6)."""
    return message(ct.MSG_EXP_GET, ct.NLM_F_REQUEST | ct.NLM_F_DUMP, seq, family)


def new_request(entry: Entry, seq: int, seconds: int | None = None) -> bytes:
    """IPCTNL_MSG_EXP_NEW that creates the expectation, or changes the one the kernel holds
    (its timeout: ``seconds``, else as replicated). The flags that only the kernel may set on an
    expectation (NF_CT_EXPECT_USERSPACE) are cleared by the kernel itself."""
    attrs = entry.attrs
    if seconds is not None:
        attrs = _without(attrs, ct.CTA_EXPECT_TIMEOUT) + attr(ct.CTA_EXPECT_TIMEOUT, _BE32.pack(seconds))
    return message(ct.MSG_EXP_NEW, ct.NLM_F_REQUEST | ct.NLM_F_CREATE, seq, entry.family, attrs)


def delete_request(key: bytes, seq: int) -> bytes:
    """IPCTNL_MSG_EXP_DELETE of one expectation (its tuple and zone: without a tuple the kernel
    would remove every expectation, ctnetlink_del_expect)."""
    if not is_expectation(key) or len(key) < 4:
        raise CodecError("not an expectation's key")
    zone = (key[1] << 8) | key[2]
    body = attr(ct.CTA_EXPECT_TUPLE, key[3:], nested=True)
    if zone:
        body += attr(ct.CTA_EXPECT_ZONE, _BE16.pack(zone))
    return message(ct.MSG_EXP_DELETE, ct.NLM_F_REQUEST, seq, family_of(key), body)

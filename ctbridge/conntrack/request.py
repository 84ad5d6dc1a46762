"""CT_NEW requests that write a flow into a kernel: create it, update it in place, or release one a
former master kept. Pure functions over bytes, like ctbridge.conntrack.codec, whose entries they take.

Creating a flow is the commit's and inject mode's hot path: ``new_request`` learns a plan per
attribute layout (``_fast_request``) and falls back to a general walk (``_general_request``) for
layouts it cannot plan, and for NAT bindings, which need CTA_NAT_* attributes (``_nat_setup``).
What the kernel refuses in a CT_NEW is codec.NOT_SETTABLE. Imports only conntrack.abi and codec.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, NamedTuple

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec
from ctbridge.conntrack.codec import NOT_SETTABLE as _NOT_SETTABLE
from ctbridge.conntrack.codec import (
    CodecError,
    Entry,
    Record,
    align,
    attr,
    attr_map,
    extend_ranges,
    iter_attrs,
    message,
    moved,
    ranges_getter,
    split_key,
)

# From include/uapi/linux/netlink.h and include/uapi/linux/netfilter/nfnetlink.h (host order)
_NLMSG = struct.Struct("=IHHII")  # struct nlmsghdr: len, type, flags, seq, pid
_NLA = struct.Struct("=HH")  # struct nlattr: len, type
_NFGEN = struct.Struct("=BBH")  # struct nfgenmsg: family, version, res_id (res_id is big endian)
_U32 = struct.Struct("=I")
_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_NESTED = ct.NLA_F_NESTED

def key_protocol(key: bytes) -> int:
    """The IP protocol number of a flow key (CTA_PROTO_NUM of its original tuple)."""
    _ip, proto = _tuple_fields(split_key(key)[2])
    num = proto.get(ct.CTA_PROTO_NUM, b"")
    if len(num) != 1:
        raise CodecError("tuple lacks CTA_PROTO_NUM")
    return num[0]


def release_request(key: bytes, seq: int, seconds: int | None) -> bytes:
    """CT_NEW that updates an entry a node kept from when it was master (a missing one answers
    ENOENT): a TCP entry is marked BE_LIBERAL in both directions, because its windows fall behind
    the traffic the new master carries and a packet of that traffic would be INVALID here if the
    node took the role back before its commit landed; with ``seconds``, its timeout becomes that
    (the purge: what no packet refreshes goes away)."""
    family, zone, orig = split_key(key)
    body = _NLA.pack(4 + len(orig), ct.CTA_TUPLE_ORIG | _NESTED) + orig
    if zone:
        body += attr(ct.CTA_ZONE, _BE16.pack(zone))
    if seconds is not None:
        body += attr(ct.CTA_TIMEOUT, _BE32.pack(seconds))
    if key_protocol(key) == ct.IPPROTO_TCP:
        # struct nf_ct_tcp_flags {flags, mask}: nlattr_to_tcp (net/netfilter/nf_conntrack_proto_tcp.c)
        # changes only the bits in the mask, so every other flag stays as the kernel has it
        loose = bytes((ct.IP_CT_TCP_FLAG_BE_LIBERAL, ct.IP_CT_TCP_FLAG_BE_LIBERAL))
        body += attr(ct.CTA_PROTOINFO, attr(ct.CTA_PROTOINFO_TCP, attr(ct.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, loose)
                                            + attr(ct.CTA_PROTOINFO_TCP_FLAGS_REPLY, loose), nested=True),
                     nested=True)
    elif seconds is None:
        raise CodecError("nothing to change: not a TCP flow, and no timeout")
    return message(ct.MSG_CT_NEW, ct.NLM_F_REQUEST, seq, family, body)


# ctnetlink_change_conntrack refuses these on an existing entry (EOPNOTSUPP), and a helper cannot
# be attached to an entry that exists.
_NOT_UPDATABLE = _NOT_SETTABLE | {ct.CTA_TUPLE_MASTER, ct.CTA_HELP}

# Status bits user space must not flip (nf_ct_change_status_common answers EBUSY to any change of
# EXPECTED, CONFIRMED or DYING). On create CONFIRMED is already set when the status is applied and
# EXPECTED is not yet (the kernel sets it once it has found the master), so it is sent set and
# cleared respectively; on update both are sent as the source had them, which is what an
# existing copy of the same flow has. DYING is never sent.
_STATUS_CLEAR_CREATE = ct.IPS_EXPECTED | ct.IPS_DYING
_STATUS_CLEAR_UPDATE = ct.IPS_DYING

# TCP flags worth carrying to another kernel. The rest describe window tracking state, which
# ctnetlink does not expose, so they would be wrong on the receiver.
_TCP_FLAGS_CARRIED = (
    ct.IP_CT_TCP_FLAG_WINDOW_SCALE | ct.IP_CT_TCP_FLAG_SACK_PERM | ct.IP_CT_TCP_FLAG_CLOSE_INIT
    | ct.IP_CT_TCP_FLAG_BE_LIBERAL
)
# Window tracking flags every write clears (in the mask, never in the value): an entry this kernel
# already holds (a returning master's own, updated by its commit) keeps them otherwise, and with
# "data unacknowledged" left set every packet gives the entry the short unacknowledged timeout
# (nf_conntrack_tcp_timeout_unacknowledged, 300 s): an idle connection died five minutes into its
# first idle period after a failback. Cleared, the kernel sets them again from the next packets.
_TCP_FLAGS_RESET = ct.IP_CT_TCP_FLAG_DATA_UNACKNOWLEDGED | ct.IP_CT_TCP_FLAG_MAXACK_SET
_TCP_FLAGS_MASK = _TCP_FLAGS_CARRIED | _TCP_FLAGS_RESET


def _tcp_protoinfo(buf: bytes, s: int, e: int, liberal: bool) -> bytes:
    """Rewrite CTA_PROTOINFO for TCP so its flags apply (the kernel dumps them with mask 0)."""
    out = []
    for t, ps, pe in iter_attrs(buf, s, e):
        if t != ct.CTA_PROTOINFO_TCP:
            out.append(attr(t, buf[ps:pe], nested=True))
            continue
        inner = []
        for it, xs, xe in iter_attrs(buf, ps, pe):
            if it in (ct.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, ct.CTA_PROTOINFO_TCP_FLAGS_REPLY):
                if xe - xs < 1:
                    raise CodecError("TCP flags attribute is empty")
                flags = buf[xs] & _TCP_FLAGS_CARRIED
                if liberal:
                    flags |= ct.IP_CT_TCP_FLAG_BE_LIBERAL
                inner.append(attr(it, bytes((flags, _TCP_FLAGS_MASK))))
            else:
                inner.append(attr(it, buf[xs:xe]))
        out.append(attr(ct.CTA_PROTOINFO_TCP, b"".join(inner), nested=True))
    return attr(ct.CTA_PROTOINFO, b"".join(out), nested=True)


def _tuple_fields(buf: bytes) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """(CTA_TUPLE_IP attributes, CTA_TUPLE_PROTO attributes) of a tuple payload."""
    top = attr_map(buf)
    try:
        return attr_map(top[ct.CTA_TUPLE_IP]), attr_map(top[ct.CTA_TUPLE_PROTO])
    except KeyError as exc:
        raise CodecError("tuple lacks CTA_TUPLE_IP or CTA_TUPLE_PROTO") from exc


def _encode_tuple(ip: dict[int, bytes], proto: dict[int, bytes]) -> bytes:
    ip_part = b"".join(attr(t, v) for t, v in sorted(ip.items()))
    proto_part = b"".join(attr(t, v) for t, v in sorted(proto.items()))
    return attr(ct.CTA_TUPLE_IP, ip_part, nested=True) + attr(ct.CTA_TUPLE_PROTO, proto_part, nested=True)


def _nat_setup(family: int, orig: bytes, reply: bytes, status: int) -> tuple[bytes, list[bytes]]:
    """The reply tuple and CTA_NAT_* attributes that recreate a NAT binding on another kernel.

    A NAT binding exists in the kernel only as a reply tuple that differs from the inverted
    original plus the SRC_NAT/DST_NAT status bits, and those bits cannot be set by user space
    (IPS_UNCHANGEABLE_MASK). They are set by nf_nat_setup_info when a CTA_NAT_SRC/DST range is
    given, and only if the range changes the tuple, so the entry is sent with its un-NATed reply
    tuple and a one-address, one-port range that the kernel maps back to the original binding.
    """
    o_ip, o_proto = _tuple_fields(orig)
    r_ip, r_proto = _tuple_fields(reply)
    v6 = family == ct.AF_INET6
    src, dst = (ct.CTA_IP_V6_SRC, ct.CTA_IP_V6_DST) if v6 else (ct.CTA_IP_V4_SRC, ct.CTA_IP_V4_DST)
    minip, maxip = (ct.CTA_NAT_V6_MINIP, ct.CTA_NAT_V6_MAXIP) if v6 else (ct.CTA_NAT_V4_MINIP, ct.CTA_NAT_V4_MAXIP)
    plain_ip = dict(r_ip)
    plain_proto = dict(r_proto)
    nat: list[bytes] = []
    for bit, cta, ip_here, ip_orig, port_here, port_orig in (
        # DNAT first: the kernel sets up the destination manipulation before the source one.
        (ct.IPS_DST_NAT, ct.CTA_NAT_DST, src, dst, ct.CTA_PROTO_SRC_PORT, ct.CTA_PROTO_DST_PORT),
        (ct.IPS_SRC_NAT, ct.CTA_NAT_SRC, dst, src, ct.CTA_PROTO_DST_PORT, ct.CTA_PROTO_SRC_PORT),
    ):
        if not status & bit:
            continue
        if ip_here not in r_ip or ip_orig not in o_ip:
            raise CodecError("NAT entry lacks the addresses of its tuples")
        body = attr(minip, r_ip[ip_here]) + attr(maxip, r_ip[ip_here])
        plain_ip[ip_here] = o_ip[ip_orig]
        if port_here in r_proto and port_orig in o_proto:
            port = r_proto[port_here]
            plain_proto[port_here] = o_proto[port_orig]
        elif bit == ct.IPS_SRC_NAT and ct.CTA_PROTO_ICMP_ID in r_proto:
            port = r_proto[ct.CTA_PROTO_ICMP_ID]
            plain_proto[ct.CTA_PROTO_ICMP_ID] = o_proto.get(ct.CTA_PROTO_ICMP_ID, port)
        elif bit == ct.IPS_SRC_NAT and ct.CTA_PROTO_ICMPV6_ID in r_proto:
            port = r_proto[ct.CTA_PROTO_ICMPV6_ID]
            plain_proto[ct.CTA_PROTO_ICMPV6_ID] = o_proto.get(ct.CTA_PROTO_ICMPV6_ID, port)
        else:
            port = b""
        if port:
            body += attr(ct.CTA_NAT_PROTO, attr(ct.CTA_PROTONAT_PORT_MIN, port)
                         + attr(ct.CTA_PROTONAT_PORT_MAX, port), nested=True)
        nat.append(attr(cta, body, nested=True))
    # Whatever else the reply tuple holds (CTA_TUPLE_ZONE of a directional zone) stays as it was.
    rest = b"".join(attr(t, v) for t, v in attr_map(reply).items() if t not in (ct.CTA_TUPLE_IP, ct.CTA_TUPLE_PROTO))
    return attr(ct.CTA_TUPLE_REPLY, _encode_tuple(plain_ip, plain_proto) + rest, nested=True), nat


class _Layout(NamedTuple):
    """How to turn one attribute layout into a CT_NEW body without walking it again.

    Entries dumped by one kernel come in a handful of layouts (IPv4 TCP, IPv6 UDP, with a zone,
    ...) whose attributes differ in value only, so the walk done once per layout is reused. A
    layout is recognised by its attribute header words, all read by one struct call and compared
    as a tuple; any difference sends the entry down the general path.
    """

    heads: struct.Struct  # reads the header word of every attribute
    expect: tuple[int, ...]  # the header words of this layout
    copy: Callable[[bytearray], tuple[bytearray, ...]]  # the byte ranges that form the body
    size: int  # length of the body
    status: int  # payload offset of CTA_STATUS, -1 if none
    tcp: int  # offset of a kernel-layout TCP CTA_PROTOINFO, -1 if none
    zone: int  # payload offset of CTA_ZONE, -1 if none
    timeout: int  # payload offset of CTA_TIMEOUT, -1 if none
    ranges: tuple[slice, ...]  # what ``copy`` takes


_LAYOUTS: dict[tuple[bool, int, bytes, int], _Layout | None] = {}


def _learn_layout(buf: bytes, update: bool) -> _Layout | None:
    action = _UPDATE_ACTION if update else _CREATE_ACTION
    fmt = ["="]
    expect = []
    ranges: list[slice] = []
    status = tcp = zone = timeout = -1
    pos = 0
    for t, s, e in iter_attrs(buf):
        off = s - 4
        fmt.append(f"{off - pos}xI" if off > pos else "I")
        pos = off + 4
        expect.append(_U32.unpack_from(buf, off)[0])
        what = action.get(t, 0)
        nxt = off + align(e - off)
        if t == ct.CTA_ZONE:
            if e - s != 2 or zone >= 0:
                return None
            zone = s
        if what == 1:
            continue  # dropped
        if t == ct.CTA_TIMEOUT:
            if e - s != 4 or timeout >= 0:
                return None
            timeout = s
        if what == 2 and e - s != 4:
            return None
        if what == 2:
            status = s
        elif what == 3:
            if not (e - off == _TCP_INFO_LEN and buf[off + 4:off + 8] == _TCP_INFO_HEAD
                    and buf[off + 32:off + 36] == _TCP_FLAGS_O_HEAD and buf[off + 40:off + 44] == _TCP_FLAGS_R_HEAD):
                return None
            tcp = off
            # The flags are patched at fixed offsets, so every entry of this layout must have the
            # same inner attribute headers, not only the first one seen.
            for inner in (4, 8, 16, 24, 32, 40):
                fmt.append(f"{off + inner - pos}xI")
                pos = off + inner + 4
                expect.append(_U32.unpack_from(buf, off + inner)[0])
        extend_ranges(ranges, off, nxt)
    if not ranges or ranges[-1].stop > len(buf):
        return None
    copy = ranges_getter(ranges)
    size = sum(r.stop - r.start for r in ranges)
    return _Layout(struct.Struct("".join(fmt)), tuple(expect), copy, size, status, tcp, zone, timeout,
                   tuple(ranges))


def _shifted(layout: _Layout | None, start: int) -> _Layout | None:
    """A layout learnt on attributes alone, for the same attributes at ``start`` in a buffer."""
    if layout is None or start == 0:
        return layout
    ranges = [slice(r.start + start, r.stop + start) for r in layout.ranges]

    def at(off: int) -> int:
        return off + start if off >= 0 else -1
    return layout._replace(heads=struct.Struct(f"={start}x" + layout.heads.format[1:]), copy=ranges_getter(ranges),
                           status=at(layout.status), tcp=at(layout.tcp), zone=at(layout.zone),
                           timeout=at(layout.timeout), ranges=tuple(ranges))


def _fast_request(entry: Entry | Record, seq: int, update: bool, liberal: bool) -> bytes | None:
    """The CT_NEW through a learnt layout, or None when the general path must do it."""
    if type(entry) is Record:
        buf, start, extend = entry.buf, entry.start, entry.extend
    else:
        buf, start, extend = entry.attrs, 0, 0.0
    key = (update, len(buf), buf[start:start + 8], start)
    layout = _LAYOUTS.get(key, _MISSING)
    if layout is _MISSING:
        if len(_LAYOUTS) >= codec.LAYOUTS_MAX:
            _LAYOUTS.clear()
        layout = _LAYOUTS[key] = _shifted(_learn_layout(buf[start:], update), start)
    if layout is None or layout.heads.unpack_from(buf) != layout.expect:
        return None
    zo = layout.zone
    if (buf[zo:zo + 2] if zo >= 0 else b"\0\0") != entry.key[1:3]:
        raise CodecError(_zone_mismatch(entry.key, buf[zo:zo + 2] if zo >= 0 else b"\0\0"))
    ba = bytearray(buf)
    so = layout.status
    if so >= 0:
        low = ba[so + 3]  # status bits 0-7, big endian
        if low & _NAT_LOW and not update:
            return None  # the NAT binding needs CTA_NAT_* attributes: general path
        if (low & _CONFIRMED == 0 or ba[so + 2] & _DYING_BYTE2) or (low & _EXPECTED_LOW and not update):
            clear = _STATUS_CLEAR_UPDATE if update else _STATUS_CLEAR_CREATE
            ba[so:so + 4] = _BE32.pack((_BE32.unpack_from(ba, so)[0] | _CONFIRMED) & ~clear)
    po = layout.tcp
    if po >= 0:
        extra = _LIBERAL if liberal else 0
        ba[po + 36] = (ba[po + 36] & _TCP_FLAGS_CARRIED) | extra
        ba[po + 37] = _TCP_FLAGS_MASK
        ba[po + 44] = (ba[po + 44] & _TCP_FLAGS_CARRIED) | extra
        ba[po + 45] = _TCP_FLAGS_MASK
    to = layout.timeout
    if extend and to >= 0:
        _BE32.pack_into(ba, to, moved(_BE32.unpack_from(ba, to)[0], extend))
    head = _HEAD.pack(20 + layout.size, ct.MSG_CT_NEW, _UPDATE_FLAGS if update else _CREATE_FLAGS, seq, 0,
                      entry.family, ct.NFNETLINK_V0, 0)
    return head + b"".join(layout.copy(ba))


def _zone_mismatch(key: bytes, zone: bytes) -> str:
    """The flow's key (from a sync message's head) names one zone and its CTA_ZONE another: written,
    the kernel would hold the flow under another key than the cache does."""
    return (f"flow in zone {int.from_bytes(key[1:3], 'big')} carries CTA_ZONE "
            f"{int.from_bytes(zone, 'big') if len(zone) == 2 else zone.hex()}: not written")


_MISSING: Any = object()
_HEAD = struct.Struct("=IHHIIBBH")  # nlmsghdr + nfgenmsg
_LIBERAL = ct.IP_CT_TCP_FLAG_BE_LIBERAL
_NAT_LOW = ct.IPS_SRC_NAT | ct.IPS_DST_NAT  # both in the status word's low byte
_EXPECTED_LOW = ct.IPS_EXPECTED
_DYING_BYTE2 = ct.IPS_DYING >> 8


def new_request(entry: Entry | Record, seq: int, *, liberal: bool = True, update: bool = False,
                keep_status: bool = True) -> bytes:
    """CT_NEW that recreates ``entry`` in another kernel.

    ``update=False`` asks for creation only (NLM_F_EXCL: an existing entry answers EEXIST and is
    left alone); ``update=True`` changes an existing entry in place (a missing one answers
    ENOENT), without the attributes the kernel takes only at creation (NAT binding, master,
    helper). ``liberal`` sets
    IP_CT_TCP_FLAG_BE_LIBERAL on TCP entries, because TCP window state is not carried and
    mid-stream packets would otherwise be judged INVALID. ``keep_status=False`` leaves the status
    out, for an update the kernel refused because a bit may only be set, never cleared.

    This runs once per committed entry: see ``_Layout`` for the fast path.
    """
    if keep_status:
        fast = _fast_request(entry, seq, update, liberal)
        if fast is not None:
            return fast
    return _general_request(entry, seq, liberal, update, keep_status)


def _general_request(entry: Entry | Record, seq: int, liberal: bool, update: bool, keep_status: bool) -> bytes:
    """new_request for any layout: walks every attribute."""
    buf = entry.attrs
    # Per attribute: 0 copy unchanged, 1 drop, 2 status, 3 protoinfo, 4 original tuple, 5 reply tuple.
    action = _UPDATE_ACTION if update else _CREATE_ACTION
    parts: list[bytes] = []
    status = 0
    reply_at = -1
    orig_s = orig_e = reply_s = reply_e = 0
    off = 0
    run = 0  # start of the current run of attributes copied unchanged
    n = len(buf)
    unpack = _NLA.unpack_from
    zone = b"\0\0"
    while n - off >= 4:
        alen, atype = unpack(buf, off)
        if alen < 4 or off + alen > n:
            raise CodecError(f"attribute at offset {off} has bad length {alen}")
        nxt = off + ((alen + 3) & ~3)
        if atype & 0x3FFF == ct.CTA_ZONE:
            zone = buf[off + 4:off + alen]
        what = action.get(atype & 0x3FFF, 0)
        if what == 0:
            pass
        elif what == 4:
            orig_s, orig_e = off + 4, off + alen
        else:
            if run < off:
                parts.append(buf[run:off])
            run = nxt
            if what == 5:
                reply_s, reply_e = off + 4, off + alen
                reply_at = len(parts)
                parts.append(buf[off:nxt])
            elif what == 2:
                if alen != 8:
                    raise CodecError(f"CTA_STATUS has bad length {alen}")
                status = _BE32.unpack_from(buf, off + 4)[0]
                if keep_status:
                    clear = _STATUS_CLEAR_UPDATE if update else _STATUS_CLEAR_CREATE
                    parts.append(_STATUS_HDR + _BE32.pack((status | _CONFIRMED) & ~clear))
            elif what == 3:
                parts.append(_protoinfo(buf, off, alen, liberal))
        off = nxt
    if zone != entry.key[1:3]:
        raise CodecError(_zone_mismatch(entry.key, zone))
    if run < n:
        tail = buf[run:n]
        parts.append(tail + b"\x00" * (align(len(tail)) - len(tail)))
    if not update and status & (ct.IPS_SRC_NAT | ct.IPS_DST_NAT) and orig_e and reply_at >= 0:
        plain_reply, nat = _nat_setup(entry.family, buf[orig_s:orig_e], buf[reply_s:reply_e], status)
        parts[reply_at] = plain_reply
        parts.extend(nat)
    body = b"".join(parts)
    return _NLMSG.pack(20 + len(body), ct.MSG_CT_NEW, _UPDATE_FLAGS if update else _CREATE_FLAGS, seq, 0) + \
        _NFGEN.pack(entry.family, ct.NFNETLINK_V0, 0) + body


_STATUS_HDR = _NLA.pack(8, ct.CTA_STATUS)
_CONFIRMED = ct.IPS_CONFIRMED
_CREATE_ACTION = {t: 1 for t in _NOT_SETTABLE} | {
    ct.CTA_STATUS: 2, ct.CTA_PROTOINFO: 3, ct.CTA_TUPLE_ORIG: 4, ct.CTA_TUPLE_REPLY: 5}
_UPDATE_ACTION = {t: 1 for t in _NOT_UPDATABLE} | {
    ct.CTA_STATUS: 2, ct.CTA_PROTOINFO: 3, ct.CTA_TUPLE_ORIG: 4, ct.CTA_TUPLE_REPLY: 5}
_CREATE_FLAGS = ct.NLM_F_REQUEST | ct.NLM_F_CREATE | ct.NLM_F_EXCL
# No NLM_F_CREATE on updates: an entry that vanished since must not come back without the NAT
# binding, master and helper only a creation can set up; it answers ENOENT and is created again.
_UPDATE_FLAGS = ct.NLM_F_REQUEST
# The kernel's TCP protoinfo (tcp_to_nlattr): CTA_PROTOINFO { CTA_PROTOINFO_TCP { STATE,
# WSCALE_ORIGINAL, WSCALE_REPLY, FLAGS_ORIGINAL, FLAGS_REPLY } }, 48 bytes with the flags at fixed
# offsets. Recognised by its headers (host byte order), anything else takes the general path.
_TCP_INFO_LEN = 48
_TCP_INFO_HEAD = _NLA.pack(44, ct.CTA_PROTOINFO_TCP | _NESTED)
_TCP_FLAGS_O_HEAD = _NLA.pack(6, ct.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL)
_TCP_FLAGS_R_HEAD = _NLA.pack(6, ct.CTA_PROTOINFO_TCP_FLAGS_REPLY)


def _protoinfo(buf: bytes, off: int, alen: int, liberal: bool) -> bytes:
    if (alen == _TCP_INFO_LEN and buf[off + 4:off + 8] == _TCP_INFO_HEAD
            and buf[off + 32:off + 36] == _TCP_FLAGS_O_HEAD and buf[off + 40:off + 44] == _TCP_FLAGS_R_HEAD):
        extra = ct.IP_CT_TCP_FLAG_BE_LIBERAL if liberal else 0
        fo = (buf[off + 36] & _TCP_FLAGS_CARRIED) | extra
        fr = (buf[off + 44] & _TCP_FLAGS_CARRIED) | extra
        return (buf[off:off + 36] + bytes((fo, _TCP_FLAGS_MASK)) + buf[off + 38:off + 44]
                + bytes((fr, _TCP_FLAGS_MASK)) + buf[off + 46:off + 48])
    return _tcp_protoinfo(buf, off + 4, off + alen, liberal)


"""The compact FLOW and DELETE of protocol version 3: a flow's state without the netlink framing
the receiver can rebuild, turned back on arrival into exactly the version-2 FLOW (DELETE) the
sender's internal cache holds, byte for byte, so everything downstream (caches, digests, commits,
inject) is unchanged.

A version-2 FLOW carries the kernel's attributes as they came: a TCP flow of IPv4 is 192 bytes,
a 16-byte head and 176 of attributes, of which 44 are values (addresses, ports, protocol,
status, timeout, TCP state, mark) and the rest netlink headers and padding; 12 of the values are
a reply tuple that is most often the plain inverse of the original. The
compact form keeps the values and says in a *descriptor* which attributes they stand for, one
code per attribute, in the order they came:

    code  attribute                                                         values (bytes)
    0x01  CTA_TUPLE_ORIG: addresses, then the L4 fields of its protocol      2 x address + L4
    0x02  CTA_TUPLE_REPLY, the same way                                      2 x address + L4
    0x82  CTA_TUPLE_REPLY, the original's inverse: addresses swapped, and    -
          the two ports of a ported protocol
    0x03  CTA_STATUS / 0x07 CTA_TIMEOUT / 0x08 CTA_MARK (u32 each)           4
    0x04  CTA_PROTOINFO holding CTA_PROTOINFO_TCP: state, window scale       7
          original and reply (u8 each), flags original and reply (2 each)
    0x12  CTA_ZONE (u16)                                                     2

L4 fields (nf_conntrack_proto_*.c, tuple_to_nlattr): ICMP and ICMPv6 an id (u16), a type and a
code (u8 each); TCP, UDP, UDP-Lite, SCTP, DCCP and GRE two ports (u16 each; GRE's keys); any
other protocol none (CTA_PROTO_NUM alone). Values are the attributes' payload bytes as they came
(network order). The descriptor starts with 0x01; the attributes it does not cover (from the
first one not exactly in one of the forms above: a helper, labels, SCTP's state, ...) follow the
values as they came, the *tail*:

    FLOW_COMPACT   type 18 | family | length (u16) | version (u64) | zone (u16) | protocol (u8)
                   | n (u8) | descriptor (n codes) | values | zero padding to 4 | tail
    DELETE_COMPACT type 19 | family | length (u16) | version (u64) | zone (u16) | protocol (u8)
                   | 0 (u8) | the original tuple's values | zero padding to 4

Each form is a fixed layout of the version-2 bytes: constants (attribute headers, in this host's
byte order as the kernel writes them; zero padding; the protocol number) around value fields.
Both sides derive it from the same codes (``_segments``), so each direction is one struct unpack
and one pack per flow, with a plan learnt once per layout: the sender's per version-2 layout
(checked whole against every message: a mask over its constant bytes), the receiver's per
descriptor. A flow no plan fits exactly goes as a version-2 FLOW, which version 3 keeps.

Imports ctbridge.conntrack.abi, ctbridge.sync.header and ctbridge.sync.msgtypes.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from ctbridge.conntrack import abi as ct
from ctbridge.sync.header import WireError
from ctbridge.sync.msgtypes import MsgType

ORIG, REPLY, REPLY_INVERSE = 0x01, 0x02, 0x82
STATUS, PROTOINFO_TCP, TIMEOUT, MARK, ZONE = 0x03, 0x04, 0x07, 0x08, 0x12
HEAD = 16  # the head of FLOW, DELETE and their compact forms
PLANS_MAX = 512  # layouts kept per table; beyond (a forged variety), the table starts again
_SIMPLE = {STATUS: ct.CTA_STATUS, TIMEOUT: ct.CTA_TIMEOUT, MARK: ct.CTA_MARK}  # u32 attributes
_NLA = struct.Struct("=HH")  # a netlink attribute's header, host order (include/uapi/linux/netlink.h)
_U16 = struct.Struct("!H")
_NESTED = ct.NLA_F_NESTED
_PORTED = frozenset({ct.IPPROTO_TCP, ct.IPPROTO_UDP, ct.IPPROTO_UDPLITE, ct.IPPROTO_SCTP, ct.IPPROTO_DCCP,
                     ct.IPPROTO_GRE})
# ICMP's and ICMPv6's L4 attributes: id, type, code (include/uapi/linux/netfilter/nfnetlink_conntrack.h)
_ICMP = {ct.IPPROTO_ICMP: (ct.CTA_PROTO_ICMP_ID, ct.CTA_PROTO_ICMP_TYPE, ct.CTA_PROTO_ICMP_CODE),
         ct.IPPROTO_ICMPV6: (ct.CTA_PROTO_ICMPV6_ID, ct.CTA_PROTO_ICMPV6_TYPE, ct.CTA_PROTO_ICMPV6_CODE)}
_ADDRESSES = {ct.AF_INET: (4, ct.CTA_IP_V4_SRC, ct.CTA_IP_V4_DST),
              ct.AF_INET6: (16, ct.CTA_IP_V6_SRC, ct.CTA_IP_V6_DST)}
_INVERSE = {"r.src": "o.dst", "r.dst": "o.src", "r.a": "o.b", "r.b": "o.a"}  # a plain inverse's fields
_FLOW_T, _DELETE_T = int(MsgType.FLOW), int(MsgType.DELETE)
_FLOW_COMPACT_T, _DELETE_COMPACT_T = int(MsgType.FLOW_COMPACT), int(MsgType.DELETE_COMPACT)
_CANDIDATES = 4  # sender's layouts kept per message length: events and dumps order differently
_RETRY = 256  # a message layout no plan fits is learnt again only every this many messages (after 8)

Field = tuple[str, int]  # a value field: name, size
Seg = bytes | Field  # a layout is a run of constants and value fields


# --- layouts -------------------------------------------------------------------------------------


def _head(length: int, atype: int) -> bytes:
    return _NLA.pack(length, atype)


def _size(segs: Sequence[Seg]) -> int:
    return sum(len(s) if isinstance(s, bytes) else s[1] for s in segs)


def _scalar(atype: int, name: str, size: int) -> list[Seg]:
    """An attribute holding one value of ``size`` bytes, zero-padded to 4."""
    return [_head(4 + size, atype), (name, size), bytes(-size & 3)]


def _tuple_payload(family: int, proto: int, p: str) -> list[Seg]:
    """A tuple's payload as the kernel writes it (ctnetlink_dump_tuples): the addresses, then the
    protocol number and its L4 fields; value fields ``p`` + src, dst, a, b, c."""
    alen, src_t, dst_t = _ADDRESSES[family]
    ip: list[Seg] = [_head(4 + 2 * (4 + alen), ct.CTA_TUPLE_IP | _NESTED), _head(4 + alen, src_t), (p + "src", alen),
                     _head(4 + alen, dst_t), (p + "dst", alen)]
    l4: list[Seg] = [_head(5, ct.CTA_PROTO_NUM), bytes((proto, 0, 0, 0))]
    if proto in _PORTED:
        l4 += _scalar(ct.CTA_PROTO_SRC_PORT, p + "a", 2) + _scalar(ct.CTA_PROTO_DST_PORT, p + "b", 2)
    elif proto in _ICMP:
        id_t, type_t, code_t = _ICMP[proto]
        l4 += _scalar(id_t, p + "a", 2) + _scalar(type_t, p + "b", 1) + _scalar(code_t, p + "c", 1)
    return [*ip, _head(4 + _size(l4), ct.CTA_TUPLE_PROTO | _NESTED), *l4]


def _tuple(atype: int, family: int, proto: int, p: str) -> list[Seg]:
    payload = _tuple_payload(family, proto, p)
    return [_head(4 + _size(payload), atype | _NESTED), *payload]


def _protoinfo_tcp() -> list[Seg]:
    inner = (_scalar(ct.CTA_PROTOINFO_TCP_STATE, "state", 1)
             + _scalar(ct.CTA_PROTOINFO_TCP_WSCALE_ORIGINAL, "wso", 1)
             + _scalar(ct.CTA_PROTOINFO_TCP_WSCALE_REPLY, "wsr", 1)
             + _scalar(ct.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, "flo", 2)
             + _scalar(ct.CTA_PROTOINFO_TCP_FLAGS_REPLY, "flr", 2))
    tcp = [_head(4 + _size(inner), ct.CTA_PROTOINFO_TCP | _NESTED), *inner]
    return [_head(4 + _size(tcp), ct.CTA_PROTOINFO | _NESTED), *tcp]


def _attribute(code: int, family: int, proto: int) -> list[Seg] | None:
    """The version-2 attribute one code stands for; None if the code is not one (for this protocol)."""
    if code == ORIG:
        return _tuple(ct.CTA_TUPLE_ORIG, family, proto, "o.")
    if code == REPLY:
        return _tuple(ct.CTA_TUPLE_REPLY, family, proto, "r.")
    if code == REPLY_INVERSE:
        if proto in _ICMP:
            return None  # an ICMP reply has a type of its own: never a plain inverse
        return [(_INVERSE[s[0]], s[1]) if isinstance(s, tuple) else s
                for s in _tuple(ct.CTA_TUPLE_REPLY, family, proto, "r.")]
    if code in _SIMPLE:
        return _scalar(_SIMPLE[code], f"u{code}", 4)
    if code == ZONE:
        return _scalar(ct.CTA_ZONE, "zone", 2)
    if code == PROTOINFO_TCP and proto == ct.IPPROTO_TCP:
        return _protoinfo_tcp()
    return None


def _segments(family: int, proto: int, codes: bytes) -> list[Seg] | None:
    """The version-2 attributes a descriptor stands for, in order; None if ``codes`` is not a
    descriptor: it starts with ORIG, no attribute twice (REPLY and REPLY_INVERSE are one)."""
    if family not in _ADDRESSES or not codes or codes[0] != ORIG or len({c & 0x7F for c in codes}) != len(codes):
        return None
    out: list[Seg] = []
    for code in codes:
        segs = _attribute(code, family, proto)
        if segs is None:
            return None
        out += segs
    return out


def _fields(segs: Sequence[Seg]) -> list[Field]:
    """The value fields of a layout, each once, in order of first appearance (an inverse reply's
    are the original's, which came before it)."""
    seen: dict[str, int] = {}
    for s in segs:
        if isinstance(s, tuple):
            seen.setdefault(s[0], s[1])
    return list(seen.items())


def _merged(segs: Sequence[Seg]) -> list[Seg]:
    """Adjacent constants as one (fewer arguments per pack), empty ones dropped."""
    out: list[Seg] = []
    for s in segs:
        if isinstance(s, bytes):
            if not s:
                continue
            if out and isinstance(out[-1], bytes):
                out[-1] += s
                continue
        out.append(s)
    return out


class _Assembly(NamedTuple):
    """Bytes of one layout from named values: ``pack(*args(values + consts))``."""

    pack: Callable[..., bytes]
    args: Callable[[tuple[Any, ...]], Any]
    consts: tuple[bytes, ...]


def _assembly(segs: Sequence[Seg], names: Sequence[str]) -> _Assembly:
    """How to make ``segs`` from a tuple of values in the order of ``names``."""
    consts: list[bytes] = []
    order: list[int] = []
    fmt = ["!"]
    for s in _merged(segs):
        if isinstance(s, bytes):
            order.append(len(names) + len(consts))
            consts.append(s)
            fmt.append(f"{len(s)}s")
        else:
            order.append(names.index(s[0]))
            fmt.append(f"{s[1]}s")
    return _Assembly(struct.Struct("".join(fmt)).pack, operator.itemgetter(*order), tuple(consts))


def _flow_head(mtype: int, family: int, length: int, last: bytes) -> tuple[bytes, Field, bytes]:
    """The head of FLOW (DELETE) and of their compact forms: type, family, length; version and
    zone (a value field, copied); then its last two bytes."""
    return bytes((mtype, family)) + _U16.pack(length), ("vz", 10), last


def _pad(n: int) -> bytes:
    return bytes(-n & 3)


# --- the receiver: compact -> version 2 ------------------------------------------------------------


class _Expand(NamedTuple):
    """Read in expand_flow by unpacking the tuple whole (one step, where an attribute each is
    a lookup each): the order of the fields is part of that code."""

    fixed: int  # bytes of the compact message before its tail
    unpack: Callable[[bytes, int], tuple[Any, ...]]  # (data, offset of the message) -> its values
    pack: Callable[..., bytes]  # ... -> the version-2 message (without its tail), from
    args: Callable[[tuple[Any, ...]], Any]  # the values and these constants:
    consts: tuple[bytes, ...]
    v2_head: bytes  # its type and family
    orig_end: int  # where the original tuple's payload ends in it (it starts at HEAD + 4)


def _expand_plan(mtype: int, family: int, proto: int, codes: bytes) -> _Expand | None:
    """How to rebuild a FLOW (a DELETE, ``codes`` == b"") from its compact form; None if the
    compact form is not one."""
    if mtype == _DELETE_COMPACT_T:
        if family not in _ADDRESSES or codes:
            return None
        attrs: list[Seg] = _tuple_payload(family, proto, "o.")
        last, v2type = b"\0\0", _DELETE_T
    else:
        segs = _segments(family, proto, codes)
        if segs is None:
            return None
        attrs = segs
        last, v2type = _U16.pack(_size(_tuple(ct.CTA_TUPLE_ORIG, family, proto, "o."))), _FLOW_T
    fields = _fields(attrs)
    fixed = HEAD + len(codes) + _size(fields)
    fixed += -fixed & 3
    v2 = [*_flow_head(v2type, family, HEAD + _size(attrs), last), *attrs]
    names = ["vz", *(name for name, _ in fields)]
    unpack = struct.Struct(f"!4x10s{2 + len(codes)}x" + "".join(f"{size}s" for _, size in fields)).unpack_from
    orig_end = HEAD + _size(_tuple(ct.CTA_TUPLE_ORIG, family, proto, "o.")) if v2type == _FLOW_T else HEAD
    return _Expand(fixed, unpack, *_assembly(v2, names), bytes((v2type, family)), orig_end)


# (type, family) -> descriptor (protocol, n, codes) -> plan; FLOW_COMPACT's by family alone too,
# the same dicts (expand_flow's lookup makes no tuple)
_EXPAND: dict[tuple[int, int], dict[bytes, _Expand | None]] = {}
_EXPAND_FLOW: dict[int, dict[bytes, _Expand | None]] = {}


def _expansion(mtype: int, family: int, data: bytes, off: int, mlen: int) -> _Expand:
    """The plan of the compact message at ``off`` (``mlen`` bytes), learnt if new; or WireError."""
    if mlen < HEAD:
        raise WireError("malformed", f"compact message of {mlen} bytes")
    n = data[off + 15]
    if HEAD + n > mlen:
        raise WireError("malformed", f"compact message of {mlen} bytes with a descriptor of {n}")
    plans = _EXPAND.get((mtype, family))
    if plans is None:
        if family not in _ADDRESSES:
            raise WireError("malformed", f"compact message of address family {family}")
        plans = _EXPAND[(mtype, family)] = {}
        if mtype == _FLOW_COMPACT_T:
            _EXPAND_FLOW[family] = plans
    desc = data[off + 14:off + HEAD + n]
    if desc in plans:
        plan = plans[desc]
    else:
        if len(plans) >= PLANS_MAX:
            plans.clear()
        plan = plans[desc] = _expand_plan(mtype, family, desc[0], desc[2:])
    if plan is None:
        raise WireError("malformed", f"compact message with descriptor {desc.hex()} (protocol, n, codes)")
    if mlen < plan.fixed or (mtype == _DELETE_COMPACT_T and mlen != plan.fixed):
        raise WireError("malformed", f"compact message of {mlen} bytes; its descriptor needs {plan.fixed}")
    return plan


def expand_flow(data: bytes, off: int, mlen: int, family: int, version: int) -> tuple[int, bytes, bytes]:
    """(version, key, the version-2 FLOW) of the FLOW_COMPACT at ``off`` (``mlen`` bytes, a
    multiple of 4 within ``data``; ``version`` read from its head); WireError if malformed. Runs
    once per compact flow received (ctbridge.sync.flows.decode_body): two dict lookups, one
    unpack, one pack. # hot loop"""
    plans = _EXPAND_FLOW.get(family)
    plan = plans.get(data[off + 14:off + HEAD + data[off + 15]]) if plans is not None and mlen >= HEAD else None
    if plan is None or mlen < plan[0]:
        plan = _expansion(_FLOW_COMPACT_T, family, data, off, mlen)
    fixed, unpack, pack, args, consts, v2_head, orig_end = plan
    msg: bytes = pack(*args(unpack(data, off) + consts))
    if mlen > fixed:  # a tail: what the descriptor does not cover, as it came
        tail = data[off + fixed:off + mlen]
        msg = v2_head + _U16.pack(len(msg) + len(tail)) + msg[4:] + tail
    return version, msg[1:2] + msg[12:14] + msg[HEAD + 4:orig_end], msg


def expand_delete(data: bytes, off: int, mlen: int, family: int) -> bytes:
    """The key of the DELETE_COMPACT at ``off``; WireError if malformed."""
    plan = _expansion(_DELETE_COMPACT_T, family, data, off, mlen)
    msg: bytes = plan.pack(*plan.args(plan.unpack(data, off) + plan.consts))
    return msg[1:2] + msg[12:14] + msg[HEAD:]


# --- the sender: version 2 -> compact --------------------------------------------------------------


class _Squeeze(NamedTuple):
    """Read in squeeze by unpacking the tuple whole: the order of the fields is part of that code."""

    end: int  # bytes of the version-2 message the plan covers (the tail follows)
    checked: int  # bytes the mask covers: those, and the header of the tail's first attribute (a
    # message whose next attribute is another, perhaps one with a code, learns a plan of its own)
    mask: int  # over those bytes, as a big-endian integer: 1 where a constant lies ...
    want: int  # ... and the constants
    unpack: Callable[[bytes], tuple[Any, ...]]  # the version-2 message -> its values (explicit reply)
    explicit: _Assembly  # the values -> the compact message, before the tail
    inverse: _Assembly | None  # the same with the reply left out ...
    reply: Callable[[tuple[Any, ...]], Any]  # ... when these values (the reply's) ...
    mirror: Callable[[tuple[Any, ...]], Any]  # ... equal these (the original's, swapped)
    stop: Stop | None  # the form the tail's first attribute did not have (_codes_of)


def _mask(segs: Sequence[Seg]) -> tuple[int, int]:
    mask = bytearray()
    want = bytearray()
    for s in segs:
        if isinstance(s, bytes):
            mask += b"\xff" * len(s)
            want += s
        else:
            mask += bytes(s[1])
            want += bytes(s[1])
    return int.from_bytes(mask, "big"), int.from_bytes(want, "big")


def _squeeze_plan(msg: bytes) -> _Squeeze | None:
    """The plan of ``msg``'s layout (a FLOW or DELETE): which of its attributes have a compact
    form, read from the message itself; None when its original tuple has none."""
    mtype, family, length = msg[0], msg[1], len(msg)
    if family not in _ADDRESSES or length < HEAD + 8:
        return None
    proto = _proto_of(msg, family, mtype)
    if proto is None:
        return None
    if mtype == _DELETE_T:
        attrs = _tuple_payload(family, proto, "o.")
        v2 = [*_flow_head(mtype, family, length, b"\0\0"), *attrs]
        mask, want = _mask(v2)
        if HEAD + _size(attrs) != length or int.from_bytes(msg, "big") & mask != want:
            return None  # not the original tuple of a standard form (a padding byte set, ...)
        return _squeeze_of(v2, _DELETE_COMPACT_T, family, bytes((proto, 0)), length, None)
    codes, stop = _codes_of(msg, family, proto)
    if not codes:
        return None
    attrs = _segments(family, proto, codes) or []
    olen = _U16.pack(_size(_tuple(ct.CTA_TUPLE_ORIG, family, proto, "o.")))
    v2 = [*_flow_head(mtype, family, length, olen), *attrs]
    inverse = codes.replace(bytes((REPLY,)), bytes((REPLY_INVERSE,))) \
        if REPLY in codes and proto not in _ICMP else None
    end = _size(v2)
    return _squeeze_of(v2, _FLOW_COMPACT_T, family, bytes((proto, len(codes))) + codes, length, inverse,
                       msg[end:end + 4], stop)


def _squeeze_of(v2: list[Seg], ctype: int, family: int, desc: bytes, length: int,
                inverse: bytes | None, next_head: bytes = b"", stop: Stop | None = None) -> _Squeeze:
    end = _size(v2)
    fields = _fields(v2)
    names = [name for name, _ in fields]
    tail = length - end

    def compact(codes_desc: bytes, own: Sequence[Field]) -> _Assembly:
        size = HEAD + len(codes_desc) - 2 + _size(own)
        segs: list[Seg] = [*_flow_head(ctype, family, size + len(_pad(size)) + tail, codes_desc), *own, _pad(size)]
        return _assembly(segs, names)

    unpack = struct.Struct("!" + "".join(f"{len(s)}x" if isinstance(s, bytes) else f"{s[1]}s" for s in v2)).unpack_from
    mask, want = _mask([*v2, next_head])
    checked = end + len(next_head)
    values = fields[1:]  # after version and zone, which the head carries
    explicit = compact(desc, values)
    if inverse is None:
        return _Squeeze(end, checked, mask, want, unpack, explicit, None, _NO_REPLY, _NO_REPLY, stop)
    reply = [f for f in values if f[0] in _INVERSE]
    own = [f for f in values if f[0] not in _INVERSE]
    return _Squeeze(end, checked, mask, want, unpack, explicit, compact(desc[:2] + inverse, own),
                    operator.itemgetter(*(names.index(n) for n, _ in reply)),
                    operator.itemgetter(*(names.index(_INVERSE[n]) for n, _ in reply)), stop)


_NO_REPLY = operator.itemgetter(slice(0, 0))  # (a plan without an inverse never calls it)


def _proto_of(msg: bytes, family: int, mtype: int) -> int | None:
    """The protocol number where a standard original tuple has it (checked by the plan's mask)."""
    at = (HEAD + (4 if mtype == _FLOW_T else 0) + 4 + 2 * (4 + _ADDRESSES[family][0]) + 4 + 4)
    return msg[at] if at < len(msg) else None


Stop = tuple[int, int, int, int]  # (start, end, mask, want): the form an attribute did not have


def _codes_of(msg: bytes, family: int, proto: int) -> tuple[bytes, Stop | None]:
    """The descriptor of a FLOW: its attributes from the first, as long as each is exactly in the
    form of a code (and no code repeats); empty if the original tuple is not. And, when the first
    attribute left out has the header of a code's form but other bytes, that form: a message of
    this layout in which that attribute has it deserves a plan of its own (squeeze checks)."""
    codes = bytearray()
    at = HEAD
    n = len(msg)
    candidates = (ORIG, REPLY, STATUS, PROTOINFO_TCP, TIMEOUT, MARK, ZONE)
    while at + 4 <= n:
        alen, atype = _NLA.unpack_from(msg, at)
        size = (alen + 3) & ~3
        code = atype & 0x7FFF
        if code not in candidates or code in codes or (not codes and code != ORIG) or at + size > n:
            break
        segs = _attribute(code, family, proto)
        if segs is None or _size(segs) != size:
            break
        mask, want = _mask(segs)
        if int.from_bytes(msg[at:at + size], "big") & mask != want:
            return bytes(codes), (at, at + size, mask, want)
        codes.append(code)
        at += size
    return bytes(codes), None


_SQUEEZE: dict[int, list[_Squeeze]] = {}  # a message's length -> its layouts' plans, the latest learnt first
_MISSES: dict[tuple[int, bytes], int] = {}  # (length, head and protocol) of a layout that has no plan -> tries


def squeeze(msg: bytes) -> bytes:
    """The compact form of a FLOW or DELETE message, or ``msg`` itself when it has none (another
    type, or a layout that does not fit). The sender's hot path: one dict lookup, an integer mask
    check (type, family and every constant byte of the layout), one unpack and one pack per flow,
    with a plan learnt per layout. # hot loop"""
    plans = _SQUEEZE.get(len(msg))
    if plans is not None:
        for plan in plans:
            out = _apply(plan, msg)
            if out is not None:
                return out
    return _squeeze_new(msg)


def _apply(plan: _Squeeze, msg: bytes) -> bytes | None:
    """``msg`` squeezed by ``plan``; None if the plan does not fit it."""
    end, checked, mask, want, unpack, explicit, inverse, reply, mirror, stop = plan  # one step
    if int.from_bytes(msg if checked == len(msg) else msg[:checked], "big") & mask != want:
        return None
    if stop is not None and int.from_bytes(msg[stop[0]:stop[1]], "big") & stop[2] == stop[3]:
        return None  # that attribute has its code's form here: this message's layout is another
    values = unpack(msg)
    pack, args, consts = inverse if inverse is not None and reply(values) == mirror(values) else explicit
    out: bytes = pack(*args(values + consts))
    return out if end == len(msg) else out + msg[end:]


def _squeeze_new(msg: bytes) -> bytes:
    """squeeze() for a message no known plan fits: learn its layout's plan. A layout that has none
    (told apart by its head and its protocol byte) is tried again only every _RETRY messages after
    8 tries, so a table of such flows costs little more than sending them as they are."""
    if (msg[0] != _FLOW_T and msg[0] != _DELETE_T) or len(msg) < HEAD + 8 or msg[1] not in _ADDRESSES:
        return msg
    miss = (len(msg), msg[:4] + msg[14:16] + bytes((_proto_of(msg, msg[1], msg[0]) or 0,)))
    tries = _MISSES.get(miss, 0)
    if tries >= 8 and tries % _RETRY:
        _MISSES[miss] = tries + 1
        return msg
    learnt = _squeeze_plan(msg)
    out = _apply(learnt, msg) if learnt is not None else None
    if learnt is None or out is None:  # (a plan always fits the message it was learnt from)
        if len(_MISSES) >= PLANS_MAX:
            _MISSES.clear()
        _MISSES[miss] = tries + 1
        return msg
    if len(_SQUEEZE) >= PLANS_MAX:
        _SQUEEZE.clear()
    plans = _SQUEEZE.setdefault(len(msg), [])
    plans.insert(0, learnt)
    del plans[_CANDIDATES:]
    return out

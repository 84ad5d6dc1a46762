"""Kernel event messages straight to what the internal cache keeps, without building objects.

The general path (codec.decode_events -> Entry -> FlowFilter.accepts -> codec.strip_local ->
wire.flow_msg) costs about 10 us per event in CPython: a burst of 100,000 new flows kept the
active node's daemon busy for a second after the kernel had them all. Events of one burst share
their layout (the same attributes at the same offsets), so, as request.new_request and the
listings do, a plan is learnt once per layout: where the key, the filter's facts and the
attributes worth replicating lie. An event is then one struct read that checks every attribute
header the plan relies on, and a few slices.

A plan is kept only after it gave, for the message it was learnt from, exactly what the general
path gives (key, facts, replicated attributes); anything else, and any message whose headers do
not match, takes the general path. Pure: bytes in, bytes out.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec
from ctbridge.sync import filter as flt
from ctbridge.sync import wire
from ctbridge.sync.carried import CARRIED

_NLMSG = struct.Struct("=IHHII")  # struct nlmsghdr, include/uapi/linux/netlink.h
# What finds a message's plan, in one read: the nlmsghdr's length, type and flags (one word), its
# port id, and the first two attribute headers (CTA_TUPLE_ORIG's and the first nested in it)
HEAD = struct.Struct("=Q4xI4xQ")
KEYED = HEAD.size  # 28: shorter messages have no plan
_U32 = struct.Struct("=I")
_BE32 = struct.Struct(">I")  # CTA_TIMEOUT's seconds, network order
_NLA = struct.Struct("=HH")
_TYPE_MASK = 0x3FFF  # NLA_TYPE_MASK, include/uapi/linux/netlink.h
_NEW_FLAGS = ct.NLM_F_CREATE | ct.NLM_F_EXCL  # a new entry (ctnetlink_conntrack_event)
_ATTRS = 20  # attributes start after the nlmsghdr (16) and the nfgenmsg (4)
_LAYOUTS_MAX = 512
_ZERO = b"\x00\x00"

SLOW = object()  # decode() could not take this message: use the general path


class Fast(NamedTuple):
    """One event as the fast path reads it."""

    key: bytes
    destroy: bool
    new: bool
    facts: tuple[int, bytes, bytes, int | None]  # as filter.flow_facts gives them
    attrs: bytes  # what is replicated (codec.strip_local), empty for a destroy
    zone: int
    orig_len: int  # length of the CTA_TUPLE_ORIG attribute, header included
    timeout: int  # seconds left in CTA_TIMEOUT (0: none)


class Plan(NamedTuple):
    """Where one layout keeps what the fast path reads: by _read, and by the internal cache's
    hot loop (InternalCache.kernel_messages), which unpacks it by position: the order of the
    fields is part of the interface."""

    heads: Callable[[bytes], tuple[int | bytes, ...]]  # reads every attribute header word the plan relies on
    expect: tuple[int | bytes, ...]
    mlen: int  # the message's length (its buffer holds it alone)
    keyhead: bytes  # the key's family and zone 0, when the layout has no zone (zone_at == -1)
    orig: slice  # the original tuple's payload: the rest of the key
    family: int
    destroy: bool
    new: bool
    key: Callable[[bytes], Any]  # -> (zone bytes, orig payload)
    zone_at: int  # -1: zone 0
    proto_at: int
    src: slice
    reply_src: slice
    state_at: int  # -1: no TCP state
    tcp: bool  # the plan was learnt from a TCP flow (its state is read only for one)
    keep: Callable[[bytes], Any]  # -> the replicated attributes, as a tuple of slices
    synproxy: int  # offset of a CTA_SYNPROXY attribute (-1 if none) ...
    keep_no_synproxy: Callable[[bytes], Any]  # ... and what to keep when it is all zero (else: keep)
    orig_len: int
    timeout_at: int  # offset of CTA_TIMEOUT's seconds (-1: none)
    carried: frozenset[int]  # the attributes of CARRIED the layout has


def _unique(attrs: list[tuple[int, int, int]]) -> dict[int, tuple[int, int]] | None:
    """{type: (payload start, end)}, None when a type repeats (attr_map keeps the last: not planned)."""
    out: dict[int, tuple[int, int]] = {}
    for t, s, e in attrs:
        if t in out:
            return None
        out[t] = (s, e)
    return out


def _learn(buf: bytes) -> Plan | None:
    """The plan of ``buf``'s layout, or None when it has none the fast path can follow."""
    mlen, mtype, mflags, _seq, _pid = _NLMSG.unpack_from(buf)
    family = buf[16]
    heads: dict[int, int] = {16: _U32.unpack_from(buf, 16)[0]}  # offset -> header word (nfgenmsg too)

    def head(s: int) -> None:
        heads[s - 4] = _U32.unpack_from(buf, s - 4)[0]

    def children(span: tuple[int, int]) -> dict[int, tuple[int, int]] | None:
        """The attributes nested in ``span``, each header checked by the plan (a later message
        with a duplicate or another order does not match); None when a type repeats."""
        inner = _unique(codec.iter_attrs(buf, *span))
        for s2, _e2 in (inner or {}).values():
            head(s2)
        return inner

    top = codec.iter_attrs(buf, _ATTRS, mlen)
    attrs = _unique(top)
    if attrs is None or ct.CTA_TUPLE_ORIG not in attrs or top[0][0] != ct.CTA_TUPLE_ORIG:
        return None
    ranges: list[slice] = []
    synproxy = -1
    for t, s, e in top:
        head(s)
        nxt = s - 4 + codec.align(e - s + 4)
        if t in codec.NOT_SETTABLE:
            continue
        if t == ct.CTA_SYNPROXY and nxt - (s - 4) == len(codec._ZERO_SYNPROXY):
            synproxy = s - 4
        codec.extend_ranges(ranges, s - 4, nxt)
    if not ranges or ranges[-1].stop > mlen:
        return None
    keep = codec.ranges_getter(ranges)
    keep_no = codec.without_zero_synproxy(ranges, synproxy) if synproxy >= 0 else keep

    def tuple_fields(t: int) -> tuple[int, slice] | None:
        """(offset of the protocol number, slice of the source address) of a tuple attribute."""
        inner = children(attrs[t])
        if inner is None or ct.CTA_TUPLE_IP not in inner or ct.CTA_TUPLE_PROTO not in inner:
            return None
        addrs = children(inner[ct.CTA_TUPLE_IP])
        protos = children(inner[ct.CTA_TUPLE_PROTO])
        if addrs is None or protos is None or ct.CTA_PROTO_NUM not in protos:
            return None
        src = addrs.get(ct.CTA_IP_V4_SRC) or addrs.get(ct.CTA_IP_V6_SRC)
        if src is None or (ct.CTA_IP_V4_SRC in addrs and ct.CTA_IP_V6_SRC in addrs):
            return None
        num_s, num_e = protos[ct.CTA_PROTO_NUM]
        if num_e <= num_s:
            return None
        return num_s, slice(*src)

    orig = tuple_fields(ct.CTA_TUPLE_ORIG)
    reply = tuple_fields(ct.CTA_TUPLE_REPLY) if ct.CTA_TUPLE_REPLY in attrs else None
    if orig is None or (ct.CTA_TUPLE_REPLY in attrs and reply is None):
        return None
    state_at = _tcp_state_at(attrs, children) if buf[orig[0]] == ct.IPPROTO_TCP else -1
    zone_at = _zone_at(attrs, top)
    if state_at is None or zone_at is None:
        return None
    os_, oe = attrs[ct.CTA_TUPLE_ORIG]
    key = operator.itemgetter(slice(zone_at, zone_at + 2) if zone_at >= 0 else slice(0, 0), slice(os_, oe))
    reads, expect = _header_reads(buf, sorted(heads))
    plan = Plan(struct.Struct(reads).unpack_from, expect, mlen,
                bytes((family, 0, 0)), slice(os_, oe), family,
                 mtype == ct.MSG_CT_DELETE, mflags & _NEW_FLAGS == _NEW_FLAGS, key, zone_at, orig[0], orig[1],
                 reply[1] if reply is not None else slice(0, 0), state_at, buf[orig[0]] == ct.IPPROTO_TCP,
                 keep, synproxy, keep_no,
                 oe - os_ + 4, codec.timeout_offset(buf, _ATTRS), frozenset(attrs) & CARRIED)
    return plan if _agrees(plan, buf) else None


def _header_reads(buf: bytes, offsets: list[int]) -> tuple[str, tuple[int | bytes, ...]]:
    """One struct format that reads the header words at ``offsets`` of a message of this layout,
    and what it reads from ``buf``. Adjacent words (a nested attribute's header right after its
    parent's) are read as one run of bytes: a TCP event's 29 words are 20 reads, and the check
    of every event costs a third less."""
    runs: list[list[int]] = []
    for off in offsets:
        if runs and runs[-1][1] == off:
            runs[-1][1] = off + 4
        else:
            runs.append([off, off + 4])
    fmt = ["="]
    expect: list[int | bytes] = []
    pos = 0
    for start, stop in runs:
        if start > pos:
            fmt.append(f"{start - pos}x")
        if stop - start == 4:
            fmt.append("I")
            expect.append(_U32.unpack_from(buf, start)[0])
        else:
            fmt.append(f"{stop - start}s")
            expect.append(buf[start:stop])
        pos = stop
    return "".join(fmt), tuple(expect)


def _tcp_state_at(attrs: dict[int, tuple[int, int]],
                  children: Callable[[tuple[int, int]], dict[int, tuple[int, int]] | None]) -> int | None:
    """Where a TCP flow's state byte is (-1: it has none); None when the layout has no plan."""
    if ct.CTA_PROTOINFO not in attrs:
        return -1
    info = children(attrs[ct.CTA_PROTOINFO])
    if info is None:
        return None
    if ct.CTA_PROTOINFO_TCP not in info:
        return -1
    tcp = children(info[ct.CTA_PROTOINFO_TCP])
    if tcp is None:
        return None
    if ct.CTA_PROTOINFO_TCP_STATE in tcp:
        ss, se = tcp[ct.CTA_PROTOINFO_TCP_STATE]
        if se > ss:
            return ss
    return -1


def _zone_at(attrs: dict[int, tuple[int, int]], top: list[tuple[int, int, int]]) -> int | None:
    """Where the key's zone is (-1: no zone); None when the layout has no plan. It is read where
    the kernel puts it, third (codec.key_from_attrs): a zone elsewhere is left to the general
    path, which reads it the same way."""
    if ct.CTA_ZONE not in attrs:
        return -1
    if len(top) < 3 or top[2][0] != ct.CTA_ZONE or top[1][0] != ct.CTA_TUPLE_REPLY:
        return None
    zs, ze = attrs[ct.CTA_ZONE]
    if ze - zs != 2:
        return None
    return zs


def _agrees(plan: Plan, buf: bytes) -> bool:
    """The plan reads ``buf`` exactly as the general path does."""
    try:
        (event,) = codec.decode_events(buf)
        fast = _read(plan, buf)
    except (codec.CodecError, ValueError):
        return False
    entry = event.entry
    if fast.key != entry.key or fast.destroy != (event.kind is codec.EventKind.DESTROY):
        return False
    if fast.new != (event.kind is codec.EventKind.NEW):
        return False
    if fast.facts != flt.flow_facts(entry):
        return False
    if plan.destroy:
        return True
    if fast.timeout != codec.timeout_of(entry.attrs):
        return False
    return wire.flow_raw(1, plan.family, fast.zone, fast.orig_len, fast.attrs) == \
        wire.flow_msg(1, codec.strip_local(entry))


def _read(plan: Plan, buf: bytes) -> Fast:
    if plan.zone_at < 0:
        zone = _ZERO
        key = plan.keyhead + buf[plan.orig]
    else:
        zone, orig = plan.key(buf)
        key = bytes((plan.family,)) + zone + orig
    at = plan.state_at
    facts = (buf[plan.proto_at], buf[plan.src], buf[plan.reply_src], buf[at] if at >= 0 else None)
    if plan.destroy:
        return Fast(key, True, False, facts, b"", 0, plan.orig_len, 0)
    so = plan.synproxy
    if so >= 0 and buf[so:so + 28] == codec._ZERO_SYNPROXY:
        attrs = b"".join(plan.keep_no_synproxy(buf))
    else:
        attrs = b"".join(plan.keep(buf))
    t = plan.timeout_at
    return Fast(key, False, plan.new, facts, attrs, (zone[0] << 8) | zone[1], plan.orig_len,
                _BE32.unpack_from(buf, t)[0] if t >= 0 else 0)


def _fits(plan: Plan, buf: bytes) -> bool:
    """``buf`` has every attribute header ``plan`` relies on, and its protocol's kind."""
    return plan.heads(buf) == plan.expect and (buf[plan.proto_at] == ct.IPPROTO_TCP) == plan.tcp


class Intake:
    """Plans per layout, learnt as messages come (at most _LAYOUTS_MAX, then learnt again)."""

    def __init__(self) -> None:
        self.plans: dict[tuple[int, int], Plan | None] = {}  # by HEAD's first and last word
        self.fast = 0  # messages read by a plan
        self.slow = 0  # messages left to the general path

    def plan(self, buf: bytes) -> Plan | None:
        """The plan of ``buf``'s layout (one message of a type decode() takes, at least KEYED
        bytes long), learnt now if it is new."""
        head, _pid, first = HEAD.unpack_from(buf)
        pkey = (head, first)
        plans = self.plans
        if pkey in plans:
            return plans[pkey]
        if len(plans) >= _LAYOUTS_MAX:
            plans.clear()
        try:
            plan = plans[pkey] = _learn(buf)
        except codec.CodecError:
            plan = plans[pkey] = None
        return plan

    def brief(self, buf: bytes) -> tuple[bytes, int, Plan] | None:
        """A dump message's key and seconds left, read by its layout's plan (None: the message
        needs decode()): a refresh sweep reads the rest, with read(), only for the flows it sends."""
        n = len(buf)
        if n < _ATTRS + 4:
            return None
        if n < KEYED:
            return None
        head, _pid, first = HEAD.unpack_from(buf)
        plan = self.plans.get((head, first))
        if plan is None or plan.mlen != n or plan.destroy or plan.timeout_at < 0 or not _fits(plan, buf):
            return None
        if plan.zone_at < 0:
            key = plan.keyhead + buf[plan.orig]
        else:
            zone, orig = plan.key(buf)
            key = bytes((plan.family,)) + zone + orig
        return key, _BE32.unpack_from(buf, plan.timeout_at)[0], plan

    @staticmethod
    def read(plan: Plan, buf: bytes) -> Fast:
        """The whole of a message brief() took."""
        return _read(plan, buf)

    def decode(self, buf: bytes, skip_portid: int) -> Fast | object | None:
        """One receive buffer holding one message: Fast, None (our own echo: skip it), or SLOW."""
        n = len(buf)
        if n < _ATTRS + 4:
            self.slow += 1
            return SLOW
        mlen, mtype, _flags, _seq, mpid = _NLMSG.unpack_from(buf)
        if mlen != n or (mtype != ct.MSG_CT_NEW and mtype != ct.MSG_CT_DELETE):
            self.slow += 1  # several messages in one buffer, or not an event: all of it the general way
            return SLOW
        if mpid == skip_portid:
            return None
        plan = self.plan(buf) if n >= KEYED else None
        if plan is None or not _fits(plan, buf):
            self.slow += 1
            return SLOW
        self.fast += 1
        return _read(plan, buf)

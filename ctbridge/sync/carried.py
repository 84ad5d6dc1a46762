"""What an update event leaves out: the kernel puts some of a flow's attributes into an event only
when that event changed them (CARRIED: the TCP state, the labels, the master's tuple, the
sequence adjustments, the synproxy state). An update without one says nothing of it,
so the flow's message keeps what an earlier event said, taken from the message the internal cache
holds. Without that, a rule that set a mark on a later packet made an event without the TCP
state, and peers were sent the flow without it (a kernel test shows the event).

Pure: bytes in, bytes out. Imports ctbridge.conntrack (abi, codec) and ctbridge.sync.wire.
"""

from __future__ import annotations

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec
from ctbridge.sync import wire

# Attributes the kernel puts into an update event only when that event changed them
# (ctnetlink_conntrack_event, net/netfilter/nf_conntrack_netlink.c: IPCT_PROTOINFO, IPCT_LABEL,
# IPCT_RELATED, IPCT_SEQADJ, IPCT_SYNPROXY): an update that lacks one says nothing of it, and a
# copy of the flow keeps what an earlier event said (a mark set by a later packet's rule made an
# event without the TCP state; measured, tests/kernel). Not the helper: an event carries it
# whenever one is attached, so its absence means it was taken off. (Labels all cleared make an
# event without them too: that one change is not told apart, docs/kernel.md)
CARRIED = frozenset({ct.CTA_PROTOINFO, ct.CTA_LABELS, ct.CTA_TUPLE_MASTER, ct.CTA_SEQ_ADJ_ORIG,
                     ct.CTA_SEQ_ADJ_REPLY, ct.CTA_SYNPROXY})
PROTOINFO = frozenset({ct.CTA_PROTOINFO})
# the TCP state is in every event but the updates that did not change it: known from the start
# (the others are learnt from the events that have them: an update is searched for them only
# once some event had one)
FIRST_SEEN = PROTOINFO


def protocol(key: bytes) -> int:
    """The protocol number in a flow's key (its original tuple: codec.make_key); 0 if none."""
    proto = codec.attr_map(codec.attr_map(key, 3).get(ct.CTA_TUPLE_PROTO, b""))
    return (proto.get(ct.CTA_PROTO_NUM) or b"\x00")[0]


def missing(attrs: bytes, key: bytes, seen: set[int], new: bool = False, start: int = 0) -> frozenset[int]:
    """The attributes of CARRIED some event had (``seen``, which learns these ones) and
    ``attrs[start:]`` (an event's as the kernel sent it, of the flow ``key``) lack; the TCP state
    only for a TCP flow (SCTP's and DCCP's are not carried). None for a new flow (``new``): its
    event is whole, and a flow of the same tuple before it (whose end an overrun lost) is not
    this one."""
    present = frozenset(t for t, _s, _e in codec.iter_attrs(attrs, start)) & CARRIED
    seen |= present
    if new:
        return frozenset()
    out = frozenset(seen) - present
    if ct.CTA_PROTOINFO in out and protocol(key) != ct.IPPROTO_TCP:
        out -= PROTOINFO
    return out


def carry(prev: bytes | None, attrs: bytes, wanted: frozenset[int]) -> bytes:
    """``attrs`` (an update's, in replication form) with the attributes of ``wanted`` that
    ``prev`` (the flow's FLOW message before it) has, appended."""
    if prev is None or not wanted:
        return attrs
    extra = [prev[s - 4:s - 4 + codec.align(e - s + 4)] for t, s, e in codec.iter_attrs(prev, wire.FLOW_HEADER)
             if t in wanted]
    return attrs + b"".join(extra) if extra else attrs


def same_but_order(a: bytes, b: bytes, start_a: int = 0) -> bool:
    """Whether ``a[start_a:]`` and ``b`` hold the same attributes, the timeout's value aside, in any
    order: a message whose carried attributes were appended against the kernel's own order (a
    dump's), so that a dump does not find every such flow changed."""
    def chunks(buf: bytes, start: int) -> dict[int, bytes]:
        return {t: buf[s:e] for t, s, e in codec.iter_attrs(buf, start) if t != ct.CTA_TIMEOUT}
    try:
        return chunks(a, start_a) == chunks(b, 0)
    except codec.CodecError:
        return False

"""What an update event leaves out: the kernel puts some of a flow's attributes into an event only
when that event changed them (codec.CARRIED: the TCP state, the labels, the master's tuple, the
sequence adjustments, the synproxy state, the helper). An update without one says nothing of it,
so the flow's message keeps what an earlier event said, taken from the message the internal cache
holds. Without that, a rule that set a mark on a later packet made an event without the TCP
state, and peers were sent the flow without it (a kernel test shows the event).

Pure: bytes in, bytes out. Imports ctbridge.conntrack (abi, codec) and ctbridge.sync.wire.
"""

from __future__ import annotations

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec
from ctbridge.sync import wire

PROTOINFO = frozenset({ct.CTA_PROTOINFO})
# the TCP state is in every event but the updates that did not change it: known from the start
# (the others are learnt from the events that have them: an update is searched for them only
# once some event had one)
FIRST_SEEN = PROTOINFO


def protocol(key: bytes) -> int:
    """The protocol number in a flow's key (its original tuple: codec.make_key); 0 if none."""
    proto = codec.attr_map(codec.attr_map(key, 3).get(ct.CTA_TUPLE_PROTO, b""))
    return (proto.get(ct.CTA_PROTO_NUM) or b"\x00")[0]


def missing(attrs: bytes, key: bytes, seen: set[int]) -> frozenset[int]:
    """The attributes of codec.CARRIED some event had (``seen``, which learns these ones) and
    ``attrs`` (an event's, of the flow ``key``) lack; the TCP state only for a TCP flow."""
    present = frozenset(t for t, _s, _e in codec.iter_attrs(attrs)) & codec.CARRIED
    seen |= present
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

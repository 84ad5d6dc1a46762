"""FLOW, EXPECT and DELETE, the bulk of the sync traffic, and ``decode_body``, which reads a run
of messages: these three types inline (no call, no object per flow: the measured hot loop of
every received datagram), every other type through the registry of ctbridge.sync.msgtypes.

A flow's key travels in the message's head (family, zone, the length of the tuple its attributes
start with), so a receiver indexes a flow with three slices and never parses its attributes;
docs/protocol.md ("Messages") has the layouts.

Version 3 adds FLOW_COMPACT and DELETE_COMPACT (ctbridge.sync.compact has their layouts):
decode_body turns them back into the FLOW and DELETE they stand for, so nothing after it knows
which form came.

Imports ctbridge.conntrack (flow and expectation layouts), ctbridge.sync.header,
ctbridge.sync.msgtypes, ctbridge.sync.compact and ctbridge.sync.messages (whose classes must be
registered before decode_body runs).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec, expectation
from ctbridge.sync import compact
from ctbridge.sync.header import VERSION, WireError
from ctbridge.sync.messages import (
    Ack,
    Alive,
    BulkBegin,
    BulkEnd,
    Challenge,
    Digest,
    DigestAsk,
    DigestKeys,
    Echo,
    Gap,
    Heartbeat,
    Hello,
    Nack,
    Resync,
)
from ctbridge.sync.msgtypes import DECODERS, MSG_HEAD, Codec, MsgType, pad, register

_NLA = struct.Struct("=HH")  # a netlink attribute's header (host order, as the kernel writes it)
VERSION_MAX = (1 << 48) - 1  # a flow version beyond this is forged: 2^48 changes in one boot cannot happen
_FLOW = struct.Struct("!BBHQHH")  # type, family, length, version, zone, original tuple length
_DELETE = _FLOW  # the same head; the last field is 0
FLOW_HEADER = _FLOW.size  # 16: the head of a FLOW or DELETE message, before the attributes or tuple
_ORIG_NESTED = ct.CTA_TUPLE_ORIG | ct.NLA_F_NESTED
_VERSION = struct.Struct("!Q")
_ORIG_HEADS: dict[int, bytes] = {}  # CTA_TUPLE_ORIG's header by its length, made once
FlowTuple = tuple[int, bytes, bytes]  # (version, key, the FLOW or EXPECT message)


class Flow(NamedTuple):
    """A FLOW (or EXPECT) message, kept encoded: receivers store ``msg`` as it came and build an
    Entry from it only when the flow is written to a kernel or shown (see ``flow_entry``)."""

    version: int
    key: bytes
    msg: bytes

    @property
    def entry(self) -> codec.Entry:
        return flow_entry(self.key, self.msg)


def flow_version(msg: bytes) -> int:
    """The version a FLOW (or DELETE) message carries, read from its head."""
    version: int = _VERSION.unpack_from(msg, 4)[0]
    return version


def restamp(msg: bytes, version: int) -> bytes:
    """A FLOW (or EXPECT) message with another version in its head."""
    return msg[:4] + _VERSION.pack(version) + msg[12:]


def flow_entry(key: bytes, msg: bytes) -> codec.Entry:
    """The Entry a FLOW (or EXPECT) message carries."""
    return codec.Entry(key, msg[1] & ~expectation.EXPECTATION, msg[FLOW_HEADER:])


@register
class FlowCodec(Codec):
    """FLOW: a flow's state. The flow key travels in the head (zone, and the length of the
    CTA_TUPLE_ORIG attribute that the attributes start with), so receivers index a flow without
    parsing its attributes."""

    TYPE = MsgType.FLOW
    INLINE = True

    @staticmethod
    def encode(version: int, entry: codec.Entry) -> bytes:
        """FLOW for an entry."""
        key = entry.key
        attrs = entry.attrs
        olen = len(key) + 1  # CTA_TUPLE_ORIG attribute: 4-byte header + the tuple
        head = _ORIG_HEADS.get(olen)
        if head is None:
            head = _ORIG_HEADS[olen] = _NLA.pack(olen, _ORIG_NESTED)
        if attrs[:4] != head:
            # not in the kernel's order (or without the nested flag): put the original tuple first
            rest = b"".join(attrs[s - 4:s - 4 + codec.align(e - s + 4)] for t, s, e in codec.iter_attrs(attrs)
                            if t != ct.CTA_TUPLE_ORIG)
            attrs = head + key[3:] + rest
        if len(attrs) & 3:
            attrs = pad(attrs)
        return _FLOW.pack(MsgType.FLOW, entry.family, FLOW_HEADER + len(attrs), version, (key[1] << 8) | key[2],
                          olen) + attrs

    @staticmethod
    def raw(version: int, family: int, zone: int, orig_len: int, attrs: bytes) -> bytes:
        """FLOW from its parts, for attributes already in replication form (ctbridge.sync.intake):
        they start with CTA_TUPLE_ORIG, ``orig_len`` bytes with its header, and are 4-byte aligned."""
        return _FLOW.pack(MsgType.FLOW, family, FLOW_HEADER + len(attrs), version, zone, orig_len) + attrs

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Flow:
        """One FLOW, read by decode_body's loop (the rules are there)."""
        return Flow(*decode_body(data, off, off + mlen)[0][0])


flow_msg = FlowCodec.encode
flow_raw = FlowCodec.raw


@register
class ExpectCodec(Codec):
    """EXPECT: an expectation in replication form (expectation.entry_from_attrs: its attributes
    start with CTA_EXPECT_TUPLE, the key's tuple). It decodes as a Flow."""

    TYPE = MsgType.EXPECT
    INLINE = True

    @staticmethod
    def encode(version: int, entry: codec.Entry) -> bytes:
        key = entry.key
        attrs = entry.attrs
        tlen = len(key) + 1  # CTA_EXPECT_TUPLE: 4-byte header + the tuple
        if attrs[:4] != _NLA.pack(tlen, ct.CTA_EXPECT_TUPLE | ct.NLA_F_NESTED) or not expectation.is_expectation(key):
            raise ValueError("an expectation's attributes start with its tuple")
        if len(attrs) & 3:
            attrs = pad(attrs)
        return _FLOW.pack(MsgType.EXPECT, key[0], FLOW_HEADER + len(attrs), version, (key[1] << 8) | key[2],
                          tlen) + attrs

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Flow:
        """One EXPECT, read by decode_body's loop (the rules are there)."""
        return Flow(*decode_body(data, off, off + mlen)[0][0])


expect_msg = ExpectCodec.encode


class Delete(NamedTuple):
    version: int
    key: bytes


@register
class DeleteCodec(Codec):
    """DELETE: a flow (or an expectation) is gone; FLOW's head, then the original tuple."""

    TYPE = MsgType.DELETE
    INLINE = True

    @staticmethod
    def encode(version: int, key: bytes) -> bytes:
        family, zone, orig = codec.split_key(key)
        orig = pad(orig)
        return _DELETE.pack(MsgType.DELETE, family, FLOW_HEADER + len(orig), version, zone, 0) + orig

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Message:
        """One DELETE, read by decode_body's loop (the rules are there)."""
        return decode_body(data, off, off + mlen)[1][0]


delete_msg = DeleteCodec.encode


def _squeezed(msg: bytes, kind: MsgType, what: str) -> bytes:
    """``msg`` in its compact form ``kind``; ValueError if it has none."""
    msg = compact.squeeze(msg)
    if msg[0] != kind:
        raise ValueError(f"this {what}'s original tuple has no compact form")
    return msg


@register
class FlowCompactCodec(Codec):
    """FLOW_COMPACT (version 3): a FLOW as its values (ctbridge.sync.compact). It decodes as the
    FLOW it stands for, byte for byte."""

    TYPE = MsgType.FLOW_COMPACT
    INLINE = True

    @staticmethod
    def encode(version: int, entry: codec.Entry) -> bytes:
        return _squeezed(FlowCodec.encode(version, entry), MsgType.FLOW_COMPACT, "flow")

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Flow:
        return Flow(*decode_body(data, off, off + mlen)[0][0])


@register
class DeleteCompactCodec(Codec):
    """DELETE_COMPACT (version 3): a DELETE as its original tuple's values."""

    TYPE = MsgType.DELETE_COMPACT
    INLINE = True

    @staticmethod
    def encode(version: int, key: bytes) -> bytes:
        return _squeezed(DeleteCodec.encode(version, key), MsgType.DELETE_COMPACT, "key")

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Message:
        return decode_body(data, off, off + mlen)[1][0]


squeeze = compact.squeeze  # a FLOW or DELETE in its compact form (itself when it has none)
_FLOW_T = int(MsgType.FLOW)
_EXPECT_T = int(MsgType.EXPECT)
_DELETE_T = int(MsgType.DELETE)
_COMPACT_T = int(MsgType.FLOW_COMPACT)
_DELETE_COMPACT_T = int(MsgType.DELETE_COMPACT)


def decode_body(data: bytes, start: int, end: int, protocol: int = VERSION) -> tuple[list[FlowTuple], list[Message]]:
    """The messages in data[start:end] of a datagram of version ``protocol``: FLOWs as (version,
    key, message) tuples, the rest as Message objects. Raises WireError("malformed") on any
    inconsistency, before anything is used; a version-3 message in a version-2 datagram is one.

    The measured hot loop of every received datagram (bench/engine.py, side B): FLOW, EXPECT and
    DELETE are read inline here (no call, no object per flow), their compact forms with one call
    each, every other type through its registered decoder."""
    flows: list[FlowTuple] = []
    add_flow = flows.append
    out: list[Message] = []
    off = start
    head = _FLOW.unpack_from
    nla = _NLA.unpack_from
    decoders = DECODERS
    t_flow, t_expect, t_delete = _FLOW_T, _EXPECT_T, _DELETE_T  # locals: the loop's cheapest loads
    # version 3's messages in a datagram of version 2 read as unknown types (-1 is no type byte)
    t_compact = _COMPACT_T if protocol >= 3 else -1
    t_delete_compact = _DELETE_COMPACT_T if protocol >= 3 else -1
    expand = compact.expand_flow
    try:
        while off < end:
            if end - off >= FLOW_HEADER:
                mtype, aux, mlen, version, _zone, olen = head(data, off)
            else:
                mtype, aux, mlen = MSG_HEAD.unpack_from(data, off)
                version = olen = 0
            if mlen < 4 or mlen & 3 or off + mlen > end:
                raise WireError("malformed", f"message at offset {off} has bad length {mlen}")
            nxt = off + mlen
            if mtype == t_flow or mtype == t_expect:  # FLOW, the one that comes by the thousand: no objects
                alen, atype = nla(data, off + FLOW_HEADER) if mlen >= FLOW_HEADER + 4 else (0, 0)
                # a FLOW starts with CTA_TUPLE_ORIG (1), an EXPECT with CTA_EXPECT_TUPLE (2); only an
                # EXPECT has the expectation bit in its family: the two kinds of key never mix
                expect = mtype == t_expect
                if (alen != olen or olen < 4 or off + FLOW_HEADER + olen > nxt or atype & 0x3FFF != 1 + expect
                        or (aux >= 0x80) != expect):
                    raise WireError("malformed", "FLOW message whose attributes do not start with its tuple")
                if version > VERSION_MAX:
                    raise WireError("bounds", f"FLOW of version {version}, beyond any a node can reach")
                # the flow key: family, zone, and the tuple's payload (after its attribute header)
                add_flow((version, data[off + 1:off + 2] + data[off + 12:off + 14]
                          + data[off + FLOW_HEADER + 4:off + FLOW_HEADER + olen], data[off:nxt]))
            elif mtype == t_compact:
                if version > VERSION_MAX:
                    raise WireError("bounds", f"FLOW of version {version}, beyond any a node can reach")
                add_flow(expand(data, off, mlen, aux, version))
            elif mtype == t_delete:
                if mlen < FLOW_HEADER:
                    raise WireError("malformed", "DELETE message too short")
                if version > VERSION_MAX:
                    raise WireError("bounds", f"DELETE of version {version}, beyond any a node can reach")
                out.append(Delete(version, data[off + 1:off + 2] + data[off + 12:off + 14]
                                  + data[off + FLOW_HEADER:nxt]))
            elif mtype == t_delete_compact:
                if version > VERSION_MAX:
                    raise WireError("bounds", f"DELETE of version {version}, beyond any a node can reach")
                out.append(Delete(version, compact.expand_delete(data, off, mlen, aux)))
            else:
                decoder = decoders.get(mtype)
                if decoder is None:
                    raise WireError("malformed", f"unknown message type {mtype}")
                out.append(decoder(data, off, mlen, aux))
            off = nxt
    except struct.error as exc:
        raise WireError("malformed", f"message at offset {off}: {exc}") from exc
    return flows, out


def decode_messages(data: bytes, start: int, end: int) -> list[Message]:
    """Every message in data[start:end] as a Message object (FLOWs first)."""
    flows, others = decode_body(data, start, end)
    return [Flow(*f) for f in flows] + others


Message = (Flow | Delete | Ack | Nack | Gap | Alive | Hello | Resync | BulkBegin | BulkEnd | Heartbeat | Challenge
           | Echo | DigestAsk | Digest | DigestKeys)

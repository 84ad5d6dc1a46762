"""The sync messages (protocol version 2): one place per message type.

Every message is type (u8) | aux (u8) | length (u16, the whole message, a multiple of 4) | body,
big endian; docs/protocol.md ("Messages") has each body's layout, and tests/unit/test_wire.py a
golden vector of each.

Each type has one class here, registered with ``@register``: its ``TYPE``, its encoder
(``encode``, also a module-level name such as ``ack_msg``, which the engine calls) and its
decoder (``decode``), next to the NamedTuple the decoder returns. ``decode_body`` dispatches
through the registry by type byte; FLOW, EXPECT and DELETE, which come by the thousand, are read
inline in its loop instead (see there). Adding a message: a MsgType value, a class here, a golden
vector (tests/support/wirevectors.py).

Decoding never raises anything but WireError, whose ``reason`` is the counter it belongs to.
Imports ctbridge.conntrack (flow and expectation layouts) and ctbridge.sync.header.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import ClassVar, NamedTuple, TypeVar

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec, expectation
from ctbridge.sync.header import WireError

_MSG = struct.Struct("!BBH")  # type, aux, length: the head of every message
_U32 = struct.Struct("!I")
_NLA = struct.Struct("=HH")  # a netlink attribute's header (host order, as the kernel writes it)
VERSION_MAX = (1 << 48) - 1  # a flow version beyond this is forged: 2^48 changes in one boot cannot happen


class MsgType(IntEnum):
    FLOW = 1  # a flow's state: aux = family; version (u64), zone (u16), n (u16), attributes (CTA_TUPLE_ORIG first, n)
    DELETE = 2  # a flow is gone: aux = family; version (u64), zone (u16), 0 (u16), the original tuple
    ACK = 3  # receiver -> sender: every datagram of (node, epoch) up to seq arrived
    NACK = 4  # receiver -> sender: datagrams first..last of (node, epoch) are missing, send them again
    ALIVE = 5  # nothing new; its sequence number lets receivers notice a lost tail
    HELLO = 6  # the sender (re)started: a new epoch begins
    RESYNC = 7  # ask node (0: every peer) to send its whole internal cache
    BULK_BEGIN = 8  # a bulk transfer for node (0: everyone) starts
    BULK_END = 9  # ... and ends; the receiver drops the sender's flows the bulk did not mention
    GAP = 10  # sender -> receiver: datagrams first..last of mine will not be resent; stop asking
    HEARTBEAT = 11  # redundant sync links: aux = the link it was sent over; counter (u32), reports (u16), 0 (u16),
    # a (node u32, links u32) pair per report, zero padding; alone in a datagram of sequence number 0
    CHALLENGE = 12  # node (0: every peer), nonce (u64): prove to me that you are alive now (echo it)
    ECHO = 13  # node, nonce (u64): the answer, in the sender's current epoch; starts that node's session
    # an expectation's state (ctbridge.conntrack.expectation): a FLOW's head with aux = family | 0x80;
    # the attributes start with CTA_EXPECT_TUPLE (n bytes); its deletion is a DELETE of the same aux
    EXPECT = 14
    # `ctbridge diff` (ctbridge.sync.digest): node (u32: who is asked), request (u32), a bitmap of
    # the 256 buckets (32 bytes, bucket b in bit b % 8 of byte b // 8) whose keys are asked for;
    # none set: the buckets' sums
    DIGEST_ASK = 15
    # node (u32: the asker), request (u32), first bucket (u16), n (u16), n x (flows u32, XOR u64)
    DIGEST = 16
    # aux 1: the last of the answer, 3: the last, cut short (DIGEST_KEYS_MAX); node (u32: the
    # asker), request (u32), n (u16), index (u16: its place in the answer, from 0), n x (hash u64,
    # key length u16, 0 u16, key, padded); an answer lists whole buckets only
    DIGEST_KEYS = 17


# --- the registry ----------------------------------------------------------------------------------

Decoder = Callable[[bytes, int, int, int], "Message"]


class Codec:
    """One message type: its number, its encoder and its decoder, side by side."""

    TYPE: ClassVar[MsgType]
    # True for the types decode_body reads inline (FLOW, EXPECT, DELETE); their ``decode`` reads
    # one message through decode_body, so the rules of those types are written once
    INLINE: ClassVar[bool] = False
    # the encoder, with the arguments its type needs (tests/support/wirevectors.py calls each);
    # DIGEST and DIGEST_KEYS return a list of messages, an answer too large for one
    encode: ClassVar[Callable[..., bytes | list[bytes]]]

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Message:
        """The message at data[off:off + mlen], its length already checked (at least 4, a
        multiple of 4, within the payload). WireError (or struct.error, which decode_body turns
        into one) if it is malformed."""
        raise NotImplementedError


CODECS: dict[int, type[Codec]] = {}  # type byte -> its class
_DECODERS: dict[int, Decoder] = {}  # type byte -> decoder, for the types decode_body does not read inline
_C = TypeVar("_C", bound=type[Codec])


def register(cls: _C) -> _C:
    """Class decorator: ``cls`` is the one place of message type ``cls.TYPE``."""
    if "encode" not in vars(cls) or "decode" not in vars(cls):
        raise TypeError(f"{cls.__name__} needs both an encode and a decode")
    kind = int(cls.TYPE)
    if kind in CODECS:
        raise ValueError(f"message type {cls.TYPE.name} is registered twice")
    CODECS[kind] = cls
    if not cls.INLINE:
        _DECODERS[kind] = cls.decode
    return cls


def _need(mlen: int, size: int, what: str) -> None:
    if mlen < size:
        raise WireError("malformed", f"{what} message of {mlen} bytes, needs {size}")


def _pad(b: bytes) -> bytes:
    extra = -len(b) & 3
    return b + b"\x00" * extra if extra else b


# --- FLOW, EXPECT, DELETE: the bulk of the traffic -------------------------------------------------

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
            attrs = _pad(attrs)
        return _FLOW.pack(MsgType.FLOW, entry.family, FLOW_HEADER + len(attrs), version, (key[1] << 8) | key[2],
                          olen) + attrs

    @staticmethod
    def raw(version: int, family: int, zone: int, orig_len: int, attrs: bytes) -> bytes:
        """FLOW from its parts, for attributes already in replication form (ctbridge.sync.intake):
        they start with CTA_TUPLE_ORIG, ``orig_len`` bytes with its header, and are 4-byte aligned."""
        return _FLOW.pack(MsgType.FLOW, family, FLOW_HEADER + len(attrs), version, zone, orig_len) + attrs

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Message:
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
            attrs = _pad(attrs)
        return _FLOW.pack(MsgType.EXPECT, key[0], FLOW_HEADER + len(attrs), version, (key[1] << 8) | key[2],
                          tlen) + attrs

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Message:
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
        orig = _pad(orig)
        return _DELETE.pack(MsgType.DELETE, family, FLOW_HEADER + len(orig), version, zone, 0) + orig

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Message:
        """One DELETE, read by decode_body's loop (the rules are there)."""
        return decode_body(data, off, off + mlen)[1][0]


delete_msg = DeleteCodec.encode
_FLOW_T = int(MsgType.FLOW)
_EXPECT_T = int(MsgType.EXPECT)
_DELETE_T = int(MsgType.DELETE)


def decode_body(data: bytes, start: int, end: int) -> tuple[list[FlowTuple], list[Message]]:
    """The messages in data[start:end]: FLOWs as (version, key, message) tuples, the rest as
    Message objects. Raises WireError("malformed") on any inconsistency, before anything is used.

    The hot loop of every received datagram: FLOW, EXPECT and DELETE are read inline here (no
    call, no object per flow), every other type through its registered decoder."""
    flows: list[FlowTuple] = []
    add_flow = flows.append
    out: list[Message] = []
    off = start
    head = _FLOW.unpack_from
    nla = _NLA.unpack_from
    decoders = _DECODERS
    t_flow, t_expect, t_delete = _FLOW_T, _EXPECT_T, _DELETE_T  # locals: the loop's cheapest loads
    try:
        while off < end:
            if end - off >= FLOW_HEADER:
                mtype, aux, mlen, version, _zone, olen = head(data, off)
            else:
                mtype, aux, mlen = _MSG.unpack_from(data, off)
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
            elif mtype == t_delete:
                if mlen < FLOW_HEADER:
                    raise WireError("malformed", "DELETE message too short")
                if version > VERSION_MAX:
                    raise WireError("bounds", f"DELETE of version {version}, beyond any a node can reach")
                out.append(Delete(version, data[off + 1:off + 2] + data[off + 12:off + 14]
                                  + data[off + FLOW_HEADER:nxt]))
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


# --- delivery: ACK, NACK, GAP, ALIVE, HELLO, RESYNC, BULK_BEGIN, BULK_END -------------------------

_ACK = struct.Struct("!BBHIQI")
_RANGE = struct.Struct("!BBHIQII")
_NODE = struct.Struct("!BBHI")
_BULK_BEGIN = struct.Struct("!BBHII")
_BULK_END = struct.Struct("!BBHIII")


class Ack(NamedTuple):
    node: int
    epoch: int
    upto: int
    highest: int = 0  # 0: not said


@register
class AckCodec(Codec):
    TYPE = MsgType.ACK

    @staticmethod
    def encode(node: int, epoch: int, upto: int, highest: int = 0) -> bytes:
        """ACK; with ``highest``, also "I have every datagram up to highest but those my NACKs in
        this datagram name" (selective acknowledgement; a version 1 decoder reads the ACK and
        ignores it)."""
        if highest > upto:
            return _ACK.pack(MsgType.ACK, 0, _ACK.size + 4, node, epoch, upto) + _U32.pack(highest)
        return _ACK.pack(MsgType.ACK, 0, _ACK.size, node, epoch, upto)

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Message:
        _need(mlen, _ACK.size, "ACK")
        node, epoch, upto = _ACK.unpack_from(data, off)[3:]
        highest = _U32.unpack_from(data, off + _ACK.size)[0] if mlen >= _ACK.size + 4 else 0
        return Ack(node, epoch, upto, highest)


ack_msg = AckCodec.encode


class Nack(NamedTuple):
    node: int
    epoch: int
    first: int
    last: int


@register
class NackCodec(Codec):
    TYPE = MsgType.NACK

    @staticmethod
    def encode(node: int, epoch: int, first: int, last: int) -> bytes:
        return _RANGE.pack(MsgType.NACK, 0, _RANGE.size, node, epoch, first, last)

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Message:
        _need(mlen, _RANGE.size, "NACK/GAP")
        return Nack(*_RANGE.unpack_from(data, off)[3:])


nack_msg = NackCodec.encode


class Gap(NamedTuple):
    node: int
    epoch: int
    first: int
    last: int


@register
class GapCodec(Codec):
    TYPE = MsgType.GAP

    @staticmethod
    def encode(node: int, epoch: int, first: int, last: int) -> bytes:
        return _RANGE.pack(MsgType.GAP, 0, _RANGE.size, node, epoch, first, last)

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Message:
        _need(mlen, _RANGE.size, "NACK/GAP")
        return Gap(*_RANGE.unpack_from(data, off)[3:])


gap_msg = GapCodec.encode


class Alive(NamedTuple):
    pass


@register
class AliveCodec(Codec):
    TYPE = MsgType.ALIVE

    @staticmethod
    def encode() -> bytes:
        return _MSG.pack(MsgType.ALIVE, 0, 4)

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Message:
        return Alive()


alive_msg = AliveCodec.encode


class Hello(NamedTuple):
    pass


@register
class HelloCodec(Codec):
    TYPE = MsgType.HELLO

    @staticmethod
    def encode() -> bytes:
        return _MSG.pack(MsgType.HELLO, 0, 4)

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Message:
        return Hello()


hello_msg = HelloCodec.encode


class Resync(NamedTuple):
    node: int


@register
class ResyncCodec(Codec):
    TYPE = MsgType.RESYNC

    @staticmethod
    def encode(node: int) -> bytes:
        return _NODE.pack(MsgType.RESYNC, 0, _NODE.size, node)

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Message:
        _need(mlen, _NODE.size, "RESYNC")
        return Resync(_NODE.unpack_from(data, off)[3])


resync_msg = ResyncCodec.encode


class BulkBegin(NamedTuple):
    node: int
    bulk_id: int


@register
class BulkBeginCodec(Codec):
    TYPE = MsgType.BULK_BEGIN

    @staticmethod
    def encode(node: int, bulk_id: int) -> bytes:
        return _BULK_BEGIN.pack(MsgType.BULK_BEGIN, 0, _BULK_BEGIN.size, node, bulk_id)

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Message:
        _need(mlen, _BULK_BEGIN.size, "BULK_BEGIN")
        return BulkBegin(*_BULK_BEGIN.unpack_from(data, off)[3:])


bulk_begin_msg = BulkBeginCodec.encode


class BulkEnd(NamedTuple):
    node: int
    bulk_id: int
    flows: int


@register
class BulkEndCodec(Codec):
    TYPE = MsgType.BULK_END

    @staticmethod
    def encode(node: int, bulk_id: int, flows: int) -> bytes:
        return _BULK_END.pack(MsgType.BULK_END, 0, _BULK_END.size, node, bulk_id, flows)

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Message:
        _need(mlen, _BULK_END.size, "BULK_END")
        return BulkEnd(*_BULK_END.unpack_from(data, off)[3:])


bulk_end_msg = BulkEndCodec.encode


# --- sessions and links: CHALLENGE, ECHO, HEARTBEAT ------------------------------------------------

_NONCE = struct.Struct("!BBHIQ")  # type, 0, length, node, nonce
_HEARTBEAT = struct.Struct("!BBHIHH")  # type, link, length, counter, reports, 0
_REPORT = struct.Struct("!II")
MAX_LINKS = 4  # sync links a node may have
HEARTBEAT_SEQ = 0  # the sequence number of a heartbeat's datagram: never one of the data stream's


class Challenge(NamedTuple):
    node: int
    nonce: int


@register
class ChallengeCodec(Codec):
    TYPE = MsgType.CHALLENGE

    @staticmethod
    def encode(node: int, nonce: int) -> bytes:
        return _NONCE.pack(MsgType.CHALLENGE, 0, _NONCE.size, node, nonce)

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Message:
        _need(mlen, _NONCE.size, "CHALLENGE/ECHO")
        return Challenge(*_NONCE.unpack_from(data, off)[3:])


challenge_msg = ChallengeCodec.encode


class Echo(NamedTuple):
    node: int
    nonce: int


@register
class EchoCodec(Codec):
    TYPE = MsgType.ECHO

    @staticmethod
    def encode(node: int, nonce: int) -> bytes:
        return _NONCE.pack(MsgType.ECHO, 0, _NONCE.size, node, nonce)

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Message:
        _need(mlen, _NONCE.size, "CHALLENGE/ECHO")
        return Echo(*_NONCE.unpack_from(data, off)[3:])


echo_msg = EchoCodec.encode


class Heartbeat(NamedTuple):
    """Redundant sync links: sent over link ``link`` with number ``counter`` (outside the data
    sequence, in a datagram of sequence number 0); ``reports`` are (node, links) pairs, "I hear
    that node on these links" (bit k: link k)."""

    link: int
    counter: int
    reports: tuple[tuple[int, int], ...] = ()


@register
class HeartbeatCodec(Codec):
    TYPE = MsgType.HEARTBEAT

    @staticmethod
    def encode(link: int, counter: int, reports: Sequence[tuple[int, int]] = (), size: int = 0) -> bytes:
        """HEARTBEAT over ``link``, zero-padded to ``size`` bytes (a link that drops full-size
        datagrams must not pass its heartbeats)."""
        body = b"".join(_REPORT.pack(node, links) for node, links in reports)
        length = max(_HEARTBEAT.size + len(body), size & ~3)
        return (_HEARTBEAT.pack(MsgType.HEARTBEAT, link, length, counter, len(reports), 0) + body
                + bytes(length - _HEARTBEAT.size - len(body)))

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Message:
        _need(mlen, _HEARTBEAT.size, "HEARTBEAT")
        _t, link, _l, counter, count, _z = _HEARTBEAT.unpack_from(data, off)
        start = off + _HEARTBEAT.size
        if link >= MAX_LINKS or start + count * _REPORT.size > off + mlen:
            raise WireError("malformed", f"HEARTBEAT of link {link} with {count} reports in {mlen} bytes")
        return Heartbeat(link, counter, tuple(_REPORT.unpack_from(data, start + i * _REPORT.size)
                                              for i in range(count)))


heartbeat_msg = HeartbeatCodec.encode


# --- `ctbridge diff`: DIGEST_ASK, DIGEST, DIGEST_KEYS ----------------------------------------------

_DIGEST_ASK = struct.Struct("!BBHII32s")
_DIGEST = struct.Struct("!BBHIIHH")
_BUCKET_SUM = struct.Struct("!IQ")
_DIGEST_KEYS = struct.Struct("!BBHIIHH")
_KEY_HEAD = struct.Struct("!QHH")
DIGEST_SUMS = 64  # bucket sums per DIGEST (784 bytes: room for acknowledgements in any datagram)
DIGEST_KEY_BYTES = 1024  # bytes of keys per DIGEST_KEYS message
DIGEST_KEYS_MAX = 5_000  # keys one answer lists at most (about 300 KB; the result says it was cut short)


class DigestAsk(NamedTuple):
    node: int
    request: int
    buckets: frozenset[int] = frozenset()  # empty: the sums


@register
class DigestAskCodec(Codec):
    TYPE = MsgType.DIGEST_ASK

    @staticmethod
    def encode(node: int, request: int, buckets: frozenset[int] | set[int] = frozenset()) -> bytes:
        bitmap = bytearray(32)
        for b in buckets:
            bitmap[b >> 3] |= 1 << (b & 7)
        return _DIGEST_ASK.pack(MsgType.DIGEST_ASK, 0, _DIGEST_ASK.size, node, request, bytes(bitmap))

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Message:
        _need(mlen, _DIGEST_ASK.size, "DIGEST_ASK")
        node, request, bitmap = _DIGEST_ASK.unpack_from(data, off)[3:]
        return DigestAsk(node, request, frozenset(b for b in range(256) if bitmap[b >> 3] >> (b & 7) & 1))


digest_ask_msg = DigestAskCodec.encode


class Digest(NamedTuple):
    node: int
    request: int
    first: int
    sums: tuple[tuple[int, int], ...]  # (flows, XOR) of buckets first, first + 1, ...


@register
class DigestCodec(Codec):
    TYPE = MsgType.DIGEST

    @staticmethod
    def encode(node: int, request: int, sums: Sequence[tuple[int, int]]) -> list[bytes]:
        """The sums of every bucket, DIGEST_SUMS per message."""
        out = []
        for first in range(0, len(sums), DIGEST_SUMS):
            part = sums[first:first + DIGEST_SUMS]
            body = b"".join(_BUCKET_SUM.pack(flows, xor) for flows, xor in part)
            out.append(_DIGEST.pack(MsgType.DIGEST, 0, _DIGEST.size + len(body), node, request, first, len(part))
                       + body)
        return out

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Message:
        _need(mlen, _DIGEST.size, "DIGEST")
        node, request, first, n = _DIGEST.unpack_from(data, off)[3:]
        if first + n > 256 or _DIGEST.size + n * _BUCKET_SUM.size > mlen:
            raise WireError("malformed", f"DIGEST of buckets {first}..{first + n - 1} in {mlen} bytes")
        at = off + _DIGEST.size
        return Digest(node, request, first, tuple(_BUCKET_SUM.unpack_from(data, at + i * _BUCKET_SUM.size)
                                                  for i in range(n)))


digest_msgs = DigestCodec.encode


class DigestKeys(NamedTuple):
    node: int
    request: int
    last: bool
    keys: tuple[tuple[int, bytes], ...]  # (state hash, key)
    truncated: bool = False
    part: int = 0  # its place in the answer: the asker knows when it has every part


@register
class DigestKeysCodec(Codec):
    TYPE = MsgType.DIGEST_KEYS

    @staticmethod
    def encode(node: int, request: int, keys: Sequence[tuple[int, bytes]], truncated: bool = False) -> list[bytes]:
        """(state hash, key) pairs, DIGEST_KEY_BYTES of them per message; the last says it is."""
        chunks: list[list[bytes]] = [[]]
        size = 0
        for h, key in keys:
            item = _pad(_KEY_HEAD.pack(h, len(key), 0) + key)
            if size + len(item) > DIGEST_KEY_BYTES and chunks[-1]:
                chunks.append([])
                size = 0
            chunks[-1].append(item)
            size += len(item)
        out = []
        for i, items in enumerate(chunks):
            aux = (1 | (2 if truncated else 0)) if i == len(chunks) - 1 else 0
            body = b"".join(items)
            out.append(_DIGEST_KEYS.pack(MsgType.DIGEST_KEYS, aux, _DIGEST_KEYS.size + len(body), node, request,
                                         len(items), i & 0xFFFF) + body)
        return out

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Message:
        _need(mlen, _DIGEST_KEYS.size, "DIGEST_KEYS")
        node, request, n, part = _DIGEST_KEYS.unpack_from(data, off)[3:]
        nxt = off + mlen
        at = off + _DIGEST_KEYS.size
        keys = []
        for _ in range(n):
            if at + _KEY_HEAD.size > nxt:
                raise WireError("malformed", "DIGEST_KEYS shorter than its keys")
            h, klen, _z = _KEY_HEAD.unpack_from(data, at)
            start = at + _KEY_HEAD.size
            if klen < 4 or start + klen > nxt:
                raise WireError("malformed", f"DIGEST_KEYS key of {klen} bytes")
            keys.append((h, bytes(data[start:start + klen])))
            at += (_KEY_HEAD.size + klen + 3) & ~3
        return DigestKeys(node, request, bool(aux & 1), tuple(keys), bool(aux & 2), part)


digest_keys_msgs = DigestKeysCodec.encode


Message = (Flow | Delete | Ack | Nack | Gap | Alive | Hello | Resync | BulkBegin | BulkEnd | Heartbeat | Challenge
           | Echo | DigestAsk | Digest | DigestKeys)

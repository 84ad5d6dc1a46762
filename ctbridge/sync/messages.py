"""Every sync message but FLOW, EXPECT and DELETE (ctbridge.sync.flows): delivery (ACK, NACK,
GAP, ALIVE, HELLO, RESYNC, BULK_BEGIN, BULK_END), sessions and links (CHALLENGE, ECHO,
HEARTBEAT) and `ctbridge diff` (DIGEST_ASK, DIGEST, DIGEST_KEYS).

One class per type, registered with ``@register`` (ctbridge.sync.msgtypes): its TYPE, its encoder
(``encode``, also the module-level name the engine calls, such as ``ack_msg``) and its decoder,
next to the NamedTuple the decoder returns. docs/protocol.md ("Messages") has each body's layout.

Version 3's announcement: HELLO, ALIVE, ACK, CHALLENGE and ECHO carry the highest protocol
version their sender speaks in their aux byte (``speaks``; 0 from a node of version 2, which
reads none of these aux bytes, so announcing costs nothing and breaks nothing there).

Imports ctbridge.sync.header and ctbridge.sync.msgtypes only.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple

from ctbridge.sync.header import WireError
from ctbridge.sync.msgtypes import MSG_HEAD, Codec, MsgType, need, pad, register

# --- delivery: ACK, NACK, GAP, ALIVE, HELLO, RESYNC, BULK_BEGIN, BULK_END -------------------------

_ACK = struct.Struct("!BBHIQI")
_U32 = struct.Struct("!I")  # an ACK's optional highest
_RANGE = struct.Struct("!BBHIQII")
_NODE = struct.Struct("!BBHI")
_BULK_BEGIN = struct.Struct("!BBHII")
_BULK_END = struct.Struct("!BBHIII")


class Ack(NamedTuple):
    node: int
    epoch: int
    upto: int
    highest: int = 0  # 0: not said
    speaks: int = 0  # the highest version its sender speaks (0: version 2)


@register
class AckCodec(Codec):
    TYPE = MsgType.ACK

    @staticmethod
    def encode(node: int, epoch: int, upto: int, highest: int = 0, speaks: int = 0) -> bytes:
        """ACK; with ``highest``, also "I have every datagram up to highest but those my NACKs in
        this datagram name" (selective acknowledgement; a decoder that does not know it reads the
        first three fields)."""
        if highest > upto:
            return _ACK.pack(MsgType.ACK, speaks, _ACK.size + 4, node, epoch, upto) + _U32.pack(highest)
        return _ACK.pack(MsgType.ACK, speaks, _ACK.size, node, epoch, upto)

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Ack:
        need(mlen, _ACK.size, "ACK")
        node, epoch, upto = _ACK.unpack_from(data, off)[3:]
        highest = _U32.unpack_from(data, off + _ACK.size)[0] if mlen >= _ACK.size + 4 else 0
        return Ack(node, epoch, upto, highest, aux)


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
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Nack:
        need(mlen, _RANGE.size, "NACK/GAP")
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
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Gap:
        need(mlen, _RANGE.size, "NACK/GAP")
        return Gap(*_RANGE.unpack_from(data, off)[3:])


gap_msg = GapCodec.encode


class Alive(NamedTuple):
    speaks: int = 0  # the highest version its sender speaks (0: version 2)


@register
class AliveCodec(Codec):
    TYPE = MsgType.ALIVE

    @staticmethod
    def encode(speaks: int = 0) -> bytes:
        return MSG_HEAD.pack(MsgType.ALIVE, speaks, 4)

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Alive:
        return Alive(aux)


alive_msg = AliveCodec.encode


class Hello(NamedTuple):
    speaks: int = 0  # the highest version its sender speaks (0: version 2)


@register
class HelloCodec(Codec):
    TYPE = MsgType.HELLO

    @staticmethod
    def encode(speaks: int = 0) -> bytes:
        return MSG_HEAD.pack(MsgType.HELLO, speaks, 4)

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Hello:
        return Hello(aux)


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
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Resync:
        need(mlen, _NODE.size, "RESYNC")
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
    def decode(data: bytes, off: int, mlen: int, aux: int) -> BulkBegin:
        need(mlen, _BULK_BEGIN.size, "BULK_BEGIN")
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
    def decode(data: bytes, off: int, mlen: int, aux: int) -> BulkEnd:
        need(mlen, _BULK_END.size, "BULK_END")
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
    speaks: int = 0  # the highest version its sender speaks (0: version 2)


@register
class ChallengeCodec(Codec):
    TYPE = MsgType.CHALLENGE

    @staticmethod
    def encode(node: int, nonce: int, speaks: int = 0) -> bytes:
        return _NONCE.pack(MsgType.CHALLENGE, speaks, _NONCE.size, node, nonce)

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Challenge:
        need(mlen, _NONCE.size, "CHALLENGE/ECHO")
        _t, _a, _l, node, nonce = _NONCE.unpack_from(data, off)
        return Challenge(node, nonce, aux)


challenge_msg = ChallengeCodec.encode


class Echo(NamedTuple):
    node: int
    nonce: int
    speaks: int = 0  # the highest version its sender speaks (0: version 2)


@register
class EchoCodec(Codec):
    TYPE = MsgType.ECHO

    @staticmethod
    def encode(node: int, nonce: int, speaks: int = 0) -> bytes:
        return _NONCE.pack(MsgType.ECHO, speaks, _NONCE.size, node, nonce)

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Echo:
        need(mlen, _NONCE.size, "CHALLENGE/ECHO")
        _t, _a, _l, node, nonce = _NONCE.unpack_from(data, off)
        return Echo(node, nonce, aux)


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
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Heartbeat:
        need(mlen, _HEARTBEAT.size, "HEARTBEAT")
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
    def decode(data: bytes, off: int, mlen: int, aux: int) -> DigestAsk:
        need(mlen, _DIGEST_ASK.size, "DIGEST_ASK")
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
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Digest:
        need(mlen, _DIGEST.size, "DIGEST")
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
            item = pad(_KEY_HEAD.pack(h, len(key), 0) + key)
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
    def decode(data: bytes, off: int, mlen: int, aux: int) -> DigestKeys:
        need(mlen, _DIGEST_KEYS.size, "DIGEST_KEYS")
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

"""Sync protocol version 2: datagram and message encoding, authentication. Pure functions.

A datagram is a 32-byte header, a run of messages, and (when authenticated) one MAC per receiver
over both. All integers are big endian. docs/protocol.md has the byte diagrams;
tests/unit/test_wire.py holds a golden vector of every message type.

    header   magic "CB" | version 2 | flags | key id | MAC count | payload length
             | node id (u32) | boot epoch (u64) | sequence (u32) | sender time, ms (u64)
    message  type (u8) | aux (u8) | length (u16, whole message, multiple of 4) | body
    trailer  MAC count x (receiver node id (u32), MAC (16 bytes)): keyed BLAKE2b or HMAC-SHA256
             over header and messages, with the key this node shares with that receiver (pairwise
             keys), or once with receiver 0 and the cluster's group key

Decoding never raises anything but WireError, whose ``reason`` is the counter it belongs to.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, NamedTuple

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec, expectation

MAGIC = b"CB"
VERSION = 2
HEADER = struct.Struct("!2sBBBBHIQIQ")
HEADER_LEN = HEADER.size  # 32
MAC_LEN = 16
_MAC_ENTRY = struct.Struct("!I16s")  # receiver node id, MAC
MAC_ENTRY_LEN = _MAC_ENTRY.size  # 20
MAX_MACS = 16  # MACs one datagram carries: one per peer, and a node has at most 16 (EngineConfig.max_peers)
GROUP = 0  # the receiver id of a MAC made with a group key (any holder can check it, and make it)
FLAG_MAC = 0x01  # MACs follow the messages
# The messages are sealed (optional encryption): the payload is a counter (u32), the messages
# encrypted with the sender's sealing key, and the AEAD's 16-byte tag; the AEAD's nonce is the
# epoch (8 bytes) and that counter, its associated data the header.
FLAG_AES_GCM = 0x02  # AES-256-GCM (NIST SP 800-38D)
FLAG_CHACHA = 0x04  # ChaCha20-Poly1305 (RFC 8439)
_SEALED = FLAG_AES_GCM | FLAG_CHACHA
CIPHERS = {"aes-256-gcm": FLAG_AES_GCM, "chacha20-poly1305": FLAG_CHACHA}
SEAL_OVERHEAD = 4 + 16  # counter, tag
SEAL_COUNTER_MAX = 0xFFFFFFFF
# The protocol label: BLAKE2b's 16-byte personalization (RFC 7693 2.5), and the first bytes HMAC
# signs, so a MAC made for another protocol or another version of this one never verifies here
LABEL = b"ctbridge sync v2"
VERSION_MAX = (1 << 48) - 1  # a flow version beyond this is forged: 2^48 changes in one boot cannot happen

_MSG = struct.Struct("!BBH")
_U64 = struct.Struct("!Q")
_FLOW = struct.Struct("!BBHQHH")  # type, family, length, version, zone, original tuple length
_DELETE = _FLOW  # the same head; the last field is 0
FLOW_HEADER = _FLOW.size  # 16: the head of a FLOW or DELETE message, before the attributes or tuple
_NLA = struct.Struct("=HH")
_ORIG_NESTED = ct.CTA_TUPLE_ORIG | ct.NLA_F_NESTED
_ACK = struct.Struct("!BBHIQI")
_RANGE = struct.Struct("!BBHIQII")
_NODE = struct.Struct("!BBHI")
_BULK_BEGIN = struct.Struct("!BBHII")
_BULK_END = struct.Struct("!BBHIII")


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


class WireError(Exception):
    """A datagram that must be dropped; ``reason`` names the counter it goes to."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class Header(NamedTuple):
    node: int
    epoch: int
    seq: int
    time_ms: int
    flags: int = 0
    key_id: int = 0


class Flow(NamedTuple):
    """A FLOW message, kept encoded: receivers store ``msg`` as it came and build an Entry from it
    only when the flow is written to a kernel or shown (see ``flow_entry``)."""

    version: int
    key: bytes
    msg: bytes

    @property
    def entry(self) -> codec.Entry:
        return flow_entry(self.key, self.msg)


_VERSION = struct.Struct("!Q")


def flow_version(msg: bytes) -> int:
    """The version a FLOW (or DELETE) message carries, read from its head."""
    version: int = _VERSION.unpack_from(msg, 4)[0]
    return version


def flow_entry(key: bytes, msg: bytes) -> codec.Entry:
    """The Entry a FLOW (or EXPECT) message carries."""
    return codec.Entry(key, msg[1] & ~expectation.EXPECTATION, msg[FLOW_HEADER:])


class Delete(NamedTuple):
    version: int
    key: bytes


class Ack(NamedTuple):
    node: int
    epoch: int
    upto: int
    highest: int = 0  # 0: not said


class Nack(NamedTuple):
    node: int
    epoch: int
    first: int
    last: int


class Gap(NamedTuple):
    node: int
    epoch: int
    first: int
    last: int


class Alive(NamedTuple):
    pass


class Heartbeat(NamedTuple):
    """Redundant sync links: sent over link ``link`` with number ``counter`` (outside the data
    sequence, in a datagram of sequence number 0); ``reports`` are (node, links) pairs, "I hear
    that node on these links" (bit k: link k)."""

    link: int
    counter: int
    reports: tuple[tuple[int, int], ...] = ()


class Hello(NamedTuple):
    pass


class Challenge(NamedTuple):
    node: int
    nonce: int


class Echo(NamedTuple):
    node: int
    nonce: int


class Resync(NamedTuple):
    node: int


class DigestAsk(NamedTuple):
    node: int
    request: int
    buckets: frozenset[int] = frozenset()  # empty: the sums


class Digest(NamedTuple):
    node: int
    request: int
    first: int
    sums: tuple[tuple[int, int], ...]  # (flows, XOR) of buckets first, first + 1, ...


class DigestKeys(NamedTuple):
    node: int
    request: int
    last: bool
    keys: tuple[tuple[int, bytes], ...]  # (state hash, key)
    truncated: bool = False
    part: int = 0  # its place in the answer: the asker knows when it has every part


class BulkBegin(NamedTuple):
    node: int
    bulk_id: int


class BulkEnd(NamedTuple):
    node: int
    bulk_id: int
    flows: int


Message = (Flow | Delete | Ack | Nack | Gap | Alive | Hello | Resync | BulkBegin | BulkEnd | Heartbeat | Challenge
           | Echo | DigestAsk | Digest | DigestKeys)


# --- authentication --------------------------------------------------------------------------------

# keyed BLAKE2b (RFC 7693) is the default: on this project's reference machine it signs a full
# datagram about 30% faster than HMAC-SHA256, which is a tenth of the per-flow cost of replication
ALGORITHMS = ("blake2b", "hmac-sha256")
KEY_MIN_BYTES = 16
BLAKE2B_KEY_MAX = 64  # hashlib.blake2b refuses longer keys (RFC 7693: at most 64 bytes)


def key_id(key: bytes) -> int:
    """One byte that tells a receiver which of its keys signed a datagram (during a rollover)."""
    return hashlib.sha256(b"ctbridge key id\x00" + key).digest()[0]


def cluster_salt(cluster: str) -> bytes:
    """The cluster's identity as every MAC covers it (BLAKE2b's 16-byte salt): a key file that a
    second cluster reuses does not let one cluster's datagrams be accepted by the other."""
    return hashlib.blake2b(cluster.encode(), digest_size=16, person=b"ctbridge cluster").digest()


def _check_key(k: bytes, algorithm: str) -> None:
    if len(k) < KEY_MIN_BYTES:
        raise ValueError(f"a sync key must have at least {KEY_MIN_BYTES} bytes, this one has {len(k)}")
    if algorithm == "blake2b" and len(k) > BLAKE2B_KEY_MAX:
        raise ValueError(f"a blake2b sync key has at most {BLAKE2B_KEY_MAX} bytes, this one has "
                         f"{len(k)}; make a new one with `ctbridge keygen`")


@dataclass(frozen=True)
class KeySet:
    """One generation of keys with its algorithm: a group key every node holds (any holder can
    sign as any node), or this node's pairwise keys, one per peer (node id -> the key only the
    two of them hold): then no node can make another accept a datagram as a third node's."""

    algorithm: str
    key_id: int
    group: bytes = b""
    pairs: Mapping[int, bytes] = field(default_factory=dict)
    # optional encryption: node id -> the key that node seals its datagrams with (every member
    # holds every member's: a member reads all flows anyway); a group key derives them
    seals: Mapping[int, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown authentication algorithm {self.algorithm!r}; use one of {', '.join(ALGORITHMS)}")
        if bool(self.group) == bool(self.pairs):
            raise ValueError("a key set holds either a group key or pairwise keys")
        for k in (self.group,) if self.group else self.pairs.values():
            _check_key(k, self.algorithm)
        if self.pairs and (GROUP in self.pairs or len(self.pairs) > MAX_MACS):
            raise ValueError(f"pairwise keys for at most {MAX_MACS} peers, none with node id 0")

    @classmethod
    def of_group(cls, key: bytes, algorithm: str = "blake2b") -> KeySet:
        return cls(algorithm, key_id(key), group=key)

    def key_for(self, node: int) -> bytes | None:
        """The key of a datagram exchanged with ``node`` (None: this set shares none with it)."""
        return self.group or self.pairs.get(node)

    def seal_key(self, node: int) -> bytes | None:
        """The key ``node`` seals its datagrams with."""
        if self.group:
            return hashlib.blake2b(node.to_bytes(4, "big"), key=self.group, digest_size=32,
                                   person=b"ctbridge seal v2").digest()
        return self.seals.get(node)


class Auth:
    """Signs with the first key set; verifies with any of them (two during a rollover, which
    may also change the algorithm or go from a group key to pairwise keys).

    ``keys`` are group keys (bytes, with ``algorithm``) or KeySets. ``algorithm`` "none" sends no
    MAC and accepts datagrams without one; a receiver with keys rejects datagrams that carry no
    MAC, or none for it, or a wrong one.
    """

    def __init__(self, keys: Sequence[bytes | KeySet], algorithm: str = "blake2b", cluster: str = "",
                 encrypt: str = "off", node: int = GROUP) -> None:
        """``encrypt``: "off"; "accept" (open sealed datagrams, send in clear: the first step of
        turning encryption on without an outage); or a cipher of CIPHERS (seal as ``node``; clear
        datagrams of peers not sealing yet are still taken: they carry MACs all the same).
        Sealing needs the cryptography package."""
        sets: list[KeySet] = []
        if algorithm != "none":
            if algorithm not in ALGORITHMS:
                raise ValueError(f"unknown authentication algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")
            if not keys:
                raise ValueError("authentication needs at least one key")
            for k in keys:
                if isinstance(k, KeySet):
                    sets.append(k)
                else:
                    _check_key(k, algorithm)
                    sets.append(KeySet.of_group(k, algorithm))
        self.algorithm = sets[0].algorithm if sets else "none"
        self.sets = sets
        # one byte of key id can collide between two sets: keep every set under its id
        self.keys: dict[int, list[KeySet]] = {}
        for ks in sets:
            self.keys.setdefault(ks.key_id, []).append(ks)
        self.sign_set = sets[0] if sets else None
        self.sign_id = sets[0].key_id if sets else 0
        self.salt = cluster_salt(cluster)
        self._prefix = LABEL + self.salt
        # the trailer's receivers and keys, in node id order
        self._sign: list[tuple[int, bytes]] = []
        if self.sign_set is not None:
            ss = self.sign_set
            self._sign = [(GROUP, ss.group)] if ss.group else sorted(ss.pairs.items())
        self.trailer_len = MAC_ENTRY_LEN * len(self._sign)
        self.encrypt = encrypt
        self.seal_flag = CIPHERS.get(encrypt, 0)
        self._aeads: dict[tuple[int, bytes], Any] = {}
        self._seal_key = b""
        if encrypt != "off":
            if encrypt != "accept" and not self.seal_flag:
                raise ValueError(f"unknown encryption {encrypt!r}; use off, accept, " + ", ".join(CIPHERS))
            if self.sign_set is None:
                raise ValueError("encryption needs keys (auth is \"none\")")
            _aead_class(FLAG_AES_GCM)  # the cryptography package is there, or a clear error now
            if self.seal_flag:
                key = self.sign_set.seal_key(node)
                if key is None:
                    raise ValueError(f"the key file holds no sealing key for this node ({node:08x}); render "
                                     "the keys again")
                self._seal_key = key
        self.overhead = self.trailer_len + (SEAL_OVERHEAD if self.seal_flag else 0)

    @property
    def enabled(self) -> bool:
        return self.sign_set is not None

    @property
    def pairwise(self) -> bool:
        return self.sign_set is not None and not self.sign_set.group

    def peers(self) -> list[int]:
        """The nodes the signing keys name (pairwise keys: the cluster's other members)."""
        return [] if self.sign_set is None else sorted(self.sign_set.pairs)

    def mac(self, algorithm: str, key: bytes, data: bytes) -> bytes:
        if algorithm == "blake2b":
            return hashlib.blake2b(data, key=key, digest_size=MAC_LEN, person=LABEL, salt=self.salt).digest()
        return hmac.digest(key, self._prefix + data, "sha256")[:MAC_LEN]

    def aead(self, flag: int, key: bytes) -> Any:
        """The AEAD object of a key (made once: key setup is most of a small seal's cost)."""
        got = self._aeads.get((flag, key))
        if got is None:
            got = self._aeads[(flag, key)] = _aead_class(flag)(key)
        return got

    def seal(self, head: bytes, epoch: int, counter: int, messages: bytes) -> bytes:
        nonce = _NONCE_HEAD.pack(epoch, counter)
        sealed: bytes = self.aead(self.seal_flag, self._seal_key).encrypt(nonce, messages, head)
        return _U32_BE.pack(counter) + sealed

    def open(self, data: bytes, end: int, header: Header, ks: KeySet) -> bytes:
        """The messages of a sealed datagram, or WireError("auth")."""
        flag = header.flags & _SEALED
        key = ks.seal_key(header.node)
        if self.encrypt == "off" or key is None:
            raise WireError("auth", "sealed datagram, and this node does not open sealed ones (sync.encrypt)")
        if end - HEADER_LEN < SEAL_OVERHEAD:
            raise WireError("malformed", "sealed payload shorter than its counter and tag")
        counter = _U32_BE.unpack_from(data, HEADER_LEN)[0]
        try:
            opened: bytes = self.aead(flag, key).decrypt(_NONCE_HEAD.pack(header.epoch, counter),
                                                         data[HEADER_LEN + 4:end], data[:HEADER_LEN])
            return opened
        except Exception as exc:  # cryptography's InvalidTag: the type lives in the optional package
            raise WireError("auth", f"sealed payload does not open ({type(exc).__name__})") from None

    def sign(self, data: bytes) -> bytes:
        """The trailer for ``data`` (header and messages): a MAC per receiver."""
        alg = self.algorithm
        mac = self.mac
        return b"".join(_MAC_ENTRY.pack(node, mac(alg, key, data)) for node, key in self._sign)


_NONCE_HEAD = struct.Struct("!QI")
_U32_BE = struct.Struct("!I")


def _aead_class(flag: int) -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
    except ImportError:
        raise ValueError("sync.encrypt needs the cryptography package: apt install python3-cryptography "
                         "(or pip install 'ctbridge[encrypt]')") from None
    return AESGCM if flag == FLAG_AES_GCM else ChaCha20Poly1305


# --- encoding --------------------------------------------------------------------------------------


def _pad(b: bytes) -> bytes:
    extra = -len(b) & 3
    return b + b"\x00" * extra if extra else b


def flow_msg(version: int, entry: codec.Entry) -> bytes:
    """FLOW for an entry. The flow key travels in the head (zone, and the length of the
    CTA_TUPLE_ORIG attribute that the attributes start with), so receivers index a flow without
    parsing its attributes."""
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


_ORIG_HEADS: dict[int, bytes] = {}


def expect_msg(version: int, entry: codec.Entry) -> bytes:
    """EXPECT for an expectation in replication form (expectation.entry_from_attrs: its
    attributes start with CTA_EXPECT_TUPLE, the key's tuple)."""
    key = entry.key
    attrs = entry.attrs
    tlen = len(key) + 1  # CTA_EXPECT_TUPLE: 4-byte header + the tuple
    if attrs[:4] != _NLA.pack(tlen, ct.CTA_EXPECT_TUPLE | ct.NLA_F_NESTED) or not expectation.is_expectation(key):
        raise ValueError("an expectation's attributes start with its tuple")
    if len(attrs) & 3:
        attrs = _pad(attrs)
    return _FLOW.pack(MsgType.EXPECT, key[0], FLOW_HEADER + len(attrs), version, (key[1] << 8) | key[2],
                      tlen) + attrs


def flow_raw(version: int, family: int, zone: int, orig_len: int, attrs: bytes) -> bytes:
    """FLOW from its parts, for attributes already in replication form (ctbridge.sync.intake):
    they start with CTA_TUPLE_ORIG, ``orig_len`` bytes with its header, and are 4-byte aligned."""
    return _FLOW.pack(MsgType.FLOW, family, FLOW_HEADER + len(attrs), version, zone, orig_len) + attrs


def delete_msg(version: int, key: bytes) -> bytes:
    family, zone, orig = codec.split_key(key)
    orig = _pad(orig)
    return _DELETE.pack(MsgType.DELETE, family, FLOW_HEADER + len(orig), version, zone, 0) + orig


_U32 = struct.Struct("!I")


def ack_msg(node: int, epoch: int, upto: int, highest: int = 0) -> bytes:
    """ACK; with ``highest``, also "I have every datagram up to highest but those my NACKs in this
    datagram name" (selective acknowledgement; a version 1 decoder reads the ACK and ignores it)."""
    if highest > upto:
        return _ACK.pack(MsgType.ACK, 0, _ACK.size + 4, node, epoch, upto) + _U32.pack(highest)
    return _ACK.pack(MsgType.ACK, 0, _ACK.size, node, epoch, upto)


def nack_msg(node: int, epoch: int, first: int, last: int) -> bytes:
    return _RANGE.pack(MsgType.NACK, 0, _RANGE.size, node, epoch, first, last)


def gap_msg(node: int, epoch: int, first: int, last: int) -> bytes:
    return _RANGE.pack(MsgType.GAP, 0, _RANGE.size, node, epoch, first, last)


def alive_msg() -> bytes:
    return _MSG.pack(MsgType.ALIVE, 0, 4)


_HEARTBEAT = struct.Struct("!BBHIHH")  # type, link, length, counter, reports, 0
_REPORT = struct.Struct("!II")
MAX_LINKS = 4  # sync links a node may have
HEARTBEAT_SEQ = 0  # the sequence number of a heartbeat's datagram: never one of the data stream's


def heartbeat_msg(link: int, counter: int, reports: Sequence[tuple[int, int]] = (), size: int = 0) -> bytes:
    """HEARTBEAT over ``link``, zero-padded to ``size`` bytes (a link that drops full-size datagrams
    must not pass its heartbeats)."""
    body = b"".join(_REPORT.pack(node, links) for node, links in reports)
    length = max(_HEARTBEAT.size + len(body), size & ~3)
    return (_HEARTBEAT.pack(MsgType.HEARTBEAT, link, length, counter, len(reports), 0) + body
            + bytes(length - _HEARTBEAT.size - len(body)))


def hello_msg() -> bytes:
    return _MSG.pack(MsgType.HELLO, 0, 4)


_NONCE = struct.Struct("!BBHIQ")  # type, 0, length, node, nonce


def challenge_msg(node: int, nonce: int) -> bytes:
    return _NONCE.pack(MsgType.CHALLENGE, 0, _NONCE.size, node, nonce)


def echo_msg(node: int, nonce: int) -> bytes:
    return _NONCE.pack(MsgType.ECHO, 0, _NONCE.size, node, nonce)


def resync_msg(node: int) -> bytes:
    return _NODE.pack(MsgType.RESYNC, 0, _NODE.size, node)


def bulk_begin_msg(node: int, bulk_id: int) -> bytes:
    return _BULK_BEGIN.pack(MsgType.BULK_BEGIN, 0, _BULK_BEGIN.size, node, bulk_id)


def bulk_end_msg(node: int, bulk_id: int, flows: int) -> bytes:
    return _BULK_END.pack(MsgType.BULK_END, 0, _BULK_END.size, node, bulk_id, flows)


_DIGEST_ASK = struct.Struct("!BBHII32s")
_DIGEST = struct.Struct("!BBHIIHH")
_BUCKET_SUM = struct.Struct("!IQ")
_DIGEST_KEYS = struct.Struct("!BBHIIHH")
_KEY_HEAD = struct.Struct("!QHH")
DIGEST_SUMS = 64  # bucket sums per DIGEST (784 bytes: room for acknowledgements in any datagram)
DIGEST_KEY_BYTES = 1024  # bytes of keys per DIGEST_KEYS message
DIGEST_KEYS_MAX = 5_000  # keys one answer lists at most (about 300 KB; the result says it was cut short)


def digest_ask_msg(node: int, request: int, buckets: frozenset[int] | set[int] = frozenset()) -> bytes:
    bitmap = bytearray(32)
    for b in buckets:
        bitmap[b >> 3] |= 1 << (b & 7)
    return _DIGEST_ASK.pack(MsgType.DIGEST_ASK, 0, _DIGEST_ASK.size, node, request, bytes(bitmap))


def digest_msgs(node: int, request: int, sums: Sequence[tuple[int, int]]) -> list[bytes]:
    """The sums of every bucket, DIGEST_SUMS per message."""
    out = []
    for first in range(0, len(sums), DIGEST_SUMS):
        part = sums[first:first + DIGEST_SUMS]
        body = b"".join(_BUCKET_SUM.pack(flows, xor) for flows, xor in part)
        out.append(_DIGEST.pack(MsgType.DIGEST, 0, _DIGEST.size + len(body), node, request, first, len(part)) + body)
    return out


def digest_keys_msgs(node: int, request: int, keys: Sequence[tuple[int, bytes]], truncated: bool = False
                     ) -> list[bytes]:
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


def datagram(header: Header, messages: bytes, auth: Auth, counter: int = 0) -> bytes:
    """Header + messages (+ a MAC per receiver); sealed with ``counter`` (never used before in
    this epoch: it makes the AEAD's nonce) when the node encrypts."""
    flags = header.flags | (FLAG_MAC if auth.enabled else 0) | auth.seal_flag
    length = len(messages) + (SEAL_OVERHEAD if auth.seal_flag else 0)
    if length > 0xFFFF:
        raise ValueError("messages exceed the 64 KiB a datagram can carry")
    head = HEADER.pack(MAGIC, VERSION, flags, auth.sign_id, auth.trailer_len // MAC_ENTRY_LEN, length,
                       header.node, header.epoch, header.seq, header.time_ms)
    data = head + (auth.seal(head, header.epoch, counter, messages) if auth.seal_flag else messages)
    if auth.enabled:
        data += auth.sign(data)
    return data


# --- decoding --------------------------------------------------------------------------------------


def decode_header(data: bytes, auth: Auth, me: int = GROUP) -> tuple[Header, int]:
    """Check framing and the MAC made for ``me`` (this node's id); (header, end of the messages).
    Raises WireError. A sealed datagram's payload is opened by ``payload``."""
    header, end, _ks = _verify(data, auth, me)
    return header, end


def payload(data: bytes, auth: Auth, me: int = GROUP) -> tuple[Header, bytes]:
    """(header, the messages) of an authentic datagram, opened if sealed; or WireError."""
    header, end, ks = _verify(data, auth, me)
    return header, _opened(data, auth, header, end, ks)


def _opened(data: bytes, auth: Auth, header: Header, end: int, ks: KeySet | None) -> bytes:
    """The messages of a verified datagram: opened if sealed."""
    if header.flags & _SEALED:
        if ks is None:
            raise WireError("auth", "sealed datagram, and this node has no keys to open it")
        return auth.open(data, end, header, ks)
    return data[HEADER_LEN:end]


def _verify(data: bytes, auth: Auth, me: int) -> tuple[Header, int, KeySet | None]:
    if len(data) < HEADER_LEN:
        raise WireError("malformed", f"datagram of {len(data)} bytes is shorter than a header")
    magic, version, flags, kid, count, length, node, epoch, seq, time_ms = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WireError("malformed", "not a ctbridge datagram (bad magic)")
    if version != VERSION:
        raise WireError("malformed", f"protocol version {version} is not supported (this node speaks {VERSION})")
    if (flags & ~(FLAG_MAC | _SEALED) or bool(flags & FLAG_MAC) != (count > 0) or count > MAX_MACS
            or flags & _SEALED == _SEALED):
        raise WireError("malformed", f"flags {flags:#x} with {count} MACs: not what version 2 defines")
    end = HEADER_LEN + length
    if len(data) != end + count * MAC_ENTRY_LEN:
        raise WireError("malformed", f"datagram length {len(data)} does not match its header ({end} + "
                                     f"{count} MACs)")
    if auth.enabled:
        if not count:
            raise WireError("auth", "datagram carries no MAC")
        sets = auth.keys.get(kid)
        if sets is None:
            raise WireError("auth", f"datagram signed with an unknown key (id {kid})")
        signed = data[:end]
        for ks in sets:
            key = ks.key_for(node)
            if key is None:
                continue  # no key shared with that node in this set
            receiver = GROUP if ks.group else me  # the MAC made for us, or the group's
            for i in range(count):
                to, mac = _MAC_ENTRY.unpack_from(data, end + i * MAC_ENTRY_LEN)
                if to == receiver:
                    if hmac.compare_digest(auth.mac(ks.algorithm, key, signed), mac):
                        return Header(node, epoch, seq, time_ms, flags, kid), end, ks
                    break
        raise WireError("auth", f"no MAC for this node that matches (from node {node:08x}, key id {kid})")
    return Header(node, epoch, seq, time_ms, flags, kid), end, None


FlowTuple = tuple[int, bytes, bytes]  # (version, key, the FLOW or EXPECT message)
_EXPECT = int(MsgType.EXPECT)


def decode_body(data: bytes, start: int, end: int) -> tuple[list[FlowTuple], list[Message]]:
    """The messages in data[start:end]: FLOWs as (version, key, message) tuples, the rest as
    Message objects. Raises WireError("malformed") on any inconsistency, before anything is used."""
    flows: list[FlowTuple] = []
    add_flow = flows.append
    out: list[Message] = []
    off = start
    head = _FLOW.unpack_from
    nla = _NLA.unpack_from
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
            if mtype == 1 or mtype == _EXPECT:  # FLOW, the one that comes by the thousand: no objects
                alen, atype = nla(data, off + FLOW_HEADER) if mlen >= FLOW_HEADER + 4 else (0, 0)
                # a FLOW starts with CTA_TUPLE_ORIG (1), an EXPECT with CTA_EXPECT_TUPLE (2); only an
                # EXPECT has the expectation bit in its family: the two kinds of key never mix
                expect = mtype == _EXPECT
                if (alen != olen or olen < 4 or off + FLOW_HEADER + olen > nxt or atype & 0x3FFF != 1 + expect
                        or (aux >= 0x80) != expect):
                    raise WireError("malformed", "FLOW message whose attributes do not start with its tuple")
                if version > VERSION_MAX:
                    raise WireError("bounds", f"FLOW of version {version}, beyond any a node can reach")
                # the flow key: family, zone, and the tuple's payload (after its attribute header)
                add_flow((version, data[off + 1:off + 2] + data[off + 12:off + 14]
                          + data[off + FLOW_HEADER + 4:off + FLOW_HEADER + olen], data[off:nxt]))
            elif mtype == MsgType.DELETE:
                if mlen < FLOW_HEADER:
                    raise WireError("malformed", "DELETE message too short")
                if version > VERSION_MAX:
                    raise WireError("bounds", f"DELETE of version {version}, beyond any a node can reach")
                out.append(Delete(version, data[off + 1:off + 2] + data[off + 12:off + 14]
                                  + data[off + FLOW_HEADER:nxt]))
            elif mtype == MsgType.ACK:
                _need(mlen, _ACK.size, "ACK")
                node, epoch, upto = _ACK.unpack_from(data, off)[3:]
                highest = _U32.unpack_from(data, off + _ACK.size)[0] if mlen >= _ACK.size + 4 else 0
                out.append(Ack(node, epoch, upto, highest))
            elif mtype == MsgType.NACK or mtype == MsgType.GAP:
                _need(mlen, _RANGE.size, "NACK/GAP")
                node, epoch, first, last = _RANGE.unpack_from(data, off)[3:]
                out.append(Nack(node, epoch, first, last) if mtype == MsgType.NACK else Gap(node, epoch, first, last))
            elif mtype == MsgType.ALIVE:
                out.append(Alive())
            elif mtype == MsgType.HEARTBEAT:
                _need(mlen, _HEARTBEAT.size, "HEARTBEAT")
                _t, link, _l, counter, count, _z = _HEARTBEAT.unpack_from(data, off)
                start = off + _HEARTBEAT.size
                if link >= MAX_LINKS or start + count * _REPORT.size > nxt:
                    raise WireError("malformed", f"HEARTBEAT of link {link} with {count} reports in {mlen} bytes")
                out.append(Heartbeat(link, counter, tuple(_REPORT.unpack_from(data, start + i * _REPORT.size)
                                                          for i in range(count))))
            elif mtype == MsgType.HELLO:
                out.append(Hello())
            elif mtype == MsgType.CHALLENGE or mtype == MsgType.ECHO:
                _need(mlen, _NONCE.size, "CHALLENGE/ECHO")
                node, nonce = _NONCE.unpack_from(data, off)[3:]
                out.append(Challenge(node, nonce) if mtype == MsgType.CHALLENGE else Echo(node, nonce))
            elif mtype == MsgType.RESYNC:
                _need(mlen, _NODE.size, "RESYNC")
                out.append(Resync(_NODE.unpack_from(data, off)[3]))
            elif mtype == MsgType.BULK_BEGIN:
                _need(mlen, _BULK_BEGIN.size, "BULK_BEGIN")
                out.append(BulkBegin(*_BULK_BEGIN.unpack_from(data, off)[3:]))
            elif mtype == MsgType.BULK_END:
                _need(mlen, _BULK_END.size, "BULK_END")
                out.append(BulkEnd(*_BULK_END.unpack_from(data, off)[3:]))
            elif mtype == MsgType.DIGEST_ASK:
                _need(mlen, _DIGEST_ASK.size, "DIGEST_ASK")
                node, request, bitmap = _DIGEST_ASK.unpack_from(data, off)[3:]
                out.append(DigestAsk(node, request, frozenset(b for b in range(256) if bitmap[b >> 3] >> (b & 7) & 1)))
            elif mtype == MsgType.DIGEST:
                _need(mlen, _DIGEST.size, "DIGEST")
                node, request, first, n = _DIGEST.unpack_from(data, off)[3:]
                if first + n > 256 or _DIGEST.size + n * _BUCKET_SUM.size > mlen:
                    raise WireError("malformed", f"DIGEST of buckets {first}..{first + n - 1} in {mlen} bytes")
                at = off + _DIGEST.size
                out.append(Digest(node, request, first, tuple(_BUCKET_SUM.unpack_from(data, at + i * _BUCKET_SUM.size)
                                                              for i in range(n))))
            elif mtype == MsgType.DIGEST_KEYS:
                _need(mlen, _DIGEST_KEYS.size, "DIGEST_KEYS")
                node, request, n, part = _DIGEST_KEYS.unpack_from(data, off)[3:]
                at = off + _DIGEST_KEYS.size
                keys = []
                for _ in range(n):
                    if at + _KEY_HEAD.size > nxt:
                        raise WireError("malformed", "DIGEST_KEYS shorter than its keys")
                    h, klen, _z2 = _KEY_HEAD.unpack_from(data, at)
                    start = at + _KEY_HEAD.size
                    if klen < 4 or start + klen > nxt:
                        raise WireError("malformed", f"DIGEST_KEYS key of {klen} bytes")
                    keys.append((h, bytes(data[start:start + klen])))
                    at += (_KEY_HEAD.size + klen + 3) & ~3
                out.append(DigestKeys(node, request, bool(aux & 1), tuple(keys), bool(aux & 2), part))
            else:
                raise WireError("malformed", f"unknown message type {mtype}")
            off = nxt
    except struct.error as exc:
        raise WireError("malformed", f"message at offset {off}: {exc}") from exc
    return flows, out


def decode_messages(data: bytes, start: int, end: int) -> list[Message]:
    """Every message in data[start:end] as a Message object (FLOWs first)."""
    flows, others = decode_body(data, start, end)
    return [Flow(*f) for f in flows] + others


def _need(mlen: int, size: int, what: str) -> None:
    if mlen < size:
        raise WireError("malformed", f"{what} message of {mlen} bytes, needs {size}")


def decode(data: bytes, auth: Auth, me: int = GROUP) -> tuple[Header, list[Message]]:
    """A whole datagram: header checked, MAC verified, opened if sealed, every message decoded —
    or WireError."""
    header, body = payload(data, auth, me)
    return header, decode_messages(body, 0, len(body))


def decode_split(data: bytes, auth: Auth, me: int = GROUP) -> tuple[Header, list[FlowTuple], list[Message]]:
    """decode() for the engine: FLOWs as plain (version, key, message) tuples, the rest apart."""
    header, end, ks = _verify(data, auth, me)
    if header.flags & _SEALED:  # opened with the key set that verified it (the MAC is checked once)
        body = _opened(data, auth, header, end, ks)
        flows, others = decode_body(body, 0, len(body))
    else:
        flows, others = decode_body(data, HEADER_LEN, end)
    return header, flows, others

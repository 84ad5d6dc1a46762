"""Authentication of sync datagrams: key sets, MACs and sealing (optional encryption).

Every datagram ends with MAC count x (receiver node id (u32), MAC (16 bytes)): keyed BLAKE2b or
HMAC-SHA256 over header and messages, with the key this node shares with that receiver (pairwise
keys), or once with receiver 0 (GROUP) and the cluster's group key. A sealed datagram's messages
are an AEAD's ciphertext (header.FLAG_AES_GCM, header.FLAG_CHACHA). docs/protocol.md
("Authentication") says why each rule is there.

Imports ctbridge.sync.header only (and, when sealing is on, the optional cryptography package);
ctbridge.sync.wire puts the pieces together.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ctbridge.sync.header import FLAG_AES_GCM, FLAG_CHACHA, HEADER_LEN, SEALED, Header, WireError

MAC_LEN = 16
MAC_ENTRY = struct.Struct("!I16s")  # receiver node id, MAC
MAC_ENTRY_LEN = MAC_ENTRY.size  # 20
MAX_MACS = 16  # MACs one datagram carries: one per peer, and a node has at most 16 (EngineConfig.max_peers)
GROUP = 0  # the receiver id of a MAC made with a group key (any holder can check it, and make it)
CIPHERS = {"aes-256-gcm": FLAG_AES_GCM, "chacha20-poly1305": FLAG_CHACHA}
SEAL_OVERHEAD = 4 + 16  # counter, tag
SEAL_COUNTER_MAX = 0xFFFFFFFF
# The protocol label: BLAKE2b's 16-byte personalization (RFC 7693 2.5), and the first bytes HMAC
# signs, so a MAC made for another protocol or another version of this one never verifies here
LABEL = b"ctbridge sync v2"
_NONCE_HEAD = struct.Struct("!QI")  # the AEAD's nonce: epoch, counter
_U32_BE = struct.Struct("!I")

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
        flag = header.flags & SEALED
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
        return b"".join(MAC_ENTRY.pack(node, mac(alg, key, data)) for node, key in self._sign)


def _aead_class(flag: int) -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
    except ImportError:
        raise ValueError("sync.encrypt needs the cryptography package: apt install python3-cryptography "
                         "(or pip install 'ctbridge[encrypt]')") from None
    return AESGCM if flag == FLAG_AES_GCM else ChaCha20Poly1305

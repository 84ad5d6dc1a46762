"""Sync protocol versions 2 and 3: datagrams, put together and taken apart. Pure functions.

A datagram is a 32-byte header, a run of messages, and (when authenticated) one MAC per receiver
over both. All integers are big endian. docs/protocol.md has the byte diagrams;
tests/unit/test_wire.py holds a golden vector of every message type.

    header   magic "CB" | version (2, 3) | flags | key id | MAC count | payload length
             | node id (u32) | boot epoch (u64) | sequence (u32) | sender time, ms (u64)
    message  type (u8) | aux (u8) | length (u16, whole message, multiple of 4) | body
    trailer  MAC count x (receiver node id (u32), MAC (16 bytes)): keyed BLAKE2b or HMAC-SHA256
             over header and messages, with the key this node shares with that receiver (pairwise
             keys), or once with receiver 0 and the cluster's group key

The parts: ctbridge.sync.header (the header, WireError); ctbridge.sync.msgtypes (MsgType and the
registry: one class per message type holds its encoder and decoder); ctbridge.sync.flows (FLOW,
EXPECT, DELETE, their compact forms, and decode_body, which reads a run of messages;
ctbridge.sync.compact has the compact layouts); ctbridge.sync.messages (every
other message type); ctbridge.sync.auth (keys, MACs, sealing). This module frames and checks
whole datagrams and re-exports the parts' names: the engine, the daemon, the tests and the
benches use ``wire.X`` only. It imports those five modules.

Decoding never raises anything but WireError, whose ``reason`` is the counter it belongs to.
"""

from __future__ import annotations

import hmac

from ctbridge.sync.auth import (
    ALGORITHMS,
    BLAKE2B_KEY_MAX,
    CIPHERS,
    GROUP,
    KEY_MIN_BYTES,
    LABEL,
    MAC_ENTRY,
    MAC_ENTRY_LEN,
    MAC_LEN,
    MAX_MACS,
    SEAL_COUNTER_MAX,
    SEAL_OVERHEAD,
    Auth,
    KeySet,
    cluster_salt,
    key_id,
)
from ctbridge.sync.flows import (
    FLOW_HEADER,
    VERSION_MAX,
    Delete,
    Flow,
    FlowTuple,
    Message,
    decode_body,
    decode_messages,
    delete_msg,
    expect_msg,
    flow_entry,
    flow_msg,
    flow_raw,
    flow_version,
    restamp,
    squeeze,
)
from ctbridge.sync.header import (
    BASE_VERSION,
    FLAG_AES_GCM,
    FLAG_CHACHA,
    FLAG_MAC,
    HEADER,
    HEADER_LEN,
    MAGIC,
    SEALED,
    VERSION,
    Header,
    WireError,
)
from ctbridge.sync.messages import (
    DIGEST_KEY_BYTES,
    DIGEST_KEYS_MAX,
    DIGEST_SUMS,
    HEARTBEAT_SEQ,
    MAX_LINKS,
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
    ack_msg,
    alive_msg,
    bulk_begin_msg,
    bulk_end_msg,
    challenge_msg,
    digest_ask_msg,
    digest_keys_msgs,
    digest_msgs,
    echo_msg,
    gap_msg,
    heartbeat_msg,
    hello_msg,
    nack_msg,
    resync_msg,
)
from ctbridge.sync.msgtypes import (
    CODECS,
    Codec,
    MsgType,
    register,
)

__all__ = [
    "ALGORITHMS", "BASE_VERSION", "BLAKE2B_KEY_MAX", "CIPHERS", "CODECS", "DIGEST_KEYS_MAX", "DIGEST_KEY_BYTES",
    "DIGEST_SUMS",
    "FLAG_AES_GCM", "FLAG_CHACHA", "FLAG_MAC", "FLOW_HEADER", "GROUP", "HEADER", "HEADER_LEN", "HEARTBEAT_SEQ",
    "KEY_MIN_BYTES", "LABEL", "MAC_ENTRY", "MAC_ENTRY_LEN", "MAC_LEN", "MAGIC", "MAX_LINKS", "MAX_MACS",
    "SEALED", "SEAL_COUNTER_MAX", "SEAL_OVERHEAD", "VERSION", "VERSION_MAX",
    "Ack", "Alive", "Auth", "BulkBegin", "BulkEnd", "Challenge", "Codec", "Delete", "Digest", "DigestAsk",
    "DigestKeys", "Echo", "Flow", "FlowTuple", "Gap", "Header", "Heartbeat", "Hello", "KeySet", "Message",
    "MsgType", "Nack", "Resync", "WireError",
    "ack_msg", "alive_msg", "bulk_begin_msg", "bulk_end_msg", "challenge_msg", "cluster_salt", "datagram",
    "decode", "decode_body", "decode_header", "decode_messages", "decode_split", "delete_msg", "digest_ask_msg",
    "digest_keys_msgs", "digest_msgs", "echo_msg", "expect_msg", "flow_entry", "flow_msg", "flow_raw",
    "flow_version", "gap_msg", "heartbeat_msg", "hello_msg", "key_id", "nack_msg", "payload", "register",
    "restamp", "resync_msg", "squeeze",
]


def datagram(header: Header, messages: bytes, auth: Auth, counter: int = 0) -> bytes:
    """Header + messages (+ a MAC per receiver); sealed with ``counter`` (never used before in
    this epoch: it makes the AEAD's nonce) when the node encrypts."""
    flags = header.flags | (FLAG_MAC if auth.enabled else 0) | auth.seal_flag
    length = len(messages) + (SEAL_OVERHEAD if auth.seal_flag else 0)
    if length > 0xFFFF:
        raise ValueError("messages exceed the 64 KiB a datagram can carry")
    head = HEADER.pack(MAGIC, header.version, flags, auth.sign_id, auth.trailer_len // MAC_ENTRY_LEN, length,
                       header.node, header.epoch, header.seq, header.time_ms)
    data = head + (auth.seal(head, header.epoch, counter, messages) if auth.seal_flag else messages)
    if auth.enabled:
        data += auth.sign(data)
    return data


# --- decoding --------------------------------------------------------------------------------------


def decode_header(data: bytes, auth: Auth, me: int = GROUP, speaks: int = VERSION) -> tuple[Header, int]:
    """Check framing and the MAC made for ``me`` (this node's id); (header, end of the messages).
    Raises WireError. A sealed datagram's payload is opened by ``payload``. ``speaks``: the
    highest version taken (a node set to speak version 2 only refuses version 3, as one of the
    release of 2026-12-01 does)."""
    header, end, _ks = _verify(data, auth, me, speaks)
    return header, end


def payload(data: bytes, auth: Auth, me: int = GROUP, speaks: int = VERSION) -> tuple[Header, bytes]:
    """(header, the messages) of an authentic datagram, opened if sealed; or WireError."""
    header, end, ks = _verify(data, auth, me, speaks)
    return header, _opened(data, auth, header, end, ks)


def _opened(data: bytes, auth: Auth, header: Header, end: int, ks: KeySet | None) -> bytes:
    """The messages of a verified datagram: opened if sealed."""
    if header.flags & SEALED:
        if ks is None:
            raise WireError("auth", "sealed datagram, and this node has no keys to open it")
        return auth.open(data, end, header, ks)
    return data[HEADER_LEN:end]


def _verify(data: bytes, auth: Auth, me: int, speaks: int) -> tuple[Header, int, KeySet | None]:
    if len(data) < HEADER_LEN:
        raise WireError("malformed", f"datagram of {len(data)} bytes is shorter than a header")
    magic, version, flags, kid, count, length, node, epoch, seq, time_ms = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WireError("malformed", "not a ctbridge datagram (bad magic)")
    if not BASE_VERSION <= version <= speaks:
        raise WireError("malformed", f"protocol version {version} is not supported (this node speaks "
                                     f"{BASE_VERSION} to {speaks})")
    if (flags & ~(FLAG_MAC | SEALED) or bool(flags & FLAG_MAC) != (count > 0) or count > MAX_MACS
            or flags & SEALED == SEALED):
        raise WireError("malformed", f"flags {flags:#x} with {count} MACs: not what version {version} defines")
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
                to, mac = MAC_ENTRY.unpack_from(data, end + i * MAC_ENTRY_LEN)
                if to == receiver:
                    if hmac.compare_digest(auth.mac(ks.algorithm, key, signed), mac):
                        return Header(node, epoch, seq, time_ms, flags, kid, version), end, ks
                    break
        raise WireError("auth", f"no MAC for this node that matches (from node {node:08x}, key id {kid})")
    return Header(node, epoch, seq, time_ms, flags, kid, version), end, None


def decode(data: bytes, auth: Auth, me: int = GROUP, speaks: int = VERSION) -> tuple[Header, list[Message]]:
    """A whole datagram: header checked, MAC verified, opened if sealed, every message decoded —
    or WireError."""
    header, body = payload(data, auth, me, speaks)
    flows, others = decode_body(body, 0, len(body), header.version)
    return header, [Flow(*f) for f in flows] + others


def decode_split(data: bytes, auth: Auth, me: int = GROUP,
                 speaks: int = VERSION) -> tuple[Header, list[FlowTuple], list[Message]]:
    """decode() for the engine: FLOWs as plain (version, key, message) tuples, the rest apart.
    The messages are read by the datagram's version (a compact FLOW in one of version 2 is
    malformed)."""
    header, end, ks = _verify(data, auth, me, speaks)
    if header.flags & SEALED:  # opened with the key set that verified it (the MAC is checked once)
        body = _opened(data, auth, header, end, ks)
        flows, others = decode_body(body, 0, len(body), header.version)
    else:
        flows, others = decode_body(data, HEADER_LEN, end, header.version)
    return header, flows, others

"""The sync datagram's header (versions 2 and 3) and the one error its decoders raise.

    magic "CB" | version | flags | key id | MAC count | payload length
    | node id (u32) | boot epoch (u64) | sequence (u32) | sender time, ms (u64)

32 bytes, big endian; docs/protocol.md ("Datagram") has the byte diagram. The flags say what
follows the header: MACs (ctbridge.sync.auth makes and checks them) and whether the messages are
sealed. The version is the one the datagram's messages are read by: 3 allows the compact FLOW
and DELETE, and a node sends each datagram in the lowest version of the peers it goes to
(docs/protocol.md, "Versions"). Imports nothing of ctbridge: ctbridge.sync.messages, ctbridge.sync.auth and
ctbridge.sync.wire build on it.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

MAGIC = b"CB"
VERSION = 3  # the highest version this node speaks (and announces)
# the version of 0.3.0 and the release of 2026-12-01, which speak no other: what a peer is taken
# to speak until it says otherwise, and what its announcement's 0 (the aux byte of its
# HELLO, ALIVE, ACK, CHALLENGE and ECHO) means
BASE_VERSION = 2
HEADER = struct.Struct("!2sBBBBHIQIQ")
HEADER_LEN = HEADER.size  # 32
FLAG_MAC = 0x01  # MACs follow the messages
# The messages are sealed (optional encryption): the payload is a counter (u32), the messages
# encrypted with the sender's sealing key, and the AEAD's 16-byte tag; the AEAD's nonce is the
# epoch (8 bytes) and that counter, its associated data the header.
FLAG_AES_GCM = 0x02  # AES-256-GCM (NIST SP 800-38D)
FLAG_CHACHA = 0x04  # ChaCha20-Poly1305 (RFC 8439)
SEALED = FLAG_AES_GCM | FLAG_CHACHA


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
    version: int = BASE_VERSION

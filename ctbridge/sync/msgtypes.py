"""The sync message types and their registry: one class per type holds its number, its encoder
and its decoder (protocol version 2).

Every message is type (u8) | aux (u8) | length (u16, the whole message, a multiple of 4) | body,
big endian; docs/protocol.md ("Messages") has each body's layout. A class derived from Codec and
decorated with ``@register`` is the one place of its type: ctbridge.sync.flows holds FLOW,
EXPECT and DELETE, ctbridge.sync.messages every other type. Adding a message: a MsgType value,
its class, and a golden vector (tests/support/wirevectors.py); the registry test fails until all
three are there.

Imports ctbridge.sync.header only.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from enum import IntEnum
from typing import Any, ClassVar, TypeVar

from ctbridge.sync.header import WireError

MSG_HEAD = struct.Struct("!BBH")  # type, aux, length: the head of every message


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
    # version 3 only (ctbridge.sync.compact has the layouts): a FLOW as its values, FLOW's head with
    # the original tuple's length replaced by protocol (u8) and n (u8), then n codes naming the
    # attributes the values stand for, the values, padding, and the attributes no code covers
    FLOW_COMPACT = 18
    # a DELETE as the original tuple's values: DELETE's head with protocol (u8) and 0 (u8) at its end
    DELETE_COMPACT = 19


# --- the registry ----------------------------------------------------------------------------------

# (data, offset, length, aux) -> the message: one of ctbridge.sync.flows.Message, the union of
# every type's class, which is named there (it needs them all; this module needs none)
Decoder = Callable[[bytes, int, int, int], Any]


class Codec:
    """One message type: its number, its encoder and its decoder, side by side."""

    TYPE: ClassVar[MsgType]
    # True for the types ctbridge.sync.flows.decode_body reads inline (FLOW, EXPECT, DELETE); their
    # ``decode`` reads one message through decode_body, so the rules of those types are written once
    INLINE: ClassVar[bool] = False
    # the encoder, with the arguments its type needs (tests/support/wirevectors.py calls each);
    # DIGEST and DIGEST_KEYS return a list of messages, an answer too large for one
    encode: ClassVar[Callable[..., bytes | list[bytes]]]

    @staticmethod
    def decode(data: bytes, off: int, mlen: int, aux: int) -> Any:
        """The message at data[off:off + mlen], its length already checked (at least 4, a
        multiple of 4, within the payload). WireError (or struct.error, which decode_body turns
        into one) if it is malformed."""
        raise NotImplementedError


CODECS: dict[int, type[Codec]] = {}  # type byte -> its class
# type byte -> decoder, for the types decode_body does not read inline
DECODERS: dict[int, Decoder] = {}
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
        DECODERS[kind] = cls.decode
    return cls


def need(mlen: int, size: int, what: str) -> None:
    if mlen < size:
        raise WireError("malformed", f"{what} message of {mlen} bytes, needs {size}")


def pad(b: bytes) -> bytes:
    extra = -len(b) & 3
    return b + b"\x00" * extra if extra else b


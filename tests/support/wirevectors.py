"""The golden vectors of every sync message type: fixed inputs, one datagram each.

tests/fixtures/wire_vectors.json holds their bytes; docs/protocol.md shows the same hex. Regenerate
both only for a deliberate format change (python -m tests.support.wirevectors --write), and say so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec
from ctbridge.sync import wire
from tests.support import builders

KEY = bytes(range(32))
SENDER, RECEIVER = 0x0A0B0C0D, 0x01020304
CLUSTER = "example"
KEY_ID = 0x5A
# the key the two nodes share, as each of them holds it: the sender signs, the receiver checks
AUTH = wire.Auth([wire.KeySet("blake2b", KEY_ID, pairs={RECEIVER: KEY})], cluster=CLUSTER)
RX_AUTH = wire.Auth([wire.KeySet("blake2b", KEY_ID, pairs={SENDER: KEY})], cluster=CLUSTER)
HEADER = wire.Header(node=SENDER, epoch=0x0000018BCFE56800, seq=42, time_ms=1700000000123)
HEADER_V3 = HEADER._replace(version=3)  # the header of a datagram of version 3: its messages only there
V3_ONLY = frozenset({wire.MsgType.FLOW_COMPACT, wire.MsgType.DELETE_COMPACT})
FILE = Path(__file__).resolve().parents[1] / "fixtures" / "wire_vectors.json"


def sample_entry() -> codec.Entry:
    src, dst = bytes((192, 0, 2, 1)), bytes((198, 51, 100, 2))
    orig = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_UDP, src, dst, 5353, 53)
    reply = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_UDP, dst, src, 53, 5353)
    return builders.build_entry(ct.AF_INET, orig, reply, status=ct.IPS_CONFIRMED | ct.IPS_SEEN_REPLY, timeout=30,
                                mark=7)


def sample_expectation() -> codec.Entry:
    """A passive FTP data connection the FTP helper expects: 192.0.2.1 to 198.51.100.2 port
    30002 (any source port), of the control connection 192.0.2.1:40000 -> 198.51.100.2:21."""
    return builders.build_expectation(ct.AF_INET, bytes((192, 0, 2, 1)), bytes((198, 51, 100, 2)), 30002,
                                      40000, 21, timeout=300)


def samples() -> dict[wire.MsgType, tuple[tuple[Any, ...], wire.Message]]:
    """Each message type's golden sample: the arguments its encoder (wire.CODECS[type].encode) is
    called with, and the message decoding the result gives back."""
    e = sample_entry()
    x = sample_expectation()
    t = wire.MsgType
    return {
        t.FLOW: ((7, e), wire.Flow(7, e.key, wire.flow_msg(7, e))),
        t.DELETE: ((8, e.key), wire.Delete(8, e.key)),
        t.ACK: ((0x01020304, 5, 41), wire.Ack(0x01020304, 5, 41)),
        t.NACK: ((0x01020304, 5, 10, 12), wire.Nack(0x01020304, 5, 10, 12)),
        t.ALIVE: ((), wire.Alive()),
        t.HELLO: ((), wire.Hello()),
        t.RESYNC: ((0,), wire.Resync(0)),
        t.BULK_BEGIN: ((0x01020304, 3), wire.BulkBegin(0x01020304, 3)),
        t.BULK_END: ((0x01020304, 3, 1000), wire.BulkEnd(0x01020304, 3, 1000)),
        t.GAP: ((0x01020304, HEADER.epoch, 10, 12), wire.Gap(0x01020304, HEADER.epoch, 10, 12)),
        t.HEARTBEAT: ((1, 77, [(0x01020304, 0b11)], 32), wire.Heartbeat(1, 77, ((0x01020304, 3),))),
        t.CHALLENGE: ((0, 0x0123456789ABCDEF), wire.Challenge(0, 0x0123456789ABCDEF)),
        t.ECHO: ((0x01020304, 0xFEDCBA9876543210), wire.Echo(0x01020304, 0xFEDCBA9876543210)),
        t.EXPECT: ((9, x), wire.Flow(9, x.key, wire.expect_msg(9, x))),
        t.DIGEST_ASK: ((0x01020304, 7, {0, 9, 255}), wire.DigestAsk(0x01020304, 7, frozenset({0, 9, 255}))),
        t.DIGEST: ((0x01020304, 7, [(3, 0x1122334455667788), (0, 0)]),
                   wire.Digest(0x01020304, 7, 0, ((3, 0x1122334455667788), (0, 0)))),
        t.DIGEST_KEYS: ((0x01020304, 7, [(0xAABBCCDD, e.key)]),
                        wire.DigestKeys(0x01020304, 7, True, ((0xAABBCCDD, e.key),))),
        # version 3: the same FLOW and DELETE as above, compact; they decode to exactly those
        t.FLOW_COMPACT: ((7, e), wire.Flow(7, e.key, wire.flow_msg(7, e))),
        t.DELETE_COMPACT: ((8, e.key), wire.Delete(8, e.key)),
    }


def announcements() -> dict[str, tuple[bytes, wire.Message]]:
    """How a node of version 3 says so (the aux byte of HELLO, ALIVE, ACK, CHALLENGE and ECHO):
    name -> (the message, what it decodes to); in a datagram of version 2, as its first one goes."""
    return {
        "HELLO_SPEAKS_3": (wire.hello_msg(3), wire.Hello(3)),
        "ACK_SPEAKS_3": (wire.ack_msg(0x01020304, 5, 41, speaks=3), wire.Ack(0x01020304, 5, 41, 0, 3)),
    }


def encode(kind: wire.MsgType, args: tuple[Any, ...]) -> list[bytes]:
    """The messages the registered encoder of ``kind`` makes of ``args`` (DIGEST and DIGEST_KEYS
    encoders return a list, the others one message)."""
    out = wire.CODECS[kind].encode(*args)
    return out if isinstance(out, list) else [out]


def messages() -> dict[str, tuple[bytes, wire.Message]]:
    """Name -> (the sample's one message, what it decodes to)."""
    out = {}
    for kind, (args, expected) in samples().items():
        (msg,) = encode(kind, args)
        out[kind.name] = (msg, expected)
    return out


def header_of(name: str) -> wire.Header:
    """The header a vector's datagram has: of version 3 for version 3's messages."""
    return HEADER_V3 if name in {t.name for t in V3_ONLY} else HEADER


def vectors() -> dict[str, str]:
    return {name: wire.datagram(header_of(name), msg, AUTH).hex()
            for name, (msg, _) in {**messages(), **announcements()}.items()}


if __name__ == "__main__" and "--write" in sys.argv:
    FILE.write_text(json.dumps(vectors(), indent=1) + "\n")
    print(f"wrote {FILE}")

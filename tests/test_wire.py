"""Wire format version 1: golden vectors, round trips, and a decoder that only ever says WireError."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from ctbridge import wire
from tests import wirevectors

GOLDEN = json.loads(wirevectors.FILE.read_text())
DOC = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()


@pytest.mark.parametrize("name", sorted(wirevectors.messages()))
def test_golden_vector(name: str) -> None:
    """Encoding a fixed message gives the recorded bytes; decoding them gives the message back."""
    msg, expected = wirevectors.messages()[name]
    data = wire.datagram(wirevectors.HEADER, msg, wirevectors.AUTH)
    assert data.hex() == GOLDEN[name], f"{name}: the wire format changed"
    header, decoded = wire.decode(bytes.fromhex(GOLDEN[name]), wirevectors.AUTH)
    assert header[:4] == wirevectors.HEADER[:4]
    assert decoded == [expected]


def test_every_message_type_has_a_vector() -> None:
    assert {t.name for t in wire.MsgType} == set(GOLDEN)


def test_protocol_document_shows_the_golden_vectors() -> None:
    shown = dict(re.findall(r"^([A-Z_]+): ([0-9a-f]+)$", DOC, re.MULTILINE))
    assert shown == GOLDEN, "docs/protocol.md and tests/fixtures/wire_vectors.json disagree"


def test_header_layout_is_as_documented() -> None:
    data = bytes.fromhex(GOLDEN["ALIVE"])
    assert data[:2] == b"CB" and data[2] == 1 and data[3] == wire.FLAG_MAC
    assert data[4] == wire.key_id(wirevectors.KEY)
    assert int.from_bytes(data[6:8], "big") == 4  # one ALIVE message
    assert int.from_bytes(data[8:12], "big") == 0x0A0B0C0D
    assert int.from_bytes(data[20:24], "big") == 42
    assert len(data) == wire.HEADER_LEN + 4 + wire.MAC_LEN


def test_wrong_key_and_missing_mac_are_auth_errors() -> None:
    data = bytes.fromhex(GOLDEN["FLOW"])
    with pytest.raises(wire.WireError) as err:
        wire.decode(data, wire.Auth([b"z" * 32]))
    assert err.value.reason == "auth"
    unsigned = wire.datagram(wirevectors.HEADER, wire.alive_msg(), wire.Auth([], "none"))
    with pytest.raises(wire.WireError) as err:
        wire.decode(unsigned, wirevectors.AUTH)
    assert err.value.reason == "auth"
    # a receiver without keys accepts unsigned datagrams (auth = "none" on both sides)
    assert wire.decode(unsigned, wire.Auth([], "none"))[1] == [wire.Alive()]


def test_hmac_sha256_signs_too() -> None:
    auth = wire.Auth([wirevectors.KEY], "hmac-sha256")
    data = wire.datagram(wirevectors.HEADER, wire.hello_msg(), auth)
    assert wire.decode(data, auth)[1] == [wire.Hello()]
    with pytest.raises(wire.WireError):
        wire.decode(data, wirevectors.AUTH)


def fuzz(n: int, seed: int) -> int:
    """n damaged datagrams through the decoder, half of them re-signed so the damage gets past the
    MAC and reaches the message parser (a peer with the key but a bug). Returns how many decoded."""
    rng = random.Random(seed)
    samples = [bytes.fromhex(h) for h in GOLDEN.values()]
    none = wire.Auth([], "none")
    decoded = 0
    for _ in range(n):
        data = bytearray(rng.choice(samples)[:-wire.MAC_LEN])
        for _ in range(rng.randint(1, 6)):
            op = rng.random()
            if op < 0.6 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif op < 0.8 and data:
                del data[rng.randrange(len(data)):]
            else:
                data[rng.randrange(len(data) + 1):0] = rng.randbytes(rng.randint(1, 12))
        if rng.random() < 0.5 and len(data) >= wire.HEADER_LEN:
            data[3] |= wire.FLAG_MAC
            data[4] = wirevectors.AUTH.sign_id
            data[6:8] = (len(data) - wire.HEADER_LEN).to_bytes(2, "big")
            auth = wirevectors.AUTH
            data += auth.mac(wirevectors.KEY, bytes(data))
        else:
            data[3:4] = bytes((data[3] & ~wire.FLAG_MAC & 0xFF,)) if len(data) > 3 else b""
            auth = none
        try:
            wire.decode(bytes(data), auth)
            decoded += 1
        except wire.WireError:
            pass
    return decoded


def test_decoder_fuzz_raises_only_wire_errors() -> None:
    """CI's share of the fuzz; bench/fuzz_wire.py runs a million."""
    assert fuzz(20_000, seed=2) > 100  # some damage must still decode, or the parser was never reached

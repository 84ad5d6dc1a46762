"""Wire format versions 2 and 3: golden vectors, round trips, and a decoder that only ever says WireError."""

from __future__ import annotations

import json
import re

import pytest

from ctbridge.sync import wire
from tests.support import ROOT, wirevectors

GOLDEN = json.loads(wirevectors.FILE.read_text())
DOC = (ROOT / "docs" / "protocol.md").read_text()


@pytest.mark.parametrize("name", sorted({**wirevectors.messages(), **wirevectors.announcements()}))
def test_golden_vector(name: str) -> None:
    """Encoding a fixed message gives the recorded bytes; decoding them gives the message back.
    Version 2's vectors are those of the release of 2026-12-01: a change there is a break."""
    msg, expected = {**wirevectors.messages(), **wirevectors.announcements()}[name]
    data = wire.datagram(wirevectors.header_of(name), msg, wirevectors.AUTH)
    assert data.hex() == GOLDEN[name], f"{name}: the wire format changed"
    header, decoded = wire.decode(bytes.fromhex(GOLDEN[name]), wirevectors.RX_AUTH, wirevectors.RECEIVER)
    assert header == wirevectors.header_of(name)._replace(flags=wire.FLAG_MAC, key_id=wirevectors.KEY_ID)
    assert decoded == [expected]


def test_every_message_type_has_a_vector() -> None:
    assert {t.name for t in wire.MsgType} | set(wirevectors.announcements()) == set(GOLDEN)


def test_version_3_messages_are_malformed_in_a_datagram_of_version_2() -> None:
    """A compact FLOW or DELETE only ever travels in a datagram of version 3 (its sender knows
    every receiver reads it); in one of version 2 it is an unknown type, as version 2 says."""
    for name in ("FLOW_COMPACT", "DELETE_COMPACT"):
        msg, _ = wirevectors.messages()[name]
        data = wire.datagram(wirevectors.HEADER, msg, wirevectors.AUTH)
        with pytest.raises(wire.WireError, match="unknown message type") as err:
            wire.decode(data, wirevectors.RX_AUTH, wirevectors.RECEIVER)
        assert err.value.reason == "malformed"


def test_a_node_that_speaks_version_2_refuses_version_3_as_the_release_of_2026_12_01_does() -> None:
    data = bytes.fromhex(GOLDEN["FLOW_COMPACT"])
    assert data[2] == 3
    assert wire.decode(data, wirevectors.RX_AUTH, wirevectors.RECEIVER)[1]
    with pytest.raises(wire.WireError, match="protocol version 3 is not supported") as err:
        wire.decode(data, wirevectors.RX_AUTH, wirevectors.RECEIVER, speaks=2)
    assert err.value.reason == "malformed"
    for version in (1, 4, 255):
        bad = bytearray(data)
        bad[2] = version
        with pytest.raises(wire.WireError, match=f"protocol version {version} is not supported"):
            wire.decode(bytes(bad), wirevectors.RX_AUTH, wirevectors.RECEIVER)


def test_every_message_type_has_one_codec_and_it_round_trips() -> None:
    """Each MsgType has exactly one registered class holding its encoder and its decoder, and a
    golden sample; the encoder's bytes decode to the sample's message, through the class's decoder
    and through decode_body. A message type cannot be half-added."""
    samples = wirevectors.samples()
    assert set(wire.CODECS) == set(wire.MsgType) == set(samples)
    for kind, cls in wire.CODECS.items():
        assert cls.TYPE == kind
        args, expected = samples[cls.TYPE]
        (data,) = wirevectors.encode(cls.TYPE, args)
        assert data[0] == kind and int.from_bytes(data[2:4], "big") == len(data) and len(data) % 4 == 0
        assert cls.decode(data, 0, len(data), data[1]) == expected, cls.TYPE.name
        assert wire.decode_messages(data, 0, len(data)) == [expected], cls.TYPE.name


def test_a_type_registers_once_and_with_both_halves() -> None:
    class Again(wire.Codec):
        TYPE = wire.MsgType.ALIVE
        encode = staticmethod(wire.alive_msg)

        @staticmethod
        def decode(data: bytes, off: int, mlen: int, aux: int) -> wire.Message:
            return wire.Alive()

    with pytest.raises(ValueError, match="registered twice"):
        wire.register(Again)

    class NoDecoder(wire.Codec):
        TYPE = wire.MsgType.ALIVE
        encode = staticmethod(wire.alive_msg)

    with pytest.raises(TypeError, match="both an encode and a decode"):
        wire.register(NoDecoder)
    assert wire.CODECS[wire.MsgType.ALIVE].__name__ == "AliveCodec"


def test_unknown_and_short_messages_are_malformed() -> None:
    """The registry answers for every type byte: one it does not hold, or a message shorter than
    its type needs, is a WireError("malformed") naming it."""
    for data, detail in ((bytes((0, 0, 0, 4)), "unknown message type 0"),
                         (bytes((20, 0, 0, 4)), "unknown message type 20"),
                         (bytes((3, 0, 0, 4)), "ACK message of 4 bytes, needs 20"),
                         (bytes((2, 2, 0, 4)), "DELETE message too short")):
        with pytest.raises(wire.WireError, match=detail) as err:
            wire.decode_body(data, 0, len(data))
        assert err.value.reason == "malformed"


def test_protocol_document_shows_the_golden_vectors() -> None:
    shown = dict(re.findall(r"^([A-Z0-9_]+): ([0-9a-f]+)$", DOC, re.MULTILINE))
    assert shown == GOLDEN, "docs/protocol.md and tests/fixtures/wire_vectors.json disagree"


def test_header_layout_is_as_documented() -> None:
    data = bytes.fromhex(GOLDEN["ALIVE"])
    assert data[:2] == b"CB" and data[2] == 2 and data[3] == wire.FLAG_MAC
    assert data[4] == wirevectors.KEY_ID and data[5] == 1  # key id, one MAC
    assert int.from_bytes(data[6:8], "big") == 4  # one ALIVE message
    assert int.from_bytes(data[8:12], "big") == 0x0A0B0C0D
    assert int.from_bytes(data[20:24], "big") == 42
    assert len(data) == wire.HEADER_LEN + 4 + wire.MAC_ENTRY_LEN
    assert int.from_bytes(data[-20:-16], "big") == wirevectors.RECEIVER  # the MAC is for that node


def test_wrong_key_and_missing_mac_are_auth_errors() -> None:
    data = bytes.fromhex(GOLDEN["FLOW"])
    with pytest.raises(wire.WireError) as err:
        wire.decode(data, wire.Auth([b"z" * 32]))
    assert err.value.reason == "auth"
    unsigned = wire.datagram(wirevectors.HEADER, wire.alive_msg(), wire.Auth([], "none"))
    with pytest.raises(wire.WireError) as err:
        wire.decode(unsigned, wirevectors.RX_AUTH, wirevectors.RECEIVER)
    assert err.value.reason == "auth"
    # the right key, but another cluster's identity or another receiver: refused
    for auth, me in ((wire.Auth(wirevectors.RX_AUTH.sets, cluster="other"), wirevectors.RECEIVER),
                     (wirevectors.RX_AUTH, 0x05060708)):
        with pytest.raises(wire.WireError) as err:
            wire.decode(data, auth, me)
        assert err.value.reason == "auth"
    # a receiver without keys accepts unsigned datagrams (auth = "none" on both sides)
    assert wire.decode(unsigned, wire.Auth([], "none"))[1] == [wire.Alive()]


def test_hmac_sha256_signs_too() -> None:
    auth = wire.Auth([wirevectors.KEY], "hmac-sha256")
    data = wire.datagram(wirevectors.HEADER, wire.hello_msg(), auth)
    assert wire.decode(data, auth)[1] == [wire.Hello()]
    with pytest.raises(wire.WireError):
        wire.decode(data, wire.Auth([wirevectors.KEY], "blake2b"))


def test_decoder_fuzz_raises_only_wire_errors() -> None:
    """CI's share of the fuzz (bench/fuzz_wire.py runs a million): decoder and engine never raise."""
    from bench.fuzz_wire import fuzz
    counts = fuzz(20_000, seed=2)
    assert counts["decoded"] > 100  # some damage must still decode, or the parser was never reached
    assert counts["rejected_malformed"] > 1000 and counts["rejected_auth"] > 500


def test_flow_of_an_entry_in_another_attribute_order_still_carries_its_key() -> None:
    from ctbridge.conntrack import abi as ct
    from ctbridge.conntrack import codec
    e = wirevectors.sample_entry()
    attrs = codec.attr_map(e.attrs)
    shuffled = (codec.attr(ct.CTA_STATUS, attrs[ct.CTA_STATUS])
                + codec.attr(ct.CTA_TUPLE_REPLY, attrs[ct.CTA_TUPLE_REPLY])
                + codec.attr(ct.CTA_TUPLE_ORIG, attrs[ct.CTA_TUPLE_ORIG]))  # and without the nested flag
    odd = codec.entry_from_attrs(e.family, shuffled)
    assert odd.key == e.key
    msg = wire.flow_msg(3, odd)
    data = wire.datagram(wirevectors.HEADER, msg, wirevectors.AUTH)
    (flow,) = wire.decode(data, wirevectors.RX_AUTH, wirevectors.RECEIVER)[1]
    assert isinstance(flow, wire.Flow) and flow.key == e.key and flow.version == 3
    assert codec.attr_map(flow.entry.attrs) == codec.attr_map(shuffled)


def test_an_ack_with_a_selective_part_reads_as_a_plain_ack_up_to_its_third_field() -> None:
    plain = wire.ack_msg(0x01020304, 5, 41)
    sack = wire.ack_msg(0x01020304, 5, 41, highest=90)
    assert len(plain) == 20 and sack == plain[:2] + b"\x00\x18" + plain[4:] + (90).to_bytes(4, "big")
    decoded = wire.decode(wire.datagram(wirevectors.HEADER, sack, wirevectors.AUTH), wirevectors.RX_AUTH,
                          wirevectors.RECEIVER)[1]
    assert decoded == [wire.Ack(0x01020304, 5, 41, 90)]
    assert wire.ack_msg(0x01020304, 5, 41, highest=41) == plain  # nothing beyond: nothing said


@pytest.mark.parametrize("cipher", sorted(wire.CIPHERS))
def test_sealed_datagrams_open_only_for_members_that_open_them(cipher: str) -> None:
    """Optional encryption: the flows are not readable on the link, a changed byte does not open,
    a node that does not open sealed datagrams refuses them, and "accept" (the first step of
    turning it on) and a sealing node open both."""
    pytest.importorskip("cryptography", reason="sync.encrypt needs python3-cryptography (make test installs it)")
    from tests.support.enginelab import pairwise_auth
    tx = pairwise_auth(1, [1, 2], encrypt=cipher)
    rx = {mode: pairwise_auth(2, [1, 2], encrypt=mode) for mode in ("off", "accept", cipher)}
    entry = wirevectors.sample_entry()
    msg = wire.flow_msg(7, entry)
    header = wire.Header(1, 5, 42, 0)
    sealed = wire.datagram(header, msg, tx, counter=1)
    assert sealed[3] & wire.CIPHERS[cipher] and entry.key[3:] not in sealed
    assert len(sealed) == wire.HEADER_LEN + len(msg) + wire.SEAL_OVERHEAD + wire.MAC_ENTRY_LEN
    again = wire.datagram(header, msg, tx, counter=2)  # a resend: same number, another counter
    assert again[wire.HEADER_LEN + 4:-20] != sealed[wire.HEADER_LEN + 4:-20]
    for mode in ("accept", cipher):
        (flow,) = wire.decode(sealed, rx[mode], 2)[1]
        assert isinstance(flow, wire.Flow) and flow.key == entry.key and flow.msg == msg
    with pytest.raises(wire.WireError, match="does not open sealed"):
        wire.decode(sealed, rx["off"], 2)
    clear = wire.datagram(header, msg, pairwise_auth(1, [1, 2]))
    assert all(wire.decode(clear, rx[mode], 2)[1] for mode in rx)
    for at in (wire.HEADER_LEN + 2, wire.HEADER_LEN + 10, len(sealed) - 30):
        bad = bytearray(sealed)
        bad[at] ^= 1  # the MAC catches it first; with a MAC made anew, the AEAD's tag does
        resigned = bytes(bad[:-20]) + tx.sign(bytes(bad[:-20]))
        for data in (bytes(bad), resigned):
            with pytest.raises(wire.WireError) as err:
                wire.decode(data, rx[cipher], 2)
            assert err.value.reason == "auth"

"""The compact FLOW and DELETE of protocol version 3 (ctbridge.sync.compact): every flow shape the
kernel makes, and random ones, come back byte for byte as the version-2 message the sender holds;
what does not fit a compact layout exactly travels as it is; a damaged compact message is a
WireError and nothing else."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec
from ctbridge.sync import compact, wire
from tests.support import builders, strategies

SHAPES = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "flow_shapes.json").read_text())
_NLA = struct.Struct("=HH")


def round_trip(msg: bytes) -> bytes:
    """The message as a receiver of its compact form (or of itself) rebuilds it, through
    decode_body in a datagram of version 3: the path every received flow takes."""
    out = wire.squeeze(msg)
    flows, others = wire.decode_body(out, 0, len(out), 3)
    if msg[0] == wire.MsgType.DELETE:
        (d,) = others
        assert isinstance(d, wire.Delete) and d.version == wire.flow_version(msg)
        return wire.delete_msg(d.version, d.key)
    ((version, key, back),) = flows
    assert version == wire.flow_version(msg)
    olen = int.from_bytes(msg[14:16], "big")
    assert key == msg[1:2] + msg[12:14] + msg[20:16 + olen]  # the key decode_body gives a FLOW
    return back


@pytest.mark.parametrize("shape", SHAPES, ids=[s["what"] for s in SHAPES])
def test_every_flow_shape_the_kernel_made_comes_back_byte_for_byte(shape: dict[str, str]) -> None:
    """tests/fixtures/flow_shapes.json (tests/fixtures/capture_flows.py): IPv4 and IPv6; TCP with
    the kernel's window state, UDP, UDP-Lite, SCTP, GRE, ICMP, ICMPv6; NAT by the CLI and by
    nftables; a zone, marks, labels, the FTP helper; from events and from a dump (another order)."""
    msg = bytes.fromhex(shape["flow"])
    small = wire.squeeze(msg)
    assert small[0] == wire.MsgType.FLOW_COMPACT and len(small) < len(msg) * 0.6
    assert round_trip(msg) == msg
    key = codec.make_key(msg[1], int.from_bytes(msg[12:14], "big"), msg[20:16 + int.from_bytes(msg[14:16], "big")])
    delete = wire.delete_msg(wire.flow_version(msg) + 1, key)
    assert wire.squeeze(delete)[0] == wire.MsgType.DELETE_COMPACT and round_trip(delete) == delete


def test_what_a_flow_carries_and_what_its_compact_form_does() -> None:
    """The measurement behind the layout (docs/protocol.md, "Versions"): the churn's flow (an
    established TCP flow of IPv4, reply the plain inverse) 192 bytes, of which 44 are attribute
    values, compact 56; the same flow source-NATed keeps its reply tuple: 68; its DELETE 64 -> 28."""
    churn = next(bytes.fromhex(s["flow"]) for s in SHAPES if s["what"] == "event NEW tcp 198.51.100.1")
    snat = next(bytes.fromhex(s["flow"]) for s in SHAPES if s["what"] == "event NEW tcp 192.0.2.10")
    assert (len(churn), len(wire.squeeze(churn))) == (192, 56)
    assert (len(snat), len(wire.squeeze(snat))) == (192, 68)
    small = wire.squeeze(churn)
    assert small[14:16 + small[15]] == bytes((ct.IPPROTO_TCP, 6, compact.ORIG, compact.REPLY_INVERSE, compact.STATUS,
                                              compact.TIMEOUT, compact.PROTOINFO_TCP, compact.MARK))
    key = codec.make_key(ct.AF_INET, 0, churn[20:68])
    assert len(wire.delete_msg(9, key)) == 64 and len(wire.squeeze(wire.delete_msg(9, key))) == 28


def _reordered(entry: codec.Entry, rng: random.Random) -> bytes:
    """The entry's FLOW with its attributes after the tuples in another order, as events and
    dumps differ (and with helper and labels, which have no code, somewhere among them)."""
    attrs = [entry.attrs[s - 4:s - 4 + codec.align(e - s + 4)] for _, s, e in codec.iter_attrs(entry.attrs)]
    if rng.random() < 0.5:
        attrs.append(codec.attr(ct.CTA_HELP, codec.attr(ct.CTA_HELP_NAME, b"ftp\0"), nested=True))
    if rng.random() < 0.5:
        attrs.append(codec.attr(ct.CTA_LABELS, rng.randbytes(16)))
    rest = attrs[2:]
    rng.shuffle(rest)
    return wire.flow_raw(rng.randrange(1, 1 << 48), entry.family, int.from_bytes(entry.key[1:3], "big"),
                         len(attrs[0]), b"".join(attrs[:2] + rest))


@settings(max_examples=400, deadline=None)
@given(strategies.entries(), st.randoms(use_true_random=False))
def test_random_flows_in_any_order_come_back_byte_for_byte(drawn: tuple[codec.Entry, dict], rng: random.Random) -> None:
    """Random flows (both families; ported protocols, ICMP; NAT'd replies; zones, marks, any
    status, timeout and TCP state; attributes of no known type) in the kernel's order and in
    others: the compact form rebuilds each exactly, and is never longer than the message."""
    entry, _fields = drawn
    for msg in (wire.flow_msg(rng.randrange(1, 1 << 48), codec.strip_local(entry)), _reordered(entry, rng)):
        assert round_trip(msg) == msg
        assert len(wire.squeeze(msg)) <= len(msg)
    delete = wire.delete_msg(rng.randrange(1 << 48), entry.key)
    assert round_trip(delete) == delete


def _flow(proto: int = ct.IPPROTO_TCP, family: int = ct.AF_INET) -> bytes:
    alen = 4 if family == ct.AF_INET else 16
    a, b = bytes(range(1, alen + 1)), bytes(range(100, 100 + alen))
    orig = builders.encode_tuple(family, proto, a, b, 1000, 80)
    reply = builders.encode_tuple(family, proto, b, a, 80, 1000)
    return wire.flow_msg(5, builders.build_entry(family, orig, reply, status=0xE, timeout=60,
                                                 tcp_state=3 if proto == ct.IPPROTO_TCP else None))


def test_a_message_whose_constants_differ_from_the_layout_is_never_bent_into_it() -> None:
    """The sender's plan is learnt per layout and checked whole against each message (headers,
    padding, the protocol number): a message of the same length and order with one other
    constant byte takes another plan or none, and still comes back exactly."""
    msg = _flow()
    assert wire.squeeze(msg)[0] == wire.MsgType.FLOW_COMPACT  # the plan is learnt from this one
    # the padding after the original's source port and after its protocol number, that number,
    # the reply's attribute type, the padding after the reply's destination port, a value
    for at in (58, 49, 48, 70, 66 + 52, len(msg) - 1):
        odd = bytearray(msg)
        odd[at] ^= 0x40
        assert round_trip(bytes(odd)) == bytes(odd), at
    assert round_trip(msg) == msg and wire.squeeze(msg)[0] == wire.MsgType.FLOW_COMPACT


def test_a_delete_whose_tuple_is_not_in_its_form_goes_as_it_is() -> None:
    """Found while measuring: a DELETE whose tuple had a padding byte set was given a plan it did
    not fit, and squeeze() tried the plan, learnt it again, tried it... until the recursion limit.
    Now the plan is checked against the message it is learnt from, and never tried twice."""
    key = codec.make_key(ct.AF_INET, 0, _flow()[20:68])
    odd = bytearray(wire.delete_msg(4, key))
    odd[16 + 4 + 8 + 8 + 4 + 8 + 6] = 4  # the padding after the source port
    for _ in range(3):
        assert wire.squeeze(bytes(odd)) == bytes(odd)
    assert round_trip(bytes(odd)) == bytes(odd)
    assert wire.squeeze(wire.delete_msg(4, key))[0] == wire.MsgType.DELETE_COMPACT


def test_a_plan_learnt_from_an_odd_message_does_not_hold_back_the_others() -> None:
    """Found while measuring: a plan learnt from a message whose reply tuple was not in its form
    (here a padding byte set) covered the original tuple only, and then took every message of that
    length and order whose reply was: they went out with the reply in the tail, 156 bytes instead
    of 56. The plan now knows the form the reply did not have, and leaves such messages to theirs."""
    churn = next(bytes.fromhex(s["flow"]) for s in SHAPES if s["what"] == "event NEW tcp 198.51.100.1")
    odd = bytearray(churn)
    odd[16 + 52 + 50] ^= 0x40  # the padding after the reply's destination port
    assert round_trip(bytes(odd)) == bytes(odd)
    small = wire.squeeze(bytes(odd))
    assert small[14:16 + small[15]] == bytes((ct.IPPROTO_TCP, 1, compact.ORIG))  # the rest in the tail
    assert len(wire.squeeze(churn)) == 56 and round_trip(churn) == churn


def test_a_flow_without_a_compact_original_tuple_goes_as_it_is() -> None:
    """A tuple the layouts do not know (here with CTA_TUPLE_ZONE, a zone of one direction) has
    no compact form: the version-2 FLOW goes in the version-3 datagram, as version 3 allows."""
    a, b = bytes((192, 0, 2, 1)), bytes((198, 51, 100, 1))
    orig = (builders.encode_tuple(ct.AF_INET, ct.IPPROTO_UDP, a, b, 1000, 53)
            + codec.attr(ct.CTA_TUPLE_ZONE, b"\x00\x07"))
    reply = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_UDP, b, a, 53, 1000)
    attrs = (codec.attr(ct.CTA_TUPLE_ORIG, orig, nested=True) + codec.attr(ct.CTA_TUPLE_REPLY, reply, nested=True)
             + codec.attr(ct.CTA_STATUS, b"\x00\x00\x00\x08") + codec.attr(ct.CTA_TIMEOUT, b"\x00\x00\x00\x1e"))
    msg = wire.flow_raw(3, ct.AF_INET, 0, len(orig) + 4, attrs)
    for _ in range(20):  # again and again: the sender stops learning (bounded), the answer stays
        assert wire.squeeze(msg) is msg
    assert round_trip(msg) == msg


def test_the_layouts_are_what_the_kernel_writes() -> None:
    """The constants of each layout are the kernel's own bytes for that attribute (the captured
    flows): a layout that drifted from the kernel would send every flow uncompacted."""
    captured = {s["what"]: bytes.fromhex(s["flow"]) for s in SHAPES}
    for what, proto, family in (("event NEW tcp 198.51.100.1", ct.IPPROTO_TCP, ct.AF_INET),
                                ("event NEW icmp 192.0.2.13", ct.IPPROTO_ICMP, ct.AF_INET),
                                ("event NEW icmpv6 2001:db8::1", ct.IPPROTO_ICMPV6, ct.AF_INET6),
                                ("event NEW gre 192.0.2.15", ct.IPPROTO_GRE, ct.AF_INET)):
        msg = captured[what]
        segs = compact._tuple(ct.CTA_TUPLE_ORIG, family, proto, "o.")
        mask, want = compact._mask(segs)
        assert int.from_bytes(msg[16:16 + compact._size(segs)], "big") & mask == want, what


def _damaged(rng: random.Random, good: list[bytes]) -> bytes:
    msg = bytearray(rng.choice(good))
    how = rng.randrange(5)
    if how == 0:  # bytes changed anywhere, the head included
        for _ in range(rng.randrange(1, 4)):
            msg[rng.randrange(len(msg))] = rng.randrange(256)
    elif how == 1:  # cut short (the length kept a multiple of 4)
        msg = msg[:max(4, rng.randrange(len(msg)) & ~3)]
    elif how == 2:  # a descriptor of random codes
        n = rng.randrange(0, 12)
        msg[15] = n
        msg[16:16 + n] = rng.randbytes(n)
    elif how == 3:  # another family or protocol
        msg[rng.choice((1, 14))] = rng.randrange(256)
    else:  # longer, the tail garbage
        msg += rng.randbytes(4 * rng.randrange(1, 6))
    msg[2:4] = len(msg).to_bytes(2, "big")
    return bytes(msg)


def test_a_damaged_compact_message_is_a_wire_error_and_nothing_else() -> None:
    """The receiver's decoder raises WireError (malformed or bounds) or reads something: never an
    exception of its own, whatever a compact message holds (what an authentic but faulty peer
    could send: the MAC passes, the message does not)."""
    good = [wire.squeeze(bytes.fromhex(s["flow"])) for s in SHAPES]
    good += [wire.squeeze(wire.delete_msg(3, codec.make_key(ct.AF_INET, 0, bytes.fromhex(s["flow"])[20:68])))
             for s in SHAPES[:3]]
    rng = random.Random(23)
    reasons: dict[str, int] = {}
    for _ in range(20_000):
        data = _damaged(rng, good)
        try:
            wire.decode_body(data, 0, len(data), 3)
            reasons["read"] = reasons.get("read", 0) + 1
        except wire.WireError as exc:
            reasons[exc.reason] = reasons.get(exc.reason, 0) + 1
    assert reasons.get("malformed", 0) > 5_000 and reasons.get("read", 0) > 1_000
    assert set(reasons) <= {"malformed", "bounds", "read"}
    assert len(compact._EXPAND[(wire.MsgType.FLOW_COMPACT, ct.AF_INET)]) <= compact.PLANS_MAX


@pytest.mark.parametrize("codes", [b"", b"\x02\x01", b"\x01\x01", b"\x01\x02\x82", b"\x01\x05", b"\x01\x04"])
def test_descriptors_that_are_not_one_are_malformed(codes: bytes) -> None:
    """No ORIG first, an attribute twice (REPLY and its inverse count as one), a code that is
    none, TCP's protocol information for UDP."""
    head = struct.pack("!BBHQHBB", wire.MsgType.FLOW_COMPACT, ct.AF_INET, 0, 1, 0, ct.IPPROTO_UDP, len(codes))
    msg = bytearray(head + codes + bytes(64))
    msg = msg[:len(msg) & ~3]
    msg[2:4] = len(msg).to_bytes(2, "big")
    with pytest.raises(wire.WireError, match="descriptor") as err:
        wire.decode_body(bytes(msg), 0, len(msg), 3)
    assert err.value.reason == "malformed"


def test_an_icmp_reply_is_never_taken_as_a_plain_inverse() -> None:
    """ICMP's reply has a type of its own (an echo's is a reply): REPLY_INVERSE with ICMP is no
    descriptor, and the sender sends the reply's values."""
    echo = next(bytes.fromhex(s["flow"]) for s in SHAPES if s["what"] == "event NEW icmp 192.0.2.13")
    small = wire.squeeze(echo)
    assert compact.REPLY in small[16:16 + small[15]] and compact.REPLY_INVERSE not in small[16:16 + small[15]]
    assert compact._segments(ct.AF_INET, ct.IPPROTO_ICMP, bytes((compact.ORIG, compact.REPLY_INVERSE))) is None


def test_a_version_beyond_any_a_node_reaches_is_out_of_bounds() -> None:
    small = bytearray(wire.squeeze(_flow()))
    small[4:12] = (wire.VERSION_MAX + 1).to_bytes(8, "big")
    with pytest.raises(wire.WireError) as err:
        wire.decode_body(bytes(small), 0, len(small), 3)
    assert err.value.reason == "bounds"

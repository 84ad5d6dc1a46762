"""Listings: the generated per-layout formatters give exactly the bytes of the general path
(entry_view + format_line / json.dumps), for random entries of every shape, for the real kernel
messages in the fixtures, and for entries that look like a learnt layout but are not."""

from __future__ import annotations

import json
import struct
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec
from ctbridge.conntrack.codec import Entry
from ctbridge.conntrack.listing import Listing, format_line
from ctbridge.conntrack.view import entry_view
from tests.support import FIXTURES, builders
from tests.support.strategies import entries

CAPTURED = json.loads(FIXTURES.joinpath("ctnetlink.json").read_text())
DUMP_MESSAGES = [bytes.fromhex(f["hex"]) for f in CAPTURED if f["what"] == "dump"]
Flow = tuple[Entry, dict[str, Any]]  # an entry and the fields it was built from (strategies.entries)


def general(entry: Entry, form: str) -> str:
    view = entry_view(entry)
    return format_line(view) if form == "text" else json.dumps(view, separators=(",", ":"))


def _zero_flow(family: int, proto: int) -> Flow:
    """An entry of the strategy's (the kernel's) layout with every value 0, and its fields."""
    addr = b"\x20\x01\x0d\xb8" + bytes(12) if family == ct.AF_INET6 else b"\xc0\x00\x02\x01"
    orig = builders.encode_tuple(family, proto, addr, addr, 0, 0)
    entry = builders.build_entry(family, orig, orig, status=0, timeout=0)
    return entry, {"family": family, "proto": proto, "src": addr, "dst": addr, "sport": 0, "dport": 0, "status": 0,
                   "timeout": 0, "mark": 0, "zone": 0, "tcp_state": None, "unknown": b""}


@settings(max_examples=300)
@given(st.lists(entries(), min_size=1, max_size=12), st.sampled_from(["text", "json"]))
# found by hypothesis: a GRE flow (refused: its keys) has the attributes and length of a UDP flow of
# its family, and its refusal was remembered for the UDP flow's shape too: no layout was learnt
@example([_zero_flow(ct.AF_INET6, ct.IPPROTO_GRE), _zero_flow(ct.AF_INET6, ct.IPPROTO_UDP)], "text")
@example([_zero_flow(ct.AF_INET, ct.IPPROTO_GRE), _zero_flow(ct.AF_INET, ct.IPPROTO_UDP)], "json")
def test_every_entry_is_listed_as_the_general_path_lists_it(items: list[Flow], form: str) -> None:
    listing = Listing(form)
    batch = [e for e, _ in items] * 2  # the second time round, through the layouts learnt
    assert list(listing.entries(batch)) == [general(e, form) for e in batch]
    # and the formatters were not all thrown away by their own check: most shapes have one
    if any(f["proto"] in (ct.IPPROTO_TCP, ct.IPPROTO_UDP, ct.IPPROTO_ICMP) for _e, f in items):
        assert listing.layouts


def test_the_kernel_messages_of_the_fixtures() -> None:
    seq = struct.unpack_from("=I", DUMP_MESSAGES[0], 8)[0]
    buf = b"".join(m for m in DUMP_MESSAGES if struct.unpack_from("=I", m, 8)[0] == seq) * 3
    expected = codec.decode_dump(buf, seq).entries
    assert len(expected) >= 9
    for form in ("text", "json"):
        listing = Listing(form)
        lines, done, errno = listing.kernel(buf, seq)
        assert (done, errno) == (False, 0)
        assert lines == [general(e, form) for e in expected]
    # the common layouts got a formatter of their own; GRE keys and SCTP state did not
    assert len(listing.fast) >= 5
    assert any("sctp" in line for line in lines) and any('"srckey"' in line for line in lines)


def test_a_refused_gre_flow_does_not_refuse_the_udp_flows_laid_out_like_it() -> None:
    """The kernel dumps a GRE flow in the attributes and length of a UDP one (its keys in the port
    attributes): the captured GRE flow, listed first, left the captured DNS flow after it to the
    general path for the rest of the listing. Each protocol is a layout of its own."""
    gre = next(m for m in DUMP_MESSAGES if _protonum(m) == ct.IPPROTO_GRE)
    udp = next(m for m in DUMP_MESSAGES if _protonum(m) == ct.IPPROTO_UDP and (m[16], len(m)) == (gre[16], len(gre)))
    seq = struct.unpack_from("=I", gre, 8)[0]
    buf = b"".join(m[:8] + struct.pack("=I", seq) + m[12:] for m in (gre, udp, gre, udp))
    expected = codec.decode_dump(buf, seq).entries
    for form in ("text", "json"):
        listing = Listing(form)
        lines, _done, _errno = listing.kernel(buf, seq)
        assert lines == [general(e, form) for e in expected]
        # the UDP flow has a formatter of its own; the GRE flow has none
        formatters = listing.layouts[(udp[16], len(udp) - 20)]
        assert [f(udp, 20) for f in formatters] == [general(expected[1], form)]
        assert [f(gre, 20) for f in formatters] == [None]


def _protonum(message: bytes) -> int:
    orig = codec.attr_map(message, 20)[ct.CTA_TUPLE_ORIG]
    return codec.attr_map(codec.attr_map(orig)[ct.CTA_TUPLE_PROTO])[ct.CTA_PROTO_NUM][0]


def test_a_learnt_layout_refuses_an_entry_of_another_shape() -> None:
    """Same family, same length, different attributes: the header check sends it to the general path."""
    flow = builders.tcp_flows(1)[0]
    listing = Listing("text")
    assert list(listing.entries([flow])) == [general(flow, "text")]
    # the mark attribute (CTA_MARK) turned into a secmark (CTA_SECMARK) of the same size
    attrs = codec.attr_map(flow.attrs)
    assert ct.CTA_MARK in attrs
    at = flow.attrs.index(codec.attr(ct.CTA_MARK, attrs[ct.CTA_MARK]))
    other = flow._replace(attrs=flow.attrs[:at] + codec.attr(ct.CTA_SECMARK, struct.pack(">I", 9))
                          + flow.attrs[at + 8:])
    assert len(other.attrs) == len(flow.attrs)
    assert list(listing.entries([other])) == [general(other, "text")]
    assert "secmark=9" in general(other, "text")
    # and a UDP-Lite flow laid out like a UDP one is no UDP flow
    udp = builders.build_entry(ct.AF_INET, builders.encode_tuple(ct.AF_INET, ct.IPPROTO_UDP, b"\xc0\x00\x02\x01",
                                                           b"\xc0\x00\x02\x02", 1, 2),
                            builders.encode_tuple(ct.AF_INET, ct.IPPROTO_UDP, b"\xc0\x00\x02\x02", b"\xc0\x00\x02\x01",
                                               2, 1))
    lite = udp._replace(attrs=udp.attrs.replace(b"\x05\x00\x01\x00\x11", b"\x05\x00\x01\x00\x88"))
    assert list(listing.entries([udp, lite])) == [general(udp, "text"), general(lite, "text")]
    assert " udplite " in general(lite, "text")


def test_a_zone_comes_from_the_flow_key_for_caches() -> None:
    flow = builders.tcp_flows(1)[0]
    family, _zone, orig = codec.split_key(flow.key)
    zoned = flow._replace(key=codec.make_key(family, 12, orig))
    for form in ("text", "json"):
        assert list(Listing(form).entries([flow, zoned])) == [general(flow, form), general(zoned, form)]
    assert general(zoned, "text").endswith(" mark=0 zone=12")


def test_a_malformed_entry_fails_as_the_general_path_does() -> None:
    flow = builders.tcp_flows(1)[0]
    broken = flow._replace(attrs=flow.attrs[:-3])
    listing = Listing("json")
    try:
        list(listing.entries([broken]))
    except codec.CodecError:
        pass
    else:
        raise AssertionError("a truncated attribute was listed")


def test_an_entry_with_nothing_to_read_is_listed_by_the_general_path() -> None:
    """Found by review: a peer's entry of only a protocol number made the generated formatter
    invalid Python, and the whole listing failed."""
    orig = codec.attr(ct.CTA_TUPLE_ORIG, codec.attr(ct.CTA_TUPLE_PROTO, codec.attr(ct.CTA_PROTO_NUM, b"\x06"),
                                                    nested=True), nested=True)
    bare = Entry(codec.make_key(ct.AF_INET, 0, orig[4:]), ct.AF_INET, orig)
    for form in ("text", "json"):
        assert list(Listing(form).entries([bare, bare])) == [general(bare, form)] * 2
    assert general(bare, "text") == "ipv4     2 tcp      6 0 [UNREPLIED] mark=0"


def test_a_layout_whose_formatter_disagrees_is_not_generated_again() -> None:
    """Counters in the reply-then-original order: the view orders them, a formatter would not. The
    shape goes to the general path once, and is not compiled again for every entry."""
    flow = builders.tcp_flows(1)[0]
    counters = b"".join(codec.attr(t, codec.attr(ct.CTA_COUNTERS_PACKETS, struct.pack(">Q", n))
                                   + codec.attr(ct.CTA_COUNTERS_BYTES, struct.pack(">Q", 100 * n)), nested=True)
                        for t, n in ((ct.CTA_COUNTERS_REPLY, 2), (ct.CTA_COUNTERS_ORIG, 1)))
    odd = flow._replace(attrs=flow.attrs + counters)
    listing = Listing("json")
    assert list(listing.entries([odd] * 3)) == [general(odd, "json")] * 3
    assert listing.layouts == {} and len(listing.unsupported) == 1


def test_a_malformed_sample_leaves_no_formatter_behind() -> None:
    """Found by review: a formatter was kept although the general path raised on its sample."""
    flow = builders.tcp_flows(1)[0]
    attrs = codec.attr_map(flow.attrs)
    bad_zone = codec.attr(ct.CTA_TUPLE_ORIG, attrs[ct.CTA_TUPLE_ORIG], nested=True) + codec.attr(
        ct.CTA_TUPLE_REPLY, attrs[ct.CTA_TUPLE_REPLY], nested=True) + codec.attr(ct.CTA_ZONE, b"\x00\x07\x00\x00")
    msg = codec.message(ct.MSG_CT_NEW, ct.NLM_F_MULTI, 5, ct.AF_INET, bad_zone)
    listing = Listing("text")
    for _ in range(2):
        try:
            listing.kernel(msg, 5)
        except codec.CodecError:
            pass
        else:
            raise AssertionError("an entry the general path refuses was listed")
    assert listing.fast == {}

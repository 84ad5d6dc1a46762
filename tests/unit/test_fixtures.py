"""Decoding real kernel messages, captured once (tests/fixtures/capture_ctnetlink.py), checked
against what the conntrack CLI printed for the same flows at the same moment."""

from __future__ import annotations

import json

import pytest

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec, request
from ctbridge.conntrack.codec import EventKind
from ctbridge.conntrack.view import entry_view
from tests.support import FIXTURES, witness

CAPTURED = json.loads(FIXTURES.joinpath("ctnetlink.json").read_text())
DUMPS = [f for f in CAPTURED if f["what"] == "dump"]
EVENTS = {f["what"].split()[1]: bytes.fromhex(f["hex"]) for f in CAPTURED if f["what"].startswith("event")}


@pytest.mark.parametrize("fixture", DUMPS, ids=lambda f: " ".join(f["witness"].split()[:3]))
def test_dump_message_matches_witness(fixture: dict) -> None:
    part = codec.decode_dump(bytes.fromhex(fixture["hex"]))
    assert len(part.entries) == 1 and not part.done
    view = entry_view(part.entries[0])
    assert witness.mismatches(view, witness.parse_line(fixture["witness"]), timeout_slack=1) == []


def test_fixtures_cover_the_protocols() -> None:
    protos = {entry_view(codec.decode_dump(bytes.fromhex(f["hex"])).entries[0])["proto"] for f in DUMPS}
    assert {"tcp", "udp", "icmp", "icmpv6", "sctp", "gre", "udplite"} <= protos


def test_events_decode_to_their_kinds() -> None:
    kinds = {}
    for name, buf in EVENTS.items():
        (event,) = codec.decode_events(buf)
        kinds[name] = event
    assert kinds["NEW"].kind == EventKind.NEW
    assert kinds["UPDATE"].kind == EventKind.UPDATE
    assert kinds["DESTROY"].kind == EventKind.DESTROY
    assert len({e.entry.key for e in kinds.values()}) == 1
    assert all(e.portid != 0 for e in kinds.values())  # made by the CLI, not by packets
    assert entry_view(kinds["UPDATE"].entry)["mark"] == 9
    # DESTROY carries a protoinfo with the state only: it must still decode and view.
    destroyed = entry_view(kinds["DESTROY"].entry)
    assert destroyed["src"] == "192.0.2.20" and destroyed["tcp_state"] == "ESTABLISHED"


def test_nat_entry_request_carries_nat_ranges() -> None:
    """A flow NATed by nftables is sent with its un-NATed reply and CTA_NAT_SRC/DST ranges."""
    nat = [e for e in (codec.decode_dump(bytes.fromhex(f["hex"])).entries[0] for f in DUMPS)
           if "DST_NAT" in entry_view(e)["status"]]
    assert nat, "the fixtures should hold a source- and destination-NATed flow"
    entry = nat[0]
    req = request.new_request(entry, 7)
    body = codec.attr_map(req, 20)
    assert ct.CTA_NAT_SRC in body and ct.CTA_NAT_DST in body
    reply = codec.Entry(b"\x02\x00\x00", 2, codec.attr(ct.CTA_TUPLE_ORIG, body[ct.CTA_TUPLE_REPLY], nested=True))
    plain = entry_view(reply)
    view = entry_view(entry)
    # un-NATed reply = inverted original
    assert (plain["src"], plain["dst"], plain["sport"], plain["dport"]) == (
        view["dst"], view["src"], view["dport"], view["sport"])
    # updates never carry NAT (the kernel refuses NAT changes on existing entries)
    upd = codec.attr_map(request.new_request(entry, 8, update=True), 20)
    assert ct.CTA_NAT_SRC not in upd and ct.CTA_NAT_DST not in upd

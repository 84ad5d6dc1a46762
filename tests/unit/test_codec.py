"""The ctnetlink codec on its own: pure functions over bytes, checked with properties."""

from __future__ import annotations

import ipaddress
import json
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec, request
from ctbridge.conntrack.codec import CodecError, Entry
from ctbridge.conntrack.view import entry_view
from tests.support import FIXTURES, builders
from tests.support.strategies import as_dump_message, entries


@given(st.lists(entries(), min_size=1, max_size=5))
def test_dump_round_trip(items: list[tuple[Entry, dict]]) -> None:
    buf = b"".join(as_dump_message(e, i) for i, (e, _) in enumerate(items))
    buf += struct.pack("=IHHIIi", 20, ct.NLMSG_DONE, ct.NLM_F_MULTI, 1, 0, 0)
    part = codec.decode_dump(buf)
    assert part.done and part.errno == 0
    assert part.entries == [e for e, _ in items]


@given(entries())
def test_view_shows_the_fields(item: tuple[Entry, dict]) -> None:
    entry, f = item
    v = entry_view(entry)
    json.dumps(v)
    assert v["family"] == ("ipv6" if f["family"] == ct.AF_INET6 else "ipv4")
    assert v["protonum"] == f["proto"]
    assert ipaddress.ip_address(v["src"]).packed == f["src"]
    assert ipaddress.ip_address(v["dst"]).packed == f["dst"]
    assert (v["mark"], v["zone"], v["timeout"]) == (f["mark"], f["zone"], f["timeout"])
    if f["proto"] in (ct.IPPROTO_TCP, ct.IPPROTO_UDP):
        assert (v["sport"], v["dport"]) == (f["sport"], f["dport"])
    assert codec.split_key(entry.key)[:2] == (f["family"], f["zone"])


@given(entries(), st.booleans(), st.booleans())
def test_new_request_keeps_what_the_kernel_takes(item: tuple[Entry, dict], liberal: bool, update: bool) -> None:
    entry, f = item
    req = request.new_request(entry, 42, liberal=liberal, update=update)
    length, mtype, flags, seq, _ = struct.unpack_from("=IHHII", req)
    assert (length, mtype, seq) == (len(req), ct.MSG_CT_NEW, 42)
    # create: only if missing (EXCL); update: only if present (no CREATE, so a vanished entry
    # cannot come back without its NAT binding)
    assert bool(flags & ct.NLM_F_CREATE) == bool(flags & ct.NLM_F_EXCL) == (not update)
    assert req[16] == f["family"]
    body = codec.attr_map(req, 20)
    src = codec.attr_map(entry.attrs)
    assert not (set(body) & {ct.CTA_ID, ct.CTA_USE, ct.CTA_COUNTERS_ORIG, ct.CTA_TIMESTAMP, ct.CTA_SECCTX})
    status = struct.unpack(">I", body[ct.CTA_STATUS])[0]
    assert status & ct.IPS_CONFIRMED and not status & ct.IPS_DYING
    # EXPECTED: cleared on create (the kernel sets it when it finds the master), kept on update
    # (an existing related entry has it, and the kernel refuses any change of it)
    assert bool(status & ct.IPS_EXPECTED) == (update and bool(f["status"] & ct.IPS_EXPECTED))
    assert status & ~(ct.IPS_EXPECTED | ct.IPS_DYING | ct.IPS_CONFIRMED) == f["status"] & ~(
        ct.IPS_EXPECTED | ct.IPS_DYING | ct.IPS_CONFIRMED)
    # unknown attributes pass byte for byte
    for t, _s, _e in codec.iter_attrs(f["unknown"]):
        assert body[t] == src[t]
    nat = f["status"] & (ct.IPS_SRC_NAT | ct.IPS_DST_NAT)
    assert (ct.CTA_NAT_SRC in body or ct.CTA_NAT_DST in body) == bool(nat and not update)
    if not (nat and not update):
        assert body[ct.CTA_TUPLE_REPLY] == src[ct.CTA_TUPLE_REPLY]
    assert body[ct.CTA_TUPLE_ORIG] == src[ct.CTA_TUPLE_ORIG]
    for t in (ct.CTA_TIMEOUT, ct.CTA_MARK, ct.CTA_ZONE):
        assert body.get(t) == src.get(t)
    if f["tcp_state"] is not None:
        tcp = codec.attr_map(codec.attr_map(body[ct.CTA_PROTOINFO])[ct.CTA_PROTOINFO_TCP])
        assert tcp[ct.CTA_PROTOINFO_TCP_STATE][0] == f["tcp_state"]
        for t in (ct.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, ct.CTA_PROTOINFO_TCP_FLAGS_REPLY):
            value, mask = tcp[t]
            assert mask & ct.IP_CT_TCP_FLAG_BE_LIBERAL
            assert bool(value & ct.IP_CT_TCP_FLAG_BE_LIBERAL) == liberal
            assert value & ct.IP_CT_TCP_FLAG_SACK_PERM  # carried from the source


@given(entries(), st.booleans(), st.booleans())
def test_fast_and_general_encoding_agree(item: tuple[Entry, dict], liberal: bool, update: bool) -> None:
    entry, _ = item
    general = request._general_request(entry, 5, liberal, update, True)
    fast = request.new_request(entry, 5, liberal=liberal, update=update)
    assert fast == general


def test_fast_path_rejects_a_changed_layout() -> None:
    a, b = builders.tcp_flows(2)
    request.new_request(a, 1)  # learns the layout
    # same length and start, but the MARK attribute retyped as an unknown one: must not be misread
    attrs = bytearray(b.attrs)
    mark_at = len(attrs) - 8
    attrs[mark_at + 2:mark_at + 4] = (200).to_bytes(2, "little")
    odd = Entry(b.key, b.family, bytes(attrs))
    assert codec.attr_map(request.new_request(odd, 1), 20) == codec.attr_map(
        request._general_request(odd, 1, True, False, True), 20)


def test_key_round_trip() -> None:
    key = codec.make_key(ct.AF_INET6, 513, b"tuple")
    assert codec.split_key(key) == (ct.AF_INET6, 513, b"tuple")
    with pytest.raises(CodecError):
        codec.split_key(b"\x02")


def test_delete_request_names_the_flow() -> None:
    (entry,) = builders.tcp_flows(1)
    family, _zone, orig = codec.split_key(entry.key)
    req = codec.delete_request(codec.make_key(family, 7, orig), 9)
    body = codec.attr_map(req, 20)
    assert struct.unpack_from("=H", req, 4)[0] == ct.MSG_CT_DELETE
    assert body[ct.CTA_TUPLE_ORIG] == orig and body[ct.CTA_ZONE] == b"\x00\x07"


def test_errors_and_acks_are_matched_by_sequence() -> None:
    acks = b"".join(struct.pack("=IHHIIi", 36, ct.NLMSG_ERROR, 0, seq, 0, -err) + bytes(16)
                    for seq, err in ((5, 17), (6, 0)))
    assert codec.decode_replies(acks) == [codec.Reply(5, 17), codec.Reply(6, 0)]


FIXTURE_MESSAGES = [bytes.fromhex(f["hex"]) for f in json.loads(
    FIXTURES.joinpath("ctnetlink.json").read_text())]


@settings(max_examples=500)
@given(st.binary(max_size=600))
def test_decoders_raise_only_codec_errors_on_noise(data: bytes) -> None:
    for decode in (codec.decode_dump, codec.decode_events, codec.decode_replies):
        try:
            decode(data)
        except CodecError:
            pass


def test_decoders_raise_only_codec_errors_on_damaged_kernel_messages() -> None:
    rng = random.Random(1)
    viewed = 0
    for _ in range(3000):
        msg = bytearray(rng.choice(FIXTURE_MESSAGES))
        for _ in range(rng.randint(1, 4)):
            msg[rng.randrange(len(msg))] = rng.randrange(256)
        if rng.random() < 0.3:
            del msg[rng.randrange(len(msg)):]
        data = bytes(msg)
        try:
            for entry in codec.decode_dump(data).entries + [e.entry for e in codec.decode_events(data)]:
                entry_view(entry)
                request.new_request(entry, 1)
                viewed += 1
        except CodecError:
            pass
    assert viewed > 300  # the damage must not make every message unreadable, or this tests nothing


def test_a_late_reply_to_another_request_neither_ends_nor_joins_a_dump() -> None:
    (entry,) = builders.tcp_flows(1)
    stale_error = struct.pack("=IHHIIi", 36, ct.NLMSG_ERROR, 0, 99, 0, -17) + bytes(16)
    stale_entry = codec.message(ct.MSG_CT_NEW, ct.NLM_F_MULTI, 98, entry.family, entry.attrs)
    mine = codec.message(ct.MSG_CT_NEW, ct.NLM_F_MULTI, 7, entry.family, entry.attrs)
    done = struct.pack("=IHHIIi", 20, ct.NLMSG_DONE, ct.NLM_F_MULTI, 7, 0, 0)
    assert not codec.dump_finished(stale_error + mine, 7)
    part = codec.decode_dump(stale_error + stale_entry + mine, 7)
    assert (len(part.entries), part.done, part.errno) == (1, False, 0)
    assert codec.dump_finished(done, 7) and codec.decode_dump(done, 7).done


def _tcp_info(entry: Entry) -> dict[int, bytes]:
    body = codec.attr_map(request.new_request(entry, 1), 20)
    return codec.attr_map(codec.attr_map(body[ct.CTA_PROTOINFO])[ct.CTA_PROTOINFO_TCP])


def test_fast_path_checks_every_entry_not_only_the_first_of_a_layout() -> None:
    """Same length and start as a learnt layout, but the TCP protoinfo's inner attributes in
    another order: the flags must still be found by type, not by offset."""
    first, second = builders.tcp_flows(2)
    assert _tcp_info(first)[ct.CTA_PROTOINFO_TCP_STATE] == b"\x03"
    attrs = bytearray(second.attrs)
    at = bytes(attrs).index(codec.attr(ct.CTA_PROTOINFO_TCP_STATE, b"\x03"))
    state = attrs[at:at + 8]
    flags_reply = attrs[at + 32:at + 40]  # STATE, WSCALE x2, FLAGS_ORIGINAL, FLAGS_REPLY: 8 bytes each
    attrs[at:at + 8], attrs[at + 32:at + 40] = flags_reply, state
    swapped = Entry(second.key, second.family, bytes(attrs))
    info = _tcp_info(swapped)
    assert info[ct.CTA_PROTOINFO_TCP_STATE] == b"\x03"
    value, mask = info[ct.CTA_PROTOINFO_TCP_FLAGS_REPLY]
    assert mask & ct.IP_CT_TCP_FLAG_BE_LIBERAL and value & ct.IP_CT_TCP_FLAG_BE_LIBERAL


_ATTR_TREES = st.recursive(
    st.binary(max_size=20),
    lambda children: st.lists(st.tuples(st.integers(0, 30), children), max_size=5).map(
        lambda items: b"".join(codec.attr(t, v, nested=True) if isinstance(v, bytes) and len(v) % 4 == 0 and v
                               else codec.attr(t, v) for t, v in items)),
    max_leaves=30)


@settings(max_examples=400)
@given(st.lists(st.tuples(st.integers(0, 30), _ATTR_TREES), max_size=12), st.sampled_from([2, 10, 0, 99]))
def test_views_and_requests_of_odd_entries_raise_only_codec_errors(items: list[tuple[int, bytes]], family: int) -> None:
    """Attribute trees of any shape (what a buggy peer could send) are viewed or refused cleanly."""
    attrs = b"".join(codec.attr(t, v) for t, v in items)
    try:
        entry = codec.entry_from_attrs(family, attrs)
        entry_view(entry)
        request.new_request(entry, 1)
        request.new_request(entry, 1, update=True)
    except CodecError:
        pass


@given(st.binary(max_size=200), st.integers(0, 2**31))
def test_stats_decoder_raises_only_codec_errors(data: bytes, seq: int) -> None:
    try:
        codec.decode_stats(data, seq)
    except CodecError:
        pass


@given(entries(), st.booleans())
def test_strip_local_removes_only_instance_attributes(item: tuple[Entry, dict], twice: bool) -> None:
    entry, _ = item
    extra = (codec.attr(ct.CTA_USE, b"\x00\x00\x00\x01") + codec.attr(ct.CTA_ID, b"\x00\x00\x30\x39")
             + codec._ZERO_SYNPROXY
             + codec.attr(ct.CTA_COUNTERS_ORIG, codec.attr(ct.CTA_COUNTERS_PACKETS, bytes(8)), nested=True))
    full = Entry(entry.key, entry.family, entry.attrs + extra)
    stripped = codec.strip_local(full)
    if twice:
        stripped = codec.strip_local(stripped)
    before, after = codec.attr_map(full.attrs), codec.attr_map(stripped.attrs)
    # instance attributes and an all-zero SYNPROXY go, everything else stays as it was
    assert set(before) - set(after) == {t for t in before if t in codec.NOT_SETTABLE} | {ct.CTA_SYNPROXY}
    assert all(after[t] == before[t] for t in after)
    assert stripped.key == full.key
    synproxy = codec.attr_map(request.new_request(full, 1), 20).pop(ct.CTA_SYNPROXY)
    assert synproxy == codec._ZERO_SYNPROXY[4:]
    assert request.new_request(stripped, 1) == request.new_request(
        Entry(full.key, full.family, entry.attrs + extra.replace(codec._ZERO_SYNPROXY, b"")), 1)


def test_a_flow_whose_key_and_cta_zone_disagree_is_not_written() -> None:
    """Found by review (issue 13, finding 3): a sync message's head names the zone that keys the
    flow in the cache; a CTA_ZONE attribute naming another one made the kernel hold the flow under
    a key the cache did not know. Both encoding paths refuse it; agreeing zones still encode."""
    from ctbridge.conntrack import abi as ct
    from tests.support import builders
    src, dst = bytes((192, 0, 2, 1)), bytes((198, 51, 100, 2))
    orig = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_UDP, src, dst, 5353, 53)
    reply = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_UDP, dst, src, 53, 5353)
    for attr_zone, key_zone in ((7, 0), (0, 7), (7, 9)):
        e = builders.build_entry(ct.AF_INET, orig, reply, zone=attr_zone)
        forged = Entry(builders.make_key(ct.AF_INET, key_zone, orig), e.family, e.attrs)
        for update in (False, True):
            for _ in range(2):  # the second time through the layout learnt the first time
                with pytest.raises(codec.CodecError, match="zone"):
                    request.new_request(forged, 1, update=update)
            with pytest.raises(codec.CodecError, match="zone"):
                request.new_request(forged, 1, update=update, keep_status=False)  # the general path
        assert request.new_request(e, 1)  # the entry as the kernel had it is fine


def test_same_but_timeout_tells_a_countdown_from_a_change() -> None:
    """What a dump read whole (kernel_resync) compares each flow with: equal but for the seconds
    of CTA_TIMEOUT (CTA_EXPECT_TIMEOUT for an expectation) is the same state; any other byte,
    before or after the timeout, header or value, is a change."""
    from tests.support import builders
    a = builders.tcp_flows(1, timeout=300)[0].attrs
    b = builders.tcp_flows(1, timeout=299)[0].attrs
    assert codec.same_but_timeout(a, a) and codec.same_but_timeout(a, b)
    at = codec.timeout_offset(a)
    for i in range(len(a)):
        if at <= i < at + 4:
            continue
        changed = bytearray(b)
        changed[i] ^= 0x40
        assert not codec.same_but_timeout(a, bytes(changed)), i
    assert not codec.same_but_timeout(a, b + bytes(4)) and not codec.same_but_timeout(a[:-8], b[:-8] + bytes(8))
    exp = builders.expectation_attrs(ct.AF_INET, bytes(4), bytes(4), 2000, 3000, timeout=300)
    later = builders.expectation_attrs(ct.AF_INET, bytes(4), bytes(4), 2000, 3000, timeout=12)
    assert codec.same_but_timeout(exp, later, ct.CTA_EXPECT_TIMEOUT)
    assert not codec.same_but_timeout(exp, later)  # as flows: CTA_TIMEOUT (7) is no expectation's

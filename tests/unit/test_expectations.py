"""Expectations (issue 15, deliver 1): the helpers' word that a connection is coming, replicated
as flows are. The codec against the kernel's layout, the wire's EXPECT, and the engine with a fake
clock and lossy links: delivery, deletion, bulks, expiry, the filters, and the commit's order."""

from __future__ import annotations

import dataclasses
import ipaddress
import struct

import pytest

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec, expectation
from ctbridge.conntrack.codec import Event, EventKind
from ctbridge.sync import wire
from ctbridge.sync.engine import Engine
from ctbridge.sync.filter import FlowFilter
from ctbridge.sync.peer import version_of
from tests.support import builders
from tests.support.enginelab import Lab, flow
from tests.unit.test_timeouts import deliver, pair

CLIENT, SERVER = bytes((192, 0, 2, 10)), bytes((203, 0, 113, 20))


def kernel_message(kind: int, attrs: bytes, flags: int = 0, portid: int = 0) -> bytes:
    """An expectation event as the kernel sends it."""
    msg = bytearray(codec.message(kind, flags, 0, ct.AF_INET, attrs))
    msg[12:16] = portid.to_bytes(4, "little")
    return bytes(msg)


def exp(port: int = 30002, control: int = 40000, timeout: int = 300, zone: int = 0) -> codec.Entry:
    return builders.build_expectation(ct.AF_INET, CLIENT, SERVER, port, control, timeout=timeout, zone=zone)


def master(control: int = 40000) -> codec.Entry:
    orig = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_TCP, CLIENT, SERVER, control, 21)
    reply = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_TCP, SERVER, CLIENT, 21, control)
    return builders.build_entry(ct.AF_INET, orig, reply, status=0xE, timeout=3600, tcp_state=3)


# --- codec ---------------------------------------------------------------------------------------

def test_an_expectation_reads_with_its_tuple_first_and_without_its_kernel_id() -> None:
    raw = builders.expectation_attrs(ct.AF_INET, CLIENT, SERVER, 30002, 40000, zone=7)
    e = expectation.entry_from_attrs(ct.AF_INET, raw, 0, len(raw))
    assert expectation.is_expectation(e.key) and not expectation.is_expectation(master().key)
    assert e.key[0] == ct.AF_INET | expectation.EXPECTATION and (e.key[1] << 8 | e.key[2]) == 7
    types = [t for t, _s, _e in codec.iter_attrs(e.attrs)]
    assert types[0] == ct.CTA_EXPECT_TUPLE and ct.CTA_EXPECT_ID not in types
    assert sorted(types) == sorted(t for t, _s, _e in codec.iter_attrs(raw) if t != ct.CTA_EXPECT_ID)
    assert expectation.timeout_of(e.attrs) == 300
    assert expectation.master_key(e) == codec.make_key(ct.AF_INET, 7, master().key[3:])
    # one without its master or mask is no expectation the kernel would take
    bare = codec.attr(ct.CTA_EXPECT_TUPLE, e.key[3:], nested=True)
    with pytest.raises(codec.CodecError):
        expectation.entry_from_attrs(ct.AF_INET, bare, 0, len(bare))


def test_events_tell_new_from_destroyed_and_skip_our_own() -> None:
    raw = builders.expectation_attrs(ct.AF_INET, CLIENT, SERVER, 30002, 40000)
    buf = (kernel_message(ct.MSG_EXP_NEW, raw, ct.NLM_F_CREATE | ct.NLM_F_EXCL)
           + kernel_message(ct.MSG_EXP_NEW, raw, ct.NLM_F_CREATE | ct.NLM_F_EXCL, portid=99)
           + kernel_message(ct.MSG_CT_NEW, master().attrs)  # not an expectation: not read here
           + kernel_message(ct.MSG_EXP_DELETE, raw))
    events = expectation.decode_events(buf, skip_portid=99)
    assert [ev.kind for ev in events] == [EventKind.NEW, EventKind.DESTROY]
    assert events[0].entry == exp()
    with pytest.raises(codec.CodecError):
        expectation.decode_events(buf[:-3])


def test_requests_name_the_expectation_and_set_what_is_left_of_its_timeout() -> None:
    e = exp(zone=3)
    req = expectation.new_request(e, 5, seconds=42)
    mlen, mtype, flags = (int.from_bytes(req[i:j], "little") for i, j in ((0, 4), (4, 6), (6, 8)))
    assert mlen == len(req) and mtype == ct.MSG_EXP_NEW and flags & ct.NLM_F_CREATE
    attrs = codec.attr_map(req, 20)
    assert expectation.timeout_of(req, 20) == 42 and attrs[ct.CTA_EXPECT_HELP_NAME] == b"ftp\0"
    assert attrs[ct.CTA_EXPECT_FN] == b"nat-follow-master\0" and ct.CTA_EXPECT_NAT in attrs
    gone = expectation.delete_request(e.key, 6)
    assert int.from_bytes(gone[4:6], "little") == ct.MSG_EXP_DELETE
    # a deletion without its tuple would flush every expectation: never made from a flow's key
    assert codec.attr_map(gone, 20) == {ct.CTA_EXPECT_TUPLE: e.key[3:], ct.CTA_EXPECT_ZONE: b"\x00\x03"}
    with pytest.raises(codec.CodecError):
        expectation.delete_request(master().key, 7)


# --- wire -----------------------------------------------------------------------------------------

def test_expect_and_flow_keys_never_mix_on_the_wire() -> None:
    auth = wire.Auth([b"k" * 32])
    header = wire.Header(1, 1, 1, 0)
    good = wire.expect_msg(3, exp())
    _h, flows, _m = wire.decode_split(wire.datagram(header, good, auth), auth)
    assert flows == [(3, exp().key, good)]
    assert wire.flow_entry(exp().key, good) == exp()
    # an EXPECT without the expectation bit, a FLOW with it: malformed
    for bad in (good[:1] + bytes((ct.AF_INET,)) + good[2:],
                wire.flow_msg(3, master())[:1] + bytes((0x82,)) + wire.flow_msg(3, master())[2:]):
        with pytest.raises(wire.WireError) as err:
            wire.decode_split(wire.datagram(header, bad, auth), auth)
        assert err.value.reason == "malformed"
    # a deletion keeps the bit: the receiver deletes the expectation, never a flow
    (gone,) = wire.decode_messages(wire.delete_msg(4, exp().key), 0, len(wire.delete_msg(4, exp().key)))
    assert gone == wire.Delete(4, exp().key)


# --- engine ---------------------------------------------------------------------------------------

def expect_event(node: Engine, kind: EventKind, e: codec.Entry, now: float) -> None:
    node.kernel_expectations([Event(kind, e, 0)], now)


def test_an_expectation_and_its_end_reach_every_peer_through_loss() -> None:
    lab = Lab(3, seed=4, loss=0.3, expectations=True)
    a = lab.engines[1]
    a.kernel_events([Event(EventKind.NEW, master(), 0)], lab.now)
    expect_event(a, EventKind.NEW, exp(), lab.now)
    lab.quiet()
    for node in (2, 3):
        external = lab.engines[node].peers[1].external
        assert exp().key in external and master().key in external
        assert lab.engines[node].external_caches.entries() == [master()]  # flows only
        assert [e for e, _s in lab.engines[node].external_expectations(lab.now)] == [exp()]
    assert a.internal_cache.entries() == [master()] and a.internal_cache.expectations() == [exp()]
    assert a.expectation_counts() == (1, 0) and lab.engines[2].expectation_counts() == (0, 1)
    # the data connection came: the kernel ends the expectation, and so do the peers
    lab.loss = 0.3
    expect_event(a, EventKind.DESTROY, exp(), lab.now)
    lab.quiet()
    for node in (2, 3):
        assert exp().key not in lab.engines[node].peers[1].external
        assert master().key in lab.engines[node].peers[1].external


def test_a_bulk_carries_expectations_and_drops_one_that_ended_meanwhile() -> None:
    a, b = pair(expectations=True)
    a.kernel_events([Event(EventKind.NEW, master(), 0)], 0.0)
    expect_event(a, EventKind.NEW, exp(30002), 0.0)
    expect_event(a, EventKind.NEW, exp(30003, 40001), 0.0)
    deliver(a, b, 0.0)
    # 30003's end is lost; a bulk afterwards leaves it out, and the receiver drops it
    expect_event(a, EventKind.DESTROY, exp(30003, 40001), 0.1)
    a.datagrams_to_send(0.1)  # the DELETE goes nowhere
    a.bulk_send(0.2)
    for t in (0.2, 0.3, 0.4):
        deliver(a, b, t)
        deliver(b, a, t)
    assert exp(30002).key in b.peers[1].external and exp(30003, 40001).key not in b.peers[1].external


def test_a_dump_of_flows_keeps_expectations_and_a_dump_of_expectations_replaces_them() -> None:
    a, b = pair(expectations=True)
    expect_event(a, EventKind.NEW, exp(30002), 0.0)
    a.kernel_resync([master()], 1.0)  # a table re-read after lost events: it has no expectations
    assert a.internal_cache.expectations() == [exp(30002)]
    a.kernel_expect_resync([exp(30002, timeout=290), exp(30004, 40002)], 2.0)
    assert sorted(e.key for e in a.internal_cache.expectations()) == sorted((exp(30002).key, exp(30004, 40002).key))
    deliver(a, b, 2.0)
    # only the countdown of 30002 moved: it was not sent again (its version is the first one's)
    assert version_of(b.peers[1].external[exp(30002).key], b.peers[1].life) == 1
    a.kernel_expect_resync([], 3.0)
    deliver(a, b, 3.0)
    assert b.expectation_counts() == (0, 0) and master().key in b.peers[1].external
    a.flush_internal()
    assert a.internal_cache.expectations() == [] and a.internal_cache.entries() == []


def test_an_expectation_expires_with_its_timeout_plus_the_margin() -> None:
    a, b = pair(expiry_margin=30.0, expectations=True)
    a.kernel_events([Event(EventKind.NEW, master(), 0)], 0.0)
    expect_event(a, EventKind.NEW, exp(timeout=60), 0.0)
    deliver(a, b, 0.0)
    (entry, left), = b.external_expectations(20.0)
    assert entry == exp(timeout=60) and left == 40  # a commit at t=20 writes what is left of it
    assert [r.key for r in b.commit_records(20.0)] == [master().key]
    for t in range(1, 122):  # passes every half margin: gone within 60 + 30 + 15 s
        b.handle_timer(float(t))
        deliver(a, b, float(t))  # the master's flow: refreshed by nothing here, 3600 s long
    # an expectation's timeout is whole: the FLOW's CTA_TIMEOUT reading would have kept it 3600 s
    assert exp().key not in b.peers[1].external and master().key in b.peers[1].external
    assert b.stats["flows_expired"] == 1


def test_a_peer_may_not_open_a_pinhole_its_accept_list_refuses() -> None:
    accept = FlowFilter(accept=(ipaddress.ip_network("198.51.100.0/24"),))
    a, b = pair(expectations=True)
    b.reconfigure(peer_filters={1: accept})
    expect_event(a, EventKind.NEW, exp(), 0.0)  # 192.0.2.10 -> 203.0.113.20: outside 198.51.100.0/24
    deliver(a, b, 0.0)
    assert exp().key not in b.peers[1].external and b.stats["flows_refused_policy"] == 1
    # the sender's own filter: an ignored client's expectations are not replicated at all
    a.reconfigure(flow_filter=FlowFilter(ignore=(ipaddress.ip_network("192.0.2.10/32"),)))
    expect_event(a, EventKind.NEW, exp(30009), 0.0)
    assert a.internal_cache.expectations() == [exp()]  # 30002, taken before the reload


# --- found by the adversarial review (each failed before its fix) ---------------------------------

def forged(a: Engine, key: bytes, after_tuple: bytes) -> None:
    """Node a sends, under ``key``, an EXPECT whose attributes after the tuple are ``after_tuple``
    (a peer holding the cluster's key can send any bytes; the decoder checks the tuple only)."""
    e = codec.Entry(key, ct.AF_INET, codec.attr(ct.CTA_EXPECT_TUPLE, key[3:], nested=True) + after_tuple)
    a.internal[key] = wire.expect_msg(1000, e)  # a version above the real one's
    a.bulk_send(0.5)  # what carries it: a bulk of a's cache


def test_a_malformed_update_of_an_expectation_is_refused_and_stops_nothing() -> None:
    a, b = pair(expiry_margin=30.0, expectations=True)
    a.kernel_events([Event(EventKind.NEW, master(), 0)], 0.0)
    expect_event(a, EventKind.NEW, exp(), 0.0)
    deliver(a, b, 0.0)
    # v2: an attribute that claims 64 bytes and has 8. It was stored unchecked, and then the
    # timer (expiry), a MASTER commit and inject mode raised on it
    forged(a, exp().key, struct.pack("=HH", 64, ct.CTA_EXPECT_TIMEOUT) + bytes(4))
    deliver(a, b, 1.0)
    assert exp().key not in b.peers[1].external and b.stats["flows_refused_policy"] == 1
    assert b.external_expectations(2.0) == []
    for t in range(2, 130):
        b.handle_timer(float(t))
    assert master().key in b.peers[1].external
    assert expectation.timeout_of(struct.pack("=HH", 64, ct.CTA_EXPECT_TIMEOUT) + bytes(4)) == 0  # never raises


def test_an_update_cannot_move_an_expectation_outside_the_accept_list() -> None:
    a, b = pair(expectations=True)
    b.reconfigure(peer_filters={1: FlowFilter(accept=(ipaddress.ip_network("192.0.2.0/24"),))})
    expect_event(a, EventKind.NEW, exp(), 0.0)  # master 192.0.2.10 -> 203.0.113.20: inside
    deliver(a, b, 0.0)
    assert exp().key in b.peers[1].external
    # the same key (same tuple), its master now 10.9.9.9 -> 10.9.9.8: outside
    outside = builders.build_expectation(ct.AF_INET, bytes((10, 9, 9, 9)), bytes((10, 9, 9, 8)), 30002, 40000)
    moved = codec.Entry(exp().key, ct.AF_INET, exp().attrs.replace(
        codec.attr_map(exp().attrs)[ct.CTA_EXPECT_MASTER], codec.attr_map(outside.attrs)[ct.CTA_EXPECT_MASTER]))
    expect_event(a, EventKind.NEW, moved, 1.0)
    deliver(a, b, 1.0)
    assert exp().key not in b.peers[1].external and b.stats["flows_refused_policy"] == 1


def test_a_source_the_mask_leaves_open_is_no_source_inside_the_accept_list() -> None:
    """A tuple whose source is inside, with a source mask of 0 (any source) and a destination
    outside, opened the destination to everyone."""
    accept = FlowFilter(accept=(ipaddress.ip_network("192.0.2.0/24"),))
    wide = builders.build_expectation(ct.AF_INET, CLIENT, bytes((10, 9, 9, 9)), 22, 40000)
    m = codec.attr_map(wide.attrs)
    open_mask = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_TCP, bytes(4), b"\xff" * 4, 0, 0xFFFF)
    forged_attrs = wide.attrs.replace(m[ct.CTA_EXPECT_MASK], open_mask)
    # its master inside too (192.0.2.10 -> 192.0.2.20): only the mask makes the difference
    inside_master = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_TCP, CLIENT, bytes((192, 0, 2, 20)), 40000, 21)
    forged_attrs = forged_attrs.replace(m[ct.CTA_EXPECT_MASTER], inside_master)
    assert not accept.accepts_expectation(codec.Entry(wide.key, ct.AF_INET, forged_attrs))
    # the same with the source masked exactly (as the FTP helper does): taken, its source is inside
    assert accept.accepts_expectation(codec.Entry(wide.key, ct.AF_INET,
                                                  wide.attrs.replace(m[ct.CTA_EXPECT_MASTER], inside_master)))
    # and whatever a peer says, no expectation is written for longer than any helper expects
    a, b = pair(expectations=True)
    expect_event(a, EventKind.NEW, exp(timeout=0xFFFFFFF0), 0.0)
    deliver(a, b, 0.0)
    assert b.external_expectations(0.0)[0][1] == expectation.TIMEOUT_MAX


def test_a_node_without_expectation_sync_takes_none() -> None:
    a, b = pair()
    a.config = dataclasses.replace(a.config, expectations=True)
    expect_event(a, EventKind.NEW, exp(), 0.0)
    deliver(a, b, 0.0)
    assert b.expectation_counts() == (0, 0) and b.stats["flows_refused_policy"] == 1


def test_a_bulk_after_a_resync_carries_each_master_before_its_expectations() -> None:
    a, _b = pair(expectations=True)
    expect_event(a, EventKind.NEW, exp(), 0.0)
    a.kernel_resync([master()] + [flow(i) for i in range(300)], 0.0, announce=False)
    order = list(a.internal)
    assert order.index(master().key) < order.index(exp().key)


def test_an_expectation_that_ends_while_its_dump_runs_is_not_brought_back() -> None:
    a, _b = pair(expectations=True)
    expect_event(a, EventKind.NEW, exp(), 0.0)
    # the dump read it; then its DESTROY came, before the dump was applied
    dumped = [exp()]
    expect_event(a, EventKind.DESTROY, exp(), 0.5)
    a.kernel_expect_resync(dumped, 1.0, newer={exp().key})
    assert a.internal_cache.expectations() == []
    # and one made while the dump ran is kept, though the dump did not have it
    expect_event(a, EventKind.NEW, exp(30005, 40003), 1.5)
    a.kernel_expect_resync([], 2.0, newer={exp(30005, 40003).key})
    assert [e.key for e in a.internal_cache.expectations()] == [exp(30005, 40003).key]


def test_a_peer_that_hears_of_an_expectation_late_gets_what_is_left_of_it() -> None:
    """A standby that restarted 250 s into a 300 s expectation was given 297 s by the bulk."""
    a, b = pair(expectations=True)
    expect_event(a, EventKind.NEW, exp(timeout=300), 0.0)
    a.internal_cache.drop_pending()  # b never heard of it
    a.bulk_send(250.0)
    for _ in range(3):
        deliver(a, b, 250.0)
        deliver(b, a, 250.0)
    ((entry, left),) = b.external_expectations(250.0)
    assert entry.key == exp().key and 49 <= left <= 51


def test_expectations_do_not_count_as_deletions_sent() -> None:
    a, b = pair(expectations=True)
    for i in range(100):
        expect_event(a, EventKind.NEW, exp(30000 + i, 40000 + i), 0.0)
    deliver(a, b, 0.0)
    assert a.stats["deletes_sent"] == 0 and a.stats["flows_sent"] == 100


def test_the_count_of_a_peers_expectations_follows_every_way_in_and_out() -> None:
    """`stats` and every metrics scrape read it: it is kept as expectations come and go (a pass
    over the copies cost 30-40 ms of the loop at 1M), so every way in and out is checked here
    against the copy itself: arrival, deletion, expiry, a restarted peer's bulk, a flush."""
    lab = Lab(2, expectations=True, expiry_margin=30.0)
    a = lab.engines[1]

    def counted() -> int:
        copy = lab.engines[2].peers[1].external
        held = sum(1 for k in copy if k[0] & expectation.EXPECTATION)
        assert lab.engines[2].expectation_counts()[1] == held
        return held
    a.kernel_events([Event(EventKind.NEW, master(), 0)], lab.now)
    for port in (30002, 30003, 30004):
        expect_event(a, EventKind.NEW, exp(port, timeout=60 if port == 30004 else 3000), lab.now)
    lab.quiet()
    assert counted() == 3
    expect_event(a, EventKind.DESTROY, exp(30003), lab.now)
    lab.quiet()
    assert counted() == 2
    lab.run(120)  # 30004's 60 s and the margin ran out: expired
    assert counted() == 1 and lab.engines[2].stats["flows_expired"] >= 1
    restarted = lab.start(1)  # A's new life holds the master and no expectation: its bulk drops 30002
    restarted.kernel_resync([master()], lab.now)
    lab.run(10)
    assert counted() == 0 and master().key in lab.engines[2].peers[1].external
    expect_event(restarted, EventKind.NEW, exp(30005, timeout=3000), lab.now)
    lab.quiet()
    assert counted() == 1
    lab.engines[2].flush_external()
    assert counted() == 0

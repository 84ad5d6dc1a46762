"""The event fast path (ctbridge.sync.intake) against the general path: real kernel messages
(captured), random entries of every shape the strategies make, filters, our own echo, and
layouts that look alike but are not. Two engines get the same messages, one through
kernel_messages(), one through decode_events() + kernel_events(); their caches must be equal."""

from __future__ import annotations

import ipaddress
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec
from ctbridge.conntrack.codec import Entry
from ctbridge.sync import wire
from ctbridge.sync.engine import Engine, EngineConfig
from ctbridge.sync.filter import FlowFilter
from tests.support import FIXTURES, builders, strategies
from tests.support.enginelab import KEY

CAPTURED = json.loads(FIXTURES.joinpath("ctnetlink.json").read_text())
NEW_FLAGS = ct.NLM_F_CREATE | ct.NLM_F_EXCL


def event(entry: Entry, kind: str = "new", pid: int = 0, seq: int = 1) -> bytes:
    mtype = ct.MSG_CT_DELETE if kind == "destroy" else ct.MSG_CT_NEW
    msg = codec.message(mtype, NEW_FLAGS if kind == "new" else 0, seq, entry.family, entry.attrs)
    return msg[:12] + pid.to_bytes(4, "little") + msg[16:]


def pair(flow_filter: FlowFilter | None = None) -> tuple[Engine, Engine]:
    auth = wire.Auth([KEY])
    cfg = EngineConfig(node_id=1, filter=flow_filter or FlowFilter())
    return Engine(cfg, auth, 1, 0.0), Engine(cfg, auth, 1, 0.0)


def same(buffers: list[bytes], flow_filter: FlowFilter | None = None, skip: int = -1) -> Engine:
    fast, general = pair(flow_filter)
    keys = fast.kernel_messages(buffers, 1.0, skip)
    events = [e for b in buffers for e in codec.decode_events(b, skip)]
    general.kernel_events(events, 1.0)
    assert fast.internal == general.internal
    assert list(fast.internal_cache.pending_keys()) == list(general.internal_cache.pending_keys())
    assert keys == [e.entry.key for e in events]
    return fast


def test_captured_kernel_events_take_the_fast_path_and_agree() -> None:
    buffers = [bytes.fromhex(f["hex"]) for f in CAPTURED if f["what"].startswith("event")]
    kernel = same(buffers)
    assert kernel.intake.fast == 3 and kernel.intake.slow == 0
    # every captured flow (tcp, udp, icmp, icmpv6, sctp, gre, udplite) as a new, updated, deleted event
    entries = [codec.decode_dump(bytes.fromhex(f["hex"])).entries[0] for f in CAPTURED if f["what"] == "dump"]
    buffers = [event(e, kind) for kind in ("new", "update", "destroy") for e in entries]
    kernel = same(buffers + buffers)  # the second time each layout has its plan
    assert kernel.intake.fast >= len(buffers)


def test_a_burst_of_one_layout_is_read_by_one_plan() -> None:
    flows = builders.tcp_flows(500) + builders.tcp_flows(120_500)[120_000:]  # from 198.51.100.1 and .3
    kernel = same([event(e) for e in flows])
    assert kernel.intake.fast == 1000 and len(kernel.intake.plans) == 1
    # filters apply to what the plan reads: ignored sources, protocols, TCP states
    half = FlowFilter(ignore=(ipaddress.ip_network("198.51.100.2/31"),))
    assert len(same([event(e) for e in flows], half).internal) == 500
    assert same([event(e) for e in flows], FlowFilter(protocols=frozenset({ct.IPPROTO_UDP}))).internal == {}
    assert same([event(e) for e in flows], FlowFilter(tcp_states=frozenset({4}))).internal == {}
    assert len(same([event(e) for e in flows], FlowFilter(tcp_states=frozenset({3}))).internal) == 1000


def test_our_own_echo_is_skipped_and_odd_buffers_take_the_general_path() -> None:
    flows = builders.tcp_flows(3)
    kernel = same([event(flows[0], pid=77), event(flows[1])], skip=77)
    assert list(kernel.internal) == [flows[1].key]
    two = event(flows[0]) + event(flows[1])  # two messages in one buffer
    kernel = same([two, event(flows[2], seq=9)])
    assert kernel.intake.slow == 1 and len(kernel.internal) == 3


def test_a_look_alike_layout_is_not_read_with_the_wrong_plan() -> None:
    """Same length, type, flags and first attribute headers, another layout behind them: the
    struct check of every header the plan relies on sends it to the general path."""
    e = builders.tcp_flows(1)[0]
    base = event(e)
    same([base])
    # move the mark attribute's header: same length, different type at the same offset
    attrs = codec.iter_attrs(base, 20, len(base))
    t, s, _end = attrs[-1]
    bent = bytearray(base)
    bent[s - 2:s] = ((t + 40) & 0x3FFF).to_bytes(2, "little")
    fast, general = pair()
    fast.kernel_messages([base, bytes(bent)], 1.0)
    general.kernel_events(codec.decode_events(base) + codec.decode_events(bytes(bent)), 1.0)
    assert fast.internal == general.internal and fast.intake.slow == 1


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(strategies.entries(), st.sampled_from(["new", "update", "destroy"])), min_size=1,
                max_size=12),
       st.sampled_from([None, FlowFilter(ignore=(ipaddress.ip_network("192.0.2.0/24"),)),
                        FlowFilter(tcp_states=frozenset({3, 5})), FlowFilter(protocols=frozenset({6, 17}))]))
def test_random_entries_agree_with_the_general_path(items: list[tuple[tuple[Entry, dict], str]],
                                                     flow_filter: FlowFilter | None) -> None:
    buffers = [event(entry, kind, seq=i) for i, ((entry, _fields), kind) in enumerate(items)]
    same(buffers + buffers, flow_filter)


def test_a_message_the_codec_cannot_read_is_counted_and_the_rest_applied() -> None:
    """No CTA_TUPLE_ORIG, a truncated attribute, an empty CTA_PROTO_NUM: each crashed the daemon's
    event reader (which restarted the daemon); now each is counted and dropped."""
    flows = builders.tcp_flows(2)
    no_orig = codec.message(ct.MSG_CT_NEW, NEW_FLAGS, 1, ct.AF_INET, codec.attr(ct.CTA_MARK, bytes(4)))
    truncated = event(flows[0])[:-3]
    truncated = len(truncated).to_bytes(4, "little") + truncated[4:]
    ip = codec.attr(ct.CTA_TUPLE_IP, codec.attr(ct.CTA_IP_V4_SRC, bytes(4)) + codec.attr(ct.CTA_IP_V4_DST, bytes(4)),
                    nested=True)
    empty_proto = ip + codec.attr(ct.CTA_TUPLE_PROTO, codec.attr(ct.CTA_PROTO_NUM, b""), nested=True)
    odd = builders.build_entry(ct.AF_INET, empty_proto, empty_proto)
    fast, _general = pair()
    fast.kernel_messages([no_orig, truncated, event(odd), event(flows[1])], 1.0)
    assert fast.stats["kernel_malformed"] == 2 and flows[1].key in fast.internal
    assert odd.key in fast.internal  # protocol 0, as the general path reads an empty number


def _tuple(src: bytes, dst: bytes, sport: int, dport: int, ip: bytes | None = None,
           proto: int = ct.IPPROTO_TCP) -> bytes:
    ip = ip if ip is not None else codec.attr(ct.CTA_IP_V4_SRC, src) + codec.attr(ct.CTA_IP_V4_DST, dst)
    ports = (codec.attr(ct.CTA_PROTO_NUM, bytes((proto,))) + codec.attr(ct.CTA_PROTO_SRC_PORT, sport.to_bytes(2, "big"))
             + codec.attr(ct.CTA_PROTO_DST_PORT, dport.to_bytes(2, "big")))
    return codec.attr(ct.CTA_TUPLE_IP, ip, nested=True) + codec.attr(ct.CTA_TUPLE_PROTO, ports, nested=True)


def _message(orig: bytes, reply: bytes, tail: bytes, seq: int = 1) -> bytes:
    attrs = codec.attr(ct.CTA_TUPLE_ORIG, orig, nested=True) + codec.attr(ct.CTA_TUPLE_REPLY, reply, nested=True)
    return codec.message(ct.MSG_CT_NEW, NEW_FLAGS, seq, ct.AF_INET, attrs + tail)


def test_crafted_look_alikes_found_by_review_take_the_general_path() -> None:
    """Messages the kernel does not write but a process with CAP_NET_ADMIN could: each was read
    differently by a plan than by the general path."""
    a, b, c = bytes((198, 51, 100, 7)), bytes((203, 0, 113, 9)), bytes((192, 0, 2, 66))
    tail = codec.attr(ct.CTA_STATUS, (0xE).to_bytes(4, "big")) + codec.attr(ct.CTA_TIMEOUT, (100).to_bytes(4, "big"))
    learn = _message(_tuple(a, b, 1000, 443), _tuple(b, a, 443, 1000), tail)
    # a duplicate source address where the destination was, with an ignore filter
    dup = _message(_tuple(a, b, 1001, 443, ip=codec.attr(ct.CTA_IP_V4_SRC, a) + codec.attr(ct.CTA_IP_V4_SRC, c)),
                   _tuple(b, a, 443, 1001), tail, seq=2)
    same([learn, dup], FlowFilter(ignore=(ipaddress.ip_network("192.0.2.0/24"),), tcp_states=frozenset({3})))
    # CTA_ZONE not third: learnt with zone 0 there, then zone 5 at the same place
    ztail = tail + codec.attr(ct.CTA_ZONE, (0).to_bytes(2, "big"))
    same([_message(_tuple(a, b, 1, 2), _tuple(b, a, 2, 1), ztail),
          _message(_tuple(a, b, 3, 4), _tuple(b, a, 4, 3), tail + codec.attr(ct.CTA_ZONE, (5).to_bytes(2, "big")))])
    # a plan learnt from another protocol with a PROTOINFO, then TCP: its state must be read
    info = codec.attr(ct.CTA_PROTOINFO, codec.attr(ct.CTA_PROTOINFO_TCP, codec.attr(ct.CTA_PROTOINFO_TCP_STATE,
                                                                                    b"\x07"), nested=True), nested=True)
    same([_message(_tuple(a, b, 5, 6, proto=136), _tuple(b, a, 6, 5, proto=136), tail + info),
          _message(_tuple(a, b, 7, 8), _tuple(b, a, 8, 7), tail + info, seq=2)], FlowFilter(tcp_states=frozenset({3})))
    # our own echo first in a buffer of two messages: the second is not ours
    flows = builders.tcp_flows(2)
    kernel = same([event(flows[0], pid=77) + event(flows[1])], skip=77)
    assert list(kernel.internal) == [flows[1].key]


@settings(max_examples=100, deadline=None)
@given(st.lists(strategies.entries(), min_size=1, max_size=10),
       st.sampled_from([FlowFilter(), FlowFilter(ignore=(ipaddress.ip_network("192.0.2.0/24"),
                                                         ipaddress.ip_network("198.51.100.7/32"))),
                        FlowFilter(ignore=(ipaddress.ip_network("198.51.100.0/25"),)),
                        FlowFilter(ignore=(ipaddress.ip_network("203.0.113.1/32"),)),  # builders' reply source
                        FlowFilter(ignore=(ipaddress.ip_network("203.0.113.0/24"),)),
                        FlowFilter(tcp_states=frozenset({3, 5})), FlowFilter(protocols=frozenset({6, 17}))]))
def test_a_receivers_filter_per_datagram_agrees_with_accepts_message(items: list[tuple[Entry, dict]],
                                                                     flow_filter: FlowFilter) -> None:
    """FlowFilter.refused_among (one call per datagram, ExternalCaches.take_flows) refuses among
    the flows new to a copy exactly those accepts_message refuses, flow by flow."""
    entries = [entry for entry, _fields in items] + builders.tcp_flows(2)
    body = b"".join(wire.flow_msg(i + 1, codec.strip_local(entry)) for i, entry in enumerate(entries))
    flows, _others = wire.decode_body(body, 0, len(body))
    known = {flows[0][1]}  # already in the copy: not looked at
    want = set()
    for i, (_version, key, msg) in enumerate(flows):
        if key in known:
            continue
        try:
            if not flow_filter.accepts_message(key, msg[1], msg, wire.FLOW_HEADER):
                want.add(i)
        except codec.CodecError:
            want.add(i)
    assert flow_filter.refused_among(flows, wire.FLOW_HEADER, known) == want

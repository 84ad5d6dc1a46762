"""The no-sync selection (filter.no_sync_*: ct mark, ct label, zone, destination port): the
userspace check (ctbridge.sync.filter.NoSync) on the sender and the receiver, and the event
socket's kernel-side filter (ctbridge.conntrack.eventfilter), which must drop exactly the
events of flows the userspace check refuses (run here by an interpreter of its instructions;
tests/kernel/test_eventfilter.py runs it in the kernel)."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec, eventfilter
from ctbridge.conntrack.codec import Entry, Event, EventKind
from ctbridge.sync import wire
from ctbridge.sync.engine import Engine, EngineConfig
from ctbridge.sync.filter import FlowFilter, NoSync
from tests.support import builders, cbpf
from tests.support.enginelab import KEY

NEW_FLAGS = ct.NLM_F_CREATE | ct.NLM_F_EXCL
SELECTION = NoSync(marks=((0x100, 0x100), (7, 0xFFFFFFFF)), labels=frozenset({3, 64, 127}), zones=frozenset({9}),
                   ports=((53, 53), (5060, 5061)))


def labels(*bits: int) -> bytes:
    """CTA_LABELS as the kernel writes it: 128 bits as unsigned longs in host order."""
    size = struct.calcsize("@L")
    words = [0] * (16 // size)
    for b in bits:
        words[b // (8 * size)] |= 1 << (b % (8 * size))
    return codec.attr(ct.CTA_LABELS, struct.pack(f"@{len(words)}L", *words))


def entry(i: int = 1, mark: int = 0, zone: int = 0, dport: int = 443, bits: tuple[int, ...] = (),
          proto: int = ct.IPPROTO_TCP) -> Entry:
    src, dst = bytes((198, 51, 100, 1 + i % 250)), bytes((203, 0, 113, 9))
    if proto == ct.IPPROTO_ICMP:
        orig = builders.encode_tuple(ct.AF_INET, proto, src, dst, icmp=(8, 0, i))
        reply = builders.encode_tuple(ct.AF_INET, proto, dst, src, icmp=(0, 0, i))
    else:
        orig = builders.encode_tuple(ct.AF_INET, proto, src, dst, 1024 + i, dport)
        reply = builders.encode_tuple(ct.AF_INET, proto, dst, src, dport, 1024 + i)
    return builders.build_entry(ct.AF_INET, orig, reply, mark=mark, zone=zone,
                                tcp_state=3 if proto == ct.IPPROTO_TCP else None,
                                extra=labels(*bits) if bits else b"")


def message(e: Entry, mtype: int = ct.MSG_CT_NEW) -> bytes:
    return codec.message(mtype, NEW_FLAGS if mtype == ct.MSG_CT_NEW else 0, 1, e.family, e.attrs)


def test_each_way_of_selecting_a_flow() -> None:
    assert not SELECTION.refuses(entry().key, entry().attrs)
    for e in (entry(mark=0x1100), entry(mark=7), entry(bits=(3,)), entry(bits=(127,)), entry(bits=(1, 64)),
              entry(zone=9), entry(dport=53), entry(dport=5061)):
        assert SELECTION.refuses(e.key, e.attrs), e
    for e in (entry(mark=0x200), entry(mark=0x6), entry(bits=(2, 4)), entry(zone=8), entry(dport=5062),
              entry(proto=ct.IPPROTO_ICMP)):
        assert not SELECTION.refuses(e.key, e.attrs), e
    # a selection of mark 0 under a mask names the flows without a mark too
    zero = NoSync(marks=((0, 0x1),))
    assert zero.refuses(entry().key, entry().attrs) and not zero.refuses(entry(mark=1).key, entry(mark=1).attrs)


@st.composite
def flows(draw: st.DrawFn) -> Entry:
    proto = draw(st.sampled_from([ct.IPPROTO_TCP, ct.IPPROTO_UDP, ct.IPPROTO_ICMP]))
    return entry(draw(st.integers(0, 200)), mark=draw(st.sampled_from([0, 7, 8, 0x100, 0x1FF, 0x200])),
                 zone=draw(st.sampled_from([0, 1, 9])),
                 dport=draw(st.sampled_from([52, 53, 54, 443, 5060, 5061, 5062])),
                 bits=tuple(draw(st.sets(st.sampled_from([0, 3, 5, 63, 64, 126, 127]), max_size=3))), proto=proto)


SELECTIONS = st.builds(
    NoSync,
    marks=st.lists(st.sampled_from([(0x100, 0x100), (7, 0xFFFFFFFF), (0, 0x1), (0x200, 0xF00)]), max_size=2).map(tuple),
    labels=st.frozensets(st.sampled_from([0, 3, 64, 127]), max_size=2),
    zones=st.frozensets(st.sampled_from([0, 1, 9]), max_size=2),
    ports=st.lists(st.sampled_from([(53, 53), (5060, 5061), (1, 100)]), max_size=2).map(tuple))


@settings(max_examples=400, deadline=None)
@given(flows(), SELECTIONS)
def test_the_kernel_filter_drops_exactly_what_the_selection_refuses(e: Entry, selection: NoSync) -> None:
    prog = eventfilter.program(selection.marks, selection.labels, selection.zones, selection.ports)
    dropped = cbpf.run(prog, message(e)) == eventfilter.DROP
    assert dropped == selection.refuses(e.key, e.attrs)
    # deletions and expectations always pass
    assert cbpf.run(prog, message(e, ct.MSG_CT_DELETE)) == eventfilter.PASS
    assert cbpf.run(prog, message(e, ct.MSG_EXP_NEW)) == eventfilter.PASS


def test_a_selection_too_long_for_one_filter_is_refused() -> None:
    many = tuple((p, p) for p in range(1, 200))
    try:
        eventfilter.program(ports=many)
    except ValueError as exc:
        assert "too long" in str(exc)
    else:
        raise AssertionError("200 port ranges fit one filter's forward jumps")


def pair(a_filter: FlowFilter, b_filter: FlowFilter) -> tuple[Engine, Engine]:
    a = Engine(EngineConfig(node_id=1, filter=a_filter), wire.Auth([KEY]), epoch=1, now=0.0)
    b = Engine(EngineConfig(node_id=2, filter=b_filter), wire.Auth([KEY]), epoch=1, now=0.0)
    for _ in range(3):
        deliver(a, b)
        deliver(b, a)
    return a, b


def deliver(src: Engine, dst: Engine) -> None:
    for data, _ in src.datagrams_to_send(0.0):
        dst.receive_datagram(data, 0.0)


def test_the_sender_leaves_no_sync_flows_out_through_both_event_paths() -> None:
    a, b = pair(FlowFilter(no_sync=SELECTION), FlowFilter())
    kept, left = entry(1), [entry(2, mark=0x100), entry(3, zone=9), entry(4, dport=53), entry(5, bits=(64,))]
    a.kernel_messages([message(e) for e in (kept, *left[:2])], 0.0)
    a.kernel_events([Event(EventKind.NEW, e, 0) for e in left[2:]], 0.0)
    a.kernel_resync([kept, *left], 0.0)  # a dump (not filtered by the kernel) too
    deliver(a, b)
    assert set(b.peers[1].external) == {kept.key} and set(a.internal) == {kept.key}
    # a flow the ruleset marks no-sync after it went out is deleted on peers
    a.kernel_messages([message(entry(1, mark=0x100))], 0.0)
    deliver(a, b)
    assert b.peers[1].external == {}


def test_the_receiver_refuses_what_a_peer_may_not_send() -> None:
    a, b = pair(FlowFilter(), FlowFilter(no_sync=SELECTION))
    a.kernel_events([Event(EventKind.NEW, e, 0) for e in (entry(1), entry(2, mark=7), entry(3, dport=5060))], 0.0)
    deliver(a, b)
    assert set(b.peers[1].external) == {entry(1).key}
    assert b.stats["flows_refused_policy"] == 2


def test_a_flow_selected_by_its_labels_stays_left_out_when_its_updates_carry_none() -> None:
    """The kernel puts CTA_LABELS into an event only when they changed: a flow's NEW carries
    them, its later updates do not (and pass the kernel-side filter). Found by review: the first
    update without labels was replicated."""
    a, b = pair(FlowFilter(no_sync=SELECTION), FlowFilter())
    labelled, update = entry(5, bits=(3,)), entry(5)
    for events in (lambda e: a.kernel_messages([message(e)], 0.0),
                   lambda e: a.kernel_events([Event(EventKind.UPDATE, e, 0)], 0.0)):
        events(labelled)
        events(update)
        deliver(a, b)
        assert b.peers[1].external == {} and a.internal == {}
    # its end forgets it: the same tuple later, without the label, is replicated
    a.kernel_messages([message(update, ct.MSG_CT_DELETE), message(entry(5))], 0.0)
    deliver(a, b)
    assert set(b.peers[1].external) == {update.key}


def test_a_flow_marked_no_sync_after_it_went_out_leaves_its_peers_at_its_refresh() -> None:
    """The update that set the mark stopped in the kernel (the kernel-side filter): the refresh
    sweep, which reads the table, sent the flow again with the mark. Found by review."""
    a, b = pair(FlowFilter(no_sync=SELECTION), FlowFilter())
    a.kernel_messages([message(entry(5, mark=0))], 0.0)
    deliver(a, b)
    assert entry(5).key in b.peers[1].external
    dump = [codec.message(ct.MSG_CT_NEW, ct.NLM_F_MULTI, 1, ct.AF_INET, entry(5, mark=7).attrs)]
    assert a.internal_cache.kernel_refresh(dump, 10.0**6, 10.0**6) == 0
    deliver(a, b)
    assert b.peers[1].external == {} and a.internal == {}

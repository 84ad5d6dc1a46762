"""What a node holds back before it goes out (ctbridge.sync.holdback), with a fake clock, through
both ways kernel events come in (the hot loop over netlink messages, and decoded events):

- sync.delay: a flow is replicated only once it has lived that long; one that ends sooner is
  never sent, nor is its deletion; per protocol overrides; bulks and digests leave young flows
  out; a young flow seen by a dump stays young.
- sync.coalesce: updates of a flow peers have go out once per window, new flows and deletions
  at once, and a deletion is sent once even when an update of its flow was held."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec
from ctbridge.conntrack.codec import Entry, Event, EventKind
from ctbridge.sync import wire
from ctbridge.sync.engine import Engine, EngineConfig
from tests.support import builders
from tests.support.enginelab import KEY, flow

NEW_FLAGS = ct.NLM_F_CREATE | ct.NLM_F_EXCL
Feed = Callable[[Engine, str, Entry, float], None]


def _messages(engine: Engine, kind: str, entry: Entry, now: float) -> None:
    mtype = ct.MSG_CT_DELETE if kind == "destroy" else ct.MSG_CT_NEW
    engine.kernel_messages([codec.message(mtype, NEW_FLAGS if kind == "new" else 0, 1, entry.family,
                                          entry.attrs)], now)


def _events(engine: Engine, kind: str, entry: Entry, now: float) -> None:
    engine.kernel_events([Event({"new": EventKind.NEW, "update": EventKind.UPDATE,
                                 "destroy": EventKind.DESTROY}[kind], entry, 0)], now)


FEEDS = pytest.mark.parametrize("feed", [_messages, _events], ids=["messages", "events"])


def pair(**config: object) -> tuple[Engine, Engine]:
    a = Engine(EngineConfig(node_id=1, **config), wire.Auth([KEY]), epoch=1, now=0.0)  # type: ignore[arg-type]
    b = Engine(EngineConfig(node_id=2), wire.Auth([KEY]), epoch=1, now=0.0)
    for _ in range(3):
        deliver(a, b, 0.0)
        deliver(b, a, 0.0)
    assert a.peers[2].proven and b.peers[1].proven
    return a, b


def deliver(src: Engine, dst: Engine, now: float) -> None:
    if src.get_timer() is not None and src.get_timer() <= now:  # type: ignore[operator]
        src.handle_timer(now)
    for data, _ in src.datagrams_to_send(now):
        dst.receive_datagram(data, now)
    for data, _ in dst.datagrams_to_send(now):  # acknowledgements back
        src.receive_datagram(data, now)


def udp_flow(i: int) -> Entry:
    src, dst = bytes((198, 51, 100, 7)), bytes((203, 0, 113, 53))
    orig = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_UDP, src, dst, 40000 + i, 53)
    reply = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_UDP, dst, src, 53, 40000 + i)
    return builders.build_entry(ct.AF_INET, orig, reply, timeout=30)


@FEEDS
def test_a_flow_is_replicated_only_once_it_has_lived_the_delay(feed: Feed) -> None:
    a, b = pair(delay=30.0)
    feed(a, "new", flow(1), 0.0)
    feed(a, "update", flow(1, mark=5), 10.0)
    deliver(a, b, 10.0)
    assert flow(1).key not in b.peers[1].external and flow(1).key not in a.internal
    assert a.queue_sizes()["young"] == 1
    assert a.internal_cache.deadline() == 30.0  # when it comes of age (the engine's timer: at the latest)
    deliver(a, b, 29.9)
    assert flow(1).key not in b.peers[1].external
    deliver(a, b, 30.0)
    got = b.peers[1].external[flow(1).key][0]
    assert codec.attr_map(got, wire.FLOW_HEADER)[ct.CTA_MARK] == (5).to_bytes(4, "big")  # its newest state
    assert a.stats["flows_came_of_age"] == 1 and a.queue_sizes()["young"] == 0
    # from then on it is an ordinary flow: its changes and its end go out at once
    feed(a, "update", flow(1, mark=6), 31.0)
    deliver(a, b, 31.0)
    assert codec.attr_map(b.peers[1].external[flow(1).key][0], wire.FLOW_HEADER)[ct.CTA_MARK] == (6).to_bytes(4, "big")
    feed(a, "destroy", flow(1), 32.0)
    deliver(a, b, 32.0)
    assert flow(1).key not in b.peers[1].external


@FEEDS
def test_a_flow_that_ends_young_is_never_sent(feed: Feed) -> None:
    a, b = pair(delay=30.0)
    feed(a, "new", flow(2), 0.0)
    feed(a, "destroy", flow(2), 1.5)
    sent = a.stats["flows_sent"] + a.stats["deletes_sent"]
    deliver(a, b, 1.5)
    deliver(a, b, 40.0)  # long past the delay: nothing came of age
    assert a.stats["flows_sent"] + a.stats["deletes_sent"] == sent == 0
    assert a.stats["flows_ended_young"] == 1 and a.stats["flows_came_of_age"] == 0
    assert a.queue_sizes()["young"] == 0


@FEEDS
def test_a_flow_that_ends_young_and_begins_again_waits_its_own_delay(feed: Feed) -> None:
    a, b = pair(delay=30.0)
    feed(a, "new", flow(3), 0.0)
    feed(a, "destroy", flow(3), 1.0)
    feed(a, "new", flow(3), 20.0)  # the same tuple again: young from 20
    deliver(a, b, 30.0)
    assert flow(3).key not in b.peers[1].external
    deliver(a, b, 50.0)
    assert flow(3).key in b.peers[1].external


@FEEDS
def test_the_delay_per_protocol_overrides_the_default(feed: Feed) -> None:
    a, b = pair(delay=30.0, delay_by_protocol={ct.IPPROTO_UDP: 0.0})
    feed(a, "new", udp_flow(1), 0.0)  # UDP: at once
    feed(a, "new", flow(4), 0.0)  # TCP: the default
    deliver(a, b, 0.0)
    assert udp_flow(1).key in b.peers[1].external and flow(4).key not in b.peers[1].external
    a2, b2 = pair(delay_by_protocol={ct.IPPROTO_UDP: 2.0})
    feed(a2, "new", udp_flow(1), 0.0)
    feed(a2, "new", flow(4), 0.0)
    deliver(a2, b2, 0.0)
    assert flow(4).key in b2.peers[1].external and udp_flow(1).key not in b2.peers[1].external
    deliver(a2, b2, 2.0)
    assert udp_flow(1).key in b2.peers[1].external


def test_young_flows_are_in_no_bulk_and_a_dump_leaves_them_young() -> None:
    a, b = pair(delay=30.0)
    a.kernel_events([Event(EventKind.NEW, flow(i), 0) for i in (1, 2)], 0.0)
    # a dump (the daemon's start or an overrun) finds both in the kernel: they stay young
    a.kernel_resync([flow(1), flow(2), flow(9)], 1.0)
    assert flow(1).key not in a.internal and flow(9).key in a.internal
    a.bulk_send(1.0)
    deliver(a, b, 1.0)
    assert set(b.peers[1].external) == {flow(9).key}
    deliver(a, b, 30.0)
    assert set(b.peers[1].external) == {flow(1).key, flow(2).key, flow(9).key}


@FEEDS
def test_updates_are_coalesced_within_the_window_new_flows_and_deletions_are_not(feed: Feed) -> None:
    a, b = pair(coalesce=0.005)
    feed(a, "new", flow(5), 0.0)
    deliver(a, b, 0.0)  # a new flow goes at once
    assert flow(5).key in b.peers[1].external
    before = a.stats["flows_sent"]
    feed(a, "update", flow(5, mark=1), 0.001)  # SYN_RECV, ESTABLISHED: within a round trip
    deliver(a, b, 0.001)
    feed(a, "update", flow(5, mark=2), 0.002)
    deliver(a, b, 0.002)
    assert a.stats["flows_sent"] == before and a.queue_sizes()["held"] == 1
    assert a.internal_cache.deadline() == pytest.approx(0.006)  # the window from the first held update
    deliver(a, b, 0.006)
    assert a.stats["flows_sent"] == before + 1  # once, in its state then
    assert codec.attr_map(b.peers[1].external[flow(5).key][0], wire.FLOW_HEADER)[ct.CTA_MARK] == (2).to_bytes(4, "big")
    assert a.stats["updates_coalesced"] == 1
    # an update held, then the flow ends: the DELETE goes at once, and once
    feed(a, "update", flow(5, mark=3), 1.0)
    feed(a, "destroy", flow(5), 1.001)
    deliver(a, b, 1.001)
    assert flow(5).key not in b.peers[1].external
    deletes = a.stats["deletes_sent"]
    deliver(a, b, 1.01)
    assert a.stats["deletes_sent"] == deletes == 1 and a.queue_sizes()["held"] == 0


@FEEDS
def test_without_coalescing_every_update_goes_out(feed: Feed) -> None:
    a, b = pair()
    feed(a, "new", flow(6), 0.0)
    deliver(a, b, 0.0)
    for i in range(1, 4):
        feed(a, "update", flow(6, mark=i), i * 0.001)
        deliver(a, b, i * 0.001)
    assert a.stats["flows_sent"] == 4 and a.stats["updates_coalesced"] == 0


# --- found by review: each failed before its fix -------------------------------------------------

@FEEDS
def test_a_flow_begun_again_while_its_delete_waits_comes_of_age_newer_than_that_delete(feed: Feed) -> None:
    """A young flow's message kept the version of its event; the DELETE of the same tuple before
    it, still queued, took a higher one when it was sent, and the peer dropped the flow that came
    of age as older than its tombstone (stale_ignored)."""
    a, b = pair(delay=5.0)
    feed(a, "new", flow(1), 0.0)
    deliver(a, b, 5.0)
    assert flow(1).key in b.peers[1].external
    feed(a, "destroy", flow(1), 100.0)
    feed(a, "new", flow(1, mark=7), 100.0)  # the same tuple again, before the DELETE went out
    deliver(a, b, 100.0)
    assert flow(1).key not in b.peers[1].external
    deliver(a, b, 105.0)
    assert flow(1).key in b.peers[1].external and b.stats["stale_ignored"] == 0


def test_a_dump_reconciles_young_flows() -> None:
    """An overrun lost a young flow's end: the dump that follows lacks it, and it never comes of
    age (it came of age, and peers held a flow no kernel had); a young flow the dump shows changed
    comes of age in the dump's state."""
    a, b = pair(delay=5.0)
    a.kernel_events([Event(EventKind.NEW, flow(i), 0) for i in (1, 2)], 0.0)
    a.kernel_resync([flow(2, mark=9), flow(3)], 2.0)  # flow 1 ended meanwhile; flow 2's update was lost
    assert a.queue_sizes()["young"] == 1
    deliver(a, b, 5.0)
    assert set(b.peers[1].external) == {flow(2).key, flow(3).key}
    mark = codec.attr_map(b.peers[1].external[flow(2).key][0], wire.FLOW_HEADER)[ct.CTA_MARK]
    assert mark == (9).to_bytes(4, "big")


def test_a_dump_takes_its_flows_out_of_the_held_updates() -> None:
    """A held update of a flow the dump found gone: its DELETE went, and when the window ended
    the key went out again, a second DELETE newer than the flow begun again meanwhile."""
    a, b = pair(coalesce=0.5, delay=1.0)
    a.kernel_events([Event(EventKind.NEW, flow(1), 0)], 0.0)
    deliver(a, b, 1.0)
    a.kernel_events([Event(EventKind.UPDATE, flow(1, mark=1), 0)], 2.0)  # held
    a.kernel_resync([], 2.1)  # an overrun lost its end
    a.kernel_events([Event(EventKind.NEW, flow(1, mark=2), 0)], 2.1)  # young again
    for t in (2.1, 2.6, 3.2, 4.0):
        deliver(a, b, t)
    assert flow(1).key in a.internal and flow(1).key in b.peers[1].external

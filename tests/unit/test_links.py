"""Redundant sync links: the link choice (pure, fake clock), the heartbeat on the wire and in the
engine. The daemon test with a link taken down mid-burst is tests/daemon/test_links.py."""

from __future__ import annotations

import pytest

from ctbridge.config import settings
from ctbridge.conntrack.codec import Entry, Event, EventKind
from ctbridge.sync import wire
from ctbridge.sync.engine import Engine, EngineConfig
from ctbridge.sync.events import Heard, LinkReport
from ctbridge.sync.links import LinkSelector, Switch
from tests.support.enginelab import KEY, flow

B = 0xB


def new_event(e: Entry) -> Event:
    return Event(EventKind.NEW, e, 0)


def heartbeats(sel: LinkSelector, links: list[int], t0: float, t1: float, report: int | None = None) -> float:
    """The peer's heartbeats arriving over ``links`` from t0 to t1 (every heartbeat interval),
    each saying it hears us on ``report`` (default: the same links)."""
    t = t0
    step = sel.heartbeat_interval
    bits = sum(1 << k for k in links) if report is None else report
    for _ in range(int((t1 - t0) / step) + 1):
        for k in links:
            sel.heard(B, k, t)
        sel.reported(B, bits, t)
        sel.update(t)
        t += step
    return t


def test_traffic_stays_on_the_first_link_while_it_works() -> None:
    sel = LinkSelector(3, timeout=1.0)
    heartbeats(sel, [0, 1, 2], 0.0, 10.0)
    assert sel.active(B) == 0
    assert all(sel.usable(B, k, 10.0) for k in range(3))


def test_a_dead_link_is_left_within_the_timeout_and_taken_back_once_stable() -> None:
    sel = LinkSelector(2, timeout=1.0)
    t = heartbeats(sel, [0, 1], 0.0, 5.0)
    assert sel.active(B) == 0
    # link 0 dies: the peer stops hearing us there too, and we stop hearing it
    switched_at = None
    for _ in range(20):
        sel.heard(B, 1, t)
        sel.reported(B, 0b10, t)
        if sel.update(t) == [Switch(B, 0, 1)]:
            switched_at = t
            break
        t += sel.heartbeat_interval
    assert switched_at is not None and switched_at - 5.0 <= 1.0 + sel.heartbeat_interval
    # it comes back: not at once (it might flap), but after a timeout of working
    back = None
    for _ in range(20):
        t += sel.heartbeat_interval
        sel.heard(B, 0, t)
        sel.heard(B, 1, t)
        sel.reported(B, 0b11, t)
        if sel.update(t):
            back = t
            break
    assert back is not None and sel.active(B) == 0
    assert back - switched_at >= 1.0


def test_a_link_broken_one_way_is_left_although_we_still_hear_the_peer_on_it() -> None:
    """We hear the peer on link 0, but it says it does not hear us there: link 0 is broken from
    us to it, and our data would be lost there."""
    sel = LinkSelector(2, timeout=1.0)
    t = heartbeats(sel, [0, 1], 0.0, 3.0)
    heartbeats(sel, [0, 1], t, t + 0.1, report=0b10)
    assert not sel.usable(B, 0, t + 0.1) and sel.active(B) == 1


def test_with_no_link_working_the_active_one_stays_and_the_first_to_return_wins() -> None:
    sel = LinkSelector(3, timeout=1.0)
    heartbeats(sel, [0, 1, 2], 0.0, 2.0)
    assert sel.update(10.0) == [] and sel.active(B) == 0
    heartbeats(sel, [2], 10.0, 10.5)
    assert sel.active(B) == 2


def test_a_peer_that_never_reports_counts_one_way_and_starts_where_it_was_heard() -> None:
    """A peer with one link (or an older version) sends no reports: hearing it is all we have."""
    sel = LinkSelector(2, timeout=1.0)
    sel.heard(B, 1, 0.0)
    assert sel.active(B) == 1 and sel.update(0.0) == []
    assert sel.hearing(0.5) == {B: 0b10} and sel.hearing(1.5) == {B: 0}


def test_a_flapping_link_waits_longer_each_time_before_traffic_returns() -> None:
    """Link 0 up 1.3 s, down 0.7 s, for a minute: traffic came back after every up period (37
    switches a minute); the hold-down doubles with each quick failure."""
    sel = LinkSelector(2, timeout=1.0)
    t = heartbeats(sel, [0, 1], 0.0, 20.0)
    switches = 0
    for _ in range(30):
        for links, length in (([1], 0.7), ([0, 1], 1.3)):
            for _ in range(int(length / sel.heartbeat_interval)):
                for k in links:
                    sel.heard(B, k, t)
                sel.reported(B, sum(1 << k for k in links), t)
                switches += len(sel.update(t))
                t += sel.heartbeat_interval
    assert switches <= 8  # away once, back a few times while the hold-down is still short
    t = heartbeats(sel, [0, 1], t, t + 200.0)  # stable again: back on link 0, hold-down reset
    assert sel.active(B) == 0


def test_heartbeat_on_the_wire() -> None:
    msg = wire.heartbeat_msg(2, 7, [(0x01020304, 0b101)], size=64)
    assert len(msg) == 64 and msg[:20].hex() == "0b020040" "00000007" "00010000" "01020304" "00000005"
    auth = wire.Auth([KEY])
    data = wire.datagram(wire.Header(1, 2, 0, 4), msg, auth)
    assert wire.decode(data, auth)[1] == [wire.Heartbeat(2, 7, ((0x01020304, 5),))]
    for bad in (wire.heartbeat_msg(4, 1), wire.heartbeat_msg(0, 1)[:8] + b"\x00\x05\x00\x00"):
        with pytest.raises(wire.WireError) as err:
            wire.decode(wire.datagram(wire.Header(1, 2, 0, 4), bad, auth), auth)
        assert err.value.reason == "malformed"


def engines(reliable: bool = True) -> tuple[Engine, Engine]:
    auth = wire.Auth([KEY])
    a = Engine(EngineConfig(node_id=0xA, reliable=reliable), auth, epoch=1, now=0.0)
    b = Engine(EngineConfig(node_id=B, reliable=reliable), auth, epoch=1, now=0.0)
    return a, b


def exchange(a: Engine, b: Engine, now: float) -> None:
    for _ in range(50):
        moved = False
        for src, dst in ((a, b), (b, a)):
            for data, _dest in src.datagrams_to_send(now):
                dst.receive_datagram(data, now)
                moved = True
        if not moved:
            return


def test_heartbeats_are_fresh_once_per_link_and_reports_reach_the_link_choice() -> None:
    a, b = engines()
    stranger = a.heartbeats(0.0, {B: 1}, 2)
    assert b.receive_datagram(stranger[0], 0.0) is None and b.stats["heartbeats_ignored"] == 1  # not known yet
    exchange(a, b, 0.0)
    beats = a.heartbeats(0.1, {B: 0b11}, 2)
    assert [len(d) for d in beats] == [EngineConfig(node_id=0).max_datagram] * 2  # padded
    for k, data in enumerate(beats):
        assert b.receive_datagram(data, 0.1) == Heard(0xA, k)
    assert b.events().count(LinkReport(0xA, 0b11)) == 2
    replays = b.stats["rejected_replay"]
    for data in beats:  # a replay, however recent, says nothing about a link
        assert b.receive_datagram(data, 0.2) is None
    assert b.stats["rejected_replay"] == replays + 2
    # heartbeats are outside the data stream: nothing to acknowledge, no gap, no sequence number
    assert b.peers[0xA].rx is not None and b.peers[0xA].rx.missing() is None
    assert b.stats["heartbeats_received"] == 2


@pytest.mark.parametrize("reliable", [True, False])
def test_a_heartbeat_that_overtakes_queued_data_opens_no_gap(reliable: bool) -> None:
    """Heartbeat copies over an idle link arrive before data queued on the busy one. When they took
    data sequence numbers, best effort gave up on the data (64 behind) and lost 7,000 of 20,000
    flows; reliable mode NACKed, resent and halved its window for nothing."""
    a, b = engines(reliable)
    exchange(a, b, 0.0)
    a.kernel_events([new_event(flow(i)) for i in range(5000)], 1.0)
    queued: list[bytes] = []
    for _ in range(8):  # a burst at a time (EngineConfig.burst), all queued before the heartbeat
        queued += [d for d, _ in a.datagrams_to_send(1.0)]
    assert len(queued) > 64
    for data in a.heartbeats(1.0, {B: 0b11}, 2):
        b.receive_datagram(data, 1.0)
    for data in queued:
        b.receive_datagram(data, 1.001)
    assert b.stats["rejected_replay"] == 0 and b.stats["nacks_sent"] == 0
    assert len(b.peers[0xA].external) == a.stats["flows_sent"] > 64
    assert b.peers[0xA].rx is not None and b.peers[0xA].rx.missing() is None


def test_path_change_probes_acknowledges_and_asks_for_gaps_at_once() -> None:
    a, b = engines()
    exchange(a, b, 0.0)
    a.kernel_events([new_event(flow(i)) for i in range(200)], 1.0)
    lost = a.datagrams_to_send(1.0)  # all lost on the link that just failed
    assert lost and a.recovery.in_flight() > 0
    a.path_changed(1.01, B)
    assert a.get_timer() is not None and a.get_timer() <= 1.01  # type: ignore[operator]
    a.handle_timer(1.01)
    probe = a.datagrams_to_send(1.01)
    assert a.stats["probes"] == 1 and a.stats["path_changes"] == 1 and a.recovery.srtt is None
    for data, _ in probe:
        b.receive_datagram(data, 1.02)
    assert b.stats["nacks_sent"] > 0  # the probe showed b the gap at once
    exchange(a, b, 1.03)
    assert len(b.external_caches.entries()) == 200


def test_config_takes_redundant_links_and_refuses_what_cannot_work() -> None:
    base = ('[node]\nname = "fw1"\n[sync]\nlocal = "192.0.2.1"\npeers = ["192.0.2.2", "192.0.2.3"]\n'
            'auth = "none"\n')
    good = base + ('[[sync.links]]\nlocal = "198.51.100.1"\npeers = ["198.51.100.2", "198.51.100.3"]\n'
                   '[[sync.links]]\nlocal = "2001:db8::1"\npeers = ["2001:db8::2", "2001:db8::3"]\n')
    cfg = settings.parse(good)
    assert [link.local for link in cfg.sync_links()] == ["192.0.2.1", "198.51.100.1", "2001:db8::1"]
    assert cfg.max_datagram() == 1500 - 48  # the smallest of the links' families
    cases = {
        '[[sync.links]]\nlocal = "198.51.100.1"\npeers = ["198.51.100.2"]\n': ":7: sync.links #1: 1 peer(s) but",
        '[[sync.links]]\npeers = ["198.51.100.2", "198.51.100.3"]\n': ":7: sync.links #1: has no local address",
        '[[sync.links]]\nlocal = "192.0.2.2"\npeers = ["198.51.100.2", "198.51.100.3"]\n':
            "address 192.0.2.2 is also on sync.local",
        '[[sync.links]]\nlocal = "198.51.100.1"\npeers = ["2001:db8::2", "198.51.100.3"]\n':
            "2001:db8::2 and its local address 198.51.100.1 are of different IP versions",
        '[[sync.links]]\nlocal = "198.51.100.1"\npeer = ["198.51.100.2"]\n': "unknown key 'peer'",
        '[[sync.links]]\nlocal = "198.51.100.1"\ngroup = "239.0.0.1"\npeers = ["198.51.100.2", "198.51.100.3"]\n':
            "[sync] is unicast, so links take local and peers",
        "".join(f'[[sync.links]]\nlocal = "198.51.100.{i}"\npeers = ["203.0.113.{2 * i}", "203.0.113.{2 * i + 1}"]\n'
                for i in range(1, 5)): "4 redundant links; at most 3",
    }
    for tail, expected in cases.items():
        with pytest.raises(settings.ConfigError) as err:
            settings.parse(base + tail)
        assert expected in str(err.value), (tail, str(err.value))


def test_a_peer_first_heard_on_a_later_link_moves_to_the_preferred_one_at_once() -> None:
    """Found when sessions came: the datagram that starts a peer's session is sent over every link
    and the copy on link 1 may arrive first. The peer started on link 1, and link 0, which never
    failed, had to wait out a hold-down (CI saw both nodes still on link 1 with both links up)."""
    sel = LinkSelector(2, timeout=1.0)
    sel.heard(B, 1, 0.0)
    assert sel.active(B) == 1
    heartbeats(sel, [0, 1], 0.0, 0.2)
    assert sel.active(B) == 0
    heartbeats(sel, [1], 0.4, 2.0)  # link 0 fails: left at once; now it has a hold-down
    assert sel.active(B) == 1
    heartbeats(sel, [0, 1], 2.2, 2.6)
    assert sel.active(B) == 1  # back only once stable for a timeout
    heartbeats(sel, [0, 1], 2.8, 4.0)
    assert sel.active(B) == 0

"""ctbridge.sync.recovery on its own, with a fake clock: the window's arithmetic (slow start,
congestion avoidance, one halving per round of losses), the RTT estimate and Karn's rule, the
probe's backoff, and what counts as in flight (RFC 6675's pipe)."""

from __future__ import annotations

import pytest

from ctbridge.sync import wire
from ctbridge.sync.options import EngineConfig
from ctbridge.sync.peer import Peer
from ctbridge.sync.recovery import Recovery
from ctbridge.sync.shared import Clock, Shared
from ctbridge.sync.stream import Stream

CONFIG = EngineConfig(node_id=1, initial_window=10, min_window=2, max_window=100, initial_rtt=0.02,
                      min_resend_interval=0.01, max_resend_interval=0.5, alive_interval=1.0)


def recovery(sent: int, now: float = 0.0) -> tuple[Recovery, Peer, Clock, list[tuple[float, int]]]:
    """A Recovery whose node sent datagrams 1..``sent`` at ``now`` to one live peer (node 2)."""
    stream = Stream(1, 1, wire.Auth([bytes(32)]), 0.0, 1, lambda: None)
    shared = Shared(CONFIG, stream, now)
    shared.control.clear()
    bulks: list[tuple[float, int]] = []
    rec = Recovery(shared, lambda t, node: bulks.append((t, node)))
    peer = shared.peers[2] = Peer(2, now)
    peer.epoch, peer.alive = 7, True
    for _ in range(sent):
        rec.on_sent(stream.next_seq(), (b"key",), b"", now)
    return rec, peer, shared.clock, bulks


def test_slow_start_then_one_halving_per_round_of_losses_then_one_more_per_round_trip() -> None:
    rec, peer, clock, _ = recovery(20)
    clock.latest = 0.05
    rec.on_acked(peer, 10, 0.05)
    assert rec.window == 20.0  # slow start: one more per datagram acknowledged
    assert rec.srtt == pytest.approx(0.05) and rec.rttvar == pytest.approx(0.025)  # the first sample
    assert rec.rto() == pytest.approx(0.15)  # SRTT + 4 RTTVAR
    assert list(rec.sent_at) == list(range(11, 21)) and len(rec.kept) == 10  # 1..10 let go
    rec.on_loss(11)
    assert rec.window == 10.0 and rec.stats["window_reductions"] == 1
    rec.on_loss(15)  # sent before the reduction: the same round of losses
    assert rec.window == 10.0 and rec.stats["losses"] == 2 and rec.stats["window_reductions"] == 1
    clock.latest = 0.3
    rec.on_acked(peer, 20, 0.3)
    assert rec.window == pytest.approx(11.0)  # congestion avoidance: 10 datagrams, 10/10 more


def test_an_acknowledgement_that_covers_a_resent_datagram_gives_no_rtt_sample() -> None:
    rec, peer, clock, _ = recovery(20)
    rec.on_acked(peer, 10, 0.05)
    rec.resent_at[(15, 2)] = 0.1
    clock.latest = 0.9
    rec.on_acked(peer, 20, 0.9)  # waited for the resend, not for one round trip (Karn's rule)
    assert rec.srtt == pytest.approx(0.05)
    rec2, peer2, _, _ = recovery(20)
    rec2.on_acked(peer2, 20, 0.9)
    assert rec2.srtt == pytest.approx(0.9) and rec2.rto() == 0.5  # RTO kept within max_resend_interval


def test_the_window_never_falls_below_min_window_nor_grows_above_max_window() -> None:
    rec, peer, clock, _ = recovery(300)
    for _ in range(5):
        rec.on_loss(rec.stream.sent_upto)  # each a new round: above the last reduction
        rec.on_sent(rec.stream.next_seq(), (b"key",), b"", 0.0)
    assert rec.window == CONFIG.min_window
    rec, peer, clock, _ = recovery(300)
    clock.latest = 0.01
    rec.on_acked(peer, 300, 0.01)  # slow start: 10 + 300, kept at the ceiling
    assert rec.window == CONFIG.max_window


def test_a_probe_resends_the_newest_datagram_and_backs_off_twice_as_long_each_time() -> None:
    rec, _peer, clock, _ = recovery(5)
    due = rec.deadline()
    assert due == pytest.approx(2 * 0.06)  # 2 RTO; RTO = 0.02 + 4 * 0.01 before any sample
    rec.on_timer(due - 0.001)
    assert not rec.resends
    clock.latest = due
    rec.on_timer(due)
    assert list(rec.resends) == [(5, None)] and rec.stats["probes"] == 1
    assert rec.deadline() == pytest.approx(due + 4 * 0.06)  # doubled
    rec.on_timer(rec.deadline())
    assert rec.deadline() == pytest.approx(due + 4 * 0.06 + 8 * 0.06)
    for _ in range(10):
        last = rec.deadline()
        rec.on_timer(last)
    assert rec.deadline() - last == CONFIG.alive_interval  # never longer than alive_interval


def test_in_flight_counts_what_the_peer_lacks_beyond_its_report_and_the_holes_it_named() -> None:
    rec, peer, clock, _ = recovery(20)
    clock.latest = 0.05
    rec.on_acked(peer, 10, 0.05)
    assert rec.in_flight() == 10
    rec.sacked(peer, [(12, 13)], 18, 0.06)  # it has up to 18 but 12 and 13
    assert peer.missing_count == 2 and rec.in_flight() == 20 - 18 + 2
    rec.on_acked(peer, 12, 0.07)  # 12 arrived: one hole left
    assert peer.missing == [(12, 13)] and peer.missing_count == 1 and rec.in_flight() == 3


def test_a_nack_for_what_is_no_longer_kept_is_answered_with_one_gap_and_a_bulk() -> None:
    rec, peer, _clock, bulks = recovery(20)
    rec.kept.release(5)  # 1..5 gone from the resend queue
    msg = wire.Nack(1, 1, 2, 8)
    rec.on_nack(peer, msg, 1, 0.1)
    assert rec.control == [wire.gap_msg(2, 1, 2, 5)] and bulks == [(0.0, 2)]
    assert sorted(rec.resends) == [(6, 2), (7, 2), (8, 2)]
    rec.resends.clear()
    rec.on_nack(peer, msg, 2, 0.1 + rec.rto() / 2)  # within an RTO: neither again
    assert len(rec.control) == 1 and not rec.resends and rec.stats["resends_skipped"] == 3

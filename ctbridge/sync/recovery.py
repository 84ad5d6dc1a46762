"""Loss recovery and flow control of this node's stream (docs/protocol.md, "Loss recovery and
flow control"; after RFC 9002 and RFC 6298). One object: the sender tells it what it sent
(on_sent), the receiving path what peers acknowledged (on_ack, on_acked) and reported lost
(on_nack, sacked); the engine asks for its deadline (the probe) and runs it (on_timer).

Rules:

1. Every data datagram is kept (``kept``: its flow keys and the control messages that must
   arrive) until every live peer acknowledged it; a resend carries the current state of the
   flows it named. A datagram is resent at most once per RTO per peer, however many NACKs name
   it; what is no longer kept is answered with a GAP and a bulk transfer.
2. RTT: SRTT and RTTVAR as RFC 6298, sampled from cumulative acknowledgements that cover no
   resent datagram (Karn's rule); RTO = SRTT + 4 RTTVAR within [min, max]_resend_interval.
3. Window (datagrams in flight): slow start below ssthresh, then one more per round trip; a
   round of losses (NACKed numbers above the last reduction) halves it once, never below
   min_window, never above max_window.
4. In flight counts, per peer that keeps up, what it has not reported having: beyond its newest
   report, and the holes its NACKs named (RFC 6675's pipe). A peer whose acknowledgements stood
   still for the lag limit, or that runs half a window behind the best, does not hold the
   others back (it catches up through NACK, GAP and a bulk).
5. Probe (RFC 9002 6.2): data unacknowledged and nothing acknowledged for a probe timeout
   (2 RTO, doubled per unanswered probe, at most alive_interval): resend the newest datagram.

Imports: ctbridge.sync (wire, sequence, peer, shared).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from ctbridge.sync import wire
from ctbridge.sync.peer import Peer
from ctbridge.sync.sequence import ResendQueue
from ctbridge.sync.shared import Part, Shared


class Recovery(Part):
    """RTT estimate, congestion window, what is kept for resending and what is due again."""

    def __init__(self, shared: Shared, bulk_send: Callable[[float, int], None]) -> None:
        super().__init__(shared)
        config = self.config
        self.bulk_send = bulk_send  # a bulk to a peer that lost what is no longer kept
        self.kept = ResendQueue(config.resend_limit)  # seq -> (flow keys, controls) for resending
        self.resends: OrderedDict[tuple[int, int | None], None] = OrderedDict()  # (seq, destination) to resend
        # flow control: congestion window (datagrams), RTT estimate, send and resend times
        self.window = float(config.initial_window)
        self._ssthresh = float("inf")
        self._recovery_upto = 0  # losses of datagrams up to this one were answered already
        self.srtt: float | None = None
        self.rttvar = config.initial_rtt / 2
        # seq -> when first sent (data datagrams still kept), in sequence order: released from the front
        self.sent_at: OrderedDict[int, float] = OrderedDict()
        self.resent_at: dict[tuple[int, int], float] = {}  # (seq, peer node; 0: all) -> when last resent
        self._probe_from = self.clock.latest  # when acknowledgements last moved the window (or the last probe)
        self._probes = 0  # probes since then: each waits twice as long as the one before
        # what one datagram's ACKs and NACKs said (on_ack, on_nack), taken at its end (end_of_datagram)
        self._nacked: list[tuple[int, int]] | None = None
        self._sack_high = 0

    def on_sent(self, seq: int, keys: tuple[bytes, ...], controls: bytes, now: float) -> None:
        """Datagram ``seq`` went out naming these flows and control messages (reliable mode)."""
        self.kept.add(seq, (keys, controls))
        if keys or controls:
            self.sent_at[seq] = now

    def on_ack(self, peer: Peer, msg: wire.Ack, seq: int, now: float) -> bool:
        if msg.node == self.stream.node_id and msg.epoch == self.stream.epoch:
            if msg.upto > peer.acked:
                self.on_acked(peer, min(msg.upto, self.stream.seq - 1), now)
            if msg.highest > self._sack_high:
                self._sack_high = msg.highest
        return False

    def on_nack(self, peer: Peer, msg: wire.Nack, seq: int, now: float) -> bool:
        if msg.node == self.stream.node_id and msg.epoch == self.stream.epoch:
            if self._nacked is None:
                self._nacked = []
            self._nacked.append((msg.first, msg.last))
            self.stats["nacks_received"] += 1
            if msg.first > peer.acked:
                self.on_loss(msg.first)
            self._resend_range(peer, msg.first, msg.last, now)
        return False

    def end_of_datagram(self, peer: Peer, now: float) -> None:
        """The datagram's messages were taken: what its NACK round and ACKs said beyond the
        cumulative acknowledgement counts now (one whole round, or none)."""
        nacked, high = self._nacked, self._sack_high
        if nacked is not None or high:
            self._nacked, self._sack_high = None, 0
            self.sacked(peer, nacked or [], high, now)

    def on_timer(self, now: float) -> None:
        """Rule 5: probe when due."""
        if self.sent_at and now >= self.probe_due():
            # Data is unacknowledged and nothing was acknowledged for a probe timeout: the last
            # datagrams, or the acknowledgements, were lost (a receiver cannot NACK a loss at the
            # tail: nothing came after it). Probe with the newest datagram not acknowledged: a
            # receiver that lacks earlier ones now sees the gap and NACKs all of it at once (a
            # probe with the oldest would recover one datagram per probe), one that has it answers
            # the duplicate with an acknowledgement (RFC 9002 6.2).
            newest = next(reversed(self.sent_at))
            self.resends[(newest, None)] = None
            self.resent_at[(newest, 0)] = now
            self.stats["probes"] += 1
            self._probes += 1
            self._probe_from = now

    def deadline(self) -> float:
        return self.probe_due() if self.sent_at else float("inf")  # probe: acknowledgements stopped

    def path_changed(self, now: float) -> None:
        """A new path has its own RTT (RFC 9002 9.4; one estimate serves every peer): start afresh
        and probe at once if data waits."""
        self.srtt = None
        self.rttvar = self.config.initial_rtt / 2
        self._probes = 0
        self._probe_from = now - 2.0 * self.config.alive_interval

    def new_epoch(self) -> None:
        """This node's stream began a new epoch: nothing of the old one is resent or counted."""
        self.kept = ResendQueue(self.config.resend_limit)
        self.resends.clear()
        self.sent_at.clear()
        self.resent_at.clear()
        self._recovery_upto = 0
        self._probes = 0
        for peer in self.peers.values():
            peer.acked = peer.ack_heard = peer.sack_high = peer.missing_count = peer.gap_upto = 0
            peer.missing = []

    def release(self) -> None:
        upto = self.acked_by_all()
        self.kept.release(upto)
        sent_at = self.sent_at
        while sent_at and next(iter(sent_at)) <= upto:
            sent_at.popitem(last=False)
        if self.resent_at:
            for key in [k for k in self.resent_at if k[0] <= upto]:
                del self.resent_at[key]

    def acked_by_all(self) -> int:
        live = [p.acked for p in self.peers.values() if p.alive and p.epoch >= 0]
        return min(live) if live else self.stream.seq - 1

    def in_flight(self) -> int:
        """Datagrams sent that a peer keeping up has not received as far as we know (what the
        window limits): those after the newest it reported having, and the holes it reported
        below (its NACKs name every gap, so what lies between them arrived: RFC 6675's pipe).
        Counting from the cumulative acknowledgement instead would let one lost datagram whose
        resend was lost too hold the whole window.
        A peer whose acknowledgements stopped while others' went on (it cannot hear us, or it is
        gone and not yet timed out) does not hold the others back: it catches up through NACK,
        GAP and a bulk transfer, as it would after an outage. Best effort: nothing is
        acknowledged, nothing is held back."""
        if not self.config.reliable:
            return 0
        last = self.stream.seq - 1
        limit = self._lag_limit()
        keeping_up = [p for p in self.peers.values()
                      if p.alive and p.epoch >= 0 and self.clock.latest - p.acked_at < limit]
        if not keeping_up:
            return last - self.acked_by_all()
        if len(keeping_up) > 1:
            # Nor does one that acknowledges, but half a window behind another: a member that
            # trickles acknowledgements would hold every peer's stream to its pace, the window
            # always full of what it has not acknowledged. Progress counts what a
            # peer reported having beyond a gap too, so a lossy but honest peer is not left out.
            best = max(max(p.acked, p.sack_high) for p in keeping_up)
            slack = max(int(self.window), self.config.initial_window) // 2
            keeping_up = [p for p in keeping_up if max(p.acked, p.sack_high) >= best - slack]
        pipe = max(last - max(p.acked, p.sack_high) + p.missing_count for p in keeping_up)
        # However little is in flight, never run further past an unfilled hole than the receiver
        # holds beyond one (rx_limit: then it gives up and asks for a bulk) or we keep for resending
        cfg = self.config
        if last - min(p.acked for p in keeping_up) >= min(cfg.rx_limit, cfg.resend_limit) - cfg.burst:
            return max(pipe, int(self.window))
        return pipe

    def sacked(self, peer: Peer, ranges: list[tuple[int, int]], highest: int, now: float) -> None:
        """A datagram of ``peer`` NACKed these ranges (one whole round, or none) and said it has
        everything else up to ``highest`` (a peer that does not say: up to the last range's end).
        Whatever a datagram claims, the count stays within what was sent and 4096 per range."""
        last = self.stream.seq - 1
        if not highest and ranges:
            highest = max(b for _a, b in ranges) + 1
        high = min(last, highest)
        if high > peer.sack_high:
            peer.sack_high = high
            peer.acked_at = now  # it keeps up: what it has moves on, if not its first hole
        if ranges:
            top = max(peer.sack_high, peer.acked)
            peer.missing = sorted((a, min(b, a + 4095, top)) for a, b in ranges if a <= top)
            self._count_missing(peer)

    @staticmethod
    def _count_missing(peer: Peer) -> None:
        floor = peer.acked
        top = max(peer.sack_high, peer.acked)
        count = 0
        for a, b in peer.missing:
            a = max(a, floor + 1)
            b = min(b, top)
            if b >= a:
                count += b - a + 1
                floor = b
        peer.missing_count = count

    def window_base(self) -> int:
        """The highest datagram every peer that keeps up has acknowledged (see in_flight)."""
        keeping_up = [p.acked for p in self.peers.values()
                      if p.alive and p.epoch >= 0 and self.clock.latest - p.acked_at < self._lag_limit()]
        return min(keeping_up) if keeping_up else self.acked_by_all()

    def _lag_limit(self) -> float:
        """How long a peer's acknowledgements may stand still before it stops counting for the
        window: a few probe timeouts, at least ack_delay and twice the resend interval's floor."""
        return max(4 * self.config.ack_delay, 8 * self.rto())

    def rto(self) -> float:
        """How long before a datagram may be resent again (RFC 6298: SRTT + 4 RTTVAR)."""
        srtt = self.srtt if self.srtt is not None else self.config.initial_rtt
        cfg = self.config
        return min(cfg.max_resend_interval, max(cfg.min_resend_interval, srtt + 4 * self.rttvar))

    def probe_due(self) -> float:
        """When to probe (RFC 9002 6.2: PTO = SRTT + 4 RTTVAR, doubled per probe unanswered, here
        kept below alive_interval)."""
        return self._probe_from + min(self.config.alive_interval, 2.0 * self.rto() * float(1 << min(self._probes, 16)))

    def on_acked(self, peer: Peer, upto: int, now: float) -> None:
        """An acknowledgement moved ``peer`` to ``upto``: an RTT sample (never from a resent
        datagram, Karn's rule), and the window grows by what all peers acknowledged."""
        before = self.window_base()
        sent = self.sent_at.get(upto)
        # Karn's rule, for cumulative acknowledgements: no sample when the acknowledgement also
        # covers a resent datagram (it waited for the resend, not for the round trip)
        low = max(peer.acked, before)
        clean = not any(low < seq <= upto for seq, _node in self.resent_at)
        if sent is not None and clean:
            sample = now - sent
            if self.srtt is None:
                self.srtt, self.rttvar = sample, sample / 2
            else:
                self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - sample)
                self.srtt = 0.875 * self.srtt + 0.125 * sample
        peer.acked = upto
        peer.ack_heard = upto
        if peer.missing:
            peer.missing = [(a, b) for a, b in peer.missing if b > upto]
            self._count_missing(peer)
        peer.acked_at = now
        newly = self.window_base() - before
        if newly > 0:
            self._probe_from = now
            self._probes = 0
            cfg = self.config
            if self.window < self._ssthresh:
                self.window += newly  # slow start: doubles per round trip
            else:
                self.window += newly / self.window  # congestion avoidance: one more per round trip
            self.window = min(self.window, float(cfg.max_window))
        self.release()

    def on_loss(self, first: int) -> None:
        """A peer reports datagrams from ``first`` on as lost: halve the window, once per round
        of losses (those sent before the last reduction are part of it)."""
        self.stats["losses"] += 1
        if first <= self._recovery_upto:
            return
        self._ssthresh = max(float(self.config.min_window), self.window / 2)
        self.window = self._ssthresh
        self._recovery_upto = self.stream.seq - 1
        self.stats["window_reductions"] += 1

    def _resend_range(self, peer: Peer, first: int, last: int, now: float) -> None:
        """Answer a NACK. A datagram is resent at most once per RTO, however many NACKs name it
        (a NACK that names thousands of datagrams resent a moment ago costs nothing)."""
        last = min(last, first + 4095, self.stream.seq - 1)
        # What the peer acknowledged it has: a NACK for it is stale (it was queued before the hole
        # filled, and left with the acknowledgement that says so), not to be answered with a GAP
        # and a bulk transfer of the whole table.
        first = max(first, peer.ack_heard + 1)
        oldest = self.kept.oldest()
        if oldest is None or oldest > last:
            oldest = self.stream.seq  # nothing of the range is kept
        lost_end = min(last, oldest - 1)
        if first <= lost_end and (lost_end > peer.gap_upto or now >= peer.gap_at + self.rto()):
            # Gone from the resend queue: tell the peer to stop waiting for all of it at once,
            # and rebuild its cache with one bulk transfer (bulk_send merges repeated requests).
            # Once per RTO for what a GAP already covered: every datagram of a NACK round names
            # the same range, and each would queue the same GAP.
            self.control.append(wire.gap_msg(peer.node, self.stream.epoch, first, lost_end))
            self.stats["gaps_sent"] += 1
            peer.gap_upto = max(peer.gap_upto, lost_end)
            peer.gap_at = now
            self.bulk_send(0.0, peer.node)
        interval = self.rto()
        resent_at = self.resent_at
        for seq in range(max(first, oldest), last + 1):
            if seq <= peer.acked or self.kept.get(seq) is None:
                continue
            at = resent_at.get((seq, peer.node))
            if at is not None and now - at < interval:
                self.stats["resends_skipped"] += 1
                continue
            resent_at[(seq, peer.node)] = now
            self.resends[(seq, peer.node)] = None


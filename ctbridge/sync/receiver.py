"""The receiving side of each peer's stream: what this node tells a peer about the datagrams it
got (ACK: everything up to a number; a NACK round: every gap, with how far beyond them it has
everything), what it gives up on (a peer's GAP, or too much held beyond a gap), and when.

A NACK round is one control entry (its NACKs and the ACK that says how far they cover travel in
one datagram); a newer one replaces a round, or an ACK, still queued.

Imports: ctbridge.sync (wire, sequence, peer, shared).
"""

from __future__ import annotations

from collections.abc import Callable

from ctbridge.sync import wire
from ctbridge.sync.peer import Peer
from ctbridge.sync.sequence import ReceiveWindow
from ctbridge.sync.shared import Part, Shared

NACK_RANGES = 32  # gaps one NACK round asks for (8 bytes each on the wire)


class Receiver(Part):
    """Acknowledgements and NACK rounds for every peer's stream (``Peer.rx``)."""

    def __init__(self, shared: Shared, ask_for_bulk: Callable[[Peer, float], None]) -> None:
        super().__init__(shared)
        self.ask_for_bulk = ask_for_bulk  # RESYNC to a peer whose stream we gave up on

    def replayed(self, peer: Peer, rx: ReceiveWindow, seq: int, now: float) -> None:
        """Datagram ``seq`` of ``peer``'s session came before (a duplicate or a replay)."""
        peer.rejected_at = now
        self.stats["rejected_replay"] += 1
        peer.rejected["replay"] += 1
        cfg = self.config
        if cfg.reliable and seq < rx.expected and peer.ack_due is None:
            # the sender resends what we have: our acknowledgement was lost, say it again
            # (once per ack_delay, however many copies come; never a NACK)
            peer.ack_sent = min(peer.ack_sent, rx.expected - 2)
            peer.ack_due = now + cfg.ack_delay

    def received(self, peer: Peer, rx: ReceiveWindow, seq: int, data_seen: bool, now: float) -> None:
        """Datagram ``seq`` of ``peer`` was applied (``data_seen``: it carried replicated data):
        acknowledge, give up or ask for gaps as due."""
        cfg = self.config
        if not cfg.reliable:
            if rx.give_up_before(seq - 64):
                peer.synced = False
                if peer.bulk_begin is not None or peer.bulk_end is not None:
                    peer.bulk_dirty = True
            return
        if data_seen:
            peer.unacked += 1
            # at once when this datagram filled a hole: the sender's window waits for it
            if peer.unacked >= cfg.ack_every or seq < rx.highest:
                self.queue_ack(peer, rx)
            elif peer.ack_due is None:
                peer.ack_due = now + cfg.ack_delay
        if len(rx.above) > rx.limit:
            # Too much is missing to wait for: give up on every gap at once (a bulk transfer
            # replaces what they held) and ask for that bulk once, not once per datagram.
            rx.give_up_before(rx.highest + 1)
            self.stats["gaps_given_up"] += 1
            peer.synced = False
            peer.given_up = max(peer.given_up, rx.highest)  # as for a GAP: no bulk before proves anything
            if peer.resync_at is None:
                self.ask_for_bulk(peer, now)
        gap = rx.missing()
        if gap is not None and (gap != peer.nacked or rx.new_gap or now >= peer.nack_at + cfg.nack_retry):
            self._nack(peer, gap, now)

    def on_gap(self, peer: Peer, msg: wire.Gap, seq: int, now: float) -> bool:
        """A GAP: the peer cannot resend these numbers of its stream."""
        if msg.node != self.node_id or msg.epoch != peer.epoch or peer.rx is None:
            pass  # another's, or of a previous epoch: nothing to do
        elif msg.last >= seq or msg.first > msg.last:
            # a sender gives up only on numbers it used before this datagram's: a GAP up to
            # 2^32-1 would make every later datagram of that peer a "replay"
            self.stats["rejected_bounds"] += 1
            peer.rejected["bounds"] += 1
        elif peer.rx.fill(msg.first, msg.last):
            # what those datagrams carried is lost: incomplete until the bulk that follows
            peer.synced = False
            # a bulk that began before this gap's end proves nothing: a deletion lost in
            # the gap leaves a flow the bulk mentioned before it looking current (a GAP
            # naming only numbers that did arrive, a stale one, changes nothing)
            peer.given_up = max(peer.given_up, msg.last)
            if peer.resync_at is None:
                peer.resync_at = now
        return False

    def on_timer(self, peer: Peer, now: float) -> None:
        """An acknowledgement or a NACK round due for ``peer``."""
        rx = peer.rx
        if peer.ack_due is not None and now >= peer.ack_due and rx is not None:
            if rx.expected - 1 > peer.ack_sent:
                self.queue_ack(peer, rx)
            peer.unacked = 0
            peer.ack_due = None
        cfg = self.config
        if rx is not None and cfg.reliable:
            gap = rx.missing()
            if gap is not None and now >= peer.nack_at + cfg.nack_retry:
                self._nack(peer, gap, now)

    def deadline(self, peers: dict[int, Peer]) -> float:
        out = float("inf")
        retry = self.config.nack_retry
        for peer in peers.values():
            if peer.ack_due is not None:
                out = min(out, peer.ack_due)
            if peer.nacked is not None and peer.rx is not None and peer.rx.missing() is not None:
                out = min(out, peer.nack_at + retry)
        return out

    def path_changed(self, peer: Peer, now: float) -> None:
        """Traffic to ``peer`` moved to another link: acknowledge and ask for gaps again over it."""
        if peer.rx is not None and self.config.reliable:
            peer.ack_sent = min(peer.ack_sent, peer.rx.expected - 2)  # the next datagram acknowledges
            peer.nack_at = -1.0
            if peer.ack_due is None:
                peer.ack_due = now

    def queue_ack(self, peer: Peer, rx: ReceiveWindow) -> None:
        """An acknowledgement to go out, replacing one of the same peer still queued (late
        datagrams filling many holes in one step would queue one ACK each; the newest says all)."""
        self._unqueue(peer.ack_queued)
        peer.ack_queued = self.ack(peer, rx)
        self.control.append(peer.ack_queued)

    def _unqueue(self, entry: bytes | None) -> None:
        """Take a control entry (this very object) out of the queue, if it still waits there."""
        if entry is not None:
            for i, m in enumerate(self.control):
                if m is entry:
                    del self.control[i]
                    return

    def ack(self, peer: Peer, rx: ReceiveWindow) -> bytes:
        """An ACK of everything received in order from ``peer``, noted as sent; with a gap open,
        also how far beyond it we have everything but the gaps our last NACK round named (not
        while a newer round waits to go out: the sender would count its gaps as arrived)."""
        peer.ack_sent = rx.expected - 1
        peer.unacked = 0
        peer.ack_due = None
        highest = 0
        if rx.above:
            # Every gap that opens brings a new round at once, so what arrived since the last round
            # is contiguous: up to the newest if that round named every gap, else up to where its
            # naming stopped.
            highest = rx.highest if peer.round_full else peer.round_high
        return wire.ack_msg(peer.node, peer.epoch, rx.expected - 1, highest, self.config.announce)

    @staticmethod
    def _sack(rx: ReceiveWindow) -> tuple[int, list[tuple[int, int]]]:
        """(highest, gaps): the gaps one NACK round names (up to NACK_RANGES, each at most 4096
        long) and how far they cover what is missing: up to the newest received, or to just
        before the first gap left unnamed (the sender counts everything else as arrived)."""
        gaps = rx.gaps(NACK_RANGES + 1)
        highest = gaps[NACK_RANGES][0] - 1 if len(gaps) > NACK_RANGES else rx.highest
        named = []
        for first, last in gaps[:NACK_RANGES]:
            if last > first + 4095:  # only so much per NACK: the naming stops here
                named.append((first, first + 4095))
                return first + 4095, named
            named.append((first, last))
        return highest, named

    def _nack(self, peer: Peer, gap: tuple[int, int], now: float) -> None:
        """Ask for every gap at once (up to NACK_RANGES, lowest first): with loss spread over a
        window, asking for the first gap only would take one round trip per gap."""
        rx = peer.rx
        assert rx is not None
        highest, gaps = self._sack(rx)
        # One round is one control entry: its NACKs and the ACK that says how far they cover what is
        # missing travel in one datagram (at most 32 x 24 + 24 bytes), so the sender never takes
        # part of a round for all of it; a round still queued is replaced by the newer one.
        self._unqueue(peer.nack_round)
        self.stats["nacks_sent"] += len(gaps)
        peer.round_high = highest
        peer.round_full = highest == rx.highest
        peer.nack_round = b"".join([wire.nack_msg(peer.node, peer.epoch, first, last) for first, last in gaps]
                                   + [wire.ack_msg(peer.node, peer.epoch, rx.expected - 1, highest,
                                                   self.config.announce)])
        self.control.append(peer.nack_round)
        peer.nacked = gap
        peer.nack_at = now


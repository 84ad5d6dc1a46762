"""Heartbeats over redundant sync links: one datagram per link, outside the data stream
(sequence number wire.HEARTBEAT_SEQ, so one that overtakes data on a slower link opens no gap),
saying on which links this node hears each peer. ctbridge.sync.links chooses the link from them.

Imports: ctbridge.sync (wire, events, shared).
"""

from __future__ import annotations

from ctbridge.sync import wire
from ctbridge.sync.events import Heard, LinkReport
from ctbridge.sync.shared import Part, Shared


class Heartbeats(Part):
    """Heartbeat rounds sent, and the peers' heartbeats taken."""

    def __init__(self, shared: Shared) -> None:
        super().__init__(shared)
        self._round = 0  # number of the last heartbeat round sent

    def send(self, now: float, hearing: dict[int, int], links: int) -> list[bytes]:
        """One heartbeat datagram per sync link, for the adapter to send over link k: HEARTBEAT
        with the link's index, this round's number, and on which links this node hears each peer
        (``hearing``: node -> bits). Padded to a full datagram."""
        self._round += 1
        reports = sorted(hearing.items())[:64]
        stream = self.stream
        header = stream.header(wire.HEARTBEAT_SEQ, now, self.datagram_version())
        size = self.config.max_datagram - wire.HEADER_LEN - stream.auth.overhead
        out = [stream.seal(header, wire.heartbeat_msg(k, self._round, reports, size)) for k in range(links)]
        stats = self.stats
        stats["heartbeats_sent"] += len(out)
        stats["tx_datagrams"] += len(out)
        stats["tx_bytes"] += sum(len(d) for d in out)
        return out

    def received(self, header: wire.Header, flows: list[wire.FlowTuple], messages: list[wire.Message]) -> Heard | None:
        """A heartbeat: fresh if its number is higher than any before from that peer over that
        link (a replay, however recent, proves nothing about a link), from the peer's current
        epoch (a restarted peer is learnt from its data first)."""
        stats = self.stats
        if flows or len(messages) != 1 or type(messages[0]) is not wire.Heartbeat:
            stats["rejected_malformed"] += 1
            return None
        hb = messages[0]
        peer = self.peers.get(header.node)
        if peer is None or header.epoch != peer.epoch or not peer.proven:
            stats["heartbeats_ignored"] += 1
            return None
        if hb.counter <= peer.heartbeats.get(hb.link, 0):
            stats["rejected_replay"] += 1
            peer.rejected["replay"] += 1
            return None
        peer.heartbeats[hb.link] = hb.counter
        stats["heartbeats_received"] += 1
        for node, links in hb.reports:
            if node == self.stream.node_id:
                self.events.append(LinkReport(peer.node, links))
        return Heard(peer.node, hb.link)

"""Redundant sync links: which link carries the traffic to each peer. Pure (an explicit ``now``).

A node with several sync links (up to wire.MAX_LINKS, in order of preference) sends everything
to a peer over one of them, its *active* link for that peer, and a heartbeat over each of them
(Engine.heartbeats, every ``timeout / 5``, numbered, padded to a full datagram). Each heartbeat
says on which links the sender hears the receiver.

A link is *usable* for a peer when both directions work, as in BFD's three-way handshake (RFC
5880 6.2): we heard the peer on it within ``timeout``, and the peer's latest report, itself not
older than ``timeout``, says it hears us on it. One-way evidence is not enough: with the link
broken only from us to the peer, we still hear the peer on it.

The active link is the most preferred usable one. Traffic leaves a link as soon as it stops being
usable (detected within ``timeout`` plus one heartbeat); it goes back to a more preferred link
only once that one has been usable for its *hold-down* without a break. The hold-down starts at
``timeout`` and doubles, up to MAX_HOLD timeouts, each time the link fails again within
STABLE timeouts of coming back (a flapping link, as BGP route-flap damping does it, RFC 2439),
and returns to ``timeout`` once it has stayed up that long. With no usable link at all the
active link stays where it is: moving would not help, and the link that comes back first wins.
"""

from __future__ import annotations

from typing import NamedTuple

MAX_HOLD = 64  # the longest hold-down, in timeouts (about a minute with the default 1 s)
STABLE = 10  # a link up this many timeouts has stopped flapping: its hold-down starts again


class Switch(NamedTuple):
    node: int
    old: int
    new: int


class _PeerLinks:
    __slots__ = ("active", "heard", "hold", "report", "report_at", "usable_since")

    def __init__(self, count: int, timeout: float, first: int) -> None:
        self.heard: list[float | None] = [None] * count  # when we last heard the peer on each link
        self.report: int | None = None  # links on which the peer hears us (None: never said)
        self.report_at = 0.0
        self.usable_since: list[float | None] = [None] * count
        # How long a link must work before traffic comes back to it: nothing for one that never
        # failed (the peer's first datagram may come over any link: with sessions, the copy that
        # answers our challenge first), a timeout after its first failure, doubling while it flaps
        self.hold = [0.0] * count
        self.active = first  # the link it was first heard on


class LinkSelector:
    def __init__(self, count: int, timeout: float) -> None:
        if count < 1:
            raise ValueError("a node needs at least one sync link")
        self.count = count
        self.timeout = timeout
        self.peers: dict[int, _PeerLinks] = {}

    @property
    def heartbeat_interval(self) -> float:
        """How often heartbeats go over every link: five per timeout, so that one or two lost
        ones do not make a working link look broken."""
        return self.timeout / 5

    def _peer(self, node: int, link: int = 0) -> _PeerLinks:
        p = self.peers.get(node)
        if p is None:
            p = self.peers[node] = _PeerLinks(self.count, self.timeout, link)
        return p

    def heard(self, node: int, link: int, now: float) -> None:
        """An authentic, fresh datagram of ``node`` arrived over ``link``."""
        if 0 <= link < self.count:
            self._peer(node, link).heard[link] = now

    def reported(self, node: int, links: int, now: float) -> None:
        """``node`` says it hears us on ``links`` (bit k: link k)."""
        p = self.peers.get(node)
        if p is None:
            return  # never heard ourselves: nothing to combine it with
        p.report = links
        p.report_at = now

    def hearing(self, now: float) -> dict[int, int]:
        """What our heartbeat tells each peer: the links on which we hear it now."""
        return {node: self._bits(p, now) for node, p in self.peers.items()}

    def _bits(self, p: _PeerLinks, now: float) -> int:
        return sum(1 << k for k, at in enumerate(p.heard) if at is not None and now - at < self.timeout)

    def usable(self, node: int, link: int, now: float) -> bool:
        p = self.peers.get(node)
        if p is None:
            return False
        at = p.heard[link]
        if at is None or now - at >= self.timeout:
            return False
        if p.report is None:  # a peer that never reported (one link, or an older version): one way
            return True
        return now - p.report_at < self.timeout and bool(p.report >> link & 1)

    def active(self, node: int) -> int | None:
        """The link to send to ``node`` on; None for a node never heard (send on every link)."""
        p = self.peers.get(node)
        return p.active if p is not None else None

    def update(self, now: float) -> list[Switch]:
        """Re-decide every peer's active link; the switches made."""
        switches = []
        for node, p in self.peers.items():
            best = None
            for k in range(self.count):
                since = p.usable_since[k]
                if self.usable(node, k, now):
                    if since is None:
                        p.usable_since[k] = now
                    elif now - since >= STABLE * self.timeout:
                        p.hold[k] = self.timeout  # it stopped flapping
                    if best is None:
                        best = k
                elif since is not None:
                    p.usable_since[k] = None
                    if not p.hold[k]:
                        p.hold[k] = self.timeout  # its first failure
                    elif now - since < STABLE * self.timeout:  # failed again soon after it came back
                        p.hold[k] = min(2 * p.hold[k], MAX_HOLD * self.timeout)
            if best is None or best == p.active:
                continue
            current_usable = p.usable_since[p.active] is not None
            since = p.usable_since[best]
            if current_usable and (best > p.active or since is None or now - since < p.hold[best]):
                continue  # the current one works: go back to a preferred one only once it is stable
            switches.append(Switch(node, p.active, best))
            p.active = best
        return switches

    def forget(self, node: int) -> None:
        self.peers.pop(node, None)

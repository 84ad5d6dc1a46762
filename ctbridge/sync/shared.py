"""What the engine's parts share (Shared: the settings, the counters, the peers, the control
queue, the events and kernel writes handed out, this node's stream and the newest time), and
Part, the base of every part, which keeps each of them under a short name. The engine (the
front) makes one Shared and gives it to every part it owns; a part never makes one.

Imports: ctbridge.sync (wire, events, options, peer, stats, stream).
"""

from __future__ import annotations

from ctbridge.sync import wire
from ctbridge.sync.events import EngineEvent, KernelOp
from ctbridge.sync.options import EngineConfig
from ctbridge.sync.peer import Peer
from ctbridge.sync.stats import new_stats
from ctbridge.sync.stream import Stream


class Clock:
    """The newest ``now`` the engine was given (its inputs may come with a ``now`` older than an
    earlier one: every part reads the newest)."""

    __slots__ = ("latest",)

    def __init__(self, now: float) -> None:
        self.latest = now


class Shared:
    """One engine's shared state: every part holds the same objects (one counter dict, one peers
    dict, one control queue), so what one part adds the others and the front see."""

    __slots__ = ("clock", "config", "control", "events", "kernel_ops", "peers", "stats", "stream")

    def __init__(self, config: EngineConfig, stream: Stream, now: float) -> None:
        self.config = config
        self.stats = new_stats()  # one flat dict of counters (Engine.stats)
        self.peers: dict[int, Peer] = {}  # node id -> what this node knows of it
        # control messages waiting, in order: datagram 1 goes out at once
        self.control = [wire.alive_msg(config.announce)]
        self.events: list[EngineEvent] = []  # handed out by Engine.events()
        self.kernel_ops: list[KernelOp] = []  # handed out by Engine.kernel_ops()
        self.stream = stream
        self.clock = Clock(now)


class Part:
    """A part of the engine. ``config`` is a plain attribute (read in hot loops): the engine sets
    it on every part when it is replaced (the setter of Engine.config)."""

    def __init__(self, shared: Shared) -> None:
        self.config = shared.config
        self.stats = shared.stats
        self.peers = shared.peers
        self.control = shared.control
        self.events = shared.events
        self.kernel_ops = shared.kernel_ops
        self.stream = shared.stream
        self.clock = shared.clock
        self.node_id = shared.config.node_id

    def datagram_version(self) -> int:
        """The protocol version of this node's datagrams: the lowest that its peers speak, as far
        as this node knows (a peer not heard to speak more, version 2), and never above this
        node's own. With no peer known, version 2: the first datagrams of a node that starts
        among older ones are read by all of them. (One version for all, resends included: a
        link may deliver a datagram meant for one peer to every node.)"""
        top = self.config.max_version
        lowest = min((p.speaks for p in self.peers.values()), default=wire.BASE_VERSION)
        return min(top, lowest)

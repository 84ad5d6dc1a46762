"""The replication engine's front: a pure state machine (no sockets, no clock, no asyncio, no
pyroute2) that owns the parts below and passes them each input.

Inputs, each with an explicit ``now`` (seconds, any monotonic origin):
    kernel_events / kernel_messages / kernel_expectations (now)    this node's kernel reported changes
    kernel_resync / kernel_expect_resync (entries, now)           this node's whole table, from a dump
    kernel_rebuild (now) -> Rebuild: feed(chunk), drop_unseen(keys), close()  ... in chunks, in place
    kernel_refresh(messages, now, within)                         a refresh sweep's dump
    receive_datagram(data, now, wall) -> Heard | None             a datagram from the sync link
    set_role, request_resync, bulk_send, reconfigure, path_changed, diff_start/diff_retry   commands
    handle_timer(now)                                             the deadline from get_timer() has passed
Outputs:
    datagrams_to_send(now)   [(bytes, destination)]: destination None = every peer, else a node id
    heartbeats(now, ...)     one datagram per sync link
    kernel_ops()             writes the kernel should do (apply mode "inject")
    events()                 what happened (ctbridge.sync.events)
    get_timer()              when handle_timer() wants to run next (None: no deadline)
Queries: complete(), live_peers(), peer_flow(), commit_records(), refresh_due() (whether a sweep can
refresh anything), internal/external listings,
diff_result(), stats (one flat dict of counters, ctbridge.sync.stats).

The shape follows aioquic's QuicConnection: the adapter moves bytes and re-arms one timer. Tests
drive engines with a fake clock over lossy in-memory links (tests/support/enginelab.py).

Replication, in short: every change of this node's internal cache (its kernel's flows, filtered)
bumps a per-node version counter and queues the flow key; queued keys coalesce, so several updates
of a flow waiting to go out are sent once, with the state current at sending time. Each datagram
takes the next sequence number of this node's stream. Receivers apply messages in any order —
a flow's version decides which state is newer — acknowledge contiguous ranges, and ask again
(NACK) for gaps; a resend carries the current state of the flows the lost datagram named. What a
receiver learns from a peer is kept per peer (the external caches); a bulk transfer replaces one.

The parts, one module each: internal (this node's table, intake, refresh sweeps), external (the
peers' copies), session (proving a peer's epoch), receiver (ACK, NACK, GAP taken), recovery (RTT,
window, loss, probes), sender (packing, bulks, resends), stream (numbers, epochs, sealing),
heartbeat (redundant links), diff (`ctbridge diff`). They share what ctbridge.sync.shared holds (the
peers, the counters, the control queue, ...); a part calls another only through a callback given
here, or one it was given (the sender: the caches, recovery, the receiver), never this module.

Imports: every module of ctbridge.sync; ctbridge.conntrack's codec (types).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

from ctbridge.sync import wire
from ctbridge.sync.diff import Diffs
from ctbridge.sync.events import (
    BulkCompleted,
    CompletenessChanged,
    EngineEvent,
    EpochChanged,
    Heard,
    KernelOp,
    LimitReached,
    LinkReport,
    PeerReport,
    PeerRestarted,
    PeerSilent,
    Role,
)
from ctbridge.sync.external import ExternalCaches
from ctbridge.sync.filter import FlowFilter
from ctbridge.sync.heartbeat import Heartbeats
from ctbridge.sync.internal import EVERYTHING, InternalCache
from ctbridge.sync.options import EngineConfig
from ctbridge.sync.peer import ExternalFlow, Peer, seconds_of
from ctbridge.sync.receiver import Receiver
from ctbridge.sync.recovery import Recovery
from ctbridge.sync.sender import Sender
from ctbridge.sync.session import NONCE_LIFETIME, Sessions
from ctbridge.sync.shared import Part, Shared
from ctbridge.sync.stream import Stream
from ctbridge.sync.sweep import Sweep

# also offered from here: the daemon, the tests and the benches import these names from the engine
__all__ = ["EVERYTHING", "NONCE_LIFETIME", "BulkCompleted", "CompletenessChanged", "Engine", "EngineConfig",
           "EngineEvent", "EpochChanged", "ExternalFlow", "Heard", "KernelOp", "LimitReached", "LinkReport", "Peer",
           "PeerReport", "PeerRestarted", "PeerSilent", "Role", "Sweep", "seconds_of"]

log = logging.getLogger(__name__)

EPOCH_AHEAD = 86400.0  # seconds a peer's epoch (its boot time) may lie ahead of our clock (with max_age)
RECEIVE_LIMIT = 9216  # bytes: no datagram longer is read (a jumbo frame; a peer's own limit may exceed ours)

Handler = Callable[[Peer, Any, int, float], bool]  # (peer, message, datagram's seq, now) -> carried data


def learns_version(peer: Peer, now: float, peer_timeout: float) -> bool:
    """Whether a datagram of the peer's session may raise the version it is taken to speak:
    not while a newer life of it was heard within ``peer_timeout`` and is not proven yet. That
    datagram may be a late one of the old life, and the new life may be an older release
    (docs/protocol.md, "Versions"); a newer life proves itself in one round trip, or its
    datagrams stop (a forged or stray one): then the session's announcements count again."""
    return peer.candidate_at <= now - peer_timeout  # (NEVER, -inf: none heard)


class Engine:
    """One node's replication: its parts (attributes ``internal_cache``, ``external_caches``,
    ``sessions``, ``receiver``, ``recovery``, ``sender``, ``heartbeat``, ``diffs``, ``stream``)
    and the inputs and outputs the module's docstring lists."""

    def __init__(self, config: EngineConfig, auth: wire.Auth, epoch: int, now: float,
                 clock_offset: float = 0.0, first_seq: int = 1, nonce: int | None = None) -> None:
        """``first_seq``: this epoch's first sequence number (1; a test of the wrap starts near
        the end of the space). ``nonce``: this life's challenge (the daemon draws 64 random bits;
        it need not be secret, only never used by an earlier life: by default the epoch)."""
        self._config = config
        self.node_id = config.node_id
        self._own_id = self.node_id.to_bytes(4, "big")  # as the header carries it
        self.stream = Stream(self.node_id, epoch, auth, clock_offset, first_seq, self._new_epoch)
        shared = self._shared = Shared(config, self.stream, now)
        self.peers, self.stats, self.clock = shared.peers, shared.stats, shared.clock
        self._events, self._kernel_ops, self._control = shared.events, shared.kernel_ops, shared.control
        self.internal_cache = InternalCache(shared)
        self.intake = self.internal_cache.intake
        self.external_caches = ExternalCaches(shared, now)
        self.recovery = Recovery(shared, self.bulk_send)
        self.sessions = Sessions(shared, epoch if nonce is None else nonce, self.bulk_send)
        self.receiver = Receiver(shared, self.sessions.ask_for_bulk)
        self.sender = Sender(shared, self.internal_cache, self.recovery, self.receiver)
        self.heartbeat = Heartbeats(shared)
        self.diffs = Diffs(shared, self.internal_cache)
        self._parts: tuple[Part, ...] = (self.internal_cache, self.external_caches, self.recovery, self.sessions,
                                         self.receiver, self.sender, self.heartbeat, self.diffs)
        self._handlers = self._dispatch_table()
        self._complete = self.complete()
        self._offer_entry_points()

    def _dispatch_table(self) -> dict[type, Handler]:
        """What a datagram's messages do, by type (its flows: ExternalCaches.take_flows; runs of
        DELETEs: ExternalCaches.take_deletes, one call per run). HELLO, ALIVE, ACK, CHALLENGE and
        ECHO also say which protocol version the peer speaks; a type not here changes nothing."""
        external, sessions, recovery, diffs = self.external_caches, self.sessions, self.recovery, self.diffs
        return {
            wire.Delete: external.on_delete,
            wire.Ack: self._on_ack,
            wire.Nack: recovery.on_nack,
            wire.Gap: self.receiver.on_gap,
            wire.Resync: sessions.on_resync,
            wire.Challenge: self._on_challenge,
            wire.Hello: self._announced,
            wire.Alive: self._announced,
            wire.Echo: self._announced,
            wire.DigestAsk: diffs.on_ask,
            wire.Digest: diffs.on_answer,
            wire.DigestKeys: diffs.on_answer,
            wire.BulkBegin: external.on_bulk_begin,
            wire.BulkEnd: external.on_bulk_end,
        }

    def _offer_entry_points(self) -> None:
        """The parts' entry points, offered on the front as they are (no call in between:
        kernel_messages and datagrams_to_send are hot loops). The daemon calls them by these
        names; tests and benches may call the parts directly."""
        cache, external, sessions = self.internal_cache, self.external_caches, self.sessions
        recovery, diffs = self.recovery, self.diffs
        self.kernel_events = cache.kernel_events
        self.kernel_messages = cache.kernel_messages
        self.kernel_expectations = cache.kernel_expectations
        self.kernel_resync = cache.kernel_resync
        self.kernel_rebuild = cache.rebuild
        self.kernel_expect_resync = cache.kernel_expect_resync
        self.kernel_refresh = cache.kernel_refresh
        self.refresh_due = cache.refresh_due
        self.runouts = cache.runouts
        self.flush_internal = cache.flush
        self.internal_messages = cache.messages
        self.flush_external = external.flush
        self.external_messages = external.messages
        self.external_expectations = external.expectations
        self.external_keys = external.keys
        self.commit_records = external.commit_records
        self.request_resync = sessions.request_resync
        self.datagrams_to_send = self.sender.datagrams_to_send
        self.queue_sizes = self.sender.queue_sizes
        self.heartbeats = self.heartbeat.send
        self.in_flight = recovery.in_flight
        self.rto = recovery.rto
        self.diff_start = diffs.start
        self.diff_retry = diffs.retry
        self.diff_result = diffs.result

    # --- reading the parts' state -----------------------------------------------------------------

    @property
    def config(self) -> EngineConfig:
        return self._config

    @config.setter
    def config(self, config: EngineConfig) -> None:
        """New settings reach every part at once (each reads its own ``config`` in its hot loops):
        the engine never runs with some parts on the old settings."""
        self._config = self._shared.config = config
        for part in self._parts:
            part.config = config

    @property
    def internal(self) -> dict[bytes, bytes]:
        """This node's table: key -> FLOW (or EXPECT) message (InternalCache.table)."""
        return self.internal_cache.table

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    @property
    def auth(self) -> wire.Auth:
        return self.stream.auth

    @property
    def role(self) -> Role:
        return self.sender.role

    def live_peers(self) -> list[int]:
        """The node ids of peers whose session is proven and that are heard (not silent)."""
        return [p.node for p in self.peers.values() if p.proven and p.alive]

    def peer_reports(self, now: float) -> list[PeerReport]:
        """Every peer, as the daemon's status shows it."""
        top = self.config.max_version
        return [PeerReport(p.node, p.epoch, p.alive, p.synced, p.proven, len(p.refused), sorted(p.limits),
                           len(p.external), now - p.last_heard, p.restarts, p.bulks, p.refused_total,
                           dict(p.rejected), p.rx.missing() if p.rx is not None else None, min(top, p.speaks))
                for p in self.peers.values()]

    def peer_flow(self, node: int, key: bytes) -> bytes | None:
        """The FLOW message ``node``'s copy holds for ``key``; None if none."""
        return self.external_caches.peer_flow(node, key)

    def complete(self) -> bool:
        """Every peer that is heard has a whole external cache: a bulk arrived in a session it proved
        live, and nothing was lost or refused since. A peer whose authentic datagrams are being
        refused (replays, an unanswered challenge, numbers out of bounds) counts as heard: it is
        never "silent, so complete"."""
        return not incomplete_peers(self)

    def events(self) -> list[EngineEvent]:
        """What happened since the last call (peers restarting or going silent, bulks completing,
        the external caches becoming complete or not), oldest first."""
        complete = self.complete()
        if complete != self._complete:
            self._complete = complete
            self._events.append(CompletenessChanged(complete))
        out = self._events[:]
        self._events.clear()
        return out

    def kernel_ops(self) -> list[KernelOp]:
        ops = self._kernel_ops[:]
        self._kernel_ops.clear()
        return ops

    # --- commands ---------------------------------------------------------------------------------

    def set_role(self, role: Role) -> None:
        """MASTER and BACKUP behave alike here; FAULT stops advertising this node's flows (they stay
        queued, coalesced, and go out when the role changes; a bulk a peer asks for waits too) but
        keeps receiving and acknowledging. A peer's copy of this node's flows is never emptied by
        a FAULT: a faulty former master's flows are exactly what its successor commits."""
        self.sender.role = role

    def bulk_send(self, now: float, target: int = 0) -> None:
        """Stream the whole internal cache to ``target`` (0: every peer)."""
        self.sender.bulk_send(now, target)

    def reconfigure(self, auth: wire.Auth | None = None, flow_filter: FlowFilter | None = None,
                    peer_filters: Mapping[int, FlowFilter] | None = None) -> None:
        """New keys or filters (a reload): the next datagram and the next flow use them, and what
        peers sent before that the new filters refuse leaves their copies (refused, as if it came
        now; in inject mode deleted from this kernel), so a commit never writes it."""
        if auth is not None:
            self.stream.auth = auth
        if flow_filter is None and peer_filters is None:
            return
        self.config = dataclasses.replace(self.config, filter=flow_filter or self.config.filter,
                                          peer_filters=self.config.peer_filters if peer_filters is None
                                          else peer_filters)
        self.external_caches.refilter()

    def path_changed(self, now: float, node: int) -> None:
        """The adapter moved the traffic to ``node`` to another link (or back): what was in flight
        on the old one may be lost. Probe at once, acknowledge and ask for gaps again over the
        new one, and start the round-trip estimate afresh."""
        self.stats["path_changes"] += 1
        self.recovery.path_changed(now)
        peer = self.peers.get(node)
        if peer is not None:
            self.receiver.path_changed(peer, now)

    def _announced(self, peer: Peer, msg: wire.Hello | wire.Alive | wire.Echo | wire.Ack | wire.Challenge,
                   seq: int, now: float) -> bool:
        """The highest version the peer speaks, said in a message of its session (docs/protocol.md,
        "Versions"); nothing else (ECHO outside a candidate datagram changes nothing)."""
        if msg.speaks > peer.speaks and learns_version(peer, now, self.config.peer_timeout):
            peer.speaks = msg.speaks
        return False

    def _on_ack(self, peer: Peer, msg: wire.Ack, seq: int, now: float) -> bool:
        self._announced(peer, msg, seq, now)
        return self.recovery.on_ack(peer, msg, seq, now)

    def _on_challenge(self, peer: Peer, msg: wire.Challenge, seq: int, now: float) -> bool:
        self._announced(peer, msg, seq, now)
        return self.sessions.on_challenge(peer, msg, seq, now)

    def _new_epoch(self) -> None:
        """The stream's numbers ran out and a new epoch began (Stream.next_seq)."""
        self._events.append(EpochChanged(self.stream.epoch))
        self.recovery.new_epoch()
        self.sender.new_epoch()

    # --- receiving --------------------------------------------------------------------------------

    def receive_datagram(self, data: bytes, now: float, wall: float | None = None) -> Heard | None:
        """Take one datagram: who was heard if it was authentic and new (accepted data, or a
        heartbeat numbered higher than any before over its link), else None."""
        stats = self.stats
        stats["rx_datagrams"] += 1
        self.clock.latest = max(self.clock.latest, now)
        stats["rx_bytes"] += len(data)
        if len(data) > RECEIVE_LIMIT:
            # checked before the MAC, so a flood of 64 KB datagrams costs no hashing; not this
            # node's own send limit, which another node's MTU or link family may exceed
            stats["rejected_oversize"] += 1
            return None
        if data[8:12] == self._own_id and len(data) >= wire.HEADER_LEN:
            # multicast loops our own datagrams back, and with pairwise keys none carries a MAC
            # for us: not an authentication failure (nothing in it is used either way)
            stats["own_datagrams"] += 1
            return None
        try:
            header, flows, messages = wire.decode_split(data, self.stream.auth, self.node_id, self.config.max_version)
        except wire.WireError as exc:
            stats["rejected_" + exc.reason] += 1
            log.debug("dropped a datagram: %s", exc)
            return None
        if header.node == self.node_id:
            stats["own_datagrams"] += 1  # multicast loops our own datagrams back
            return None
        cfg = self.config
        if cfg.max_age and wall is not None and abs(wall * 1000 - header.time_ms) > cfg.max_age * 1000:
            stats["rejected_replay"] += 1
            return None
        if cfg.max_age and wall is not None and header.epoch > (wall + EPOCH_AHEAD) * 1e9:
            # epochs are boot times in ns (config.host.next_epoch): one far in the future is forged
            # or from a clock that is off by days, and would lock that node's real epoch out
            stats["rejected_bounds"] += 1
            return None
        if header.seq == wire.HEARTBEAT_SEQ:
            return self.heartbeat.received(header, flows, messages)
        peer = self.peers.get(header.node)
        if peer is None:
            peer = self.sessions.admit(header, now)
            if peer is None:
                return None
        if header.epoch != peer.epoch and not self.sessions.take_epoch(peer, header, messages, now):
            return None
        rx = peer.rx
        assert rx is not None
        if not rx.accept(header.seq):
            self.receiver.replayed(peer, rx, header.seq, now)
            return None
        peer.last_heard = now
        peer.alive = True
        if header.version > peer.speaks and learns_version(peer, now, self.config.peer_timeout):
            peer.speaks = header.version  # a datagram of version 3 says its sender speaks it
        if header.version >= 3:
            stats["rx_v3_datagrams"] += 1
        heard = Heard(peer.node, None)
        # the datagram's flows, then its messages through the table (one call per message)
        seq = header.seq
        data_seen = bool(flows)
        if flows:
            self.external_caches.take_flows(peer, flows, seq, now)
            peer.flows_at = now
        if messages:
            data_seen = self._take_messages(peer, messages, seq, now) or data_seen
            self.recovery.end_of_datagram(peer, now)
        self.receiver.received(peer, rx, seq, data_seen, now)
        if peer.bulk_end is not None:
            self.external_caches.finish_bulk(peer, self.clock.latest)
        return heard

    def _take_messages(self, peer: Peer, messages: list[wire.Message], seq: int, now: float) -> bool:
        """A datagram's messages other than FLOWs through the dispatch table; True if any of
        them was data (a change of a peer's copy, a bulk's mark)."""
        handlers = self._handlers
        data_seen = False
        deletes: list[wire.Delete] = []  # a run of DELETEs: taken in one call (the bulk of a churn)
        for msg in messages:
            if type(msg) is wire.Delete:
                deletes.append(msg)
                continue
            if deletes:
                self.external_caches.take_deletes(peer, deletes, seq, now)
                deletes = []
                data_seen = True
            handler = handlers.get(type(msg))
            if handler is not None and handler(peer, msg, seq, now):
                data_seen = True
        if deletes:
            self.external_caches.take_deletes(peer, deletes, seq, now)
            data_seen = True
        return data_seen

    # --- time ---------------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        if self.sender.output_waiting():
            return float("-inf")  # output is waiting: call datagrams_to_send() now
        latest = self.clock.latest
        deadline = min(self.sender.deadline(), self.external_caches.deadline(latest), self.recovery.deadline(),
                       self.receiver.deadline(self.peers), self.sessions.deadline(), self.internal_cache.deadline())
        timeout = self.config.peer_timeout
        for peer in self.peers.values():
            if peer.alive:
                deadline = min(deadline, peer.last_heard + timeout)
        return deadline

    def handle_timer(self, now: float) -> None:
        self.clock.latest = max(self.clock.latest, now)
        receiver, sessions, recovery = self.receiver, self.sessions, self.recovery
        timeout = self.config.peer_timeout
        for peer in self.peers.values():
            receiver.on_timer(peer, now)
            sessions.on_timer(peer, now)
            if peer.alive and now >= peer.last_heard + timeout:
                peer.alive = False
                self._events.append(PeerSilent(peer.node, now - peer.last_heard))
                recovery.release()
        sessions.reclaim(now)
        self.internal_cache.release(now)  # held updates and young flows that are due
        recovery.release()  # also lets go of what nobody is left to acknowledge
        recovery.on_timer(now)
        self.sender.on_timer(now)
        self.external_caches.on_timer(now)

    # (read by the daemon's status; the parts hold them: recovery, sender, the two caches)

    @property
    def window(self) -> float:
        return self.recovery.window

    @property
    def srtt(self) -> float | None:
        return self.recovery.srtt

    def expectation_counts(self) -> tuple[int, int]:
        """(this node's expectations, those learnt from peers): the rest of each cache is flows."""
        return self.internal_cache.expectation_count(), self.external_caches.expectation_count()


def incomplete_peers(engine: Engine) -> set[int]:
    """The peers Engine.complete waits for (their node ids)."""
    recent = engine.clock.latest - engine.config.peer_timeout
    return {p.node for p in engine.peers.values() if (p.alive or p.rejected_at > recent) and not (
        p.synced and p.proven and not p.limits and p.candidate_at <= recent
        and (p.rx is None or p.rx.missing() is None))}

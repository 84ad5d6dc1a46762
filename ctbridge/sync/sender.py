"""The sending side of this node's stream: what goes into each datagram and in which order.

A datagram carries, in this order: acknowledgements due to peers, control messages (challenges,
answers, NACK rounds, GAPs, RESYNC, digests), then flows waiting to go out (``pending``, only
while the window has room and the role is not FAULT), then the next part of a bulk transfer.
Its number comes from the stream (ctbridge.sync.stream); recovery keeps it for resending. A
resend keeps its number and carries the current state of the flows it named.

Its protocol version is the lowest its receivers speak (Part.datagram_version): in a datagram of
version 3, FLOW and DELETE go in their compact forms (ctbridge.sync.compact: about a third of
the bytes), chosen per datagram, resends included, so a peer that went back to version 2 is sent
nothing it cannot read.

datagrams_to_send(), _fill_pending() and _fill_bulk() are measured hot loops (bench/engine.py: A's side): the
flows are joined inline, one dict operation per flow and no call per flow except for an
expectation (its timeout is rewritten) or a deletion (its DELETE is encoded).

Imports: ctbridge.sync (wire, events, peer, sequence, shared, internal, recovery, receiver).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from ctbridge.sync import wire
from ctbridge.sync.events import Role
from ctbridge.sync.internal import InternalCache
from ctbridge.sync.peer import MARK
from ctbridge.sync.receiver import Receiver
from ctbridge.sync.recovery import Recovery
from ctbridge.sync.sequence import SEQ_MAX
from ctbridge.sync.shared import Part, Shared

# Control messages a resend must carry again: losing them would leave a bulk transfer unfinished
# or a gap open for good. Acknowledgements, ALIVE and HELLO are not worth it.
_COMPACT = int(wire.MsgType.FLOW_COMPACT)  # it and DELETE_COMPACT, the highest types: version 3's forms
_MUST_ARRIVE = frozenset({wire.MsgType.BULK_BEGIN, wire.MsgType.BULK_END, wire.MsgType.GAP, wire.MsgType.RESYNC})


class _Bulk:
    __slots__ = ("begun", "bulk_id", "keys", "pos", "sent", "target")

    def __init__(self, target: int, bulk_id: int) -> None:
        self.target = target
        self.bulk_id = bulk_id
        self.keys: list[bytes] = []
        self.pos = 0
        self.sent = 0
        self.begun = False


class Sender(Part):
    """The control queue, bulk transfers and the packing of datagrams."""

    def __init__(self, shared: Shared, cache: InternalCache, recovery: Recovery, receiver: Receiver) -> None:
        super().__init__(shared)
        self.cache = cache
        self.recovery = recovery
        self.receiver = receiver
        self.role = Role.BACKUP
        self._bulks: deque[_Bulk] = deque()
        self._bulk_id = 0
        self._overflow_seen = 0
        self._overflow_bulk = False
        self._overflow_bulk_at = self.clock.latest
        self.last_send = self.clock.latest - self.config.alive_interval  # so the HELLO goes out at once

    def output_waiting(self) -> bool:
        """Something can go out now: control messages, resends, or flows the window has room for."""
        recovery = self.recovery
        window_open = recovery.in_flight() < recovery.window
        flows_waiting = (self.cache.pending or self._bulks) and self.role is not Role.FAULT
        return bool(self.control or (flows_waiting and window_open) or recovery.resends)

    def deadline(self) -> float:
        """Something must go out at least every alive_interval; a bulk after an overflow, when allowed."""
        out = self.last_send + self.config.alive_interval
        if self._overflow_bulk and self._overflow_bulk_can_start():
            out = min(out, self._overflow_bulk_at)
        return out

    def on_timer(self, now: float) -> None:
        if now >= self.last_send + self.config.alive_interval and not self.control:
            self.control.append(wire.alive_msg(self.config.announce))

    def new_epoch(self) -> None:
        self._overflow_seen = 0

    def bulk_send(self, now: float, target: int = 0) -> None:
        """Stream the whole internal cache to ``target`` (0: every peer)."""
        for bulk in self._bulks:
            if not bulk.begun:
                if bulk.target != target:
                    bulk.target = 0
                return
        self._bulk_id = (self._bulk_id + 1) & SEQ_MAX
        self._bulks.append(_Bulk(target, self._bulk_id))

    def queue_sizes(self) -> dict[str, int]:
        """Flows waiting to go out, datagrams kept for resending, bulk transfers under way, young
        flows (sync.delay) and updates held (sync.coalesce)."""
        hold = self.cache.hold
        return {"pending": len(self.cache.pending), "resend": len(self.recovery.kept), "bulk": len(self._bulks),
                "young": len(hold.young), "held": len(hold.held)}

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, int | None]]:
        """Datagrams to send now (at most ``burst``): [(bytes, destination)], destination None =
        every peer, else a node id (a resend asked for by one peer)."""
        out: list[tuple[bytes, int | None]] = []
        cfg = self.config
        cache = self.cache
        recovery = self.recovery
        room = cfg.max_datagram - wire.HEADER_LEN - self.stream.auth.overhead - 24 * sum(
            1 for p in self.peers.values() if p.rx is not None) - 4  # acknowledgements (24 with highest); HELLO
        self.clock.latest = max(self.clock.latest, now)
        if self._overflow_bulk and self._overflow_bulk_can_start() and now >= self._overflow_bulk_at:
            # at most one such bulk per resync_retry: while a link is down, every datagram
            # overflows the queue, and bulks back to back would only flood it (a queued bulk
            # that has not begun becomes one to every peer)
            self._overflow_bulk = False
            self._overflow_bulk_at = now + cfg.resync_retry
            self.bulk_send(now, 0)
        while len(out) < cfg.burst and recovery.resends:
            seq, dest = next(iter(recovery.resends))
            del recovery.resends[(seq, dest)]
            out.append((self._resend_one(seq, room, now, dest), dest))
        stats = self.stats
        version = self.datagram_version()
        squeeze = wire.squeeze if version >= 3 else None
        # each datagram below takes a new number: the window's room, counted down as they go
        room_left = recovery.window - recovery.in_flight()
        while len(out) < cfg.burst:
            msgs: list[bytes] = []
            keys: list[bytes] = []
            size = 0
            control = self.control
            while control and size + len(control[0]) <= room:
                m = control.pop(0)
                msgs.append(m)
                size += len(m)
            # New flows only while the window has room: acknowledgements, NACKs and resends
            # always go (the peer needs them to let the window move).
            open_ = room_left > 0
            if not open_ and (cache.pending or self._bulks):
                stats["window_full"] += 1
            if cache.pending and self.role is not Role.FAULT and open_:
                size = self._fill_pending(msgs, keys, size, room, now, squeeze)
            if self.role is not Role.FAULT and open_:
                size = self._fill_bulk(msgs, keys, size, room, now, squeeze)
            if not msgs:
                break
            out.append((self._finish(msgs, keys, now, version=version), None))
            room_left -= 1
        return out

    def _fill_pending(self, msgs: list[bytes], keys: list[bytes], size: int, room: int, now: float,
                      squeeze: Callable[[bytes], bytes] | None) -> int:
        """The flows waiting to go out, as many as fit: current state, or a DELETE for a flow
        that is gone; compact (``squeeze``) in a datagram of version 3. The measured hot loop."""
        cache = self.cache
        stats = self.stats
        pending = cache.pending
        take = pending.popitem
        internal_get = cache.table.get
        flows = compact = 0
        start = len(keys)
        while pending:
            key = take(last=False)[0]
            cur = internal_get(key)
            if cur is None:
                m = cache.message(key, now)  # deleted: a DELETE with a version of its own
            else:
                m = cur if key[0] < MARK else cache.fresh(key, cur, now)
            if squeeze is not None and key[0] < MARK:
                m = squeeze(m)
            if size + len(m) > room:
                if not msgs:  # a single flow larger than a datagram: cannot be sent at all
                    stats["oversized_flows"] += 1
                    continue
                pending[key] = None  # back to the front: the next datagram starts with it
                pending.move_to_end(key, last=False)
                break
            msgs.append(m)
            keys.append(key)
            size += len(m)
            if cur is not None:
                flows += 1
            if m[0] >= _COMPACT:
                compact += 1
        stats["flows_sent"] += flows
        stats["deletes_sent"] += len(keys) - start - flows
        stats["tx_compact"] += compact
        return size

    def _fill_bulk(self, msgs: list[bytes], keys: list[bytes], size: int, room: int, now: float,
                   squeeze: Callable[[bytes], bytes] | None) -> int:
        cache = self.cache
        while self._bulks:
            bulk = self._bulks[0]
            if not bulk.begun:
                m = wire.bulk_begin_msg(bulk.target, bulk.bulk_id)
                if size + len(m) > room:
                    return size
                msgs.append(m)
                size += len(m)
                bulk.begun = True
                bulk.keys = list(cache.table)
                self.stats["bulks_sent"] += 1
            internal = cache.table
            bkeys = bulk.keys
            pos = bulk.pos
            n = len(bkeys)
            sent = compact = 0
            while pos < n:
                key = bkeys[pos]
                fm = internal.get(key)
                if fm is None:  # deleted since the bulk began: the delete went out by itself
                    pos += 1
                    continue
                if key[0] >= MARK:
                    fm = cache.fresh(key, fm, now)
                elif squeeze is not None:
                    fm = squeeze(fm)
                if len(fm) > room:  # larger than any datagram: cannot be sent (counted), go on
                    self.stats["oversized_flows"] += 1
                    pos += 1
                    continue
                if size + len(fm) > room:
                    break
                msgs.append(fm)
                keys.append(key)
                size += len(fm)
                pos += 1
                sent += 1
                if fm[0] >= _COMPACT:
                    compact += 1
            bulk.pos = pos
            bulk.sent += sent
            self.stats["flows_sent"] += sent
            self.stats["tx_compact"] += compact
            if pos < n:
                return size
            m = wire.bulk_end_msg(bulk.target, bulk.bulk_id, bulk.sent)
            if size + len(m) > room:
                return size
            msgs.append(m)
            size += len(m)
            self._bulks.popleft()
        return size

    def _resend_one(self, seq: int, room: int, now: float, dest: int | None) -> bytes:
        """Datagram ``seq`` again, carrying the current state of the flows it named, for ``dest``
        (None: every peer), in the stream's version: the lowest every peer speaks, even when one
        peer asked. A multicast link, or a unicast one that does not know ``dest``'s address,
        delivers it to every node, and one of version 2 drops a datagram of 3 as malformed
        (found by an adversarial review: 19 of them on an old node during an upgrade)."""
        kept = self.recovery.kept.get(seq)
        cache = self.cache
        keys, controls = kept if kept is not None else ((), b"")
        msgs: list[bytes] = [controls] if controls else []
        fitted: list[bytes] = []
        size = len(controls)
        version = self.datagram_version()
        for key in keys:
            m = cache.message(key, now)
            if version >= 3 and key[0] < MARK:
                m = wire.squeeze(m)
            if size + len(m) > room:
                cache.pending[key] = None  # grew since: goes out in a new datagram
                continue
            msgs.append(m)
            fitted.append(key)
            size += len(m)
            if m[0] >= _COMPACT:
                self.stats["tx_compact"] += 1
        if not msgs:
            msgs.append(wire.alive_msg(self.config.announce))
        self.stats["resent_datagrams"] += 1
        data = self._finish(msgs, fitted, now, seq=seq, version=version)
        self.stats["resent_bytes"] += len(data)
        return data

    def _finish(self, msgs: list[bytes], keys: list[bytes], now: float, seq: int | None = None,
                version: int = wire.BASE_VERSION) -> bytes:
        acks = []
        recovery = self.recovery
        if seq is None:  # acknowledgements ride along, but not on a resend meant for one peer
            for peer in self.peers.values():
                rx = peer.rx
                if rx is not None and rx.expected - 1 > peer.ack_sent and self.config.reliable:
                    acks.append(self.receiver.ack(peer, rx))
            seq = self.stream.next_seq()
            if seq == 1:
                msgs.insert(0, wire.hello_msg(self.config.announce))  # the first datagram of every epoch says so
            if self.config.reliable:
                # flows are kept as keys; only datagrams with more messages than flows hold any
                # control message worth keeping (checked by type, not on every datagram)
                controls = b"".join(m for m in msgs if m[0] in _MUST_ARRIVE) if len(msgs) > len(keys) else b""
                recovery.on_sent(seq, tuple(keys), controls, now)
                if recovery.kept.dropped_upto > self._overflow_seen:
                    self._overflowed(now)
        stream = self.stream
        data = stream.seal(stream.header(seq, now, version), b"".join(acks + msgs))
        self.stats["tx_datagrams"] += 1
        self.stats["tx_bytes"] += len(data)
        self.last_send = now
        return data

    def _overflowed(self, now: float) -> None:
        """The resend queue overflowed: peers that had not acknowledged what was dropped get
        everything again (one bulk transfer, started once no other is under way) instead of
        silently missing it."""
        self._overflow_seen = self.recovery.kept.dropped_upto
        self.stats["resend_overflows"] += 1
        if any(p.alive and p.acked < self._overflow_seen for p in self.peers.values()):
            self._overflow_bulk = True

    def _overflow_bulk_can_start(self) -> bool:
        return not self._bulks or not self._bulks[0].begun


"""The peers' copies (the external caches): what each peer told this node of its table, and the
rules for taking it.

- Admission: a flow new to a peer's copy is taken only if this node's filter, the accept list
  for that peer and the cap (max_entries) allow it; refused ones are remembered by key and
  counted. A flow's version decides which state is newer; a deletion leaves a tombstone that
  outranks late updates for tombstone_ttl (at most max_tombstones per peer).
- Bulk completion: once every datagram up to a BULK_END has arrived, flows the bulk did not
  mention since its BULK_BEGIN leave the copy; a bulk that lost datagrams, or counted more flows
  than arrived, changes nothing and is asked for again.
- Inject mode: every change is also a write for this kernel (Engine.kernel_ops); a flow leaves
  the kernel only when no other live peer holds it (_forget).
- Reading: commit records, the merged view (a flow two peers know is the later peer's), expiry
  of flows a peer stopped refreshing (expiry_margin after their timeout ran out).

take_flows() is a measured hot loop (bench/engine.py: B's side): inline, one dict operation per
flow and no call per flow except to admit a flow new to the copy.

Imports: ctbridge.conntrack (codec, expectation), ctbridge.sync (wire, events, peer, shared).
"""

from __future__ import annotations

import logging
import struct
from collections import OrderedDict
from collections.abc import Iterator, Mapping

from ctbridge.conntrack import codec, expectation
from ctbridge.conntrack.codec import Entry
from ctbridge.sync import wire
from ctbridge.sync.events import BulkCompleted, KernelOp, LimitReached
from ctbridge.sync.peer import EXPECT, MARK, ExternalFlow, Peer, runs_out, version_of
from ctbridge.sync.shared import Part, Shared

log = logging.getLogger("ctbridge.sync.engine")  # the engine's one logger, whichever part speaks

_VERSION = struct.Struct("!Q")  # a FLOW's version, at offset 4 (ctbridge.sync.peer.version_of)
EXPIRY_CHUNK = 8192  # flows looked at per timer call of an expiry pass (about 10 ms: the loop goes on)


class ExternalCaches(Part):
    """Every peer's copy (``Peer.external``, with its tombstones and refused keys), and the
    expiry and tombstone sweeps over them."""

    def __init__(self, shared: Shared, now: float) -> None:
        super().__init__(shared)
        self._next_sweep = now + self.config.tombstone_ttl
        self._expiry_at = now + self._expiry_pass()
        self._expiry_work: list[tuple[Peer, list[bytes]]] = []  # an expiry pass under way

    # --- taking what a datagram carries -------------------------------------------------------------

    def take_flows(self, peer: Peer, flows: list[wire.FlowTuple], seq: int, now: float) -> None:
        """The flows of datagram ``seq`` of ``peer`` (a measured hot loop: see the module's
        docstring). When no accept list for that peer applies and the cap is out of reach, our
        own filter looks at the flows new to the copy in one call (FlowFilter.refused_among),
        else _admit does, flow by flow."""
        external = peer.external
        tombstones = peer.tombstones
        refused = peer.refused
        cfg = self.config
        inject = cfg.apply_mode == "inject"
        kernel_ops = self.kernel_ops
        # the cap cannot be reached within this datagram: each flow adds at most one to the copy
        # or to the refused keys (the daemon's cap is the kernel's table size, rarely near)
        direct = peer.node not in cfg.peer_filters and (
            not cfg.max_entries or len(external) + len(refused) + len(flows) < cfg.max_entries)
        refusing = cfg.filter.refused_among(flows, wire.FLOW_HEADER, external) if direct else set()
        unpack_version = _VERSION.unpack_from
        life = peer.life
        stored = life + seq  # ctbridge.sync.peer.LIFE
        stale = 0
        for i, (version, key, fmsg) in enumerate(flows):
            cur = external.get(key)
            if cur is None:
                if tombstones and key in tombstones and tombstones[key][0] >= version:
                    stale += 1
                    continue
                if direct and fmsg[0] != EXPECT:
                    if refusing and i in refusing:
                        self._refused(peer, key, version, seq)
                        continue
                    if refused:
                        refused.pop(key, None)
                elif not self._admit(peer, version, key, fmsg, seq):
                    continue
                if key[0] & MARK:
                    peer.expectations += 1
                external[key] = (fmsg, stored, now)
            elif version > (unpack_version(cur[0], 4)[0] if cur[1] >= life else -1):  # peer.version_of
                if fmsg[0] == EXPECT and not self._allowed(peer, key, fmsg):
                    # an expectation's master and mask are not in its key: every version is
                    # checked, or an accepted one could be turned into a pinhole the filter refuses
                    self._forget(peer, key)
                    self._refused(peer, key, version, seq)
                    continue
                external[key] = (fmsg, stored if stored > cur[1] else cur[1], now)
            else:
                if stored > cur[1]:
                    external[key] = (cur[0], stored, cur[2])
                stale += 1
                continue
            if inject:
                kernel_ops.append(KernelOp("commit", wire.flow_entry(key, fmsg), key))
        stats = self.stats
        stats["flows_received"] += len(flows)
        stats["stale_ignored"] += stale

    def on_delete(self, peer: Peer, msg: wire.Delete, seq: int, now: float) -> bool:
        """A DELETE: the flow leaves the copy, and a tombstone outranks late updates of it."""
        self.take_deletes(peer, [msg], seq, now)
        return True

    def take_deletes(self, peer: Peer, deletes: list[wire.Delete], seq: int, now: float) -> None:
        """The DELETEs of datagram ``seq`` of ``peer`` (one run of them, in order): each flow
        leaves the copy, and a tombstone outranks late updates of it. A hot loop: one call per
        run of DELETEs, not per message (bench/engine_churn.py)."""
        stats = self.stats
        external = peer.external
        tombstones = peer.tombstones
        cfg = self.config
        cap = cfg.max_tombstones
        ttl = now + cfg.tombstone_ttl
        unpack_version = _VERSION.unpack_from
        life = peer.life
        stale = 0
        for version, key in deletes:
            cur = external.get(key)
            if cur is not None and (unpack_version(cur[0], 4)[0] if cur[1] >= life else -1) >= version:
                stale += 1
                continue
            if peer.refused:
                peer.refused.pop(key, None)  # never taken; its tombstone below counts it for a bulk
            old = tombstones.get(key)
            if old is None and len(tombstones) >= cap:
                # the oldest deletion is forgotten: a late update of that flow, older than the
                # deletion, could bring it back until the next bulk (counted, logged once)
                tombstones.popitem(last=False)
                stats["tombstones_dropped"] += 1
                self._limit(peer, "tombstones", cap, whole=True)
            # the highest number that mentioned it: a deletion resent under an older number
            # must not make a bulk that carried the flow look short
            tombstones[key] = (version, ttl, seq if old is None else max(seq, old[2]))
            if cur is not None:
                self._forget(peer, key)
        stats["deletes_received"] += len(deletes)
        stats["stale_ignored"] += stale

    def on_bulk_begin(self, peer: Peer, msg: wire.BulkBegin, seq: int, now: float) -> bool:
        if msg.node in (0, self.node_id):
            peer.bulk_begin = (msg.bulk_id, seq)
            peer.bulk_dirty = False
            peer.warned.clear()  # a cap this bulk hits is said again
            peer.capped = 0
        return True

    def on_bulk_end(self, peer: Peer, msg: wire.BulkEnd, seq: int, now: float) -> bool:
        if msg.node in (0, self.node_id) and peer.bulk_begin is not None and peer.bulk_begin[0] == msg.bulk_id:
            peer.bulk_end = (msg.bulk_id, seq, peer.bulk_begin[1], msg.flows)
            peer.bulk_begin = None
        return True

    def refilter(self) -> None:
        """New filters (a reload): what peers sent before that they refuse leaves their copies,
        refused as if it came now (in inject mode deleted from this kernel)."""
        for peer in self.peers.values():
            for key, cur in list(peer.external.items()):
                if self._allowed(peer, key, cur[0]):
                    continue
                self._forget(peer, key)
                # a flow of the peer's previous life is refused as if it came before any bulk
                self._refused(peer, key, version_of(cur, peer.life), max(0, cur[1] - peer.life))

    # --- reading ----------------------------------------------------------------------------------

    def keys(self) -> set[bytes]:
        """Every flow key some peer told us about."""
        return {k for p in self.peers.values() for k in p.external}

    def expectation_count(self) -> int:
        """Expectations learnt from peers (every copy counted): kept as they come and go, as a
        pass over the copies on each `stats` or metrics scrape cost 30-40 ms of the loop at 1M."""
        return sum(p.expectations for p in self.peers.values())

    def peer_flow(self, node: int, key: bytes) -> bytes | None:
        """The FLOW message ``node``'s copy holds for ``key``; None if none."""
        peer = self.peers.get(node)
        cur = peer.external.get(key) if peer is not None else None
        return cur[0] if cur is not None else None

    # --- time ---------------------------------------------------------------------------------------

    def deadline(self, last_input: float) -> float:
        """When on_timer() wants to run next: the tombstone sweep, the next chunk of expiry."""
        if self.config.expiry_margin > 0:
            # an expiry pass under way takes its next chunk as soon as the adapter can call
            return min(self._next_sweep, last_input if self._expiry_work else self._expiry_at)
        return self._next_sweep

    def on_timer(self, now: float) -> None:
        if self.config.expiry_margin > 0 and (self._expiry_work or now >= self._expiry_at):
            self._expire(now)
        if now >= self._next_sweep:
            self._next_sweep = now + self.config.tombstone_ttl / 2
            for peer in self.peers.values():
                if peer.tombstones:
                    peer.tombstones = OrderedDict((k, v) for k, v in peer.tombstones.items() if v[1] > now)

    # --- admission, caps, bulk completion -----------------------------------------------------------

    def _admit(self, peer: Peer, version: int, key: bytes, fmsg: bytes, seq: int) -> bool:
        """A flow new to this peer's cache: taken only if our own filter, the accept list for that
        peer and the cap allow it; refused ones are remembered by key (a bulk counts them)."""
        cfg = self.config
        refused = peer.refused
        if cfg.max_entries and len(peer.external) + len(refused) >= cfg.max_entries and key not in refused:
            self.stats["flows_refused_cap"] += 1
            peer.capped += 1  # a bulk counts it as mentioned (it is not kept, not even by key)
            self._limit(peer, "flows", cfg.max_entries)
            return False
        if self._allowed(peer, key, fmsg):
            if refused:
                refused.pop(key, None)
            return True
        self._refused(peer, key, version, seq)
        return False

    def _refused(self, peer: Peer, key: bytes, version: int, seq: int) -> None:
        """Our policy refuses a flow ``peer`` sent: remembered by key (a bulk counts it as
        mentioned) and counted, for the peer and in all."""
        peer.refused[key] = (version, seq)
        peer.refused_total += 1
        self.stats["flows_refused_policy"] += 1

    def _forget(self, peer: Peer, key: bytes) -> None:
        """Drop a flow from ``peer``'s copy; in inject mode delete it from this kernel too, unless
        another live peer holds it (see _held_by_another)."""
        _drop(peer, key)
        if self.config.apply_mode == "inject" and not self._held_by_another(peer, key):
            self.kernel_ops.append(KernelOp("delete", None, key))

    def _held_by_another(self, peer: Peer, key: bytes) -> bool:
        """Inject mode: whether a peer other than ``peer`` still tells us of this flow. This
        kernel holds one entry per flow, whoever told us of it: one peer's word that it is gone
        (a faulty node's empty bulk, a former master's expiry) does not take it from another's."""
        return len(self.peers) > 1 and any(key in p.external for p in self.peers.values()
                                           if p is not peer and p.alive)  # a dead peer's copy is stale

    def _allowed(self, peer: Peer, key: bytes, fmsg: bytes) -> bool:
        """What our own filter and the accept list for that peer say of a flow (or expectation)."""
        cfg = self.config
        if fmsg[0] == EXPECT and not cfg.expectations:
            return False
        peer_filter = cfg.peer_filters.get(peer.node)
        family = fmsg[1]
        try:
            return (cfg.filter.accepts_message(key, family, fmsg, wire.FLOW_HEADER)
                    and (peer_filter is None or peer_filter.accepts_message(key, family, fmsg, wire.FLOW_HEADER)))
        except codec.CodecError:
            return False  # attributes our filter cannot read are not written into our kernel either

    def _limit(self, peer: Peer, what: str, limit: int, whole: bool = False) -> None:
        """A cap was hit, said once per bulk. Unless ``whole``, the peer's cache is no longer a
        whole copy: incomplete until a bulk completes without hitting it. (Forgetting the oldest
        deletion keeps the copy whole: a late update older than a deletion arrives within a
        round trip or a resend, long before a busy node's oldest tombstone.)"""
        if what not in peer.warned:
            peer.warned.add(what)
            self.events.append(LimitReached(peer.node, what, limit))
        if not whole:
            peer.limits.add(what)

    def finish_bulk(self, peer: Peer, last_input: float) -> None:
        """Once every datagram up to BULK_END has arrived, the peer's cache is what the bulk said."""
        if peer.bulk_end is None or peer.rx is None:
            return
        _bulk_id, end_seq, begin_seq, flows_sent = peer.bulk_end
        if self.config.reliable and peer.rx.expected <= end_seq:
            return
        gap = peer.rx.missing()
        if peer.bulk_dirty or peer.given_up >= begin_seq or (gap is not None and gap[0] <= end_seq):
            # datagrams of this bulk were lost (best-effort), or given up (a GAP), so "not
            # mentioned" does not mean "gone", nor "mentioned" "still there": keep what we have
            # rather than delete flows the peer still has, and ask again
            self.events.append(BulkCompleted(peer.node, len(peer.external), 0, complete=False))
            peer.bulk_end = None
            peer.bulk_dirty = False
            return
        # Every flow the bulk carried was mentioned since BULK_BEGIN: it is in the cache, or was
        # deleted or refused since. Fewer than BULK_END says means something of it was lost or
        # is not what the peer sent: keep what we have and ask again.
        begin = peer.life + begin_seq  # as stored (ctbridge.sync.peer.LIFE)
        # the flows not mentioned since BULK_BEGIN, in one pass over the copy: at 1M flows 52 ms
        # of the loop, where counting the mentioned ones and then listing the others took 120
        stale = [k for k, v in peer.external.items() if v[1] < begin]
        mentioned = (len(peer.external) - len(stale)
                     + sum(1 for t in peer.tombstones.values() if t[2] >= begin_seq)
                     + sum(1 for r in peer.refused.values() if r[1] >= begin_seq) + peer.capped)
        if mentioned < flows_sent:
            self.stats["bulk_count_mismatches"] += 1
            log.warning("bulk from node %08x said %d flows, %d arrived: asking again in %.0f s", peer.node,
                        flows_sent, mentioned, self.config.resync_retry)
            self.events.append(BulkCompleted(peer.node, len(peer.external), 0, complete=False))
            peer.bulk_end = None
            peer.synced = False
            peer.resync_at = last_input  # asked again after resync_retry, never in a loop
            return
        for key in [k for k, v in peer.refused.items() if v[1] < begin_seq]:
            del peer.refused[key]
        for key in stale:
            self._forget(peer, key)
        peer.bulk_end = None
        peer.synced = True
        peer.resync_at = None
        if not peer.capped:
            peer.limits.discard("flows")  # a whole copy within the cap: caps hit before no longer matter
        peer.bulks += 1
        self.stats["bulks_received"] += 1
        self.events.append(BulkCompleted(peer.node, len(peer.external), len(stale), complete=True))

    def entries(self) -> list[Entry]:
        """Every flow learnt from peers. A flow two peers know is taken from the one that was
        heard from first most recently (peers are kept in the order they appeared)."""
        return [wire.flow_entry(key, msg) for key, msg in self.messages()]

    def expectations(self, now: float) -> list[tuple[Entry, int]]:
        """Every expectation learnt from peers, with what is left of its timeout (whole
        seconds, at least 1), for a commit after the flows: merged as entries()."""
        cap = expectation.TIMEOUT_MAX
        return [(wire.flow_entry(key, cur[0]), max(1, min(cap, int(runs_out(cur) - now + 0.5))))
                for key, cur in self.merged().items() if key[0] & MARK]

    def commit_records(self, now: float) -> Iterator[codec.Record]:
        """entries() for a commit, each flow with what is left of its timeout: until
        the peer's timeout, as it last came, runs out plus the expiry margin (at least 1 s: a
        flow past it is gone from the cache at the next expiry pass). Records point into the
        cached messages: nothing is copied until the codec writes the request.

        Made as they are consumed, by the commit's worker thread, from a snapshot of the cache
        taken here: two lists, no object per flow (a million records made at once held the
        event loop 0.8-1.4 s). A flow the cache changes meanwhile is committed as it was when
        the snapshot was taken, as if the commit had begun a moment earlier."""
        flows = self.merged()
        keys, values = list(flows), list(flows.values())
        margin = self.config.expiry_margin
        base = margin - now if margin > 0 else None
        return self._records(keys, values, base)

    @staticmethod
    def _records(keys: list[bytes], values: list[ExternalFlow], base: float | None) -> Iterator[codec.Record]:
        header = wire.FLOW_HEADER
        record = codec.Record
        for key, cur in zip(keys, values, strict=True):
            if key[0] < MARK:
                msg = cur[0]
                yield record(key, msg[1], msg, header, 0.0 if base is None else cur[2] + base)

    def messages(self) -> list[tuple[bytes, bytes]]:
        """(key, FLOW message) of every flow learnt from peers, merged as entries() does."""
        return [(key, cur[0]) for key, cur in self.merged().items() if key[0] < MARK]

    def merged(self) -> Mapping[bytes, ExternalFlow]:
        """Every peer's copy in one mapping: a flow two peers know is the later peer's (peers are
        kept in the order they appeared). One peer's copy as it is, without a copy."""
        copies = [p.external for p in self.peers.values() if p.external]
        if len(copies) == 1:
            return copies[0]
        merged: dict[bytes, ExternalFlow] = {}
        for external in copies:
            merged.update(external)
        return merged

    def flush(self) -> None:
        for peer in self.peers.values():
            peer.external.clear()
            peer.expectations = 0
            peer.tombstones.clear()
            peer.refused.clear()

    def _expiry_pass(self) -> float:
        """Seconds between expiry passes: a flow is dropped at most this late (half the margin,
        at most 30 s). A pass costs about 0.5 us per cached flow (1,000,000 flows: 0.5 s of CPU
        every 15 s), in chunks of EXPIRY_CHUNK."""
        return min(30.0, max(0.05, self.config.expiry_margin / 2))

    def _expire(self, now: float) -> None:
        """One chunk of an expiry pass (EXPIRY_CHUNK flows): drop the flows of peers whose timeout,
        as it last came, ran out more than the margin ago. A pass starts when the last ended and
        its interval passed; it works on the keys as they were at its start."""
        if not self._expiry_work:
            self._expiry_at = now + self._expiry_pass()
            self._expiry_work = [(p, list(p.external)) for p in self.peers.values() if p.external]
        limit = now - self.config.expiry_margin
        budget = EXPIRY_CHUNK
        expired = 0
        timeout_of = codec.timeout_of
        expect_timeout = expectation.timeout_of
        header = wire.FLOW_HEADER
        work = self._expiry_work
        while work and budget > 0:
            peer, keys = work[-1]
            external = peer.external
            take = min(budget, len(keys))
            budget -= take
            for key in keys[len(keys) - take:]:
                cur = external.get(key)
                # heard within the margin: not expired whatever its timeout (most of a busy table)
                if cur is not None and cur[2] < limit and \
                        cur[2] + (timeout_of(cur[0], header) if cur[0][0] != EXPECT
                                  else expect_timeout(cur[0], header)) < limit:
                    _drop(peer, key)
                    expired += 1
            del keys[len(keys) - take:]
            if not keys:
                work.pop()
        if expired:
            if self.stats["flows_expired"] == 0:
                log.info("flows of peers expired: the peer stopped refreshing them (sync.expiry_margin)")
            self.stats["flows_expired"] += expired


def _drop(peer: Peer, key: bytes) -> None:
    """A flow leaves ``peer``'s copy, and the copy's count of expectations with it."""
    del peer.external[key]
    if key[0] & MARK:
        peer.expectations -= 1

"""`ctbridge diff`: comparing a peer's table with our copy of it, by the sums of ctbridge.sync.digest.

The asker sends DIGEST_ASK for the sums of every bucket; the peer answers with DIGEST (its whole
table summed per bucket); the asker compares them with the sums of its copy and asks for the
keys of at most DIFF_BUCKETS_ASKED buckets that differ; the peer answers with DIGEST_KEYS (whole
buckets, at most wire.DIGEST_KEYS_MAX keys, in parts), and the asker lists what is missing,
extra, stale or refused. A peer answers each kind of question at most once per DIGEST_INTERVAL
(each answer is a pass over its table).

Imports: ctbridge.sync (wire, digest, sequence, shared, internal, peer).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from ctbridge.sync import digest, wire
from ctbridge.sync.internal import InternalCache
from ctbridge.sync.peer import Peer
from ctbridge.sync.sequence import SEQ_MAX
from ctbridge.sync.shared import Part, Shared

DIFF_KEPT = 16  # comparisons remembered (the oldest is forgotten)
DIFF_LIFETIME = 30.0  # seconds a comparison takes answers (`ctbridge diff` waits 10)
DIFF_BUCKETS_ASKED = 32  # buckets whose keys one comparison asks for at most
DIGEST_INTERVAL = 1.0  # seconds: a peer's questions (each costs a pass over our table) answered at most this often


class _Diff:
    """A comparison of a peer's table with our copy of it under way (`ctbridge diff`)."""

    __slots__ = ("asked", "counts", "differ", "keys", "last", "node", "parts", "result", "started", "sums",
                 "truncated")

    def __init__(self, node: int, now: float) -> None:
        self.node = node
        self.started = now
        self.sums: dict[int, digest.Bucket] = {}  # the peer's, by bucket
        self.asked: frozenset[int] = frozenset()  # the buckets whose keys we asked for
        self.keys: dict[bytes, int] = {}  # the peer's keys of those buckets, with their state hash
        self.counts: dict[str, int] = {}  # flows on each side ("theirs", "ours")
        self.differ = 0  # buckets that differ
        self.parts: set[int] = set()  # the indices of the DIGEST_KEYS messages received
        self.last = -1  # the index of the answer's last message, once it came
        self.truncated = False
        self.result: dict[str, Any] | None = None


class Diffs(Part):
    """Comparisons this node asked for, and its answers to peers' questions."""

    def __init__(self, shared: Shared, cache: InternalCache) -> None:
        super().__init__(shared)
        self.cache = cache  # what we answer with: this node's table
        self._diffs: OrderedDict[int, _Diff] = OrderedDict()  # request -> comparison (start)
        self._diff_request = 0
        self._digest_at: dict[tuple[int, bool], float] = {}  # (peer, for keys) -> when we last answered

    def on_ask(self, peer: Peer, msg: wire.DigestAsk, seq: int, now: float) -> bool:
        if msg.node == self.node_id:
            self._answer(peer, msg, now)
        return False

    def on_answer(self, peer: Peer, msg: wire.Digest | wire.DigestKeys, seq: int, now: float) -> bool:
        if msg.node == self.node_id:
            self._take(peer, msg, now)
        return False

    def start(self, node: int, now: float) -> int:
        """Ask ``node`` for its table's sums (ctbridge.sync.digest); the request's number, for
        result()."""
        self._diff_request = (self._diff_request + 1) & SEQ_MAX
        request = self._diff_request
        self._diffs[request] = _Diff(node, now)
        while len(self._diffs) > DIFF_KEPT:
            self._diffs.popitem(last=False)
        self.control.append(wire.digest_ask_msg(node, request))
        return request

    def retry(self, request: int) -> None:
        """Ask again what a comparison waits for (nothing of it is resent: an answer was lost, or
        the peer answered another question for its sums less than DIGEST_INTERVAL before)."""
        d = self._diffs.get(request)
        if d is None or d.result is not None:
            return
        if d.asked:
            d.keys.clear()
            d.parts.clear()
            d.last = -1
            self.control.append(wire.digest_ask_msg(d.node, request, d.asked))
        else:
            d.sums.clear()
            self.control.append(wire.digest_ask_msg(d.node, request))

    def result(self, request: int) -> dict[str, Any] | None:
        """The comparison, once the answers came: "equal", "theirs" and "ours" (flows in each),
        and the keys "missing" (the peer has them, our copy not), "extra" (ours only), "stale"
        (in another state), "refused" (missing because our filters refuse them), "truncated"."""
        d = self._diffs.get(request)
        return d.result if d is not None else None

    def _answer(self, peer: Peer, msg: wire.DigestAsk, now: float) -> None:
        kind = (peer.node, bool(msg.buckets))  # a question for the sums, and one for keys, each a second
        if now < self._digest_at.get(kind, float("-inf")) + DIGEST_INTERVAL:
            self.stats["digests_refused"] += 1
            return  # asked again too soon: each answer is a pass over the whole table
        self._digest_at[kind] = now
        items = self.cache.table.items()
        if not msg.buckets:
            self.control.extend(wire.digest_msgs(peer.node, msg.request, digest.summary(items)))
            return
        # whole buckets only, in order, as many as DIGEST_KEYS_MAX keys allow: the asker compares
        # the buckets it got, and knows the others were left out
        listed = digest.listing(items, set(msg.buckets))
        keys: list[tuple[int, bytes]] = []
        cut = False
        for b in sorted(listed):
            if keys and len(keys) + len(listed[b]) > wire.DIGEST_KEYS_MAX:
                cut = True
                break
            keys.extend(listed[b][:wire.DIGEST_KEYS_MAX])
        self.control.extend(wire.digest_keys_msgs(peer.node, msg.request, keys, cut))

    def _take(self, peer: Peer, msg: wire.Digest | wire.DigestKeys, now: float) -> None:
        d = self._diffs.get(msg.request)
        if d is None or d.node != peer.node or d.result is not None or now > d.started + DIFF_LIFETIME:
            return
        ours = ((k, cur[0]) for k, cur in peer.external.items())  # our copy, read once when needed
        if type(msg) is wire.Digest:
            if d.asked:
                return  # the sums are in: a later DIGEST changes nothing
            for i, (flows, xor) in enumerate(msg.sums):
                d.sums[msg.first + i] = digest.Bucket(flows, xor)
            if len(d.sums) < digest.BUCKETS:
                return
            theirs = [d.sums[b] for b in range(digest.BUCKETS)]
            mine = digest.summary(ours)
            differ = digest.differing(theirs, mine)
            d.counts = {"theirs": sum(b.flows for b in theirs), "ours": sum(b.flows for b in mine)}
            if not differ:
                d.result = {"equal": True, **d.counts, "missing": [], "extra": [], "stale": [], "refused": [],
                            "truncated": False}
                return
            d.differ = len(differ)
            d.asked = frozenset(differ[:DIFF_BUCKETS_ASKED])
            self.control.append(wire.digest_ask_msg(peer.node, msg.request, d.asked))
            return
        assert type(msg) is wire.DigestKeys
        if not d.asked or msg.part in d.parts:
            return
        d.parts.add(msg.part)
        asked = d.asked
        for h, key in msg.keys:  # only keys of the buckets asked, as many as an answer may hold
            if len(d.keys) < wire.DIGEST_KEYS_MAX and digest.bucket_of(key) in asked:
                d.keys[key] = h
        if msg.last:
            d.last = msg.part
            d.truncated = msg.truncated
        if d.last < 0 or len(d.parts) < d.last + 1:
            return  # every part of the answer, whatever their order, or none of it counts
        # the buckets the answer covers: those it listed keys of (whole buckets), and those the
        # peer holds nothing in; a bucket left out of a cut-short answer is not compared
        seen = {digest.bucket_of(k) for k in d.keys}
        covered = {b for b in asked if b in seen or d.sums[b].flows == 0}
        mine_keys = {k: h for h, k in (pair for pairs in digest.listing(ours, covered).values() for pair in pairs)}
        theirs_keys = {k: h for k, h in d.keys.items() if digest.bucket_of(k) in covered}
        diff = digest.compare(theirs_keys, mine_keys)
        refused = [k for k in diff.missing if k in peer.refused]
        d.result = {"equal": False, **d.counts, "missing": diff.missing, "extra": diff.extra, "stale": diff.stale,
                    "refused": refused, "truncated": d.truncated or len(covered) < d.differ}

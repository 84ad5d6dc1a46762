"""Engines wired together in memory with a fake clock and links that drop, duplicate and reorder."""

from __future__ import annotations

import hashlib
import heapq
import random
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack.codec import Entry, Event, EventKind
from ctbridge.sync import wire
from ctbridge.sync.engine import Engine, EngineConfig
from tests.support import builders

KEY = b"k" * 32


def flow(i: int, mark: int = 0, timeout: int = 3600, zone: int = 0) -> Entry:
    """Flow number i (distinct tuples), in some state given by mark and timeout."""
    src = bytes((198, 51, 100, 1 + i // 60000 % 250))
    dst = bytes((203, 0, 113, 1 + i // 15000000 % 250))
    sport = 1024 + i % 60000
    orig = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_TCP, src, dst, sport, 443)
    reply = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_TCP, dst, src, 443, sport)
    return builders.build_entry(ct.AF_INET, orig, reply, status=0xE, timeout=timeout, mark=mark, zone=zone, tcp_state=3)


def pair_key(a: int, b: int) -> bytes:
    """The key nodes a and b share in a pairwise lab."""
    return hashlib.blake2b(f"lab pair {min(a, b)} {max(a, b)}".encode(), digest_size=32).digest()


def pairwise_auth(node: int, cluster: range | list[int], key_id: int = 0x42, encrypt: str = "off") -> wire.Auth:
    """What node holds in a pairwise cluster: a key per other member, none of the others' pairs
    (and every member's sealing key, for encryption)."""
    seals = {j: hashlib.blake2b(f"lab seal {j}".encode(), digest_size=32).digest() for j in cluster}
    return wire.Auth([wire.KeySet("blake2b", key_id, pairs={j: pair_key(node, j) for j in cluster if j != node},
                                  seals=seals)], cluster="lab", encrypt=encrypt, node=node)


class Lab:
    """n engines, node ids 1..n, every datagram to every other node unless addressed to one."""

    def __init__(self, n: int, seed: int = 0, loss: float = 0.0, dup: float = 0.0, reorder: float = 0.0,
                 latency: float = 0.001, bandwidth: float = 0.0, queue: int = 0, pairwise: bool = False,
                 encrypt: str = "off", **config: object) -> None:
        """``bandwidth`` (bytes/s, 0: unlimited) and ``queue`` (datagrams waiting for the wire on
        each directed link, 0: unbounded) make a bottleneck that tail-drops when full: what a
        burst meets in a switch or in the receiver's socket buffer."""
        self.rng = random.Random(seed)
        self.loss, self.dup, self.reorder, self.latency = loss, dup, reorder, latency
        self.bandwidth, self.queue = bandwidth, queue
        self.links: dict[tuple[int, int], deque[float]] = {}  # (from, to) -> when each queued datagram leaves
        self.overflowed = 0  # datagrams the bottleneck queues dropped
        # drop(from, to, datagram) -> True to lose it: a test's own loss pattern
        self.drop: Callable[[int, int, bytes], bool] | None = None
        self.bytes_sent = 0
        self.now = 1000.0
        self.config = config
        self.auth = wire.Auth([KEY])  # the group key (pairwise=False): every node signs with it
        # pairwise=True: node i holds only the keys it shares with each j (as rendered keys are)
        self.auths = {i: pairwise_auth(i, range(1, n + 1), encrypt=encrypt) if pairwise or encrypt != "off"
                      else self.auth for i in range(1, n + 1)}
        self.engines: dict[int, Engine] = {}
        self.epochs: dict[int, int] = {}
        self.in_flight: list[tuple[float, int, int, bytes]] = []
        self._order = 0
        self.sent = 0
        self.dropped = 0
        for node in range(1, n + 1):
            self.start(node)

    def start(self, node: int, epoch: int | None = None, **config: object) -> Engine:
        """(Re)start a node: a new engine with a higher epoch (or ``epoch``: a clock behind and
        the state lost), empty caches; ``config``: settings of this node's own (``max_version=2``:
        a node of the release of 2026-12-01, as far as the protocol goes)."""
        old = self.engines.get(node)  # a wrapped sequence began an epoch of its own: start above it
        self.epochs[node] = epoch if epoch is not None else max(
            self.epochs.get(node, 0), old.epoch if old is not None else 0) + 1
        cfg = EngineConfig(node_id=node, **{**self.config, **config})  # type: ignore[arg-type]
        self.engines[node] = Engine(cfg, self.auths.get(node, self.auth), epoch=self.epochs[node], now=self.now,
                                    nonce=self.rng.getrandbits(64))
        return self.engines[node]

    def event(self, node: int, kind: EventKind, entry: Entry) -> None:
        self.engines[node].kernel_events([Event(kind, entry, 0)], self.now)

    def _send_all(self) -> None:
        for node, eng in list(self.engines.items()):
            for _ in range(1000):
                out = eng.datagrams_to_send(self.now)
                if not out:
                    break
                for data, dest in out:
                    for other in self.engines:
                        if other == node or (dest is not None and dest != other):
                            continue
                        self.sent += 1
                        self.bytes_sent += len(data)
                        if self.rng.random() < self.loss or (self.drop is not None and self.drop(node, other, data)):
                            self.dropped += 1
                            continue
                        leaves = self._bottleneck(node, other, len(data))
                        if leaves is None:
                            continue
                        copies = 2 if self.rng.random() < self.dup else 1
                        for _ in range(copies):
                            delay = self.latency + (self.rng.random() * 0.05 if self.rng.random() < self.reorder else 0)
                            self._order += 1
                            heapq.heappush(self.in_flight, (leaves + delay, self._order, other, data))

    def _bottleneck(self, src: int, dst: int, size: int) -> float | None:
        """When a datagram of ``size`` bytes leaves the link src -> dst, or None if its queue is full."""
        if not self.bandwidth:
            return self.now
        waiting = self.links.setdefault((src, dst), deque())
        while waiting and waiting[0] <= self.now:
            waiting.popleft()
        if self.queue and len(waiting) >= self.queue:
            self.overflowed += 1
            return None
        leaves = max(self.now, waiting[-1] if waiting else self.now) + size / self.bandwidth
        waiting.append(leaves)
        return leaves

    def step(self, max_dt: float = 0.05) -> None:
        self._send_all()
        deadlines = [t for t in (e.get_timer() for e in self.engines.values()) if t is not None]
        nxt = min([self.now + max_dt] + [t for t in deadlines] + [d[0] for d in self.in_flight[:1]])
        self.now = max(self.now, nxt)
        while self.in_flight and self.in_flight[0][0] <= self.now:
            _, _, node, data = heapq.heappop(self.in_flight)
            if node in self.engines:
                self.engines[node].receive_datagram(data, self.now)
        for eng in self.engines.values():
            t = eng.get_timer()
            if t is not None and t <= self.now:
                eng.handle_timer(self.now)

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        for _ in range(200_000):
            if self.now >= end:
                return
            self.step()
        raise AssertionError("lab did not reach its end time")

    def converged(self) -> bool:
        return not self.differences()

    def differences(self) -> list[str]:
        out = []
        for s, sender in self.engines.items():
            want = {e.key: e.attrs for e in sender.internal_cache.entries() + sender.internal_cache.expectations()}
            for r, receiver in self.engines.items():
                if r == s:
                    continue
                peer = receiver.peers.get(s)
                have = {k: v[0][wire.FLOW_HEADER:] for k, v in peer.external.items()} if peer else {}
                if have != want:
                    missing = len(want.keys() - have.keys())
                    extra = len(have.keys() - want.keys())
                    stale = sum(1 for k in want.keys() & have.keys() if want[k] != have[k])
                    out.append(f"node {r} view of {s}: {missing} missing, {extra} extra, {stale} stale")
        return out

    def quiet(self) -> None:
        """Links become perfect; run until everything converged (bounded)."""
        self.loss = self.dup = self.reorder = 0.0
        for _ in range(120):
            self.run(0.5)
            if self.converged():
                return
        raise AssertionError("no convergence: " + "; ".join(self.differences()))


def with_config(lab: Lab, **changes: object) -> None:
    for eng in lab.engines.values():
        eng.config = replace(eng.config, **changes)  # type: ignore[arg-type]

"""Comparing a peer's table with this node's copy of it, without sending the table (`ctbridge
diff`). Pure.

Both sides split the flows into BUCKETS by a hash of the key and sum each bucket up: how many
flows, and the XOR of a hash of each flow's key and state (XOR: the order flows are stored in
does not matter). The asker compares the 256 sums with its own, then asks for the keys, each with
its state's hash, of the buckets that differ only, and finds the flows its copy lacks, holds
beyond the peer's table, or holds in another state. An expectation is compared without its
timeout, which the sender rewrites each time it sends one (what is left of it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from ctbridge.conntrack import expectation
from ctbridge.sync.wire import FLOW_HEADER

BUCKETS = 256
_PERSON = b"ctbridge diff v1"  # BLAKE2b personalization: these hashes mean nothing elsewhere


def bucket_of(key: bytes) -> int:
    return hashlib.blake2b(key, digest_size=1, person=_PERSON).digest()[0]


def state_hash(key: bytes, msg: bytes) -> int:
    """A flow's key and state (its FLOW message: version and attributes); an expectation's
    without its timeout."""
    if key[:1] and key[0] & expectation.EXPECTATION:
        msg = expectation.with_timeout(msg, FLOW_HEADER, 0)
    h = hashlib.blake2b(key, digest_size=8, person=_PERSON)
    h.update(msg)
    return int.from_bytes(h.digest(), "big")


class Bucket(NamedTuple):
    flows: int
    xor: int


def summary(items: Iterable[tuple[bytes, bytes]]) -> list[Bucket]:
    """Per bucket: how many flows, and the XOR of their state hashes. ``items``: (key, message)."""
    counts = [0] * BUCKETS
    xors = [0] * BUCKETS
    for key, msg in items:
        b = bucket_of(key)
        counts[b] += 1
        xors[b] ^= state_hash(key, msg)
    return [Bucket(c, x) for c, x in zip(counts, xors, strict=True)]


def differing(theirs: list[Bucket], ours: list[Bucket]) -> list[int]:
    """The buckets whose sums differ."""
    return [i for i, (a, b) in enumerate(zip(theirs, ours, strict=True)) if a != b]


def listing(items: Iterable[tuple[bytes, bytes]], buckets: set[int]) -> dict[int, list[tuple[int, bytes]]]:
    """The keys of the flows in ``buckets``, each with its state hash."""
    out: dict[int, list[tuple[int, bytes]]] = {b: [] for b in buckets}
    for key, msg in items:
        b = bucket_of(key)
        if b in buckets:
            out[b].append((state_hash(key, msg), key))
    return out


class Difference(NamedTuple):
    missing: list[bytes]  # the peer has them, this node's copy does not
    extra: list[bytes]  # this node's copy has them, the peer does not
    stale: list[bytes]  # both have them, in different states


def compare(theirs: Mapping[bytes, int], ours: Mapping[bytes, int]) -> Difference:
    """Keys with their state hashes, of the same buckets on both sides."""
    missing = sorted(k for k in theirs if k not in ours)
    extra = sorted(k for k in ours if k not in theirs)
    stale = sorted(k for k, h in theirs.items() if k in ours and ours[k] != h)
    return Difference(missing, extra, stale)

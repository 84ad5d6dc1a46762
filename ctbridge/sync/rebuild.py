"""The internal cache brought up to a dump of this kernel's table, in chunks (Rebuild): at start,
after an overrun of the event socket, on a resync.

Imports ctbridge.conntrack.codec and ctbridge.sync (wire, carried, holdback, options); it works on an
InternalCache (ctbridge.sync.internal, whose rebuild() makes it), known here by what it reads
(RebuiltCache): the cache imports this module, not the other way round.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Iterable, Sequence
from typing import Protocol

from ctbridge.conntrack import codec
from ctbridge.conntrack.codec import Entry
from ctbridge.sync import carried, wire
from ctbridge.sync.holdback import Holdback
from ctbridge.sync.options import EngineConfig


class RebuiltCache(Protocol):
    """What a Rebuild reads and writes of the internal cache (ctbridge.sync.internal)."""

    config: EngineConfig
    table: dict[bytes, bytes]
    _told: dict[bytes, float]
    _told_share: float
    _version: int
    _expectations: set[bytes]
    pending: OrderedDict[bytes, None]
    hold: Holdback
    rebuilding: set[bytes] | None
    rebuilds: int


class Rebuild:
    """The internal cache brought up to a dump, fed in chunks so that a table of a million flows
    never holds the event loop (at once, 1M flows took 3.6-4.8 s of one core), in place: events go
    on being applied to the cache meanwhile, and each flow the dump shows changed is written and
    marked to be sent as its chunk is read (the sender reads the cache as it is, so what goes out
    is always what it holds). Then the flows the dump lacks are dropped, in chunks too
    (``leftovers``, ``drop_unseen``), and ``close`` ends it.

    In place rather than a new cache swapped in at the end: the swap had to copy back every flow
    events changed meanwhile (a 1M load's overrun: most of them) and find the flows gone as a set
    difference of two 1M-key dicts, 0.39-0.45 s of the loop at once (a probe on finish,
    docs/performance.md), and building the new dicts resized them on the loop.

    ``newer`` (given to each call, growing): flows whose events were applied since the dump
    began. What the cache holds for them (or their absence) is at least as recent as the dump,
    which may have read them before the event: they keep it. So do the flows events or a refresh
    sweep change while the rebuild runs (``InternalCache.rebuilding``): a sweep between two
    chunks had its newer version overwritten by the dump's older one (found by review)."""

    __slots__ = ("_announce", "_cache", "_now", "_seen")

    def __init__(self, cache: RebuiltCache, now: float, announce: bool) -> None:
        cache.rebuilding = set()  # (one Rebuild at a time: the daemon's KernelReader.rebuilding)
        self._cache = cache
        self._now = now
        self._announce = announce
        self._seen: set[bytes] = set()  # the flows the dump holds: the others are gone

    def feed(self, entries: Sequence[Entry], newer: Container[bytes] = frozenset()) -> None:
        cache = self._cache
        accepts = cache.config.filter.accepts
        table, told, pending = cache.table, cache._told, cache.pending
        changed: Container[bytes] = cache.rebuilding if cache.rebuilding is not None else frozenset()
        seen, now, share, announce = self._seen, self._now, cache._told_share, self._announce
        young, held = cache.hold.young, cache.hold.held
        for entry in entries:
            key = entry.key
            if key in newer or key in changed or not accepts(entry):
                continue
            seen.add(key)
            entry = codec.strip_local(entry)
            if key in young:  # it stays young (sync.delay), in the state the dump read
                cache._version += 1
                young[key] = (wire.flow_msg(cache._version, entry), now + codec.timeout_of(entry.attrs) * share,
                              young[key][2])
                continue
            prev = table.get(key)
            if prev is not None and (codec.same_but_timeout(prev[wire.FLOW_HEADER:], entry.attrs) or (
                    len(prev) - wire.FLOW_HEADER == len(entry.attrs)
                    and carried.same_but_order(prev, entry.attrs, wire.FLOW_HEADER))):
                # only the countdown moved: no need to send the flow again (after an overrun the
                # dump would otherwise re-announce the whole table; kernel_refresh() sends what
                # traffic kept alive longer than peers were told)
                if key not in told:
                    told[key] = now
                continue
            cache._version += 1
            table[key] = wire.flow_msg(cache._version, entry)
            told[key] = now + codec.timeout_of(entry.attrs) * share
            if announce:
                pending[key] = None
                held.pop(key, None)  # it goes now: not again when a held window ends

    def leftovers(self) -> list[bytes]:
        """After the last chunk: the keys to look at for flows the dump lacks (drop_unseen): the
        table's and the young flows' (sync.delay)."""
        return [*self._cache.table, *self._cache.hold.young]

    def drop_unseen(self, keys: Iterable[bytes], newer: Container[bytes] = frozenset()) -> None:
        """Of ``keys``, drop the flows the dump lacked, unless events or a sweep changed them
        meanwhile (a flow created after the dump began is not gone). A flow dump holds no
        expectations (kernel_expect_resync's): they stay."""
        cache = self._cache
        table, told, pending, seen = cache.table, cache._told, cache.pending, self._seen
        changed: Container[bytes] = cache.rebuilding if cache.rebuilding is not None else frozenset()
        expectations = cache._expectations
        young, held = cache.hold.young, cache.hold.held
        for key in keys:
            if key in seen or key in newer or key in changed or key in expectations:
                continue
            if table.pop(key, None) is not None:
                told.pop(key, None)
                held.pop(key, None)  # its DELETE goes once
                if self._announce:
                    pending[key] = None
            else:
                young.pop(key, None)  # it ended young (its end was lost with the overrun): never sent

    def close(self) -> None:
        cache = self._cache
        cache.rebuilding = None
        cache.rebuilds += 1
        self._seen = set()
        # a flow dump holds no expectations (kernel_expect_resync's): moved after every flow the
        # dump may have added, so that a bulk carries each master before its expectations
        table = cache.table
        for key in cache._expectations:
            if key in table:
                table[key] = table.pop(key)

    def finish(self, newer: Container[bytes] = frozenset()) -> None:
        """The rest at once: every flow the dump lacked dropped, and the rebuild closed."""
        self.drop_unseen(self.leftovers(), newer)
        self.close()

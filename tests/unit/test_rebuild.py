"""The internal cache rebuilt from a dump in chunks (sync/internal.py's Rebuild): the same result
as at once, events applied between chunks win over the dump, and nothing is sent before the new
cache is in place. Pure engines, no kernel."""

from __future__ import annotations

from ctbridge.conntrack.codec import Entry, Event, EventKind
from ctbridge.sync import wire
from ctbridge.sync.engine import Engine, EngineConfig
from tests.support.enginelab import flow
from tests.unit.test_timeouts import deliver, pair
from tests.unit.test_timeouts import dump as nl_dump

AUTH = wire.Auth([bytes(range(32))])


def engine() -> Engine:
    return Engine(EngineConfig(node_id=1), AUTH, epoch=1, now=0.0)


def state(e: Engine) -> tuple[dict[bytes, bytes], set[bytes]]:
    """The internal cache without each FLOW's version (the same flow numbered otherwise is the
    same state), and the flows waiting to go out."""
    return ({k: m[:2] + m[10:] for k, m in e.internal.items()}, set(e.internal_cache.pending))


def dump(first: int, n: int, timeout: int = 3600, mark: int = 0) -> list[Entry]:
    return [flow(i, mark=mark, timeout=timeout) for i in range(first, first + n)]


def test_chunks_give_what_the_whole_dump_at_once_gives() -> None:
    at_once, chunked = engine(), engine()
    for e in (at_once, chunked):
        e.kernel_resync(dump(0, 300), 1.0)  # what the cache held
        e.internal_cache.pending.clear()
    # 0-99 gone, 100-199 changed, 200-299 as they were, 300-399 new
    entries = dump(100, 100, mark=7) + dump(200, 100) + dump(300, 100)
    at_once.kernel_resync(entries, 2.0)
    rebuild = chunked.kernel_rebuild(2.0)
    for at in range(0, len(entries), 64):
        rebuild.feed(entries[at:at + 64])
    rebuild.finish()
    assert state(at_once) == state(chunked)
    assert len(chunked.internal) == 300 and len(chunked.internal_cache.pending) == 100 + 100 + 100


def test_events_between_chunks_win_over_the_dump() -> None:
    """A flow the dump read, then changed by an event before the rebuild ends, keeps the event's
    state; one an event deleted stays deleted; one an event created stays, though the dump
    missed it."""
    e = engine()
    e.kernel_resync(dump(0, 10), 1.0)
    changed, deleted, created = flow(3, mark=9), flow(5), flow(50)
    touched: set[bytes] = set()
    rebuild = e.kernel_rebuild(2.0)
    rebuild.feed(dump(0, 5), touched)
    for kind, entry in ((EventKind.UPDATE, changed), (EventKind.DESTROY, deleted), (EventKind.NEW, created)):
        e.kernel_events([Event(kind, entry, 0)], 2.0)
        touched.add(entry.key)  # as Kernel.watch marks them
    rebuild.feed(dump(5, 5), touched)
    rebuild.finish(touched)
    assert deleted.key not in e.internal and created.key in e.internal
    assert e.internal[changed.key][wire.FLOW_HEADER:] == wire.flow_msg(1, changed)[wire.FLOW_HEADER:]
    assert len(e.internal) == 10


def test_nothing_goes_out_before_the_new_cache_is_in_place() -> None:
    """Flows only the dump has are marked to be sent at finish, not when their chunk is read: the
    sender reads the cache as it is, and would have sent a DELETE for each of them."""
    e = engine()
    rebuild = e.kernel_rebuild(1.0)
    rebuild.feed(dump(0, 100))
    assert not e.internal_cache.pending and not e.internal
    rebuild.finish()
    assert len(e.internal) == 100 and len(e.internal_cache.pending) == 100


def test_a_refresh_sweep_between_chunks_is_not_undone_by_the_older_dump() -> None:
    """Found by review: a refresh sweep (its own dump, its own lock) sent flow 1 again with a new
    version and a later deadline between two chunks; finish() put back what the rebuild's dump had
    read before it, an older version that the peer then ignores as stale. The cache keeps what
    the sweep wrote."""
    a, b = pair()
    key = flow(1).key
    a.kernel_events([Event(EventKind.NEW, flow(1, timeout=30), 0)], 0.0)
    deliver(a, b, 0.0)
    rebuild = a.kernel_rebuild(15.0)
    rebuild.feed([flow(1, timeout=20)])  # the rebuild's dump: only the countdown moved
    assert a.kernel_refresh(nl_dump(flow(1, timeout=30)), 15.0, within=20.0) == 1
    swept = a.internal[key]
    deliver(a, b, 15.0)
    rebuild.finish()
    assert a.internal[key] is swept
    assert b.peers[1].external[key][0] == swept

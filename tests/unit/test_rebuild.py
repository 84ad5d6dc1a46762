"""The internal cache rebuilt from a dump in chunks (sync/internal.py's Rebuild): the same result
as at once, events applied between chunks win over the dump, and what goes out meanwhile is what
the cache holds. Pure engines, no kernel."""

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
    return ({k: m[:4] + m[12:] for k, m in e.internal.items()}, set(e.internal_cache.pending))


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


def test_what_goes_out_between_chunks_is_what_the_cache_holds() -> None:
    """The rebuild works in place: a flow the dump shows changed is written and marked to be sent
    as its chunk is read, so a peer hears it between chunks as a FLOW, never as a DELETE of a
    flow only a new cache held (the sender reads the cache as it is). Flows the dump lacks go
    out as DELETEs once the leftovers are looked at."""
    a, b = pair()
    a.kernel_resync(dump(0, 50), 1.0)
    deliver(a, b, 1.0)
    assert len(b.peers[1].external) == 50
    rebuild = a.kernel_rebuild(2.0)
    rebuild.feed(dump(40, 30, mark=3))  # 40-49 changed, 50-69 new; 0-39 gone, not yet known
    assert set(a.internal_cache.pending) <= set(a.internal)
    deliver(a, b, 2.0)
    external = b.peers[1].external
    assert len(external) == 70
    assert all(external[flow(i).key][0] == a.internal[flow(i).key] for i in range(40, 70))
    keys = rebuild.leftovers()
    rebuild.drop_unseen(keys[:10])
    rebuild.drop_unseen(keys[10:])
    rebuild.close()
    deliver(a, b, 2.0)
    assert sorted(external) == sorted(a.internal) == sorted(flow(i).key for i in range(40, 70))


def test_a_flow_created_while_the_leftovers_are_looked_at_stays() -> None:
    """Between two chunks of the leftovers an event creates a flow the dump never read and
    deletes one it read: the first stays (it is newer than the dump), the second stays deleted,
    and a flow the dump lacked, still in the snapshot of keys, is dropped."""
    e = engine()
    e.kernel_resync(dump(0, 10), 1.0)
    touched: set[bytes] = set()
    rebuild = e.kernel_rebuild(2.0)
    rebuild.feed(dump(0, 8), touched)  # 8 and 9 gone
    keys = rebuild.leftovers()
    rebuild.drop_unseen(keys[:5], touched)
    for kind, entry in ((EventKind.NEW, flow(30)), (EventKind.DESTROY, flow(2)), (EventKind.NEW, flow(9))):
        e.kernel_events([Event(kind, entry, 0)], 2.0)
        touched.add(entry.key)
    rebuild.drop_unseen([*keys[5:], flow(30).key], touched)
    rebuild.close()
    assert sorted(e.internal) == sorted(flow(i).key for i in (0, 1, 3, 4, 5, 6, 7, 9, 30))
    assert e.internal_cache.rebuilding is None


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

"""This node's conntrack table as the daemon reads and writes it.

- ``Kernel``: the KernelTable behind one lock (it is not thread-safe), its requests run in a
  worker thread so the sync link is served meanwhile; and the dumps under way (``watching``).
- ``KernelReader``: the event sockets (flows, drained by a thread of their own:
  ctbridge.conntrack.eventdrain; the helpers' expectations with sync.expectations, read on the
  loop) and the dumps that rebuild the internal cache (``resync``).
- ``KernelWriter``: peers' flows into this kernel: the MASTER commit, inject mode's batches,
  expectations after their masters, and the release of this node's former flows.

Rules: the engine reads the event buffers itself (ctbridge.sync.intake), and the echo of our
own flow writes is skipped unread; events that arrive while a dump runs are newer than the dump
(``watching``), and a dump makes every older one under way stale (EVERYTHING); the flows' event
buffers the thread queued before a dump of the whole table begins are older than it and dropped
(EventDrain.cut), and an overrun reaches the loop in order, after the buffers read before it,
and is answered by such a dump. Imports
ctbridge.conntrack, ctbridge.sync (the engine and its kernel ops) and daemon.metrics; service
wires these parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any

from ctbridge.conntrack import codec, eventfilter, expectation
from ctbridge.conntrack.codec import Entry, EventKind
from ctbridge.conntrack.eventdrain import EventDrain
from ctbridge.conntrack.eventsocket import EventSocket
from ctbridge.conntrack.expectation import is_expectation
from ctbridge.conntrack.table import KernelError, KernelTable
from ctbridge.daemon import heap, metrics
from ctbridge.sync.engine import EVERYTHING, Engine, KernelOp
from ctbridge.sync.filter import NoSync

log = logging.getLogger("ctbridge")

EXPECT_RCVBUF = 1 << 20  # the helpers' expectations are few
# Event buffers the engine reads per turn of the event loop. Each is one event (about 5 us of
# engine work), so a turn is a few ms: the sync link's datagrams and the timers are served
# between turns, while the engine's output (after_input) is made once per turn, not per buffer.
EVENTS_PER_TURN = 1024
# Flows of a dump the engine takes per turn of the loop when it rebuilds its internal cache: 3.6 to
# 6 us each (a million at once held the loop for 3.6-4.8 s). 10,000 a turn measured 50-60 ms
# during a 1M load (a probe on Rebuild.feed, docs/performance.md), so 5,000: 25-30 ms.
REBUILD_CHUNK = 5_000
# Keys of the cache a rebuild looks at per turn for flows the dump lacked: four set lookups each,
# about 0.2 us (1M at once held the loop for 0.4 s as a set difference)
LEFTOVER_CHUNK = 50_000


class Kernel:
    """This node's table, one request at a time, in a worker thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.table = KernelTable()
        self.lock = asyncio.Lock()  # one kernel request at a time (KernelTable is not thread-safe)
        self.watching: list[set[bytes]] = []  # while dumps run: for each, the flows events changed meanwhile

    async def run(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in a worker thread, under the lock."""
        async with self.lock:
            return await self.loop.run_in_executor(None, fn, *args)

    @contextlib.contextmanager
    def watch(self) -> Iterator[set[bytes]]:
        """For a dump under way: the keys of the flows events change meanwhile (newer than the dump)."""
        touched = set[bytes]()
        self.watching.append(touched)
        try:
            yield touched
        finally:
            # by identity: list.remove compares sets by value, and two dumps under way with the
            # same keys touched (none, often) took each other's place: a resync ending during a
            # sweep removed the sweep's set, marked its own stale instead, and the sweep's end
            # found nothing to remove (ValueError: the daemon stopped, in the lab's soak)
            self.watching = [t for t in self.watching if t is not touched]

    def supersede(self, own: set[bytes]) -> None:
        """A dump of the whole table was just read (``own``: its set): every other dump under way
        (a refresh sweep) read the table before it, so is older, and must change nothing from
        now on. Said before the rebuild writes anything: a sweep chunk between two of its turns
        would otherwise write its older state over what the rebuild's dump read (found by
        review: a flow the dump saw closing went out again as established)."""
        for other in self.watching:
            if other is not own:
                other.add(EVERYTHING)

    def touched(self, keys: Collection[bytes]) -> None:
        """Events read ``keys``: newer than what any dump under way read (a collection: each
        dump under way reads it)."""
        for touched in self.watching:
            touched.update(keys)

    def close(self) -> None:
        self.table.close()


class KernelReader:
    """The kernel's events, and dumps of its table, into the engine's internal cache.

    ``stats`` is the "kernel" section of the daemon's stats (overruns, events, resyncs, superseded)."""

    def __init__(self, kernel: Kernel, engine: Engine, event_buffer: int, expectations: bool,
                 stats: dict[str, int], after_input: Callable[[], None], event_queue: int = 256 << 20) -> None:
        self.kernel = kernel
        self.engine = engine
        self.stats = stats
        self.after_input = after_input
        self.events = EventSocket(rcvbuf=event_buffer)
        # the echo of our own commits (100,000 events after a failover) is not even decoded
        self.events.skip_portid = kernel.table.portid
        self.events.raw = True  # the engine reads the buffers itself (ctbridge.sync.intake)
        # read by a thread into a queue of at most ``event_queue`` bytes (apply.event_queue), so
        # the kernel's buffer empties while the loop works; read_events sets its wake-up
        self.drain = EventDrain(self.events, event_queue, lambda: None)
        self.select(engine.config.filter.no_sync)
        # of self.drain.overruns and .dropped, what stats' overruns and superseded hold
        self.counted = (0, 0)
        self.rebuilding = asyncio.Lock()  # one rebuild from a dump at a time: the newer dump is applied last
        # the helpers' expectations (sync.expectations): few, read as they come on a socket of their own
        self.expect_events: EventSocket | None = None
        if expectations:
            # our own writes' echo is read too (few): read_expectations keeps their ends
            self.expect_events = EventSocket(rcvbuf=EXPECT_RCVBUF, groups=EventSocket.EXPECT_GROUPS,
                                             decode=expectation.decode_events)

    def select(self, no_sync: NoSync | None) -> None:
        """The no-sync selection into the event socket's kernel-side filter (or the filter off):
        the kernel drops those flows' new and update events before they are queued. Where the
        selection is too long for one filter, every event is read and the engine's own check
        (NoSync) leaves them out."""
        try:
            insns = None if no_sync is None else eventfilter.program(no_sync.marks, no_sync.labels, no_sync.zones,
                                                                      no_sync.ports)
        except ValueError as exc:
            log.warning("%s: the daemon reads their events and leaves them out itself", exc)
            insns = None
        try:
            eventfilter.attach(self.events.sock, insns)
            self.stats["event_filter"] = len(insns or ())
        except OSError as exc:
            self.stats["event_filter"] = 0
            log.warning("the event socket's kernel-side filter could not be set (%s): the daemon reads every "
                        "event and leaves no-sync flows out itself", exc)

    async def read_events(self) -> None:
        """The flows' events into the engine, until cancelled: the thread reads the socket
        (conntrack/eventdrain.py) and wakes this once per handoff; each turn takes up to
        EVENTS_PER_TURN buffers. An overrun comes in order, after the buffers read before it:
        those, and everything the thread reads until the dump begins, are superseded by it."""
        loop = self.kernel.loop
        drain = self.drain
        ready = asyncio.Event()

        def wake() -> None:  # from the thread: one wake-up of the loop per handoff
            loop.call_soon_threadsafe(ready.set)
        drain.wake = wake
        drain.start()
        kernel_stats = self.stats
        try:
            while True:
                taken = drain.take(EVENTS_PER_TURN)
                if taken is None:  # the queue is empty: the thread's next batch wakes us
                    await ready.wait()
                    ready.clear()
                    continue
                if taken.overrun:
                    self.count()
                    log.warning("kernel events were lost (netlink overrun); rebuilding the internal cache from a dump")
                    # Read before the loss was reported, so before the dump begins: the dump is
                    # newer, and applying them after it would put back states the lost events
                    # had moved on from.
                    kernel_stats["superseded"] += len(taken.buffers)
                    await self.resync()
                    continue
                # the echo of our own writes is skipped unread (skip_portid)
                keys = self.engine.kernel_messages(taken.buffers, loop.time(), self.events.skip_portid)
                kernel_stats["events"] += len(keys)
                if keys:
                    self.kernel.touched(keys)
                    self.after_input()
                await asyncio.sleep(0)  # what is left waits for the next turn: datagrams and timers first
        finally:
            drain.close()

    def count(self) -> None:
        """Into the stats: every ENOBUFS of the flows' event socket (conntrackd counts each too),
        and the buffers the event thread dropped as older than a dump (superseded)."""
        overruns, dropped = self.drain.overruns, self.drain.dropped
        self.stats["overruns"] += overruns - self.counted[0]
        self.stats["superseded"] += dropped - self.counted[1]
        self.counted = (overruns, dropped)

    def queue_stats(self) -> dict[str, int]:
        """The event thread's queue: bytes now, at the most, and its bound; wake-ups of the loop;
        times it was full (the thread stopped reading); buffers dropped as older than a dump."""
        d = self.drain
        return {"bytes": d.queued_bytes, "peak_bytes": d.peak_bytes, "limit_bytes": d.limit,
                "handoffs": d.handoffs, "full": d.full, "dropped": d.dropped}

    async def read_expectations(self) -> None:
        sock = self.expect_events
        assert sock is not None
        async for batch in sock.stream():
            if batch.overrun:
                self.stats["overruns"] += 1
                log.warning("expectation events were lost (netlink overrun); reading them again from a dump")
                await self.resync()
                continue
            # Our own writes (peers' expectations) are not this node's to announce, but their end
            # is: an expectation this node had, deleted here because a peer said it was used, must
            # leave the internal cache too, or it is announced again later, and written into a
            # peer's kernel it evicts the live one (FTP's helper keeps one per master).
            own = self.kernel.table.portid
            events = [e for e in batch.events if e.portid != own or e.kind is EventKind.DESTROY]
            self.engine.kernel_expectations(events, self.kernel.loop.time())
            # a dump under way read them before: these are newer
            self.kernel.touched([e.entry.key for e in events])
            self.after_input()

    async def resync(self, announce: bool = True) -> int:
        """The internal cache from a dump of the table (and of the expectations); the flows read.
        The dump is read in a worker thread and taken by the engine REBUILD_CHUNK flows per turn
        of the loop (a million flows at once held it for seconds), events applied meanwhile."""
        kernel = self.kernel
        loop = kernel.loop
        async with self.rebuilding, contextlib.AsyncExitStack() as stack:
            stack.enter_context(heap.collector_paused())  # an entry per flow of the dump, until the end
            async with kernel.lock:
                # flows whose events arrive from here until the rebuild ends: their events are
                # newer than the dump (the rebuild keeps what the cache holds for them)
                touched = stack.enter_context(kernel.watch())
                # what the event thread queued until now is older than this dump (the overrun's
                # own buffers among them): dropped; what it reads from now on is newer, or as new
                self.drain.cut()
                entries = await loop.run_in_executor(None, kernel.table.dump)
                # after the flows: an expectation whose master the dump missed is refused by no one
                expected = (await loop.run_in_executor(None, kernel.table.dump_expectations)
                            if self.expect_events is not None else None)
            kernel.supersede(touched)
            rebuild = self.engine.kernel_rebuild(loop.time(), announce)
            try:
                # taken from the end, in the dump's order, so that each chunk is freed once read:
                # freeing a million entries at once held the loop for 0.1 s
                read = len(entries)
                entries.reverse()
                while entries:
                    chunk = entries[-REBUILD_CHUNK:]
                    del entries[-REBUILD_CHUNK:]
                    chunk.reverse()
                    rebuild.feed(chunk, touched)
                    del chunk
                    await asyncio.sleep(0)
                keys = rebuild.leftovers()
                for at in range(0, len(keys), LEFTOVER_CHUNK):
                    rebuild.drop_unseen(keys[at:at + LEFTOVER_CHUNK], touched)
                    await asyncio.sleep(0)
            finally:
                rebuild.close()
            if expected is not None:
                self.engine.kernel_expect_resync(expected, loop.time(), announce=announce, newer=touched)
        self.stats["resyncs"] += 1
        self.count()
        self.after_input()
        return read

    def close(self) -> None:
        self.drain.close()  # before its socket: the thread must not poll a closed descriptor
        self.events.close()
        if self.expect_events is not None:
            self.expect_events.close()


class KernelWriter:
    """Peers' flows (and expectations) into this kernel, and this node's former flows released.

    ``stats``: the daemon's stats sections; this writes "commit" and "expectations"."""

    def __init__(self, kernel: Kernel, engine: Engine, liberal_tcp: bool, stats: dict[str, Any]) -> None:
        self.kernel = kernel
        self.engine = engine
        self.liberal_tcp = liberal_tcp
        self.stats = stats
        self.histogram = metrics.Histogram()  # the commits' durations
        self.ops: list[KernelOp] = []  # inject mode: the engine's writes not yet made
        self.task: asyncio.Task[None] | None = None
        # inject mode: peers' expectations whose master this kernel lacked -> until when to try again
        self.expect_retry: dict[bytes, float] = {}
        # called after each batch of peers' flows is written (the active-active defer looks again)
        self.after_inject: Callable[[], None] | None = None

    @property
    def injecting(self) -> bool:
        """Flows are being written into the kernel (inject mode)."""
        return self.task is not None and not self.task.done()

    def inject(self, ops: list[KernelOp]) -> None:
        """Inject mode: the engine's writes, made in the background in batches."""
        self.ops.extend(ops)
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self.apply_injected())

    async def apply_injected(self) -> None:
        """Inject mode: peers' flows go into this kernel as they arrive, in batches."""
        table = self.kernel.table
        while self.ops:
            ops, self.ops = self.ops, []
            latest: dict[bytes, KernelOp] = {}
            for op in ops:  # only the last word on each flow counts
                latest[op.key] = op
            commits = [op.entry for op in latest.values() if op.kind == "commit" and op.entry is not None]
            deletes = [op.key for op in latest.values() if op.kind == "delete"]
            # expectations after the flows (their masters may be among them), with their timeouts
            expected = [e for e in commits if is_expectation(e.key)]
            gone = [k for k in deletes if is_expectation(k)]
            if expected or gone:
                commits = [e for e in commits if not is_expectation(e.key)]
                deletes = [k for k in deletes if not is_expectation(k)]
            for key in gone:
                self.expect_retry.pop(key, None)
            try:
                if commits:
                    result = await self.kernel.run(table.commit, commits, self.liberal_tcp)
                    if result.failed:
                        log.warning("inject: %d of %d flows refused by the kernel (first: %s)", len(result.failed),
                                    len(commits), os.strerror(result.failed[0].errno))
                if deletes:
                    await self.kernel.run(table.delete, deletes)
                cap = expectation.TIMEOUT_MAX
                todo = {e.key: (e, max(1, min(cap, expectation.timeout_of(e.attrs)))) for e in expected}
                if commits:  # a master that came now may be one an earlier expectation waited for
                    todo.update((e.key, (e, s)) for e, s in self.retried_expectations() if e.key not in todo)
                if todo:
                    await self.write_expectations(list(todo.values()), retry=True)
                if gone:
                    await self.kernel.run(table.delete_expectations, gone)
                if commits and self.after_inject is not None:
                    self.after_inject()  # the active-active defer: a packet may wait for one of these
            except (OSError, KernelError, codec.CodecError) as exc:
                # said here, once: the flows come again with the next bulk or commit, and a later
                # MASTER must not fail for a batch that could not be written before it
                log.error("inject: %d flows not written into the kernel: %s", len(commits) + len(deletes), exc)

    async def commit(self) -> dict[str, Any]:
        """The peers' flows into this kernel (a new master), then their expectations; the answer's figures."""
        loop = self.kernel.loop
        # each with what is left of its timeout
        entries = self.engine.commit_records(loop.time())
        # flows this kernel already holds (a node taking back the master role): updated at once
        existing = frozenset(self.engine.internal)
        with heap.collector_paused():  # a record per flow, alive until the commit ends
            result = await self.kernel.run(self.kernel.table.commit, entries, self.liberal_tcp, existing)
        info = {"entries": result.created + result.updated, "failed": len(result.failed),
                "seconds": round(result.seconds, 6), "at": time.time()}
        self.stats["commit"] = info
        self.histogram.observe(result.seconds)
        log.info("committed %d flows into the kernel in %.3f s (%d created, %d updated, %d failed)",
                 info["entries"], result.seconds, result.created, result.updated, len(result.failed))
        for failure in result.failed[:5]:
            log.warning("commit: the kernel refused a flow: %s", os.strerror(failure.errno))
        answer = {"committed": info["entries"], "commit_failed": info["failed"], "commit_seconds": info["seconds"]}
        expected = self.engine.external_expectations(loop.time())
        if expected:  # after their masters, which the kernel looks up (and which carry the helper)
            answer["expectations"] = await self.write_expectations(expected)
        return answer

    async def write_expectations(self, expected: list[tuple[Entry, int]], retry: bool = False) -> int:
        """Peers' expectations into this kernel, each with what is left of its timeout; the
        number written. A master the kernel lacks (its flow was refused, ended, or, in inject
        mode, has not arrived yet: ``retry``, tried again with the next injected flows) fails
        that one."""
        left = {entry.key: seconds for entry, seconds in expected}
        result = await self.kernel.run(self.kernel.table.commit_expectations, [e for e, _ in expected],
                                       lambda entry: left[entry.key])
        info = self.stats["expectations"]
        info["written"] += result.done
        for key in left:
            self.expect_retry.pop(key, None)
        if retry:
            self.expect_retry.update((key, self.kernel.loop.time() + left[key]) for key in result.missing)
        else:
            info["failed"] += len(result.missing)
        info["failed"] += len(result.failed)
        if result.failed or (result.missing and not retry):
            first = os.strerror(result.failed[0].errno) if result.failed else "no master flow"
            log.warning("%d of %d expectations not written into the kernel (first: %s)",
                        len(result.missing) + len(result.failed), len(expected), first)
        return int(result.done)

    def retried_expectations(self) -> list[tuple[Entry, int]]:
        """Inject mode: peers' expectations written before their master was in this kernel, as
        the cache holds them now (gone or run out: forgotten)."""
        if not self.expect_retry:
            return []
        now = self.kernel.loop.time()
        current = {e.key: (e, s) for e, s in self.engine.external_expectations(now) if e.key in self.expect_retry}
        for key in [k for k, until in self.expect_retry.items() if k not in current or until <= now]:
            del self.expect_retry[key]
            self.stats["expectations"]["failed"] += 1
        return list(current.values())

    def former_flows(self) -> list[bytes]:
        """This kernel's flows that no peer told us about: the ones this node had as master."""
        external = self.engine.external_keys()
        return [k for k in self.engine.internal if k not in external and not is_expectation(k)]

    async def release(self, seconds: int | None = None) -> int:
        """This node's former flows marked liberal (TCP), with ``seconds`` as their timeout if
        given; how many."""
        result = await self.kernel.run(self.kernel.table.release, self.former_flows(), seconds)
        return int(result.done)

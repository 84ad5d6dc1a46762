"""Kernel adapter: the conntrack event socket drained by a thread of its own, so events leave the
kernel's receive buffer while the daemon's event loop is busy with other work.

Theory of operation. The kernel queues each event on the socket and drops it when the socket's
receive buffer is full (ENOBUFS: an overrun, answered by a dump of the whole table). A reader on
the event loop reads only when the loop is free, so engine work, a refresh sweep's chunk or a
commit's bookkeeping let the kernel's buffer fill. Here a thread sleeps in poll(2), which lets the
interpreter lock go, reads what the socket holds with recvmmsg(2), and hands the receive buffers,
undecoded, to the loop through a queue. The rules:

1. The thread only moves bytes. It never parses an event: parsing in Python would hold the lock
   the loop needs, and the engine reads the buffers itself (ctbridge.sync.intake).
2. The queue is bounded in bytes (each buffer's payload plus the bytes object's own overhead),
   not in items: the bound is memory. When it is full, the thread stops reading; the kernel's
   buffer then fills and the kernel drops events and says so (ENOBUFS), exactly as without the
   thread. A loss is never silent. The queue may pass its bound by one recvmmsg batch at most.
3. One wake-up per handoff: ``wake`` is called when the consumer has found the queue empty and
   something new arrives, not per buffer or per batch; the consumer then takes many at once.
4. An overrun (ENOBUFS) makes the thread read the socket to its end at once, dropping what it
   reads: all of it is older than the dump that must follow, and the kernel reports the next
   loss only once its queue has been emptied (netlink_rcv_wake in net/netlink/af_netlink.c
   clears the congestion only on an empty queue). Only then is the overrun queued, as a marker
   after the buffers read before it, so the loop meets it in order and its dump begins after
   the socket was emptied, as when the loop read the socket itself. Until that dump begins
   (``cut``), what the thread reads is dropped too: it is older than the dump.
5. ``cut`` marks the start of a dump of the whole table: everything queued is older than the
   dump and is dropped; what the thread reads from then on is newer, or as new. A dump that
   begins while the thread is still emptying the socket after an overrun does not answer it:
   the marker still comes, and the loop dumps again.
6. ``close`` wakes the thread through a pipe (poll returns at once, whatever the socket does)
   and joins it: no thread is left blocked, for a daemon's stop and for tests alike.
7. The thread reads when the loop has taken everything (the loop waits for it: the lock is
   free) and GATHER has passed since the socket woke it (the rest of a burst comes in the same
   read), and otherwise at most every READ_INTERVAL, each time all the socket holds (recvmmsg
   keeps the interpreter lock: ctbridge.conntrack.recvmmsg): while the loop is busy, one switch
   of the interpreter lock per interval, not one per event that arrives.

Imports only the conntrack layer (the socket is an EventSocket or anything with its
``fileno``/``receive``).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import select
import sys
import threading
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

log = logging.getLogger(__name__)

# What a queued buffer costs beyond its payload: the bytes object's header (sys.getsizeof(b""))
# and the list slot that holds it. The queue's bound counts both, so it bounds memory.
BUFFER_OVERHEAD = sys.getsizeof(b"") + 8
# While the loop works through what the thread gave it, the thread reads again only once the loop
# found the queue empty, or after this long (rule 7). Each read while the loop runs Python takes
# the interpreter lock from it: a forced switch, and on a busy machine a wait until the thread is
# scheduled, which cost the loop more than the reads themselves when the thread read whenever an
# event came. The kernel's buffer holds the events meanwhile: 20 ms at 100,000 events a second
# is 2,000 events, 1% of what the default apply.event_buffer holds (about 210,000).
READ_INTERVAL = 0.02
# Even when the loop waits for events, the thread reads only GATHER after the socket woke it. The
# kernel delivers a batch of changes (a burst of new connections, a NAT gateway's busy second) one
# event at a time, and a thread that read at the first of them handed the loop a few events per
# read: at 20,000 flows/s, 8 events per recvmmsg (128 calls per 1,000 flow changes), and the
# daemon took 15.1 µs per flow change. Reading 2 ms after the wake: 26 calls and 13.6 µs (5 ms: 16
# calls, 13.0 µs; bench/profile.py --churn 20000 --no-profile, 2026-12-07). 2 ms adds at most 2 ms
# to a flow's replication, and holds 200 events at 100,000 events a second.
GATHER = 0.002
JOIN_TIMEOUT = 5.0  # seconds close() waits for the thread; it wakes at once, so this is a safety net


class Source(Protocol):
    """What the thread reads: EventSocket.receive (one recvmmsg, never blocking; None for an
    overrun) and the descriptor to poll."""

    def fileno(self) -> int: ...

    def receive(self) -> list[bytes] | None: ...


class Drained(NamedTuple):
    """What the consumer took, in the order read. ``overrun``: the kernel dropped events after
    ``buffers`` (which the dump to come supersedes): the consumer must rebuild from a dump."""

    buffers: list[bytes]
    overrun: bool


_OVERRUN = None  # the marker in the queue (a batch is a list, never None)


class EventDrain:
    """The thread that reads ``source`` into a queue of at most ``limit`` bytes; the consumer
    (the event loop) calls ``take`` and ``cut``; ``wake`` is called from the thread when the
    consumer should take again (it must be thread-safe: loop.call_soon_threadsafe).

    Figures, read by the consumer: ``queued_bytes`` now and at the most (``peak_bytes``),
    ``handoffs`` (wake-ups), ``full`` (times the thread waited for room: the kernel's buffer
    was filling meanwhile), ``dropped`` (buffers read after an overrun, or queued when a dump
    began: older than the dump). ``overruns``: ENOBUFS seen."""

    def __init__(self, source: Source, limit: int, wake: Callable[[], None]) -> None:
        self.source = source
        self.limit = limit
        self.wake = wake
        self.queued_bytes = 0
        self.peak_bytes = 0
        self.handoffs = 0
        self.full = 0
        self.dropped = 0
        self.overruns = 0
        self._queue: collections.deque[list[bytes] | None] = collections.deque()
        self._markers = 0  # overrun markers in the queue
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # the thread waits here while the queue is full
        self._asleep = True  # the consumer found the queue empty: the next batch wakes it
        self._dropping = False  # from an overrun until a dump begins after its marker (rule 4)
        self._marker_due = False  # an overrun not yet queued: the socket is being emptied
        self._last_read = 0.0  # time.monotonic() of the thread's last read
        self._error: BaseException | None = None
        self._stopping = False
        self._pipe_r, self._pipe_w = os.pipe()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ctbridge-events", daemon=True)
            self._thread.start()

    # --- the consumer's side (the event loop) ---------------------------------------------------

    def take(self, limit: int) -> Drained | None:
        """Up to ``limit`` buffers in the order read (None: the queue is empty, and the next
        batch calls ``wake``). With an overrun queued, everything up to it at once, whatever
        the limit: the consumer drops them unread (the dump supersedes them)."""
        with self._lock:
            if self._error is not None:
                raise self._error
            queue = self._queue
            if not queue:
                self._asleep = True
                self._room.notify()  # the thread may read at once (rule 7)
                return None
            out: list[bytes] = []
            overrun = False
            while queue and (len(out) < limit or self._markers):
                batch = queue.popleft()
                if batch is _OVERRUN:
                    self._markers -= 1
                    overrun = True
                    break
                room = limit - len(out)
                if self._markers or len(batch) <= room:
                    out += batch
                else:  # the rest of this batch stays first in line
                    out += batch[:room]
                    queue.appendleft(batch[room:])
            self.queued_bytes -= sum(map(len, out)) + BUFFER_OVERHEAD * len(out)
            self._room.notify()
            return Drained(out, overrun)

    def cut(self) -> int:
        """A dump of the whole table begins: what is queued is older (dropped: how many
        buffers), and what the thread reads from now on is kept again (rule 5)."""
        with self._lock:
            dropped = sum(len(b) for b in self._queue if b is not _OVERRUN)
            self._queue.clear()
            self._markers = 0
            if not self._marker_due:  # else the socket still holds older events: the marker will come
                self._dropping = False
            self.queued_bytes = 0
            self.dropped += dropped
            self._room.notify()
            return dropped

    def close(self) -> None:
        """Stop the thread and wait for it (rule 6); the socket stays its owner's to close."""
        with self._lock:
            self._stopping = True
            self._room.notify()
        with contextlib.suppress(OSError):
            os.write(self._pipe_w, b"x")
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT)
            if self._thread.is_alive():  # never seen; said, not hidden
                log.error("the event thread did not stop within %.0f s", JOIN_TIMEOUT)
            self._thread = None
        for fd in (self._pipe_r, self._pipe_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._pipe_r = self._pipe_w = -1

    # --- the thread's side ------------------------------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.source.fileno(), select.POLLIN)
        poller.register(self._pipe_r, select.POLLIN)
        try:
            while True:
                # Sleep in the kernel until the socket holds something (ENOBUFS wakes it too),
                # and only then wait for the turn: a thread that waited for the loop first woke
                # once more per handoff only to find the socket empty.
                for _, flags in poller.poll():
                    if flags & select.POLLNVAL:  # closed under the thread: never spin on it
                        raise OSError(errno.EBADF, "the event socket was closed while being read")
                if not self._wait_for_turn(time.monotonic()):
                    break
                self._read_all()
        except BaseException as exc:  # the consumer raises it: the daemon stops, as when the loop read
            with self._lock:
                self._error = exc
                wake = self._asleep
                self._asleep = False
            if wake:
                self._wake()

    def _read_all(self) -> None:
        """What the socket holds, into the queue (until it is full)."""
        while True:
            got = self.source.receive()
            if got is None:
                with self._lock:
                    self.overruns += 1
                    self._dropping = self._marker_due = True
                continue
            if not got:
                if self._marker_due:  # the socket is empty after an overrun: now the loop hears of it
                    self._put_overrun()
                break
            if self._put(got):  # full: the rest waits in the kernel's buffer
                break
        self._last_read = time.monotonic()

    def _wait_for_turn(self, arrived: float) -> bool:
        """Until the thread may read again (rule 7): the queue has room, and the consumer found
        it empty and GATHER passed since something ``arrived``, or READ_INTERVAL passed since
        the last read (at once after an overrun: the thread reads only to drop). False once
        closing."""
        with self._lock:
            counted = False
            while not self._stopping:
                if self._dropping:
                    return True
                if self.queued_bytes >= self.limit:
                    if not counted:
                        self.full += 1
                        counted = True
                    self._room.wait()
                    continue
                now = time.monotonic()
                if self._asleep:
                    wait = arrived + GATHER - now
                else:
                    wait = self._last_read + READ_INTERVAL - now
                if wait <= 0:
                    return True
                self._room.wait(wait)
            return False

    def _put(self, batch: list[bytes]) -> bool:
        """``batch`` queued (or dropped after an overrun); whether the queue is now full."""
        size = sum(map(len, batch)) + BUFFER_OVERHEAD * len(batch)
        with self._lock:
            if self._dropping:  # older than the dump to come (rule 4)
                self.dropped += len(batch)
                return False
            self._queue.append(batch)
            self.queued_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.queued_bytes)
            wake = self._asleep
            self._asleep = False
            full = self.queued_bytes >= self.limit
        if wake:
            self._wake()
        return full

    def _put_overrun(self) -> None:
        with self._lock:
            self._marker_due = False
            self._queue.append(_OVERRUN)
            self._markers += 1
            wake = self._asleep
            self._asleep = False
        if wake:
            self._wake()

    def _wake(self) -> None:
        self.handoffs += 1
        try:
            self.wake()
        except RuntimeError:  # the loop closed first (a stop): nothing waits for the buffers
            pass

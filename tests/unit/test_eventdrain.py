"""The event socket's thread and its queue (conntrack/eventdrain.py), with a fake socket: the
kernel's side is a script of what each recvmmsg returns (a list of buffers, None for ENOBUFS),
and a socket pair makes it pollable. No root, no kernel; the tests wait for states (bounded
waits), never measure time."""

from __future__ import annotations

import collections
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from ctbridge.conntrack import eventdrain
from ctbridge.conntrack.eventdrain import BUFFER_OVERHEAD, Drained, EventDrain

Step = list[bytes] | None | BaseException | threading.Event


class FakeSocket:
    """What EventSocket.receive returns, step by step: buffers, None (an overrun), an exception
    to raise, or an Event to wait for (the thread stops there until the test sets it)."""

    def __init__(self) -> None:
        self.steps: collections.deque[Step] = collections.deque()
        self.lock = threading.Lock()
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.receives = 0  # recvmmsg calls that returned something (the queue's fullness stops them)

    def feed(self, *steps: Step) -> None:
        with self.lock:
            self.steps.extend(steps)
        self.writer.send(b"!")  # readable: poll returns

    def fileno(self) -> int:
        return self.reader.fileno()

    def receive(self) -> list[bytes] | None:
        with self.lock:
            step = self.steps.popleft() if self.steps else []
            if not self.steps:
                try:
                    while self.reader.recv(4096):
                        pass
                except BlockingIOError:
                    pass
        if isinstance(step, threading.Event):
            step.wait(10)
            return self.receive()  # then the next step, as if the held call went on
        if isinstance(step, BaseException):
            raise step
        if step:
            self.receives += 1
        return step

    def left(self) -> int:
        with self.lock:
            return len(self.steps)

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


def until(what: str, check: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


@pytest.fixture
def fake() -> Iterator[FakeSocket]:
    sock = FakeSocket()
    yield sock
    sock.close()


class Woken:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def drain_of(sock: FakeSocket, limit: int = 1 << 20) -> tuple[EventDrain, Woken]:
    woken = Woken()
    drain = EventDrain(sock, limit, woken)
    drain.start()
    return drain, woken


def test_buffers_come_in_order_with_one_wake_up_per_handoff(fake: FakeSocket) -> None:
    drain, woken = drain_of(fake)
    try:
        assert drain.take(10) is None  # the consumer found it empty: the next batch wakes it
        fake.feed([b"a", b"b"], [b"c"], [b"d", b"e"])
        until("three batches queued", lambda: fake.left() == 0 and drain.queued_bytes == 5 + 5 * BUFFER_OVERHEAD)
        assert woken.count == 1 and drain.handoffs == 1  # three batches, one wake-up
        assert drain.take(100) == Drained([b"a", b"b", b"c", b"d", b"e"], False)
        assert drain.queued_bytes == 0
        assert drain.take(100) is None
        fake.feed([b"f"])
        until("the second handoff", lambda: woken.count == 2)
        assert drain.take(100) == Drained([b"f"], False)
    finally:
        drain.close()


def test_a_turn_takes_at_most_its_limit_and_the_rest_of_a_batch_stays_first(fake: FakeSocket) -> None:
    drain, woken = drain_of(fake)
    try:
        fake.feed([b"1", b"2", b"3"], [b"4"])
        until("both batches", lambda: drain.queued_bytes == 4 * (1 + BUFFER_OVERHEAD))
        assert drain.take(2) == Drained([b"1", b"2"], False)
        assert drain.take(2) == Drained([b"3", b"4"], False)
        assert drain.queued_bytes == 0 and woken.count == 1  # not asleep in between: no wake-up needed
    finally:
        drain.close()


def test_a_full_queue_stops_the_reading_until_the_loop_takes(fake: FakeSocket) -> None:
    """Bounded in bytes: past the bound the thread reads nothing more, so the kernel's own buffer
    fills and an overrun is reported by the kernel (never a silent loss here)."""
    size = 100
    limit = 2 * (size + BUFFER_OVERHEAD)
    drain, _ = drain_of(fake, limit)
    try:
        fake.feed(*([b"x" * size] for _ in range(5)))
        until("the thread to wait for room", lambda: drain.full == 1)
        assert fake.receives == 2 and fake.left() == 3  # two read (the bound reached), three still in "the kernel"
        assert drain.peak_bytes == limit
        taken = drain.take(1)
        assert taken == Drained([b"x" * size], False)
        until("the thread to wait for room again", lambda: drain.full == 2)
        assert fake.receives == 3 and drain.queued_bytes == limit and fake.left() == 2
    finally:
        drain.close()


def test_an_overrun_comes_after_the_buffers_before_it_once_the_socket_is_emptied(fake: FakeSocket) -> None:
    """ENOBUFS: what the thread reads until the socket is empty is older than the dump that must
    follow (dropped), then the marker comes, after the buffers read before the loss."""
    drain, _ = drain_of(fake)
    try:
        fake.feed([b"before"], None, [b"older1"], [b"older2"])
        until("the marker", lambda: drain._markers == 1)
        assert drain.take(1) == Drained([b"before"], True)  # the marker comes with them, whatever the limit
        assert drain.dropped == 2 and drain.overruns == 1
        fake.feed([b"still older"])  # read before the dump begins: older than it too
        until("the socket read", lambda: drain.dropped == 3)
        assert drain.take(10) is None
        assert drain.cut() == 0  # the dump begins
        fake.feed([b"newer"])
        until("a buffer newer than the dump", lambda: drain.queued_bytes > 0)
        assert drain.take(10) == Drained([b"newer"], False)
        assert drain.overruns == 1 and drain.dropped == 3
    finally:
        drain.close()


def test_a_dump_that_begins_while_the_socket_is_still_emptied_does_not_answer_the_overrun(fake: FakeSocket) -> None:
    """A dump begun before the thread emptied the socket after an overrun (another resync) may
    be older than events still in the socket: the marker still comes, for a dump after it."""
    drain, _ = drain_of(fake)
    hold = threading.Event()
    try:
        fake.feed([b"queued"], None, hold, [b"older"])
        until("the thread held while emptying", lambda: fake.left() == 1)
        assert drain.cut() == 1  # another resync's dump begins: "queued" is older than it
        hold.set()
        until("the marker", lambda: drain._markers == 1)
        assert drain.dropped == 2  # "queued" (the cut) and "older" (read after the overrun)
        assert drain.take(10) == Drained([], True)  # the overrun, answered by the next dump
        drain.cut()
        fake.feed([b"newer"])
        until("a buffer newer than that dump", lambda: drain.queued_bytes > 0)
        assert drain.take(10) == Drained([b"newer"], False)
    finally:
        hold.set()
        drain.close()


def test_a_dump_drops_what_was_queued_before_it(fake: FakeSocket) -> None:
    drain, _ = drain_of(fake)
    try:
        fake.feed([b"a"], [b"b", b"c"])
        until("both batches", lambda: drain.queued_bytes == 3 * (1 + BUFFER_OVERHEAD))
        assert drain.cut() == 3 and drain.dropped == 3 and drain.queued_bytes == 0
        assert drain.take(10) is None
    finally:
        drain.close()


def test_a_read_error_reaches_the_loop(fake: FakeSocket) -> None:
    drain, woken = drain_of(fake)
    try:
        assert drain.take(10) is None
        fake.feed(OSError(90, "Message too long"))
        until("the wake-up", lambda: woken.count == 1)
        with pytest.raises(OSError, match="too long"):
            drain.take(10)
    finally:
        drain.close()


@pytest.mark.parametrize("full", [False, True], ids=["blocked in poll", "waiting for room"])
def test_close_stops_a_thread_that_waits_and_leaves_none_behind(fake: FakeSocket, full: bool) -> None:
    drain, _ = drain_of(fake, limit=1)
    if full:
        fake.feed([b"x"], [b"y"])
        until("the thread to wait for room", lambda: drain.full == 1)
    else:
        until("the thread to sleep in poll", lambda: drain._thread is not None and drain._thread.is_alive())
    thread = drain._thread
    assert thread is not None
    drain.close()
    assert not thread.is_alive()
    assert not [t for t in threading.enumerate() if t.name == "ctbridge-events"]
    drain.close()  # twice: nothing left to close, nothing closed that is not its own


def test_while_the_loop_works_the_thread_reads_again_only_once_it_took_everything(
        fake: FakeSocket, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rule 7: each read while the loop runs takes the interpreter lock from it, so the thread
    reads again only when the loop found the queue empty (or READ_INTERVAL later: made an hour
    here, so only the loop's emptiness can let it read)."""
    monkeypatch.setattr(eventdrain, "READ_INTERVAL", 3600.0)
    drain, woken = drain_of(fake)
    try:
        fake.feed([b"first"])
        until("the first batch", lambda: woken.count == 1)
        fake.feed([b"second"])
        time.sleep(0.1)  # room for a thread that would read at once (it must not)
        assert fake.left() == 1
        assert drain.take(10) == Drained([b"first"], False)
        assert fake.left() == 1  # taken, but the loop has not come back for more: still not read
        assert drain.take(10) is None  # now it has: the thread reads
        until("the second batch", lambda: drain.queued_bytes > 0)
        assert drain.take(10) == Drained([b"second"], False) and woken.count == 2
    finally:
        drain.close()


def test_while_the_loop_waits_the_thread_gathers_what_arrives_within_gather(
        fake: FakeSocket, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rule 7: events of a burst arrive one by one; the thread reads GATHER after the first woke
    it, not at the first, so the loop takes them in one handoff (at 20,000 flows/s it had read 8
    events per recvmmsg). GATHER made 2 s here: the test's 50 ms pause is well inside it."""
    monkeypatch.setattr(eventdrain, "GATHER", 2.0)
    drain, woken = drain_of(fake)
    try:
        assert drain.take(10) is None  # the loop waits
        fake.feed([b"a"])
        time.sleep(0.05)
        assert fake.left() == 1 and woken.count == 0  # not read at the first event
        fake.feed([b"b"])
        until("the gathered read", lambda: woken.count == 1)
        until("both queued", lambda: fake.left() == 0)
        assert drain.take(10) == Drained([b"a", b"b"], False) and woken.count == 1
    finally:
        drain.close()

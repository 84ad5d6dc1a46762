"""sendmmsg and recvmmsg on UDP (ctbridge.daemon.mmsg) over loopback, and the sync link's send
queue around them (ctbridge.daemon.synclink): both directions, sources, truncation, a partial
send, a full send buffer; each with sendmmsg/recvmmsg and with the plain calls (no root)."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Iterator, Sequence

import pytest

from ctbridge.config import settings
from ctbridge.daemon import mmsg, synclink
from ctbridge.daemon.synclink import SyncLinks
from ctbridge.sync.engine import RECEIVE_LIMIT
from tests.unit.test_config import GOOD

BOTH = [pytest.param(True, id="mmsg"), pytest.param(False, id="plain")]


def _mmsg(use: bool) -> bool:
    if use and not mmsg.MMSG:
        pytest.skip("this libc has no sendmmsg/recvmmsg")
    return use


@pytest.fixture(params=[(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")], ids=["v4", "v6"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, socket.socket]]:
    family, host = request.param
    try:
        a, b = socket.socket(family, socket.SOCK_DGRAM), socket.socket(family, socket.SOCK_DGRAM)
    except OSError:
        pytest.skip("no IPv6 here")
    with a, b:
        a.bind((host, 0))
        b.bind((host, 0))
        a.setblocking(False)
        b.setblocking(False)
        yield a, b


@pytest.mark.parametrize("use", BOTH)
def test_datagrams_go_each_to_its_address_and_arrive_with_their_source(
        pair: tuple[socket.socket, socket.socket], use: bool) -> None:
    a, b = pair
    outbox, inbox = mmsg.Outbox(a, count=8, mmsg=_mmsg(use)), mmsg.Inbox(b, count=4, size=64, mmsg=use)
    assert outbox.mmsg == inbox.mmsg == use
    assert inbox.receive() == []
    sent = [bytes([i]) * (i + 1) for i in range(6)]
    assert outbox.send([(d, b.getsockname()) for d in sent]) == 6
    first, second = inbox.receive(), inbox.receive()
    assert [d for d, _ in first] == sent[:4] and [d for d, _ in second] == sent[4:]
    assert {src for _, src in first + second} == {a.getsockname()}  # as recvfrom gives it
    # and back, in the other direction, to the source read
    back = mmsg.Outbox(b, mmsg=use)
    assert back.send([(b"answer", first[0][1])]) == 1
    assert mmsg.Inbox(a, mmsg=use).receive() == [(b"answer", b.getsockname())]


@pytest.mark.parametrize("use", BOTH)
def test_a_batch_larger_than_the_outbox_goes_in_part(pair: tuple[socket.socket, socket.socket], use: bool) -> None:
    a, b = pair
    outbox, inbox = mmsg.Outbox(a, count=3, mmsg=_mmsg(use)), mmsg.Inbox(b, count=16, mmsg=use)
    batch = [(bytes([i]), b.getsockname()) for i in range(5)]
    assert outbox.send(batch) == 3 and outbox.send(batch[3:]) == 2 and outbox.send([]) == 0
    assert [d for d, _ in inbox.receive()] == [bytes([i]) for i in range(5)]


@pytest.mark.parametrize("use", BOTH)
def test_a_datagram_longer_than_the_buffer_arrives_cut_and_counted_so_the_engine_refuses_it(
        pair: tuple[socket.socket, socket.socket], use: bool) -> None:
    a, b = pair
    size = RECEIVE_LIMIT + 1  # as the sync link reads
    inbox = mmsg.Inbox(b, count=4, size=size, mmsg=_mmsg(use))
    long, fits = bytes(range(256)) * 40, b"x" * RECEIVE_LIMIT
    assert mmsg.Outbox(a, mmsg=use).send([(long, b.getsockname()), (fits, b.getsockname())]) == 2
    got = [d for d, _ in inbox.receive()]
    assert got == [long[:size], fits] and inbox.truncated == 1
    assert len(got[0]) > RECEIVE_LIMIT  # Engine.receive_datagram counts it in rejected_oversize


@pytest.mark.parametrize("use", BOTH)
def test_a_full_receiver_takes_part_of_a_batch_then_the_sender_is_told_to_wait(use: bool) -> None:
    """A datagram socket pair: what the receiver has not read stays charged to the sender's small
    send buffer, then a non-blocking sender gets EAGAIN, as a UDP socket whose buffer is full does."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        a.setblocking(False)
        b.setblocking(False)
        outbox = mmsg.Outbox(a, count=64, mmsg=_mmsg(use))
        batch: list[tuple[bytes, mmsg.Address | None]] = [(i.to_bytes(2, "big"), None) for i in range(64)]
        taken = outbox.send(batch)
        assert 0 < taken < 64
        with pytest.raises(BlockingIOError):
            outbox.send(batch[taken:])
        got = mmsg.Inbox(b, count=64, size=16, mmsg=False).receive()  # recvmmsg here is for UDP only
        assert [d for d, _ in got] == [d for d, _ in batch[:taken]]
        assert outbox.send(batch[taken:]) > 0  # room again


def test_the_kernels_socket_addresses_read_back_as_recvfrom_gives_them() -> None:
    for family, address in ((socket.AF_INET, ("192.0.2.1", 3780)), (socket.AF_INET6, ("2001:db8::1", 3780, 0, 0))):
        assert mmsg.address_of(family, mmsg.sockaddr(family, address)) == address
    assert len(mmsg.sockaddr(socket.AF_INET, ("192.0.2.1", 1))) == mmsg.SOCKADDR_IN
    assert len(mmsg.sockaddr(socket.AF_INET6, ("2001:db8::1", 1))) == mmsg.SOCKADDR_IN6


# --- the sync link's send queue -------------------------------------------------------------


class _Outbox:
    """An Outbox whose kernel takes ``takes[i]`` datagrams on its i-th call (an exception: raised)."""

    def __init__(self, takes: list[int | OSError]) -> None:
        self.takes = takes
        self.sent: list[bytes] = []

    def send(self, datagrams: Sequence[tuple[bytes, mmsg.Address | None]]) -> int:
        take = self.takes.pop(0) if self.takes else len(datagrams)
        if isinstance(take, OSError):
            raise take
        self.sent += [d for d, _ in datagrams[:take]]
        return take


@pytest.fixture
def links() -> Iterator[tuple[SyncLinks, socket.socket, asyncio.AbstractEventLoop]]:
    loop = asyncio.new_event_loop()
    links = SyncLinks(settings.parse(GOOD), bind=False)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    links.socks, links.queues, links.loop = [a], [[]], loop  # one link on a socket always writable
    try:
        yield links, a, loop
    finally:
        links.close()
        b.close()
        loop.close()


def _turn(loop: asyncio.AbstractEventLoop) -> None:
    loop.run_until_complete(asyncio.sleep(0))


def test_datagrams_left_by_a_full_send_buffer_wait_for_room_and_go_in_order(
        links: tuple[SyncLinks, socket.socket, asyncio.AbstractEventLoop]) -> None:
    sl, _, loop = links
    box = _Outbox([2, BlockingIOError(errno.EAGAIN, "full")])
    sl.outboxes = [box]  # type: ignore[list-item]
    for i in range(5):
        sl.send(bytes([i]), None)
    assert box.sent == []  # queued: the turn's datagrams leave together
    sl.flush()
    assert box.sent == [b"\x00", b"\x01"] and sl.blocked == {0} and sl.send_waits == 1
    sl.send(b"\x05", None)
    sl.flush()  # blocked: nothing goes past the queue
    assert len(box.sent) == 2
    _turn(loop)  # the socket is writable
    assert box.sent == [bytes([i]) for i in range(6)] and sl.blocked == set() and sl.queues == [[]]
    assert sl.send_errors == 0


def test_a_refused_datagram_is_counted_and_lost_the_rest_go(
        links: tuple[SyncLinks, socket.socket, asyncio.AbstractEventLoop]) -> None:
    sl, _, _ = links
    box = _Outbox([OSError(errno.ENETUNREACH, "unreachable")])
    sl.outboxes = [box]  # type: ignore[list-item]
    for i in range(3):
        sl.send(bytes([i]), None)
    sl.flush()
    assert box.sent == [b"\x01", b"\x02"] and sl.send_errors == 1 and sl.blocked == set()


def test_a_link_blocked_for_long_drops_what_comes_past_its_queue_and_counts_it(
        links: tuple[SyncLinks, socket.socket, asyncio.AbstractEventLoop],
        monkeypatch: pytest.MonkeyPatch) -> None:
    sl, _, _ = links
    monkeypatch.setattr(synclink, "SEND_QUEUE", 3)
    sl.outboxes = [_Outbox([BlockingIOError(errno.EAGAIN, "full")])]  # type: ignore[list-item]
    for i in range(5):
        sl.send(bytes([i]), None)
    sl.flush()
    assert len(sl.queues[0]) == 3 and sl.send_errors == 2 and sl.blocked == {0}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("use", BOTH)
def test_two_sync_links_over_loopback_carry_a_turns_datagrams_in_one_batch(
        use: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two nodes' SyncLinks on 127.0.0.1 and 127.0.0.2: what one queues and flushes, the other
    reads in one wake-up, each datagram with its source, then makes its output once; with the
    batched calls and, as where libc lacks them, with the plain ones."""
    monkeypatch.setattr(mmsg, "MMSG", _mmsg(use))
    port = _free_port()

    def node(local: str, peer: str) -> SyncLinks:
        return SyncLinks(settings.parse(f'[node]\nname = "n{local[-1]}"\n[sync]\nlocal = "{local}"\n'
                                        f'peers = ["{peer}"]\nport = {port}\nauth = "none"\n'))
    loop = asyncio.new_event_loop()
    a, b = node("127.0.0.1", "127.0.0.2"), node("127.0.0.2", "127.0.0.1")
    got: list[tuple[bytes, tuple[object, ...], int]] = []
    outputs = []
    try:
        assert a.outboxes[0].mmsg == b.inboxes[0].mmsg == use
        a.open(loop, lambda *_: None, lambda: None)
        b.open(loop, lambda data, addr, link: got.append((data, addr, link)), lambda: outputs.append(len(got)))
        for i in range(10):
            a.send(bytes([i]) * 100, None)
        a.flush()
        for _ in range(100):  # bounded: loopback hands them over within the sendmmsg
            if got:
                break
            _turn(loop)
        assert got == [(bytes([i]) * 100, ("127.0.0.1", port), 0) for i in range(10)] and outputs == [10]
        assert a.send_errors == 0 and a.queues == [[]]
    finally:
        a.close()
        b.close()
        loop.close()

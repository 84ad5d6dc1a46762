"""Kernel adapter: the subscription to this network namespace's conntrack events (ctnetlink's
multicast groups), read with recvmmsg in batches and handed out raw or decoded.

A receive-buffer overrun (ENOBUFS: the kernel dropped events) is reported, never hidden: the
reader must rebuild its view of the table from a dump (ctbridge.conntrack.table.KernelTable).
Imports only the conntrack layer.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterable
from typing import NamedTuple

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec
from ctbridge.conntrack import recvmmsg as mmsg
from ctbridge.conntrack.codec import Event
from ctbridge.conntrack.table import SO_RCVBUFFORCE, explain, open_socket

log = logging.getLogger(__name__)

DEFAULT_EVENT_RCVBUF = 128 << 20  # about 130,000 events: each costs ~1 KiB of buffer (skb truesize)
MAX_EVENT_RCVBUF = 256 << 20


class EventBatch(NamedTuple):
    """Events read in one go. ``overrun`` means the kernel dropped events before these (ENOBUFS):
    the reader's view of the table is incomplete and must be rebuilt from a dump."""

    events: list[Event]
    overrun: bool
    buffers: tuple[bytes, ...] | list[bytes] = ()  # with EventSocket.raw: the receive buffers, undecoded



class EventSocket:
    """Subscription to the conntrack event groups of this network namespace.

    Read either with ``read()`` (non-blocking, for callers with their own loop) or with
    ``async for batch in sock.stream()``. A receive-buffer overrun (ENOBUFS) is reported as an
    EventBatch with ``overrun=True``; the subscription continues.
    """

    GROUPS = (ct.NFNLGRP_CONNTRACK_NEW, ct.NFNLGRP_CONNTRACK_UPDATE, ct.NFNLGRP_CONNTRACK_DESTROY)
    # expectations, read with expectation.decode_events (nothing changes an expectation in place
    # that a peer needs: EXP_UPDATE is not joined)
    EXPECT_GROUPS = (ct.NFNLGRP_CONNTRACK_EXP_NEW, ct.NFNLGRP_CONNTRACK_EXP_DESTROY)

    def __init__(self, rcvbuf: int = DEFAULT_EVENT_RCVBUF, groups: Iterable[int] = GROUPS,
                 max_rcvbuf: int = MAX_EVENT_RCVBUF,
                 decode: Callable[[bytes, int], list[Event]] = codec.decode_events) -> None:
        self.max_rcvbuf = max(max_rcvbuf, rcvbuf)
        self.sock = open_socket(rcvbuf)
        self.groups = tuple(groups)
        for group in self.groups:
            self.sock.setsockopt(ct.SOL_NETLINK, ct.NETLINK_ADD_MEMBERSHIP, group)
        self.sock.setblocking(False)
        # non-blocking reads, by the loop or by the thread that drains the socket: neither needs
        # to let the interpreter lock go for them (recvmmsg._RECVMMSG_HOLDING says why)
        self.receiver = mmsg.Receiver(self.sock, hold_lock=True)
        self.overruns = 0
        # events caused by this port's writes (a KernelTable's portid) are dropped undecoded
        self.skip_portid = -1
        self.raw = False  # read() hands out the receive buffers undecoded (ctbridge.sync.intake reads them)
        self.decode = decode

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> EventSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def pause(self) -> None:
        """Leave the event groups: a caller about to write many flows, and to dump the table
        afterwards, does not need the echo of its writes (100,000 events after a failover,
        read while the commit runs). Events queued before are still read."""
        for group in self.groups:
            self.sock.setsockopt(ct.SOL_NETLINK, ct.NETLINK_DROP_MEMBERSHIP, group)

    def resume(self) -> None:
        """Join the event groups again; what changed meanwhile must come from a dump."""
        for group in self.groups:
            self.sock.setsockopt(ct.SOL_NETLINK, ct.NETLINK_ADD_MEMBERSHIP, group)

    def read(self, limit: int = 256) -> EventBatch:
        """What is queued now, up to ``limit`` receive buffers; never blocks.

        After an overrun the queue is read to the end whatever the limit: the kernel reports a
        netlink overrun (ENOBUFS) only once per congestion, and the congestion ends only when the
        queue has been emptied (net/netlink/af_netlink.c, netlink_overrun/netlink_rcv_wake). A
        reader that left events queued would not hear of the next loss. The buffer also doubles,
        up to ``max_rcvbuf``, as conntrackd's does.
        """
        events: list[Event] = []
        buffers: list[bytes] = []
        overrun = False
        n = 0
        while n < limit or overrun:
            try:
                datagrams = self.receiver.receive()
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    overrun = True
                    self.overruns += 1
                    self._grow()
                    continue
                raise explain(exc.errno or 0, "reading conntrack events") from exc
            if not datagrams:
                break
            n += len(datagrams)
            if self.raw:
                buffers += datagrams
                continue
            skip = self.skip_portid
            decode = self.decode
            for data in datagrams:
                events.extend(decode(data, skip))
        return EventBatch(events, overrun, buffers)

    def receive(self) -> list[bytes] | None:
        """One recvmmsg of what is queued now, undecoded ([] if nothing; never blocks), for a
        reader of its own (ctbridge.conntrack.eventdrain). None: the kernel dropped events
        before what comes next (ENOBUFS), counted in ``overruns``, the buffer grown."""
        try:
            return self.receiver.receive()
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                self.overruns += 1
                self._grow()
                return None
            raise explain(exc.errno or 0, "reading conntrack events") from exc

    def _grow(self) -> None:
        size = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2  # the kernel reports it doubled
        if size < self.max_rcvbuf:
            new = min(self.max_rcvbuf, 2 * size)
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, new)
            log.info("netlink event buffer grown to %d bytes after an overrun", new)

    async def stream(self) -> AsyncIterator[EventBatch]:
        """Batches of events as they arrive, forever (until the socket is closed)."""
        import asyncio  # here: the CLI's listings start faster without it
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(self.sock.fileno(), ready.set)
        try:
            while True:
                await ready.wait()
                ready.clear()
                batch = self.read()
                if batch.events or batch.buffers or batch.overrun:
                    yield batch
        finally:
            loop.remove_reader(self.sock.fileno())

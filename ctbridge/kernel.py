"""Kernel adapter: this network namespace's conntrack table over raw ctnetlink sockets.

The only module that talks to the kernel's conntrack table. Messages are built and parsed by
``ctbridge.codec``; here they are only sent and received. Writes are batched, many netlink messages
per ``send()``, and only the last message of a batch asks for an acknowledgement: the kernel
processes a batch in order and answers every failed message with an NLMSG_ERROR carrying its
sequence number, so failures still map to their entries.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import NamedTuple

from ctbridge import codec
from ctbridge import ctnetlink as ct
from ctbridge.codec import Entry, Event

log = logging.getLogger(__name__)

# From include/uapi/asm-generic/socket.h: set buffer sizes beyond net.core.[rw]mem_max (needs
# CAP_NET_ADMIN).
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
# From include/uapi/linux/netlink.h: errors carry only the header of the failed request, not the
# whole request, so a batch of failures does not fill the receive buffer.
NETLINK_CAP_ACK = 10

RECV_SIZE = 1 << 20  # larger than any datagram the kernel sends (dumps use up to 32 KiB)
BATCH_BYTES = 200_000  # bytes of requests per send(); the send buffer must exceed it
DEFAULT_RCVBUF = 8 << 20
DEFAULT_EVENT_RCVBUF = 16 << 20
REPLY_TIMEOUT = 30.0  # seconds to wait for the kernel to answer a batch


class KernelError(Exception):
    """The kernel refused a request or could not be reached; the message says which and why."""


class Failure(NamedTuple):
    entry_key: bytes
    errno: int


class CommitResult(NamedTuple):
    created: int
    updated: int
    failed: list[Failure]
    seconds: float


class DeleteResult(NamedTuple):
    deleted: int
    missing: int
    failed: list[Failure]


class EventBatch(NamedTuple):
    """Events read in one go. ``overrun`` means the kernel dropped events before these (ENOBUFS):
    the reader's view of the table is incomplete and must be rebuilt from a dump."""

    events: list[Event]
    overrun: bool


def _open(rcvbuf: int, sndbuf: int | None = None) -> socket.socket:
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, ct.NETLINK_NETFILTER)
    except OSError as exc:
        raise KernelError(f"cannot open a netfilter netlink socket: {exc.strerror}") from exc
    for force, plain, size in ((SO_RCVBUFFORCE, socket.SO_RCVBUF, rcvbuf),
                               (SO_SNDBUFFORCE, socket.SO_SNDBUF, sndbuf)):
        if size is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)
    try:
        sock.setsockopt(ct.SOL_NETLINK, NETLINK_CAP_ACK, 1)
    except OSError:
        pass  # older kernels echo whole requests in errors; only buffer use differs
    sock.bind((0, 0))
    return sock


def _explain(err: int, what: str) -> KernelError:
    hint = ""
    if err in (errno.EPERM, errno.EACCES):
        hint = " (run as root or with CAP_NET_ADMIN)"
    elif err == errno.EOPNOTSUPP or err == errno.EPROTONOSUPPORT:
        hint = " (is the nf_conntrack_netlink module loaded?)"
    return KernelError(f"{what}: {os.strerror(err)}{hint}")


class KernelTable:
    """Requests to the conntrack table of the network namespace this process runs in."""

    def __init__(self, rcvbuf: int = DEFAULT_RCVBUF, batch_bytes: int = BATCH_BYTES) -> None:
        self.batch_bytes = batch_bytes
        self.sock = _open(rcvbuf, sndbuf=max(4 * batch_bytes, 1 << 20))
        self.sock.settimeout(REPLY_TIMEOUT)
        # Events caused by this socket's writes carry this port id (nlmsg_pid), so the daemon can
        # tell its own inserts from the kernel's and not replicate them back.
        self.portid: int = self.sock.getsockname()[0]
        self._seq = int(time.time()) & 0x7FFFFFFF

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> KernelTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_seq(self, n: int = 1) -> int:
        seq = self._seq
        self._seq = (self._seq + n) & 0x7FFFFFFF
        if self._seq < seq:  # wrapped: keep a batch's numbers contiguous
            seq, self._seq = 1, n + 1
        return seq

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(RECV_SIZE)
        except TimeoutError as exc:
            raise KernelError(f"the kernel did not answer within {REPLY_TIMEOUT:.0f} s") from exc
        except OSError as exc:
            raise _explain(exc.errno or 0, "reading from the conntrack netlink socket") from exc

    def _send(self, data: bytes, what: str) -> None:
        try:
            self.sock.send(data)
        except OSError as exc:
            raise _explain(exc.errno or 0, what) from exc

    # --- reading ---------------------------------------------------------------------------------

    def dump_parts(self) -> Iterator[list[Entry]]:
        """The whole table (IPv4 and IPv6, every zone), one list per receive buffer.

        The kernel fills the next dump buffer inside each recv(), so a reader thread keeps
        receiving (recv releases the GIL) while this thread decodes: the kernel's work and ours
        overlap on two cores instead of taking turns.
        """
        seq = self._next_seq()
        self._send(codec.dump_request(seq), "requesting a conntrack dump")
        buffers: queue.SimpleQueue[bytes | BaseException] = queue.SimpleQueue()

        def reader() -> None:
            try:
                while True:
                    data = self._recv()
                    buffers.put(data)
                    if codec.dump_finished(data, seq):
                        return
            except BaseException as exc:  # handed to the decoding thread, which raises it
                buffers.put(exc)

        thread = threading.Thread(target=reader, name="ctbridge-dump", daemon=True)
        thread.start()
        try:
            while True:
                item = buffers.get()
                if isinstance(item, BaseException):
                    raise item
                part = codec.decode_dump(item, seq)
                if part.entries:
                    yield part.entries
                if part.errno:
                    raise _explain(part.errno, "conntrack dump")
                if part.interrupted:
                    log.debug("conntrack dump was interrupted by concurrent changes")
                if part.done:
                    return
        finally:
            thread.join(REPLY_TIMEOUT)

    def dump(self) -> list[Entry]:
        out: list[Entry] = []
        for part in self.dump_parts():
            out.extend(part)
        return out

    def count(self) -> int:
        """Entries in the table, as the kernel counts them (IPCTNL_MSG_CT_GET_STATS)."""
        self._send(codec.stats_request(self._next_seq()), "requesting conntrack statistics")
        return codec.decode_stats(self._recv())[0]

    # --- writing ---------------------------------------------------------------------------------

    def _chunks(self, requests: Iterable[bytes], first_seq: int) -> Iterator[tuple[bytes, int, int]]:
        """Requests numbered first_seq.. joined into sends of about batch_bytes, each with the
        sequence numbers of its first and last message. Only that message asks for an acknowledgement: it
        tells the batch is done, and failures before it come back as errors anyway."""
        pending: list[bytes] = []
        size = 0
        seq = first_seq - 1
        for req in requests:
            if pending and size + len(req) > self.batch_bytes:
                yield _with_ack(pending), seq - len(pending) + 1, seq
                pending, size = [], 0
            pending.append(req)
            size += len(req)
            seq += 1
        if pending:
            yield _with_ack(pending), seq - len(pending) + 1, seq

    def _send_batch(self, data: bytes, first_seq: int, last_seq: int, failures: dict[int, int]) -> None:
        self._send(data, "writing to the conntrack table")
        acked = False
        while not acked:
            for seq, err in codec.decode_replies(self._recv()):
                if seq == last_seq:
                    acked = True
                # a late answer to an abandoned request belongs to no entry of this batch
                if err and first_seq <= seq <= last_seq:
                    failures[seq] = err

    def _batch(self, requests: Iterable[bytes], first_seq: int) -> dict[int, int]:
        """Send requests numbered first_seq..; {sequence number: errno} of the failures.

        The kernel applies a batch inside send(), which releases the GIL, so when there is more
        than one batch a sender thread talks to the kernel while this thread encodes the next.
        """
        failures: dict[int, int] = {}
        chunks = self._chunks(requests, first_seq)
        first = next(chunks, None)
        if first is None:
            return failures
        second = next(chunks, None)
        if second is None:
            self._send_batch(*first, failures)
            return failures
        work: queue.SimpleQueue[tuple[bytes, int, int] | None] = queue.SimpleQueue()
        errors: list[BaseException] = []

        def sender() -> None:
            try:
                while (item := work.get()) is not None:
                    self._send_batch(*item, failures)
            except BaseException as exc:  # re-raised below, in the caller's thread
                errors.append(exc)

        thread = threading.Thread(target=sender, name="ctbridge-commit", daemon=True)
        thread.start()
        try:
            work.put(first)
            work.put(second)
            for chunk in chunks:
                if errors:
                    break
                work.put(chunk)
        finally:
            work.put(None)
            thread.join()
        if errors:
            raise errors[0]
        return failures

    def commit(self, entries: Iterable[Entry], liberal: bool = True) -> CommitResult:
        """Write entries into the table: create what is missing, update what exists.

        Creation is tried first, because only a creation can set up NAT bindings and helpers; an
        entry that exists (EEXIST) is then updated in place. An update the kernel refuses because
        a status bit may only be set (EBUSY) is retried without the status, and a related entry
        whose master came later in the same commit (ENOENT) is retried once.
        """
        start = time.monotonic()
        todo = list(entries)
        seq = self._next_seq(len(todo))
        failed = self._batch((codec.new_request(e, seq + i, liberal=liberal) for i, e in enumerate(todo)), seq)
        created = len(todo) - len(failed)
        exists = [todo[s - seq] for s, err in failed.items() if err == errno.EEXIST]
        final: dict[bytes, int] = {todo[s - seq].key: err for s, err in failed.items()
                                   if err not in (errno.EEXIST, errno.ENOENT)}
        retry = [todo[s - seq] for s, err in failed.items() if err == errno.ENOENT]
        if retry:
            seq = self._next_seq(len(retry))
            again = self._batch([codec.new_request(e, seq + i, liberal=liberal) for i, e in enumerate(retry)], seq)
            created += len(retry) - len(again)
            for s, err in again.items():
                if err == errno.EEXIST:
                    exists.append(retry[s - seq])
                else:
                    final[retry[s - seq].key] = err
        updated = 0
        if exists:
            seq = self._next_seq(len(exists))
            upd = self._batch([codec.new_request(e, seq + i, liberal=liberal, update=True)
                               for i, e in enumerate(exists)], seq)
            busy = [exists[s - seq] for s, err in upd.items() if err == errno.EBUSY]
            for s, err in upd.items():
                if err != errno.EBUSY:
                    final[exists[s - seq].key] = err
            updated = len(exists) - len(upd)
            if busy:
                seq = self._next_seq(len(busy))
                last = self._batch([codec.new_request(e, seq + i, liberal=liberal, update=True, keep_status=False)
                                    for i, e in enumerate(busy)], seq)
                updated += len(busy) - len(last)
                for s, err in last.items():
                    final[busy[s - seq].key] = err
        return CommitResult(created, updated, [Failure(k, e) for k, e in final.items()],
                            time.monotonic() - start)

    def delete(self, keys: Iterable[bytes]) -> DeleteResult:
        """Remove entries by flow key; an entry already gone counts as missing, not as a failure."""
        todo = list(keys)
        seq = self._next_seq(len(todo))
        failed = self._batch([codec.delete_request(k, seq + i) for i, k in enumerate(todo)], seq)
        missing = sum(1 for err in failed.values() if err == errno.ENOENT)
        errors = [Failure(todo[s - seq], err) for s, err in failed.items() if err != errno.ENOENT]
        return DeleteResult(len(todo) - len(failed), missing, errors)

    def flush(self) -> None:
        """Remove every entry of this namespace's table (IPv4 and IPv6, every zone)."""
        seq = self._next_seq()
        failed = self._batch([codec.flush_request(seq)], seq)
        if failed:
            raise _explain(failed[seq], "flushing the conntrack table")


def _with_ack(requests: list[bytes]) -> bytes:
    """Join requests, setting NLM_F_ACK on the last one."""
    data = bytearray(b"".join(requests))
    last = len(data) - len(requests[-1])
    flags = int.from_bytes(data[last + 6:last + 8], "little") | ct.NLM_F_ACK
    data[last + 6:last + 8] = flags.to_bytes(2, "little")
    return bytes(data)


class EventSocket:
    """Subscription to the conntrack event groups of this network namespace.

    Read either with ``read()`` (non-blocking, for callers with their own loop) or with
    ``async for batch in sock.stream()``. A receive-buffer overrun (ENOBUFS) is reported as an
    EventBatch with ``overrun=True``; the subscription continues.
    """

    GROUPS = (ct.NFNLGRP_CONNTRACK_NEW, ct.NFNLGRP_CONNTRACK_UPDATE, ct.NFNLGRP_CONNTRACK_DESTROY)

    def __init__(self, rcvbuf: int = DEFAULT_EVENT_RCVBUF, groups: Iterable[int] = GROUPS) -> None:
        self.sock = _open(rcvbuf)
        for group in groups:
            self.sock.setsockopt(ct.SOL_NETLINK, ct.NETLINK_ADD_MEMBERSHIP, group)
        self.sock.setblocking(False)
        self.overruns = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> EventSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, limit: int = 256) -> EventBatch:
        """Everything queued now, up to ``limit`` receive buffers; never blocks."""
        events: list[Event] = []
        overrun = False
        for _ in range(limit):
            try:
                data = self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    overrun = True
                    self.overruns += 1
                    continue
                raise _explain(exc.errno or 0, "reading conntrack events") from exc
            events.extend(codec.decode_events(data))
        return EventBatch(events, overrun)

    async def stream(self) -> AsyncIterator[EventBatch]:
        """Batches of events as they arrive, forever (until the socket is closed)."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(self.sock.fileno(), ready.set)
        try:
            while True:
                await ready.wait()
                ready.clear()
                batch = self.read()
                if batch.events or batch.overrun:
                    yield batch
        finally:
            loop.remove_reader(self.sock.fileno())

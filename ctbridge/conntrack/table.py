"""Kernel adapter: this network namespace's conntrack table over raw ctnetlink sockets.

The only module that talks to the kernel's conntrack table. Messages are built and parsed by
``ctbridge.conntrack.codec``; here they are only sent and received. Writes are batched, many netlink messages
per ``send()``, and only the last message of a batch asks for an acknowledgement: the kernel
processes a batch in order and answers every failed message with an NLMSG_ERROR carrying its
sequence number, so failures still map to their entries.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Container, Iterable, Iterator
from typing import NamedTuple

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec, expectation, request
from ctbridge.conntrack import recvmmsg as mmsg
from ctbridge.conntrack.codec import Entry, Record

log = logging.getLogger(__name__)

# From include/uapi/asm-generic/socket.h: set buffer sizes beyond net.core.[rw]mem_max (needs
# CAP_NET_ADMIN).
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
# From include/uapi/linux/netlink.h: errors carry only the header of the failed request, not the
# whole request, so a batch of failures does not fill the receive buffer.
NETLINK_CAP_ACK = 10

# A dump buffer holds at most 32 KiB (net/netlink/af_netlink.c caps max_recvmsg_len there);
# a dump reads up to DUMP_BATCH of them per system call.
DUMP_BUFFER = 64 << 10
DUMP_BATCH = 32
RECV_SIZE = 1 << 20  # larger than any datagram the kernel sends (dumps use up to 32 KiB)
BATCH_BYTES = 200_000  # bytes of requests per send(); the send buffer must exceed it
DEFAULT_RCVBUF = 8 << 20
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


class KeyResult(NamedTuple):
    """What a request per flow key did: ``done`` entries, ``missing`` ones (already gone)."""

    done: int
    missing: int
    failed: list[Failure]


class ExpectResult(NamedTuple):
    """What writing expectations did: ``done``, the keys of those whose master the table lacks
    (``missing``: ENOENT, worth another try once it is there), and the other refusals."""

    done: int
    missing: list[bytes]
    failed: list[Failure]


def open_socket(rcvbuf: int, sndbuf: int | None = None) -> socket.socket:
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


def explain(err: int, what: str) -> KernelError:
    hint = ""
    if err in (errno.EPERM, errno.EACCES):
        hint = " (run as root or with CAP_NET_ADMIN)"
    elif err == errno.EOPNOTSUPP or err == errno.EPROTONOSUPPORT:
        hint = " (is the nf_conntrack_netlink module loaded?)"
    return KernelError(f"{what}: {os.strerror(err)}{hint}")


# How much of a receive buffer one small netlink answer costs: the kernel charges an skb's
# truesize, not its length, and a 36-byte error still takes a buffer of its own. Batches are kept
# small enough that even an answer to every message fits.
ANSWER_COST = 1024


class KernelTable:
    """Requests to the conntrack table of the network namespace this process runs in.

    One request at a time: the object is not meant to be shared between threads.
    """

    def __init__(self, rcvbuf: int = DEFAULT_RCVBUF, batch_bytes: int = BATCH_BYTES) -> None:
        self.batch_bytes = batch_bytes
        self.sock = open_socket(rcvbuf, sndbuf=max(4 * batch_bytes, 1 << 20))
        self.sock.settimeout(REPLY_TIMEOUT)
        granted = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        if granted < rcvbuf:
            log.warning("the kernel granted a %d-byte netlink receive buffer instead of %d (no CAP_NET_ADMIN?): "
                        "writes go in smaller batches", granted, rcvbuf)
        self.batch_messages = max(16, granted // ANSWER_COST)
        # Events caused by this socket's writes carry this port id (nlmsg_pid), so the daemon can
        # tell its own inserts from the kernel's and not replicate them back.
        self.portid: int = self.sock.getsockname()[0]
        self._seq = int(time.time()) & 0x7FFFFFFF
        self._dump_receiver: mmsg.Receiver | None = None  # made by the first dump
        # Progress, read by other threads while a write runs (a daemon's answer to a client
        # waiting for a commit of a large table): requests the kernel has answered in all, and
        # of the commit under way (or the last) how many entries it has and where it began.
        self.requests_done = 0
        self.commit_entries = 0
        self.commit_base = 0

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
            raise explain(exc.errno or 0, "reading from the conntrack netlink socket") from exc

    def _send(self, data: bytes, what: str) -> None:
        try:
            self.sock.send(data)
        except OSError as exc:
            raise explain(exc.errno or 0, what) from exc

    # --- reading ---------------------------------------------------------------------------------

    def dump_buffers(self, request: Callable[[int], bytes] = codec.dump_request) -> Iterator[tuple[bytes, int]]:
        """The whole table (IPv4 and IPv6, every zone) as the kernel's receive buffers, each with
        the dump's sequence number (to tell its messages from late answers to other requests).

        The kernel fills the next dump buffer inside each recv(), so a reader thread keeps
        receiving (recv releases the GIL) while this thread decodes: the kernel's work and ours
        overlap on two cores instead of taking turns. A caller that stops early still waits for
        the reader to take the rest of the dump off the socket, so the next request starts clean.
        """
        seq = self._next_seq()
        self._send(request(seq), "requesting a conntrack dump")
        buffers: queue.SimpleQueue[bytes | BaseException | None] = queue.SimpleQueue()

        if self._dump_receiver is None:
            self._dump_receiver = mmsg.Receiver(self.sock, DUMP_BATCH, DUMP_BUFFER)
        receive = self._dump_receiver.receive

        def reader() -> None:
            try:
                while True:
                    try:
                        batch = receive()  # what the kernel has ready, without waiting
                    except OSError as exc:
                        raise explain(exc.errno or 0, "reading a conntrack dump") from exc
                    for data in batch or [self._recv()]:  # nothing ready: wait for the kernel
                        buffers.put(data)
                        if codec.dump_finished(data, seq):
                            return
            except BaseException as exc:  # handed to the decoding thread, which raises it
                buffers.put(exc)
            finally:
                buffers.put(None)

        thread = threading.Thread(target=reader, name="ctbridge-dump", daemon=True)
        with _quick_handover():
            thread.start()
            try:
                while (item := buffers.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    yield item, seq
            finally:
                # The reader stops at the dump's end or at the socket timeout, whichever is first.
                thread.join()

    def dump_parts(self) -> Iterator[list[Entry]]:
        """The whole table, one list of entries per receive buffer (see dump_buffers)."""
        for buf, seq in self.dump_buffers():
            part = codec.decode_dump(buf, seq)
            if part.entries:
                yield part.entries
            if part.errno:
                raise explain(part.errno, "conntrack dump")
            if part.interrupted:
                log.debug("conntrack dump was interrupted by concurrent changes")
            if part.done:
                return

    def dump_messages(self) -> list[bytes]:
        """The whole table as its netlink messages (nlmsghdr included), one bytes each, undecoded:
        a sweep reads them the way events are read (ctbridge.sync.intake)."""
        out: list[bytes] = []
        for buf, seq in self.dump_buffers():
            messages, done, err, _interrupted = codec.walk_dump(buf, seq, _whole_message)
            out.extend(messages)
            if err:
                raise explain(err, "conntrack dump")
            if done:
                break
        return out

    def dump(self) -> list[Entry]:
        out: list[Entry] = []
        for part in self.dump_parts():
            out.extend(part)
        return out

    def dump_expectations(self) -> list[Entry]:
        """Every expectation of this namespace (ctbridge.conntrack.expectation)."""
        out: list[Entry] = []
        for buf, seq in self.dump_buffers(expectation.dump_request):
            made, done, err, _interrupted = codec.walk_dump(buf, seq, expectation.entry_from_attrs,
                                                            kind=ct.MSG_EXP_NEW)
            out.extend(made)
            if err:
                raise explain(err, "expectation dump")
            if done:
                break
        return out

    def count(self) -> int:
        """Entries in the table, as the kernel counts them (IPCTNL_MSG_CT_GET_STATS)."""
        seq = self._next_seq()
        self._send(codec.stats_request(seq), "requesting conntrack statistics")
        for _ in range(1000):  # answers to other, abandoned requests are skipped
            stats = codec.decode_stats(self._recv(), seq)
            if stats is not None:
                if stats.errno:
                    raise explain(stats.errno, "requesting conntrack statistics")
                return stats.entries
        raise KernelError("the kernel did not answer the statistics request")

    # --- writing ---------------------------------------------------------------------------------

    def _chunks(self, requests: Iterable[tuple[int, bytes]]) -> Iterator[tuple[bytes, int, int]]:
        """Numbered requests joined into sends of at most batch_bytes and batch_messages, each with
        the sequence numbers of its first and last message. Only the last message asks for an
        acknowledgement: it tells the batch is done, and failures before it come back as errors."""
        pending: list[bytes] = []
        size = 0
        first = last = 0
        for seq, req in requests:
            if pending and (size + len(req) > self.batch_bytes or len(pending) >= self.batch_messages):
                yield _with_ack(pending), first, last
                pending, size = [], 0
            if not pending:
                first = seq
            pending.append(req)
            size += len(req)
            last = seq
        if pending:
            yield _with_ack(pending), first, last

    def _send_batch(self, data: bytes, first_seq: int, last_seq: int, failures: dict[int, int]) -> None:
        self._send(data, "writing to the conntrack table")
        acked = False
        while not acked:
            for seq, err in codec.decode_replies(self._recv()):
                if seq == last_seq:
                    acked = True
                    self.requests_done += last_seq - first_seq + 1
                # a late answer to an abandoned request belongs to no entry of this batch
                if err and first_seq <= seq <= last_seq:
                    failures[seq] = err

    def _batch(self, requests: Iterable[tuple[int, bytes]]) -> dict[int, int]:
        """Send numbered requests; {sequence number: errno} of the failures.

        The kernel applies a batch inside send(), which releases the GIL, so when there is more
        than one batch a sender thread talks to the kernel while this thread encodes the next.
        """
        failures: dict[int, int] = {}
        chunks = self._chunks(requests)
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
        with _quick_handover():
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

    def _write(self, entries: list[Entry | Record], liberal: bool, update: bool = False,
               keep_status: bool = True) -> dict[int, int]:
        """One pass of CT_NEW requests; {index into entries: errno} of the failures. An entry the
        codec cannot encode fails with EINVAL instead of stopping the others."""
        base = self._next_seq(len(entries))
        bad: dict[int, int] = {}

        def requests() -> Iterator[tuple[int, bytes]]:
            for i, entry in enumerate(entries):
                try:
                    yield base + i, request.new_request(entry, base + i, liberal=liberal, update=update,
                                                      keep_status=keep_status)
                except codec.CodecError as exc:
                    log.warning("cannot write a flow to the kernel: %s", exc)
                    bad[i] = errno.EINVAL
        failed = {seq - base: err for seq, err in self._batch(requests()).items()}
        failed.update(bad)
        return failed

    def commit(self, entries: Iterable[Entry | Record], liberal: bool = True,
               existing: Container[bytes] = frozenset()) -> CommitResult:
        """Write entries into the table: create what is missing, update what exists.

        Creation is tried first, because only a creation can set up NAT bindings, masters and
        helpers; an entry that exists (EEXIST) is then updated in place. An update refused
        because a status bit may only be set (EBUSY) is retried without the status; an update of
        an entry that vanished meanwhile (ENOENT) is created again; a related entry whose master
        came later in the same commit (ENOENT on create) is retried once after it.

        ``existing``: keys the caller believes the table holds (a node taking back the master
        role still has its old entries). Those are updated straight away: creating them first
        would cost one error message per entry from the kernel, the slowest part of such a commit.
        Without ``liberal``, existing TCP entries are deleted and created anew instead: ctnetlink
        sets no TCP window, so an updated entry would keep the windows this kernel learnt before
        the peer carried the flow, and judge its packets INVALID (the lab measured every
        connection stalling at a failback); a new entry learns them from the next packets. With
        ``liberal`` they are updated in place (a deleted entry would leave each flow without one
        until it is created again, and with the commit gate off, the default, a packet meanwhile
        makes one of its own, with a NAT binding of its own); the update clears the window flags
        that would otherwise stay (request._TCP_FLAGS_RESET).
        """
        start = time.monotonic()
        todo = list(entries)
        self.commit_entries, self.commit_base = len(todo), self.requests_done
        final: dict[bytes, int] = {}
        created = updated = 0
        creates = [e for e in todo if e.key not in existing] if existing else todo
        known = [e for e in todo if e.key in existing] if existing else []
        if known and not liberal:
            stale = [e for e in known if _is_tcp(e.key)]
            if stale:
                self.delete(e.key for e in stale)
                keep = {e.key for e in stale}
                known = [e for e in known if e.key not in keep]
                creates = creates + stale
        if known:
            n, missing = self._update(known, liberal, final)
            updated += n
            creates += missing
        for attempt in range(3):
            if not creates:
                break
            failed = self._write(creates, liberal)
            created += len(creates) - len(failed)
            exists = [creates[i] for i, err in failed.items() if err == errno.EEXIST]
            later = [creates[i] for i, err in failed.items() if err == errno.ENOENT]
            for i, err in failed.items():
                if err not in (errno.EEXIST, errno.ENOENT) or (err == errno.ENOENT and attempt == 2):
                    final[creates[i].key] = err
            creates = later
            if exists:
                n, missing = self._update(exists, liberal, final)
                updated += n
                creates += missing
        for entry in creates:
            final.setdefault(entry.key, errno.ENOENT)
        return CommitResult(created, updated, [Failure(k, e) for k, e in final.items()],
                            time.monotonic() - start)

    def _update(self, entries: list[Entry | Record], liberal: bool,
                final: dict[bytes, int]) -> tuple[int, list[Entry | Record]]:
        """Update entries in place; (how many were, those the table did not hold). Other refusals
        go into ``final``; EBUSY (a status bit that may only be set) is retried without the status."""
        upd = self._write(entries, liberal, update=True)
        busy = [entries[i] for i, err in upd.items() if err == errno.EBUSY]
        missing = [entries[i] for i, err in upd.items() if err == errno.ENOENT]
        for i, err in upd.items():
            if err not in (errno.EBUSY, errno.ENOENT):
                final[entries[i].key] = err
        updated = len(entries) - len(upd)
        if busy:
            last = self._write(busy, liberal, update=True, keep_status=False)
            updated += len(busy) - len(last)
            for i, err in last.items():
                final[busy[i].key] = err
        return updated, missing

    def delete(self, keys: Iterable[bytes]) -> KeyResult:
        """Remove entries by flow key; an entry already gone counts as missing, not as a failure."""
        return self._by_key(keys, codec.delete_request)

    def present(self, keys: list[bytes]) -> list[bool]:
        """Whether each key names an entry of the table now, in either direction (CT_GET)."""
        return [attrs is not None for attrs in self.lookup(keys)]

    def lookup(self, keys: list[bytes]) -> list[bytes | None]:
        """Each key's entry as the kernel holds it now (its attributes), found by either direction's
        tuple (CT_GET), or None. For a handful of keys: every answer that finds one carries it."""
        base = self._next_seq(len(keys))
        self._send(b"".join(codec.get_request(key, base + i) for i, key in enumerate(keys)), "looking flows up")
        out: list[bytes | None] = [None] * len(keys)
        waiting = set(range(len(keys)))
        while waiting:
            for seq, err, attrs in _answers(self._recv()):
                i = seq - base
                if i in waiting:
                    waiting.discard(i)
                    if not err:
                        out[i] = attrs
        return out

    def release(self, keys: Iterable[bytes], seconds: int | None = None) -> KeyResult:
        """Entries a node kept from when it was master: TCP ones marked BE_LIBERAL, and with
        ``seconds`` every one's timeout set to it (request.release_request). Keys of other
        protocols are left alone when no timeout is asked for."""
        if seconds is None:
            keys = [k for k in keys if _is_tcp(k)]
        return self._by_key(keys, lambda key, seq: request.release_request(key, seq, seconds))

    def _by_key(self, keys: Iterable[bytes], encode: Callable[[bytes, int], bytes]) -> KeyResult:
        todo = list(keys)
        base = self._next_seq(len(todo))
        bad: dict[int, int] = {}

        def requests() -> Iterator[tuple[int, bytes]]:
            for i, key in enumerate(todo):
                try:
                    yield base + i, encode(key, base + i)
                except codec.CodecError:
                    bad[i] = errno.EINVAL
        failed = {seq - base: err for seq, err in self._batch(requests()).items()}
        failed.update(bad)
        missing = sum(1 for err in failed.values() if err == errno.ENOENT)
        errors = [Failure(todo[i], err) for i, err in failed.items() if err != errno.ENOENT]
        return KeyResult(len(todo) - len(failed), missing, errors)

    def commit_expectations(self, entries: Iterable[Entry], seconds: Callable[[Entry], int] | None = None
                            ) -> ExpectResult:
        """Write expectations, after their masters (expectation.py): each is created, or found,
        and then given what is left of its timeout, ``seconds(entry)`` (else as it came). A master
        that is not in the table (ENOENT) or has no helper (EOPNOTSUPP) fails that one only."""
        todo = list(entries)
        base = self._next_seq(2 * len(todo))
        bad: dict[int, int] = {}

        def requests() -> Iterator[tuple[int, bytes]]:
            for i, entry in enumerate(todo):
                try:
                    yield base + 2 * i, expectation.new_request(entry, base + 2 * i)
                    # the same request once it exists: now it changes the timeout
                    left = seconds(entry) if seconds is not None else None
                    yield base + 2 * i + 1, expectation.new_request(entry, base + 2 * i + 1, left)
                except codec.CodecError:
                    bad[i] = errno.EINVAL
        failed: dict[int, int] = {}
        for seq, err in self._batch(requests()).items():
            failed.setdefault((seq - base) // 2, err)  # the creation's error, when both failed
        failed.update(bad)
        missing = [todo[i].key for i, err in failed.items() if err == errno.ENOENT]
        errors = [Failure(todo[i].key, err) for i, err in failed.items() if err != errno.ENOENT]
        return ExpectResult(len(todo) - len(failed), missing, errors)

    def delete_expectations(self, keys: Iterable[bytes]) -> KeyResult:
        """Remove expectations by key; one already gone (used, expired) counts as missing."""
        return self._by_key(keys, expectation.delete_request)

    def flush(self) -> None:
        """Remove every entry of this namespace's table (IPv4 and IPv6, every zone)."""
        seq = self._next_seq()
        failed = self._batch([(seq, codec.flush_request(seq))])
        if failed:
            raise explain(failed[seq], "flushing the conntrack table")


# While a helper thread talks to the kernel, the thread that encodes or decodes holds the GIL
# almost all the time; at Python's default switch interval (5 ms) the helper would wait up to
# 5 ms after every send() or recv() before it may hand over the next batch, which costs about 40%
# of a 100k-entry commit. A 0.5 ms interval for the duration keeps both cores busy.
_SWITCH_INTERVAL = 0.0005


def _answers(buf: bytes) -> list[tuple[int, int, bytes]]:
    """Each message of a receive buffer as (sequence number, errno, attributes): an NLMSG_ERROR
    gives its errno (0: an acknowledgement) and no attributes, a conntrack message 0 and its
    attributes (after nlmsghdr and nfgenmsg). CT_GET's answers."""
    out = []
    n = len(buf)
    off = 0
    while off < n:
        mlen, mtype, _flags, mseq, _pid = codec._header(buf, off, n)
        if mtype == ct.NLMSG_ERROR:
            out.append((mseq, codec._error(buf, off, mlen), b""))
        elif mtype not in (ct.NLMSG_DONE, ct.NLMSG_NOOP) and mlen >= 20:
            out.append((mseq, 0, buf[off + 20:off + mlen]))
        off += (mlen + 3) & ~3
    return out


def _is_tcp(key: bytes) -> bool:
    try:
        return request.key_protocol(key) == ct.IPPROTO_TCP
    except codec.CodecError:
        return True  # its request fails with EINVAL, counted with the others


def _whole_message(_family: int, buf: bytes, start: int, end: int) -> bytes:
    return buf[start - 20:end]  # the attributes follow the nlmsghdr (16 bytes) and the nfgenmsg (4)


@contextlib.contextmanager
def _quick_handover() -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, _SWITCH_INTERVAL))
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def _with_ack(requests: list[bytes]) -> bytes:
    """Join requests, setting NLM_F_ACK on the last one."""
    data = bytearray(b"".join(requests))
    last = len(data) - len(requests[-1])
    flags = int.from_bytes(data[last + 6:last + 8], "little") | ct.NLM_F_ACK
    data[last + 6:last + 8] = flags.to_bytes(2, "little")
    return bytes(data)

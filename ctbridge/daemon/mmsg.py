"""sendmmsg(2) and recvmmsg(2) on the sync links' UDP sockets: many datagrams, each with its own
address, in one system call.

Under churn the engine's output of one turn is a dozen datagrams, and a peer's burst arrives as
many: one ``sendto`` and one ``recvfrom`` each cost a system call and a trip through the socket
module per datagram (docs/performance.md). ``Outbox`` hands a turn's datagrams to the kernel
with one sendmmsg, ``Inbox`` reads what waits with one recvmmsg, sources included. Where libc
lacks either (``MMSG`` False), both do the same work one datagram at a time with the plain
calls, with the same results.

Rules: the sockets are non-blocking. ``Outbox.send`` returns how many datagrams the kernel took
from the front of the list, raises the error of the first one it refused (BlockingIOError when
the socket's buffer is full: the caller waits for writability); a datagram longer than an
``Inbox``'s buffer is cut to the buffer's size plus a byte and counted (``truncated``), so the
engine's own length check (RECEIVE_LIMIT) refuses it as today's ``recvfrom(65536)`` did.

Imports ctbridge.conntrack.recvmmsg (the C structures, libc's functions); synclink uses it.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any

from ctbridge.conntrack.recvmmsg import MSG_DONTWAIT, MSG_TRUNC, IoVec, MMsgHdr, MsgHdr, libc_function

Address = tuple[Any, ...]  # as socket.recvfrom gives it: (host, port) or (host, port, flowinfo, scope_id)

# the vector passed as a prepared c_void_p: converting an array to POINTER(MMsgHdr) on every call
# cost more than the system call itself
_MMSG_ARGS = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int)
# int sendmmsg(int sockfd, struct mmsghdr *msgvec, unsigned int vlen, int flags)
_SENDMMSG = libc_function("sendmmsg", _MMSG_ARGS)
# int recvmmsg(int sockfd, struct mmsghdr *msgvec, unsigned int vlen, int flags, struct timespec *timeout)
_RECVMMSG = libc_function("recvmmsg", (*_MMSG_ARGS, ctypes.c_void_p))
MMSG = _SENDMMSG is not None and _RECVMMSG is not None

# struct mmsghdr as bytes (MMsgHdr's native layout, 64 bytes on LP64): the sources' names written
# and the results (msg_flags, msg_len) read with struct, a batch at a time: setting or reading
# ctypes fields one by one costs more than the system call.
_MMSGHDR_SIZE = ctypes.sizeof(MMsgHdr)
_NAME = struct.Struct("@PI")  # msg_name, msg_namelen: the first fields
_FLAGS_AT = MMsgHdr.msg_hdr.offset + MsgHdr.msg_flags.offset
_LEN_AT = MMsgHdr.msg_len.offset
_RESULT = f"{_FLAGS_AT}xi{_LEN_AT - _FLAGS_AT - 4}xI{_MMSGHDR_SIZE - _LEN_AT - 4}x"  # msg_flags, msg_len
_IOVEC = "PN"  # iov_base, iov_len
# From include/uapi/linux/in.h and in6.h: sizeof(struct sockaddr_in), sizeof(struct sockaddr_in6)
SOCKADDR_IN = 16
SOCKADDR_IN6 = 28
NAMES_KEPT = 1024  # sources remembered as decoded addresses; a peer has one, a flood of forged ones is cut off


def _structs(fmt: str, cache: dict[int, struct.Struct], n: int) -> struct.Struct:
    s = cache.get(n)
    if s is None:
        s = cache[n] = struct.Struct("@" + fmt * n)
    return s


def sockaddr(family: int, address: Address) -> bytes:
    """``address`` (as sendto takes it) as the kernel's struct sockaddr_in / sockaddr_in6."""
    host, port = address[0], address[1]
    if family == socket.AF_INET:
        return struct.pack("=H", family) + struct.pack("!H", port) + socket.inet_pton(family, host) + bytes(8)
    # a scoped address (fe80::1%eth0): getaddrinfo reads the scope as sendto would
    info: tuple[Any, ...] = socket.getaddrinfo(host, port, family, socket.SOCK_DGRAM, 0, socket.AI_NUMERICHOST)[0][4]
    flowinfo = address[2] if len(address) > 2 else info[2]
    scope = address[3] if len(address) > 3 else info[3]
    return (struct.pack("=H", family) + struct.pack("!HI", port, flowinfo) + socket.inet_pton(family, info[0])
            + struct.pack("=I", scope))


def address_of(family: int, name: bytes) -> Address:
    """A struct sockaddr the kernel wrote, as socket.recvfrom returns it."""
    if family == socket.AF_INET:
        return socket.inet_ntop(family, name[4:8]), struct.unpack_from("!H", name, 2)[0]
    port, flowinfo = struct.unpack_from("!HI", name, 2)
    return socket.inet_ntop(family, name[8:24]), port, flowinfo, struct.unpack_from("=I", name, 24)[0]


class Outbox:
    """Sends up to ``count`` datagrams, each to its own address, with one sendmmsg."""

    def __init__(self, sock: socket.socket, count: int = 64, mmsg: bool = MMSG) -> None:
        self.sock = sock
        self.family = sock.family
        self.count = count
        self.sendmmsg = _SENDMMSG if mmsg else None
        self.mmsg = self.sendmmsg is not None
        self.msgs = (MMsgHdr * count)()
        self.iovecs = (IoVec * count)()
        for i in range(count):  # message i sends iovec i, always
            self.msgs[i].msg_hdr.msg_iov = ctypes.pointer(self.iovecs[i])
            self.msgs[i].msg_hdr.msg_iovlen = 1
        self._msgs = ctypes.c_void_p(ctypes.addressof(self.msgs))
        self._msgs_view = memoryview(self.msgs).cast("B")
        self._iov_view = memoryview(self.iovecs).cast("B")
        self._slots: list[Address | None] = [None] * count  # the address each message's name holds
        self._names: dict[Address | None, tuple[ctypes.Array[ctypes.c_char] | None, int, int]] = {}
        self._iov_structs: dict[int, struct.Struct] = {}

    def _name(self, address: Address | None) -> tuple[ctypes.Array[ctypes.c_char] | None, int, int]:
        """The kernel's form of ``address`` (None: the connected peer's), kept for the next batch."""
        name = self._names.get(address)
        if name is None:
            if len(self._names) >= NAMES_KEPT:
                self._names.clear()
            if address is None:
                name = self._names[address] = (None, 0, 0)
            else:
                raw = sockaddr(self.family, address)
                buf = ctypes.create_string_buffer(raw, len(raw))
                name = self._names[address] = (buf, ctypes.addressof(buf), len(raw))
        return name

    def send(self, datagrams: Sequence[tuple[bytes, Address | None]]) -> int:
        """Hand the kernel datagrams from the front of ``datagrams`` (at most ``count``), each to
        its address (None: a connected socket's peer): how many it took (at least one); the first
        one's error if it took none (OSError; BlockingIOError when the send buffer is full)."""
        sendmmsg = self.sendmmsg
        if sendmmsg is None:
            return self._send_plain(datagrams)
        batch = datagrams[:self.count]
        n = len(batch)
        if not n:
            return 0
        # one buffer for the batch: its address taken once, each datagram an iovec into it
        joined = b"".join([d for d, _ in batch])
        at = ctypes.cast(ctypes.c_char_p(joined), ctypes.c_void_p).value or 0  # no copy: joined's own bytes
        iov: list[int] = []
        slots = self._slots
        for i, (data, address) in enumerate(batch):
            size = len(data)
            iov += (at, size)
            at += size
            if slots[i] != address:  # most batches go to the address the slot already names
                name = self._name(address)
                _NAME.pack_into(self._msgs_view, i * _MMSGHDR_SIZE, name[1], name[2])
                slots[i] = address
        _structs(_IOVEC, self._iov_structs, n).pack_into(self._iov_view, 0, *iov)
        sent = sendmmsg(self.sock.fileno(), self._msgs, n, MSG_DONTWAIT)
        del joined  # kept alive until the kernel copied it
        if sent < 0:
            err = ctypes.get_errno()
            if err in (errno_mod.EAGAIN, errno_mod.EWOULDBLOCK):
                raise BlockingIOError(err, os.strerror(err))
            raise OSError(err, os.strerror(err))
        return sent

    def _send_plain(self, datagrams: Sequence[tuple[bytes, Address | None]]) -> int:
        sendto = self.sock.sendto
        sent = 0
        for data, address in datagrams[:self.count]:
            try:
                if address is None:
                    self.sock.send(data)
                else:
                    sendto(data, address)
            except OSError:
                if sent:
                    return sent  # the caller sends the rest again, and sees this error then
                raise
            sent += 1
        return sent


class Inbox:
    """Reads up to ``count`` datagrams of at most ``size`` bytes, with their sources, in one call."""

    def __init__(self, sock: socket.socket, count: int = 64, size: int = 65536, mmsg: bool = MMSG) -> None:
        self.sock = sock
        self.family = sock.family
        self.count = count
        self.size = size
        self.recvmmsg = _RECVMMSG if mmsg else None
        self.mmsg = self.recvmmsg is not None
        self.truncated = 0  # datagrams longer than ``size``
        self.namelen = SOCKADDR_IN if self.family == socket.AF_INET else SOCKADDR_IN6
        self.buffer = ctypes.create_string_buffer(count * size)
        self.names = ctypes.create_string_buffer(count * self.namelen)
        self.iovecs = (IoVec * count)()
        self.msgs = (MMsgHdr * count)()
        base, names = ctypes.addressof(self.buffer), ctypes.addressof(self.names)
        for i in range(count):
            self.iovecs[i].iov_base = base + i * size
            self.iovecs[i].iov_len = size
            hdr = self.msgs[i].msg_hdr
            hdr.msg_iov = ctypes.pointer(self.iovecs[i])
            hdr.msg_iovlen = 1
            hdr.msg_name = names + i * self.namelen
            # the kernel writes back the length of the source it wrote, for UDP always the
            # family's (udp_recvmsg, udpv6_recvmsg: *addr_len = sizeof(*sin)): never reset
            hdr.msg_namelen = self.namelen
        self._msgs = ctypes.c_void_p(ctypes.addressof(self.msgs))
        self._data_view = memoryview(self.buffer)
        self._names_view = memoryview(self.names)
        self._msgs_view = memoryview(self.msgs).cast("B")
        self._results: dict[int, struct.Struct] = {}
        self._sources: dict[bytes, Address] = {}

    def receive(self) -> list[tuple[bytes, Address]]:
        """The datagrams waiting now, with their sources ([] if none); an error as recvfrom raises it."""
        recvmmsg = self.recvmmsg
        if recvmmsg is None:
            return self._receive_plain()
        n = recvmmsg(self.sock.fileno(), self._msgs, self.count, MSG_DONTWAIT, None)
        if n <= 0:
            err = ctypes.get_errno()
            if n == 0 or err in (errno_mod.EAGAIN, errno_mod.EWOULDBLOCK):
                return []
            raise OSError(err, os.strerror(err))
        results = _structs(_RESULT, self._results, n).unpack_from(self._msgs_view)
        size, namelen = self.size, self.namelen
        data, names = self._data_view, bytes(self._names_view[:n * namelen])
        sources = self._sources
        out = []
        for i in range(n):
            flags, length = results[2 * i], results[2 * i + 1]
            if flags & MSG_TRUNC:
                self.truncated += 1
                length = size
            name = names[i * namelen:(i + 1) * namelen]
            source = sources.get(name)
            if source is None:
                if len(sources) >= NAMES_KEPT:
                    sources.clear()
                source = sources[name] = address_of(self.family, name)
            out.append((data[i * size:i * size + length].tobytes(), source))
        return out

    def _receive_plain(self) -> list[tuple[bytes, Address]]:
        out: list[tuple[bytes, Address]] = []
        recvfrom, size = self.sock.recvfrom, self.size
        for _ in range(self.count):
            try:
                data, source = recvfrom(size)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                if out:
                    break  # an ICMP error reported on the socket, read and gone: the datagrams count
                raise
            if len(data) == size:  # recvfrom says nothing of truncation: size is one past the limit
                self.truncated += 1
            out.append((data, source))
        return out

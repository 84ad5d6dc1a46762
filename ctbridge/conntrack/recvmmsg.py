"""recvmmsg(2) through ctypes: many netlink event messages (or dump buffers) per system call.

The kernel delivers every conntrack event as a datagram of its own, so reading events with
recv() costs one system call per event, which was the daemon's largest single cost under load
(about 20 us each on the reference machine). The standard library has no recvmmsg; this is the
small piece of ctypes that provides it, with recv() as the fallback where it is missing.

A dump profits too: the kernel fills the next dump buffer inside each receive, so one recvmmsg
takes many buffers, and the thread that reads them takes the interpreter lock once per call
instead of once per 32 KiB buffer (which let the formatting thread starve it).

The C structures and ``libc_function`` serve ctbridge.daemon.mmsg too (the sync link's UDP).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as errno_mod
import os
import socket
import struct
from collections.abc import Callable

MSG_DONTWAIT = 0x40  # From include/linux/socket.h
MSG_TRUNC = 0x20  # From include/linux/socket.h


class IoVec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class MsgHdr(ctypes.Structure):
    _fields_ = (("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(IoVec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int))


class MMsgHdr(ctypes.Structure):
    _fields_ = (("msg_hdr", MsgHdr), ("msg_len", ctypes.c_uint))


def libc_function(name: str, argtypes: tuple[object, ...],
                  dll: type[ctypes.CDLL] = ctypes.CDLL) -> Callable[..., int] | None:
    """libc's ``name`` returning an int, errno kept for ctypes.get_errno(); None where it lacks it.
    ``dll``: ctypes.PyDLL for a call that keeps the interpreter lock."""
    try:
        libc = dll(ctypes.util.find_library("c") or None, use_errno=True)
        fn = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    typed: Callable[..., int] = fn
    return typed


# int recvmmsg(int sockfd, struct mmsghdr *msgvec, unsigned int vlen, int flags, struct timespec *timeout)
_RECVMMSG_ARGS = (ctypes.c_int, ctypes.POINTER(MMsgHdr), ctypes.c_uint, ctypes.c_int, ctypes.c_void_p)
_RECVMMSG = libc_function("recvmmsg", _RECVMMSG_ARGS)
# The same call without releasing the interpreter lock (ctypes.PyDLL), for reads that never block
# (MSG_DONTWAIT) in a process with other busy threads: a thread that lets the lock go for a system
# call of microseconds waits up to the switch interval (sys.getswitchinterval(), 5 ms) to take it
# back while another thread runs Python, so a reader releasing it per call reads at most a batch
# per switch interval while the event loop is busy (ctbridge.conntrack.eventdrain).
_RECVMMSG_HOLDING = libc_function("recvmmsg", _RECVMMSG_ARGS, ctypes.PyDLL)


# Of each struct mmsghdr, what Receiver.receive reads: msg_hdr.msg_flags and msg_len, at their offsets.
_MMSG_SIZE = ctypes.sizeof(MMsgHdr)
_FLAGS_AT = MsgHdr.msg_flags.offset
_LEN_AT = MMsgHdr.msg_len.offset
_HEAD = struct.Struct(f"={_FLAGS_AT}xi{_LEN_AT - _FLAGS_AT - 4}xI{_MMSG_SIZE - _LEN_AT - 4}x")


class Receiver:
    """Reads up to ``count`` datagrams of at most ``size`` bytes with one call, without blocking;
    with ``hold_lock`` the call keeps the interpreter lock (_RECVMMSG_HOLDING)."""

    def __init__(self, sock: socket.socket, count: int = 128, size: int = 16384, hold_lock: bool = False) -> None:
        self.sock = sock
        self.call = _RECVMMSG_HOLDING if hold_lock else _RECVMMSG
        self.count = count
        self.size = size
        # one block for all the datagrams, read through a memoryview: slicing it costs less than a
        # ctypes call per datagram, and the headers' lengths and flags are unpacked in one go
        self.block = ctypes.create_string_buffer(count * size)
        self.view = memoryview(self.block).cast("B")
        self.iovecs = (IoVec * count)()
        self.msgs = (MMsgHdr * count)()
        base = ctypes.addressof(self.block)
        for i in range(count):
            self.iovecs[i].iov_base = base + i * size
            self.iovecs[i].iov_len = size
            self.msgs[i].msg_hdr.msg_iov = ctypes.pointer(self.iovecs[i])
            self.msgs[i].msg_hdr.msg_iovlen = 1

    def receive(self) -> list[bytes]:
        """The datagrams waiting now ([] if none); OSError(ENOBUFS) and others as recv() raises them."""
        if self.call is None:
            try:
                return [self.sock.recv(self.size)]
            except BlockingIOError:
                return []
        n = self.call(self.sock.fileno(), self.msgs, self.count, MSG_DONTWAIT, None)
        if n < 0:
            err = ctypes.get_errno()
            if err in (errno_mod.EAGAIN, errno_mod.EWOULDBLOCK):
                return []
            raise OSError(err, os.strerror(err))
        heads = list(_HEAD.iter_unpack(ctypes.string_at(self.msgs, n * _MMSG_SIZE)))  # (flags, length) each
        if any(flags & MSG_TRUNC for flags, _ in heads):
            raise OSError(errno_mod.EMSGSIZE, f"a netlink message was longer than the {self.size}-byte buffer")
        view = self.view
        size = self.size
        return [view[i * size:i * size + length].tobytes() for i, (_, length) in enumerate(heads)]

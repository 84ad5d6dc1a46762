"""recvmmsg through ctypes, on a pair of local datagram sockets (no root)."""

from __future__ import annotations


def test_recvmmsg_reads_many_datagrams_at_once() -> None:
    import socket as socketlib

    from ctbridge.conntrack import recvmmsg as mmsg
    a, b = socketlib.socketpair(socketlib.AF_UNIX, socketlib.SOCK_DGRAM)
    with a, b:
        b.setblocking(False)
        receiver = mmsg.Receiver(b, count=4, size=64)
        assert receiver.receive() == []
        for i in range(6):
            a.send(bytes([i]) * (i + 1))
        first, second = receiver.receive(), receiver.receive()
        assert first == [bytes([i]) * (i + 1) for i in range(4)]
        assert second == [b"\x04" * 5, b"\x05" * 6]

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


def test_recvmmsg_that_keeps_the_interpreter_lock_reads_the_same() -> None:
    import socket as socketlib

    from ctbridge.conntrack import recvmmsg as mmsg
    assert mmsg._RECVMMSG_HOLDING is not None and mmsg._RECVMMSG_HOLDING is not mmsg._RECVMMSG
    a, b = socketlib.socketpair(socketlib.AF_UNIX, socketlib.SOCK_DGRAM)
    with a, b:
        b.setblocking(False)
        receiver = mmsg.Receiver(b, count=4, size=64, hold_lock=True)
        assert receiver.call is mmsg._RECVMMSG_HOLDING
        assert receiver.receive() == []
        for i in range(3):
            a.send(bytes([i]) * 3)
        assert receiver.receive() == [b"\x00" * 3, b"\x01" * 3, b"\x02" * 3]

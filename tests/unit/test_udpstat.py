"""The sync socket's drops as the kernel counts them (/proc/net/udp), on loopback sockets."""

from __future__ import annotations

import socket

from ctbridge.daemon import udpstat


def test_datagrams_the_full_receive_buffer_dropped_are_counted() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel doubles it: a few datagrams
        rx.bind(("127.0.0.1", 0))
        assert udpstat.socket_stats(rx)["drops"] == 0
        for _ in range(200):
            tx.sendto(b"x" * 1000, rx.getsockname())
        stats = udpstat.socket_stats(rx)
        assert stats["drops"] > 100 and stats["rx_queue_bytes"] > 0


def test_a_table_without_the_socket_or_its_columns_says_nothing() -> None:
    head = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref "
            "pointer drops\n")
    row = "   1: 0100007F:A5A5 00000000:0000 07 00000010:00000020 00:00000000 00000000     0        0 4242 2 0000 7\n"
    assert udpstat.parse(head + row, 4242) == {"drops": 7, "tx_queue_bytes": 16, "rx_queue_bytes": 32}
    assert udpstat.parse(head + row, 1) is None
    assert udpstat.parse("", 4242) is None and udpstat.parse("nonsense\n" + row, 4242) is None

"""What the kernel says about the sync socket: datagrams it dropped because the receive buffer was
full (the `drops` column of /proc/net/udp and /proc/net/udp6, see proc(5)), and what waits in the
buffers. Read on demand (stats, metrics), matched by the socket's inode."""

from __future__ import annotations

import os
import socket

PROC_FILES = ("/proc/net/udp", "/proc/net/udp6")


def parse(text: str, inode: int) -> dict[str, int] | None:
    """The row of ``inode`` in a /proc/net/udp table: drops, and the bytes queued to send and to
    read; None if the socket is not in it."""
    lines = text.splitlines()
    if not lines:
        return None
    head = lines[0].split()
    try:
        at_inode, at_drops = head.index("inode"), head.index("drops")
    except ValueError:
        return None
    # the header names "tx_queue rx_queue" as one column of the rows ("00000000:00000000"), and
    # "tr tm->when" likewise: each row has two fields fewer than the header has words
    shift = 2
    for line in lines[1:]:
        fields = line.split()
        if len(fields) <= at_drops - shift or not fields[at_inode - shift].isdigit():
            continue
        if int(fields[at_inode - shift]) == inode:
            tx, _, rx = fields[4].partition(":")
            return {"drops": int(fields[at_drops - shift]), "tx_queue_bytes": int(tx, 16),
                    "rx_queue_bytes": int(rx, 16)}
    return None


def socket_stats(sock: socket.socket) -> dict[str, int]:
    """The sync socket's row ({} where /proc cannot tell)."""
    try:
        inode = os.fstat(sock.fileno()).st_ino
    except OSError:
        return {}
    for path in PROC_FILES:
        try:
            with open(path) as f:
                row = parse(f.read(), inode)
        except OSError:
            continue
        if row is not None:
            return row
    return {}

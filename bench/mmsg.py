"""What batching the sync link's socket calls saves: CPU per datagram of sending N datagrams with
one sendmmsg against N sendto calls, and of reading them with one recvmmsg against N recvfrom
calls (ctbridge.daemon.mmsg, its batched path and its plain one), over loopback UDP.

    python bench/mmsg.py [--batch 8] [--size 1330] [--rounds 7] [--reps 3000]

The defaults are the churn's (bench/profile.py --churn 5000: 8 datagrams per sendmmsg, 1,330
bytes each). The kernel's own work per datagram (the UDP and IP path, loopback, the receiving
socket's queue) is in both and is the larger part; what differs is the system call and the
socket module's work per datagram. The paths alternate round by round; medians are printed.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ctbridge.daemon import mmsg


def measure(batched: bool, batch: int, size: int, reps: int) -> tuple[float, float]:
    """(µs of CPU per datagram sent, per datagram read) over ``reps`` batches."""
    rx, tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with rx, tx:
        rx.bind(("127.0.0.1", 0))
        tx.bind(("127.0.0.1", 0))
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        rx.setblocking(False)
        tx.setblocking(False)
        outbox, inbox = mmsg.Outbox(tx, 64, mmsg=batched), mmsg.Inbox(rx, 64, 9217, mmsg=batched)
        datagrams = [(bytes(size), rx.getsockname()) for _ in range(batch)]
        sending = reading = 0.0
        clock = time.process_time
        for _ in range(reps):
            t0 = clock()
            assert outbox.send(datagrams) == batch
            t1 = clock()
            assert len(inbox.receive()) == batch
            t2 = clock()
            sending += t1 - t0
            reading += t2 - t1
        return sending / reps / batch * 1e6, reading / reps / batch * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8, help="datagrams per call")
    ap.add_argument("--size", type=int, default=1330, help="bytes per datagram")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=3000, help="batches per round")
    args = ap.parse_args()
    if not mmsg.MMSG:
        print("this libc has no sendmmsg/recvmmsg")
        return 1
    runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for _ in range(args.rounds):
        for batched in (True, False):
            runs[batched].append(measure(batched, args.batch, args.size, args.reps))
    print(f"{args.batch} datagrams of {args.size} bytes per call, loopback UDP, median of {args.rounds} rounds "
          f"of {args.reps} batches (µs of CPU per datagram, the kernel's work included):")
    for batched, name in ((True, "sendmmsg / recvmmsg"), (False, "sendto / recvfrom")):
        send = statistics.median(s for s, _ in runs[batched])
        read = statistics.median(r for _, r in runs[batched])
        print(f"  {name:<20} send {send:6.2f}   read {read:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

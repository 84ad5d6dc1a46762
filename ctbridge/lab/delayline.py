"""A delay line for the lab (Options.wan_delay): the server's TCP packets held in a netfilter
queue for a fixed time before they go, as a WAN's round trip would hold them (this kernel has no
netem). With it a connection's events reach the firewalls as they do in the field: the
handshake's SYN_RECV a round trip after its SYN_SENT, ESTABLISHED just after, the teardown's
states a round trip apart (bench/coalesce.py).

    ip netns exec SERVER python -m ctbridge.lab.delayline QUEUE MILLISECONDS

It binds QUEUE (ctbridge.conntrack.nfqueue), says "delaying" on stdout, and releases each packet
MILLISECONDS after it came, in order, until SIGTERM or MAX_SECONDS. The rule (DELAY_RULE, an
iptables rule: this kernel's nftables has no queue expression, as for the defer) carries
``--queue-bypass``: once the process is gone, packets pass undelayed.
"""

from __future__ import annotations

import collections
import select
import signal
import sys
import time
from types import FrameType

from ctbridge.conntrack.nfqueue import QueueSocket

MAX_SECONDS = 24 * 3600.0  # a lab never runs this long: the loop is bounded by it
def delay_rule(queue: int) -> list[str]:
    """The iptables command that hands this namespace's outgoing TCP packets to ``queue``."""
    return ["iptables", "-w", "-A", "OUTPUT", "-p", "tcp", "-j", "NFQUEUE", "--queue-num", str(queue),
            "--queue-bypass"]


def run(queue: int, delay: float) -> int:
    stop = False

    def on_term(_sig: int, _frame: FrameType | None) -> None:
        nonlocal stop
        stop = True
    signal.signal(signal.SIGTERM, on_term)
    q = QueueSocket(queue)
    held: collections.deque[tuple[float, int]] = collections.deque()
    print("delaying", flush=True)
    end = time.monotonic() + MAX_SECONDS
    try:
        while not stop and time.monotonic() < end:
            now = time.monotonic()
            wait = min(1.0, max(0.0, held[0][0] - now)) if held else 1.0
            ready, _w, _x = select.select([q], [], [], wait)
            now = time.monotonic()
            if ready:
                held.extend((now + delay, p.packet_id) for p in q.read())
            while held and held[0][0] <= now:
                q.verdict(held.popleft()[1])
    finally:
        for _due, packet_id in held:  # what is held goes now, undelayed
            q.verdict(packet_id)
        q.close()
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[0].isdigit() or not 1 <= int(argv[0]) <= 65535:
        print("usage: python -m ctbridge.lab.delayline QUEUE MILLISECONDS", file=sys.stderr)
        return 2
    try:
        ms = float(argv[1])
    except ValueError:
        ms = -1.0
    if not 0 < ms <= 1000:
        print("delayline: MILLISECONDS is more than 0 and at most 1000", file=sys.stderr)
        return 2
    return run(int(argv[0]), ms / 1000)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

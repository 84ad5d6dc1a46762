"""Sequence numbers: what a receiver has seen of a sender's stream, what a sender keeps for resending.

Every datagram a node sends takes the next number of its stream (one stream per node and boot
epoch, the same for every peer). Receivers use the numbers twice: to reject a datagram seen
before (replay protection) and to notice a missing one (NACK). A resent datagram keeps its
original number but carries the current state of the flows it named, so a late original and its
resend are never both applied.
"""

from __future__ import annotations

from collections import OrderedDict

SEQ_MAX = 0xFFFFFFFF


class ReceiveWindow:
    """One sender's stream as this node has received it.

    ``expected`` is the lowest number not yet received; every number below it has arrived (or
    was given up on). ``above`` holds the numbers received beyond a gap.
    """

    def __init__(self, first: int, limit: int = 8192) -> None:
        self.expected = first
        self.above: set[int] = set()
        self.limit = limit  # numbers held beyond a gap before the gap is given up on
        self.highest = first - 1
        self.new_gap = False  # the last accepted number opened a gap (it skipped some)

    def accept(self, seq: int) -> bool:
        """Record ``seq``; False if it was received before (a duplicate or a replay)."""
        if seq < self.expected or seq in self.above:
            return False
        if seq == self.expected:
            self.expected += 1
            above = self.above
            while self.expected in above:
                above.discard(self.expected)
                self.expected += 1
        else:
            self.above.add(seq)
        self.new_gap = seq > self.highest + 1
        if seq > self.highest:
            self.highest = seq
        return True

    def gaps(self, limit: int) -> list[tuple[int, int]]:
        """Up to ``limit`` gaps (first, last), lowest first: every number missing below the
        highest received, as ranges (what one NACK round asks for)."""
        if not self.above:
            return []
        out = []
        start = self.expected
        for seq in sorted(self.above):
            if seq > start:
                out.append((start, seq - 1))
                if len(out) == limit:
                    break
            start = seq + 1
        return out

    def missing(self) -> tuple[int, int] | None:
        """The first gap (first, last), or None if the stream is contiguous."""
        if not self.above:
            return None
        return self.expected, min(self.above) - 1

    def fill(self, first: int, last: int) -> bool:
        """The sender will not resend first..last: stop waiting for them; True if that skipped
        numbers not received. Only a range that starts at the first missing number moves anything
        (a sender answers what was asked for); the cost does not depend on the range's size."""
        if first > self.expected or last < self.expected:
            return False
        self.expected = last + 1
        self.above = {s for s in self.above if s > last}
        while self.expected in self.above:
            self.above.discard(self.expected)
            self.expected += 1
        return True

    def give_up_before(self, seq: int) -> bool:
        """Treat every number below ``seq`` as done; True if that skipped a gap."""
        if seq <= self.expected:
            return False
        below = {s for s in self.above if s < seq}
        skipped = len(below) < seq - self.expected
        self.above -= below
        self.expected = seq
        while self.expected in self.above:
            self.above.discard(self.expected)
            self.expected += 1
        return skipped


Kept = tuple[tuple[bytes, ...], bytes]  # (flow keys, control messages that must arrive too)


class ResendQueue:
    """Datagrams this node sent and may have to send again, by sequence number.

    A datagram is kept as the keys of the flows it carried, so a resend carries their state as
    it is now, plus the control messages that must not be lost with it (bulk markers, GAP,
    RESYNC); acknowledgements and ALIVE are not kept, a resend without anything else is empty.
    Entries go once every live peer has acknowledged them, or — past ``limit`` — the oldest go,
    and the peers that had not acknowledged them must be brought back by a bulk resync.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sent: OrderedDict[int, Kept] = OrderedDict()
        self.dropped_upto = 0  # highest number dropped because of the limit

    def __len__(self) -> int:
        return len(self.sent)

    def add(self, seq: int, kept: Kept) -> None:
        self.sent[seq] = kept
        while len(self.sent) > self.limit:
            old, _ = self.sent.popitem(last=False)
            self.dropped_upto = max(self.dropped_upto, old)

    def release(self, upto: int) -> None:
        """Everything up to ``upto`` has been acknowledged by every live peer."""
        sent = self.sent
        while sent:
            first = next(iter(sent))
            if first > upto:
                break
            del sent[first]

    def get(self, seq: int) -> Kept | None:
        """What datagram ``seq`` carried, or None if it is no longer kept."""
        return self.sent.get(seq)

    def oldest(self) -> int | None:
        return next(iter(self.sent), None)

"""What this node holds back before it goes out: young flows and coalesced updates.

**Sync delay** (``sync.delay``, per protocol ``sync.delay_by_protocol``): a flow is replicated
only once it has lived that long. Most flows of web and DNS traffic end within a second; losing
one at a failover costs the client a retry, while replicating it costs CPU on both nodes and
bytes on the sync link that the long-lived flows need. A young flow is kept here, not in the
internal cache's table: its events update it, a bulk transfer, a digest and the refresh sweeps
do not see it, and when it ends before its time nothing about it is ever sent. When it comes of
age its newest state goes into the table and out, as a new flow would.

**Coalescing** (``sync.coalesce``): a TCP connection's handshake and teardown each make several
events within a round trip. An update of a flow peers already have waits up to the window, and
the flow goes out once, in its state at sending time. A new flow and a deletion are never held:
a deletion also takes its flow out of the held updates, so it is sent once.

Pure: the internal cache calls it with its own dicts and the engine's ``now``.

Imports nothing of ctbridge.
"""

from __future__ import annotations

from collections import deque
from collections.abc import MutableMapping

INF = float("inf")


class Holdback:
    """Young flows (``young``: key -> (FLOW message, when peers' copy would run out, when it comes
    of age)) and the updates held for coalescing (``held``, all released at ``held_until``)."""

    __slots__ = ("_queues", "generation", "held", "held_until", "young")

    def __init__(self) -> None:
        self.young: dict[bytes, tuple[bytes, float, float]] = {}
        # one queue per delay (a protocol may have its own): each is in order of coming of age,
        # so the flows due are found at the fronts, never by a pass over ``young``
        self._queues: dict[float, deque[tuple[float, bytes]]] = {}
        # key -> the generation (one per batch of kernel events read) of its last update held: a
        # later batch's update of a held flow is one message saved (updates of one batch went
        # out once anyway: a flow waits in ``pending`` once)
        self.held: dict[bytes, int] = {}
        self.held_until = INF
        self.generation = 0

    def hold_young(self, key: bytes, msg: bytes, told_until: float, delay: float, now: float) -> None:
        """A flow this node has not replicated yet changed (``msg``: its FLOW message now)."""
        young = self.young
        prev = young.get(key)
        if prev is not None:
            young[key] = (msg, told_until, prev[2])
            return
        due = now + delay
        young[key] = (msg, told_until, due)
        queue = self._queues.get(delay)
        if queue is None:
            queue = self._queues[delay] = deque()
        queue.append((due, key))

    def hold_update(self, key: bytes, now: float, window: float) -> bool:
        """An update of a flow peers have, held for at most ``window`` from the first held;
        whether it saved a message (its flow was held already, by an earlier batch)."""
        held = self.held
        before = held.get(key)
        if before is None and not held:
            self.held_until = now + window
        held[key] = self.generation
        return before is not None and before != self.generation

    def deadline(self) -> float:
        """When something held here is due (INF: nothing is held)."""
        out = self.held_until
        for queue in self._queues.values():
            if queue and queue[0][0] < out:
                out = queue[0][0]
        return out

    def release(self, now: float, pending: MutableMapping[bytes, None]) -> list[tuple[bytes, bytes, float]]:
        """Held updates whose window ran out into ``pending``; the young flows that came of age,
        taken out: (key, FLOW message, when peers' copy would run out), for the internal cache to
        put in its table with a version of now (a DELETE of the same tuple queued meanwhile takes
        its version when it is sent: the flow's must be newer, or peers would drop it)."""
        if now >= self.held_until:
            for key in self.held:
                pending[key] = None
            self.held.clear()
            self.held_until = INF
        young = self.young
        grown: list[tuple[bytes, bytes, float]] = []
        for queue in self._queues.values():
            while queue and queue[0][0] <= now:
                due, key = queue.popleft()
                held = young.get(key)
                if held is None or held[2] != due:  # ended young, or ended and began again since
                    continue
                del young[key]
                grown.append((key, held[0], held[1]))
        return grown

    def clear(self) -> None:
        self.young.clear()
        self._queues.clear()
        self.held.clear()
        self.held_until = INF

"""The event loop's lag: how late a probe runs that asked to run at a given time. Everything the
daemon does runs on one loop, so a stall there (a long pass over the table, a slow callback) is
time in which no datagram is read, no acknowledgement sent and no keepalived transition taken:
peers see a silent node. The probe wakes every LAG_INTERVAL; the lag of each wake-up goes into a
histogram, the longest ever, and the longest of the last RECENT seconds (`ctbridge status`).

``LoopLag`` is pure (its clock is passed in); ``watch`` is the probe on a running loop. Imports
daemon.metrics (the histogram) only.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from ctbridge.daemon.metrics import Histogram

LAG_INTERVAL = 0.1  # seconds between two probes: a stall shorter than this may go unseen
# upper bounds (seconds) of the histogram's buckets: a busy loop is a few ms late; 5 s is
# sync.peer_timeout's default, where a peer declares this node silent
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
RECENT = 60.0  # seconds over which "the longest recent stall" is taken


class LoopLag:
    def __init__(self) -> None:
        self.histogram = Histogram(LAG_BUCKETS)
        self.longest = 0.0
        # (when, lag) with lags decreasing from left to right: the left end is the longest of the
        # window, and a probe that lagged less than a later one can never be the longest again
        self._window: deque[tuple[float, float]] = deque()

    def observe(self, due: float, now: float) -> None:
        """A probe due at ``due`` ran at ``now``."""
        lag = max(0.0, now - due)
        self.histogram.observe(lag)
        self.longest = max(self.longest, lag)
        window = self._window
        while window and window[-1][1] <= lag:
            window.pop()
        window.append((now, lag))

    def recent(self, now: float) -> float:
        """The longest lag of the probes of the last RECENT seconds."""
        window = self._window
        while window and window[0][0] < now - RECENT:
            window.popleft()
        return window[0][1] if window else 0.0

    def snapshot(self, now: float) -> dict[str, Any]:
        return {"longest_stall_seconds": round(self.longest, 6),
                "recent_longest_stall_seconds": round(self.recent(now), 6),
                "recent_seconds": RECENT, "lag_histogram": self.histogram.snapshot()}


async def watch(lag: LoopLag) -> None:
    """Probe the running loop every LAG_INTERVAL, until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + LAG_INTERVAL
        await asyncio.sleep(LAG_INTERVAL)
        lag.observe(due, loop.time())

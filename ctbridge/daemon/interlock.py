"""The priority interlock: keepalived's track file says whether this node may win an election.

The rules (the verdict itself is failover.may_take_over and failover.track_value, pure): the
file is checked every TRACK_INTERVAL and written only when its value changes; a file that cannot
be written is counted and tried again, said once when it starts failing and once when it works
again. With the conntrackd backend, whose caches cannot be judged whole, conntrackd must at
least answer. A stopped daemon replicates nothing: a node that is not MASTER is left demoted.

Imports ctbridge.sync (the engine's role and completeness) and daemon.conntrackd, failover and
keepalived; service starts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from ctbridge.daemon import conntrackd, failover, keepalived
from ctbridge.sync.engine import Engine, Role

log = logging.getLogger("ctbridge")

TRACK_INTERVAL = 0.5  # seconds between checks of the priority interlock


@dataclass
class Interlock:
    """The track file (keepalived.track_file) of one node."""

    engine: Engine
    backend: conntrackd.Conntrackd | None
    path: str
    incomplete_value: int
    stats: dict[str, Any]  # the daemon's stats sections: this counts "track_errors"
    value: int | None = None  # what the track file holds, once written
    gone_value: int = 0  # keepalived.peer_gone_value (active-active; failover.track_value)

    async def may_take_over(self, now: float) -> bool:
        if self.backend is not None:  # conntrackd's caches cannot be judged whole: it must answer, at least
            alive = await self.backend.answers(now)  # asked on a master too: the stats show it
            return self.engine.role is Role.MASTER or alive
        return failover.may_take_over(self.engine.complete(), self.engine.role,
                                      heard_a_peer=bool(self.engine.live_peers()))

    def peer_gone(self) -> bool:
        """A peer proved a session in this life and is silent now, and this node holds every live
        peer's flows (ctbridge's own replication only)."""
        engine = self.engine
        return (self.backend is None and engine.complete()
                and any(p.proven and not p.alive for p in engine.peers.values()))

    async def run(self) -> None:
        """The track file follows failover.track_value, checked every TRACK_INTERVAL."""
        failing = False
        path = self.path
        loop = asyncio.get_running_loop()
        while True:
            may = await self.may_take_over(loop.time())
            value = failover.track_value(may, self.incomplete_value, self.peer_gone(), self.gone_value)
            if value != self.value:
                try:
                    keepalived.write_track_file(path, value)
                except OSError as exc:  # a full tmpfs, no file descriptors: counted, tried again
                    self.stats["track_errors"] += 1
                    if not failing:  # logged when it starts failing, and when it works again
                        log.error("track file %s cannot be written (%s); trying again every %.1f s", path,
                                  exc.strerror or exc, TRACK_INTERVAL)
                    failing = True
                else:
                    if failing:
                        log.info("track file %s written again", path)
                    failing = False
                    log.info("track file %s = %d (external cache %s%s)", path, value,
                             "complete" if may else "incomplete",
                             ", a peer gone" if value == self.gone_value != 0 else "")
                    self.value = value
            await asyncio.sleep(TRACK_INTERVAL)

    def stop(self) -> None:
        """At the daemon's stop: a stopped daemon replicates nothing, so a node that is not
        MASTER is demoted until it runs again (a master's own table stays the truth, so a
        master's restart keeps its priority)."""
        if self.path and self.engine.role is not Role.MASTER:
            with contextlib.suppress(OSError):
                keepalived.write_track_file(self.path, self.incomplete_value)

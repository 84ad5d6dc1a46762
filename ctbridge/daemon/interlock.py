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
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from ctbridge.daemon import conntrackd, failover, keepalived
from ctbridge.sync.engine import Engine, Role, incomplete_peers

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
    gone_complete: bool = False  # keepalived.peer_gone_complete (active-active)
    gone: set[int] = dataclasses.field(default_factory=set)  # peers gone or restarted, not yet whole again
    restarts: dict[int, int] = dataclasses.field(default_factory=dict)  # each peer's restarts, as last seen
    whole: set[int] = dataclasses.field(default_factory=set)  # peers live and complete here, at the last look

    async def may_take_over(self, now: float) -> bool:
        if self.gone_complete and self.peer_gone():
            return True
        if self.backend is not None:  # conntrackd's caches cannot be judged whole: it must answer, at least
            alive = await self.backend.answers(now)  # asked on a master too: the stats show it
            return self.engine.role is Role.MASTER or alive
        return failover.may_take_over(self.engine.complete(), self.engine.role,
                                      heard_a_peer=bool(self.engine.live_peers()))

    def peer_gone(self) -> bool:
        """Active-active (keepalived.peer_gone_complete): a peer that was live and whole here went
        silent or restarted (a newer life heard or proven), and its flows have not all arrived
        here since; and this node holds every other live peer's flows. The node then counts as
        complete although it hears nobody (ctbridge's own replication only).

        Without it a survivor that hears nobody demoted itself, and with both nodes demoted the
        masters' own priorities decided: the node of a killed daemon (demoted by its unit's
        ExecStopPost) kept its VIP and forwarded flows nobody replicated; and at a peer's
        restart both nodes read incomplete, and the restarting node kept or took back its VIP
        before its defer could hold anything (found in the lab: 790 packets of new connections
        dropped after one restart). It never raises a priority: a sync link that fails one way,
        or between two other nodes, moves no VIP (found by review, when it did)."""
        if self.backend is not None:
            return False
        engine = self.engine
        peers = engine.peers
        incomplete = incomplete_peers(engine)
        recent = engine.clock.latest - engine.config.peer_timeout
        for p in peers.values():
            restarted = p.restarts > self.restarts.get(p.node, p.restarts)
            self.restarts[p.node] = p.restarts
            # only a peer whose flows were all here: a node that lacks them must not count as whole
            if p.node in self.whole and (not p.alive or restarted or p.candidate_at > recent):
                self.gone.add(p.node)
        self.whole = {p.node for p in peers.values() if p.alive and p.proven and p.node not in incomplete}
        self.gone -= self.whole
        return bool(self.gone) and incomplete <= self.gone

    async def run(self) -> None:
        """The track file follows failover.track_value, checked every TRACK_INTERVAL."""
        failing = False
        path = self.path
        loop = asyncio.get_running_loop()
        while True:
            may = await self.may_take_over(loop.time())
            value = failover.track_value(may, self.incomplete_value)
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
                             "complete" if may else "incomplete", ", a peer gone" if self.gone else "")
                    self.value = value
            await asyncio.sleep(TRACK_INTERVAL)

    def stop(self) -> None:
        """At the daemon's stop: a stopped daemon replicates nothing, so a node that is not
        MASTER is demoted until it runs again (a master's own table stays the truth, so a
        master's restart keeps its priority)."""
        if self.path and self.engine.role is not Role.MASTER:
            with contextlib.suppress(OSError):
                keepalived.write_track_file(self.path, self.incomplete_value)

"""Refresh sweeps: this kernel's table read again and again for flows whose timeouts traffic
restarted, which the kernel sends no event for (Engine.kernel_refresh sends them before the
peers' copies run out).

The rules: a sweep runs on a socket of its own, so it never waits for a commit, nor holds one
up; its dump is read in a thread and the engine takes it in chunks (REFRESH_CHUNK), so
datagrams and events are served in between; a dump of the whole table made meanwhile
(KernelReader.resync) supersedes it. When the next sweep comes, and so how far ahead this one
refreshes, is sweep_timing()'s (pure, tested with a fake clock in tests/unit/test_timeouts.py).

Imports ctbridge.conntrack (its own KernelTable), ctbridge.config.replication (the interval),
ctbridge.sync (the engine) and daemon.kernelio (the dumps under way); service starts it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import operator
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ctbridge.config.replication import refresh_interval
from ctbridge.config.settings import Config
from ctbridge.conntrack.table import KernelError, KernelTable
from ctbridge.daemon.kernelio import Kernel
from ctbridge.sync.engine import EVERYTHING, Engine, Sweep

log = logging.getLogger("ctbridge")

# the timeouts traffic restarts without an event, in proc_sys_net_netfilter(5): a sweep must come
# well within the shortest, or an injected copy (and a peer's cache) runs out between two sweeps
REFRESHED_TIMEOUTS = ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream", "nf_conntrack_icmp_timeout",
                      "nf_conntrack_icmpv6_timeout", "nf_conntrack_generic_timeout")
REFRESH_SHARE = 20  # a sweep starts at least 20 times its last duration after it: at most 5% of a core
REFRESH_CHUNK = 8192  # dump messages the engine reads per turn of the event loop (about 20 ms)
REFRESH_HISTORY = 8  # sweeps whose longest duration estimates the next one
# when peers' copies run out, looked through per turn for the soonest: min() over a million at once
# held the loop for 20-100 ms (docs/performance.md), 100,000 take 2-10
RUNOUT_CHUNK = 100_000


def sweep_timing(interval: float, shortest: float, dumped: float, last: float) -> tuple[float, float]:
    """(seconds until the next sweep, how far ahead this one refreshes), once this sweep's dump
    took ``dumped`` seconds and the longest of the last sweeps ``last`` (REFRESH_HISTORY of
    them); ``shortest``: the shortest timeout traffic restarts (refreshed_timeouts()).

    A flow this sweep does not send must still be held by its peers when the next sweep has
    read it: after this sweep's own remaining work, the wait, and the next sweep's dump and
    work. So this sweep refreshes what runs out within the wait plus twice a sweep's duration
    (the estimate: the longer of the last sweeps and 1.5 times this dump) plus a fifth of the
    shortest timeout (at least a second) for a next sweep slower than any before. The wait is
    decided here and kept, whatever this sweep then takes: ``within`` rests on it.

    The next sweep waits REFRESH_SHARE times a sweep's duration (at most 5% of a core), but
    never so long that a flow refreshed now with the shortest timeout would run out before the
    next sweep has sent it again: correctness first, so a table whose sweep takes more than a
    few percent of the shortest timeout is swept more often."""
    estimate = max(last, 1.5 * dumped)
    slack = max(1.0, shortest / 5)
    ceiling = shortest - 3 * estimate - slack  # what a flow refreshed now must outlive
    wait = max(interval if ceiling >= interval else 0.25, min(REFRESH_SHARE * estimate, ceiling))
    return wait, wait + 2 * estimate + slack


def needless(due: Callable[[float], bool], flows: int, now: float, interval: float, shortest: float,
             dumped: float, dumped_flows: int, last: float) -> float | None:
    """The wait until the next sweep when a sweep now could refresh nothing, so its dump (0.45 s
    of CPU for 90,000 flows, most of it the kernel's) is left out; None: dump. A dump now would
    end after ``dumped`` (the last one's duration, grown as the table did since that one read
    ``dumped_flows``: it holds ``flows``) and refresh what runs out within sweep_timing()'s
    horizon from then: when no flow's peers' copy runs out before that (``due``:
    Engine.refresh_due), every flow is still held when the sweep after next has read it, as
    sweep_timing() requires. A table of connections established for days, and of flows that
    end before their timeouts matter, is swept only so."""
    grown = max(1.0, flows / dumped_flows)
    wait, within = sweep_timing(interval, shortest, dumped * grown, last * grown)
    return None if due(now + dumped * grown + within) else wait


async def soonest(runouts: list[float]) -> float:
    """The earliest of ``runouts`` (Engine.runouts(): when peers' copies run out), in chunks of
    RUNOUT_CHUNK with the loop served in between; infinity for none."""
    first = float("inf")
    for at in range(0, len(runouts), RUNOUT_CHUNK):
        first = min(first, min(runouts[at:at + RUNOUT_CHUNK]))
        await asyncio.sleep(0)
    return first


def refreshed_timeouts() -> float:
    """The shortest of this network namespace's REFRESHED_TIMEOUTS, in seconds (30, the kernel's
    UDP default, if none can be read). Read again before each sweep: an operator may lower them
    while the daemon runs."""
    seen = []
    for name in REFRESHED_TIMEOUTS:
        try:
            with open(f"/proc/sys/net/netfilter/{name}") as f:
                seen.append(float(f.read().strip()))
        except (OSError, ValueError):
            continue
    return min(seen) if seen else 30.0


async def refresh_loop(cfg: Config, engine: Engine, kernel: Kernel, info: dict[str, Any],
                       after_input: Callable[[], None]) -> None:
    """Sweeps until cancelled. ``info``: the "refresh" section of the daemon's stats (the last
    sweep's table size and duration, the interval, errors, sweeps superseded, sweeps left out
    as needless)."""
    sweeper = KernelTable()
    loop = kernel.loop
    recent: deque[float] = deque([0.0], maxlen=REFRESH_HISTORY)
    wait = refresh_interval(cfg, refreshed_timeouts())
    dumped, dumped_flows = 0.0, 0  # the last dump's duration and the flows it read
    try:
        while True:
            info["interval"] = round(wait, 3)
            await asyncio.sleep(wait)
            if dumped_flows:
                shortest = refreshed_timeouts()
                first = await soonest(engine.runouts())
                skip = needless(functools.partial(operator.lt, first), len(engine.internal), loop.time(),
                                refresh_interval(cfg, shortest),
                                shortest, dumped, dumped_flows, max(recent))
                if skip is not None:
                    info["skipped"] += 1
                    wait = skip
                    continue
            start = time.monotonic()
            refreshed = 0
            try:
                with kernel.watch() as touched:
                    messages = await loop.run_in_executor(None, sweeper.dump_messages)
                    shortest = refreshed_timeouts()
                    dumped, dumped_flows = time.monotonic() - start, len(messages)
                    wait, within = sweep_timing(refresh_interval(cfg, shortest), shortest, dumped, max(recent))
                    # the flows that can need a refresh, looked up once for every chunk: the others'
                    # messages are skipped unread (``touched`` names what events changed since)
                    sweep = Sweep()
                    for at in range(0, len(messages), REFRESH_CHUNK):
                        if EVERYTHING in touched:  # the table was read again meanwhile: this dump is older
                            info["superseded"] += 1
                            break
                        refreshed += engine.kernel_refresh(messages[at:at + REFRESH_CHUNK], loop.time(),
                                                           within, newer=touched, sweep=sweep)
                        after_input()
                        await asyncio.sleep(0)
            except (OSError, KernelError) as exc:
                info["errors"] += 1
                if info["errors"] == 1:  # once: the counter tells how often
                    log.warning("refresh sweep failed: %s (peers may expire flows traffic keeps alive)", exc)
                wait = refresh_interval(cfg, refreshed_timeouts())
                continue
            recent.append(time.monotonic() - start)
            info.update(flows=len(messages), seconds=round(recent[-1], 4), refreshed=info["refreshed"] + refreshed)
    finally:
        sweeper.close()

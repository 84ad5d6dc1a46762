"""The conntrackd backend (apply.backend = "conntrackd"): ctbridge keeps keepalived's FIFO, its
ordered transitions, the interlock, the commit gate and the metrics, and an existing conntrackd
replicates the table. Each step of the policy (ctbridge.daemon.failover) that is a replicator's
becomes the conntrackd command for it, run to its end and checked, in the order of conntrackd's
primary-backup script (conntrackd(8)):

    MASTER   -c  commit the external cache into the kernel      (failover.COMMIT)
             -f  flush the internal and external caches          (FLUSH_EXTERNAL)
             -R  resync the internal cache with the kernel table (DUMP, in the follow-up)
             -B  send a bulk update to the peers                 (BULK_SEND, in the follow-up)
    BACKUP   -n  ask the peers for a resync                      (REQUEST_RESYNC)
             -t  shorten the kernel timers of the old entries    (START_PURGE, a former master)
    FAULT    -t                                                  (RELEASE, a former master)

Unlike the script, whose steps keepalived forks unordered, one step starts only when the one
before ended. A step that fails (an exit status, a timeout) fails the transition, as the script's
steps do not, but the steps after it still run, as the script's do: a new master whose commit
failed still flushes, resyncs from its kernel and sends its bulk.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from ctbridge.daemon import failover

FLAGS = {
    failover.COMMIT: "-c",
    failover.FLUSH_EXTERNAL: "-f",
    failover.DUMP: "-R",
    failover.BULK_SEND: "-B",
    failover.REQUEST_RESYNC: "-n",
    failover.START_PURGE: "-t",
    failover.RELEASE: "-t",
}
# Steps of ctbridge's own replication, with nothing to do when conntrackd replicates
IDLE = frozenset({failover.PAUSE_EVENTS, failover.RESUME_EVENTS, failover.CANCEL_PURGE, failover.WAIT_INJECT})
KEPT = 16  # steps remembered for the stats
POLL_INTERVAL = 5.0  # seconds between the interlock's `conntrackd -s` (a process each)
POLL_TIMEOUT = 2.0  # ... and how long one may take before conntrackd counts as not answering


class StepError(Exception):
    """A conntrackd command failed: which, and how (one line)."""


@dataclass
class Conntrackd:
    binary: str
    config: str
    timeout: float = 30.0
    steps: list[dict[str, Any]] = field(default_factory=list)  # the last KEPT, oldest first
    failures: int = 0
    polled: tuple[float, bool] = (float("-inf"), False)  # (when, whether it answered): the interlock's

    def argv(self, flag: str) -> list[str]:
        return [self.binary, "-C", self.config, flag]

    async def run(self, flag: str, keep: bool = True, timeout: float | None = None) -> str:
        """Run ``conntrackd -C CONFIG FLAG`` to its end; its output. StepError if it failed.
        ``keep``: remember it among the steps (the interlock's polls are not)."""
        start = time.monotonic()
        limit = self.timeout if timeout is None else timeout
        record: dict[str, Any] = {"flag": flag, "at": time.time()}
        try:
            # a session of its own: on a timeout the whole group goes (a wrapper script and its
            # conntrackd), or the pipe a child still holds would keep this waiting
            proc = await asyncio.create_subprocess_exec(*self.argv(flag), stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            raise self._failed(record, start, f"cannot run {self.binary}: {exc.strerror}", keep) from None
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), limit)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise self._failed(record, start, f"conntrackd {flag} did not end within {limit:.0f} s",
                               keep) from None
        text = out.decode(errors="replace").strip()
        if proc.returncode != 0:
            last = text.splitlines()[-1] if text else ""
            raise self._failed(record, start, f"conntrackd {flag} exited with {proc.returncode}: {last}", keep)
        if keep:
            self._keep(record, start, ok=True)
        return text

    def _failed(self, record: dict[str, Any], start: float, why: str, keep: bool) -> StepError:
        if keep:
            self.failures += 1
            self._keep(record, start, ok=False, error=why)
        return StepError(why)

    def _keep(self, record: dict[str, Any], start: float, **more: Any) -> None:
        record.update(more, seconds=round(time.monotonic() - start, 6))
        self.steps.append(record)
        del self.steps[:-KEPT]

    async def caches(self) -> dict[str, int] | None:
        """The internal and external cache sizes `conntrackd -s` reports; None if it does not
        answer within POLL_TIMEOUT."""
        try:
            text = await self.run("-s", keep=False, timeout=POLL_TIMEOUT)
        except StepError:
            return None
        return cache_sizes(text)

    @property
    def alive(self) -> bool:
        """Whether conntrackd answered its last `-s` (the interlock's word; False before any)."""
        return self.polled[1]

    async def answers(self, now: float) -> bool:
        """Whether conntrackd answers, asked at most every POLL_INTERVAL (the interlock's word)."""
        when, alive = self.polled
        if now < when + POLL_INTERVAL:
            return alive
        alive = await self.caches() is not None
        self.polled = (now, alive)
        return alive


def cache_sizes(text: str) -> dict[str, int]:
    """{"internal": n, "external": m} from what `conntrackd -s` printed (conntrackd(8): a "cache
    internal:" block, then "cache external:", each with its "current active connections"; a
    section missing is left out)."""
    return {section: int(count) for section, count in
            re.findall(r"cache (internal|external):\s*\ncurrent active connections:\s*(\d+)", text)}

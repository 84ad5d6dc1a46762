"""The conntrackd backend's pure parts (issue 15, deliver 3): the policy's steps as conntrackd's
commands, in the primary-backup order, and conntrackd's own figures read back."""

from __future__ import annotations

import asyncio
import sys

import pytest

from ctbridge.daemon import conntrackd, failover
from ctbridge.daemon.keepalived import parse_args
from ctbridge.sync.engine import Role


def flags(state: str, was: Role) -> list[str]:
    d = failover.decide(parse_args(["GROUP", "G", state, "100"]), failover.Facts(role=was))
    steps = [a.name for a in d.actions]
    if state == "MASTER":
        steps += [a.name for a in failover.followup(Role.MASTER)]
    return [conntrackd.FLAGS[s] for s in steps if s in conntrackd.FLAGS]


def test_each_transition_runs_conntrackds_steps_in_the_primary_backup_order() -> None:
    assert flags("MASTER", Role.BACKUP) == ["-c", "-f", "-R", "-B"]
    assert flags("BACKUP", Role.MASTER) == ["-n", "-t"]
    assert flags("BACKUP", Role.FAULT) == ["-n"]  # nothing of its own to purge
    assert flags("FAULT", Role.MASTER) == ["-t"] and flags("STOP", Role.MASTER) == ["-t"]
    assert flags("FAULT", Role.BACKUP) == []


def test_conntrackds_caches_are_read_from_its_statistics() -> None:
    text = ("cache internal:\ncurrent active connections:          120\nconnections created:  200\n\n"
            "cache external:\ncurrent active connections:           98\n")
    assert conntrackd.cache_sizes(text) == {"internal": 120, "external": 98}
    assert conntrackd.cache_sizes("not conntrackd") == {}


def test_a_step_that_fails_or_hangs_says_which_and_why() -> None:
    async def run() -> None:
        fails = conntrackd.Conntrackd(sys.executable, "/nonexistent.conf", timeout=5)
        # python -C is no option of Python's: it exits non-zero, as conntrackd does on an error
        with pytest.raises(conntrackd.StepError, match="exited with 2"):
            await fails.run("-c")
        assert fails.failures == 1 and fails.steps[-1]["ok"] is False
        missing = conntrackd.Conntrackd("/nonexistent/conntrackd", "/x.conf")
        with pytest.raises(conntrackd.StepError, match="cannot run"):
            await missing.run("-f")
        assert await missing.caches() is None and missing.failures == 1  # the interlock's polls count nothing
    asyncio.run(run())


def test_the_interlock_asks_conntrackd_every_few_seconds_and_a_hung_one_does_not_answer(tmp_path: object) -> None:
    async def run() -> None:
        from pathlib import Path
        script = Path(str(tmp_path)) / "conntrackd"
        # a wrapper whose child holds the pipe: a timeout must end the whole group
        script.write_text("#!/bin/sh\nsleep 60 &\nwait\n")
        script.chmod(0o755)
        hung = conntrackd.Conntrackd(str(script), "/x.conf", timeout=1)
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await hung.answers(100.0) is False  # -s within POLL_TIMEOUT, or not answering
        assert loop.time() - start < conntrackd.POLL_TIMEOUT + 2
        with pytest.raises(conntrackd.StepError, match="did not end within 1 s"):
            await hung.run("-c")
        assert loop.time() - start < conntrackd.POLL_TIMEOUT + 5
        hung.polled = (100.0, True)
        assert await hung.answers(100.0 + conntrackd.POLL_INTERVAL / 2) is True  # not asked again yet
    asyncio.run(run())

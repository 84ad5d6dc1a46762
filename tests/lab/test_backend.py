"""The conntrackd backend end to end (issue 15, deliver 3): each firewall runs conntrackd (FTFW
over the sync link, its conntrackd.conf rendered from the cluster description) and a ctbridge
with apply.backend = "conntrackd" that reads keepalived's FIFO, keeps the interlock and the
commit gate, and drives conntrackd through the primary-backup steps in order, each checked."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from ctbridge.daemon.control import ControlError
from ctbridge.lab import Lab, Options, lab, wait_for
from ctbridge.lab.firewall import Firewall
from ctbridge.lab.scenario import switch
from tests.conftest import require

pytestmark = [pytest.mark.root, pytest.mark.lab]
TCP, UDP = 100, 10


@pytest.fixture
def conntrackd_lab() -> Iterator[Lab]:
    require("keepalived")
    require("conntrackd")
    with lab(Options(backend="conntrackd", notify="fifo", tcp=TCP, udp=UDP)) as the_lab:
        the_lab.start()
        yield the_lab


def steps(fw: Firewall, since: int) -> list[str]:
    return [s["flag"] for s in fw.request("stats")["backend"]["steps"][since:] if s["ok"]]


def test_ctbridge_drives_conntrackd_through_a_failover_and_a_failback_in_order(conntrackd_lab: Lab) -> None:
    the_lab = conntrackd_lab
    fw1, fw2 = the_lab.fws
    assert fw2.request("status")["backend"]["name"] == "conntrackd"
    wait_for("fw2's conntrackd to hold fw1's flows",
             lambda: (the_lab.replicator.replicated(fw2) or 0) >= TCP + UDP, timeout=30)
    before = [len(fw.request("stats")["backend"]["steps"]) for fw in (fw1, fw2)]
    s = switch(the_lab, "keepalived stopped", fw1, fw2)
    assert s.recovered is not None and s.status["tcp_failed"] == 0, s.status
    assert s.flows_after == {"tcp": TCP, "udp": UDP} and s.udp_renat == 0
    # MASTER: commit, flush, then (the follow-up) resync from the kernel and bulk send, in that order
    wait_for("fw2's follow-up", lambda: steps(fw2, before[1])[-2:] == ["-R", "-B"], timeout=20)
    assert steps(fw2, before[1]) == ["-c", "-f", "-R", "-B"]
    assert steps(fw1, before[0]) == ["-t"]  # STOP of a former master: its entries' timers shortened
    before = [len(fw.request("stats")["backend"]["steps"]) for fw in (fw1, fw2)]
    s = switch(the_lab, "keepalived started", fw1, fw1)
    assert s.recovered is not None and s.status["tcp_failed"] == 0, s.status
    assert s.flows_after == {"tcp": TCP, "udp": UDP} and s.udp_renat == 0
    wait_for("fw1's follow-up", lambda: steps(fw1, before[0])[-2:] == ["-R", "-B"], timeout=20)
    assert steps(fw1, before[0]) == ["-n", "-c", "-f", "-R", "-B"]  # BACKUP first (it came back), then MASTER
    assert steps(fw2, before[1]) == ["-n", "-t"]  # BACKUP of a former master: resync asked, then the purge
    for fw in the_lab.fws:
        assert fw.request("stats")["backend"]["failures"] == 0
    status = the_lab.stop()
    assert status["final"] and status["tcp_failed"] == 0 and status["udp_rebound"] == 0, status


def test_a_failing_conntrackd_step_fails_the_transition_and_is_said(conntrackd_lab: Lab) -> None:
    """conntrackd gone: the MASTER transition's commit fails, and says so; the gate still opens
    (a master never keeps new flows out) and the role still follows keepalived."""
    fw2 = conntrackd_lab.fws[1]
    assert fw2.conntrackd is not None
    fw2.conntrackd.stop()
    fw2.conntrackd = None
    wait_for("the interlock to notice", lambda: fw2.request("stats")["backend"]["alive"] is False, timeout=10)
    with pytest.raises(ControlError) as err:
        fw2.request("notify", args=["GROUP", "FW", "MASTER", "100"])
    assert "conntrackd -c exited with 1" in str(err.value), err.value
    stats = fw2.request("stats")
    # every step ran (the script's would), each failed, and said so; the gate opened, the role followed
    flags = [s["flag"] for s in stats["backend"]["steps"]]
    assert "-c" in flags and "-f" in flags[flags.index("-c"):], flags  # then -R and -B, in the follow-up
    assert stats["backend"]["failures"] >= 2 and stats["gate"] == "open" and stats["role"] == "MASTER"
    # the same through keepalived's FIFO: the transition fails, the daemon reads on
    fifo = fw2.run_dir / "keepalived.fifo"
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    os.write(fd, b'GROUP "FW" BACKUP 100\n')
    os.close(fd)
    wait_for("the BACKUP from the FIFO", lambda: fw2.request("status")["role"] == "BACKUP", timeout=20)
    assert fw2.daemon is not None and fw2.daemon.alive() and "-n" in [
        s["flag"] for s in fw2.request("stats")["backend"]["steps"]]

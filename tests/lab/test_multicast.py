"""Three firewalls over multicast end to end (issue 15, deliver 2): the three-node example's
shape (sync and VRRP adverts over multicast groups, inject mode, keepalived's notify FIFO),
rendered by `ctbridge render`'s code, real keepalived on each. Connections survive failovers
between any two of the three (1 -> 2 -> 3 -> 1, and back from 3 to 2 to 1), and a node whose
daemon is killed and started again rejoins the group, gets both peers' tables and takes over."""

from __future__ import annotations

import signal

import pytest

from ctbridge.lab import Options, lab, wait_for
from ctbridge.lab.firewall import Firewall
from ctbridge.lab.scenario import Switch, switch
from tests.conftest import require

pytestmark = [pytest.mark.root, pytest.mark.lab]
TCP, UDP = 100, 10


@pytest.fixture(autouse=True)
def _keepalived() -> None:
    require("keepalived")


def survived(s: Switch) -> None:
    assert s.recovered is not None, f"{s.how} ({s.old} -> {s.new}): flows did not recover: {s.status}"
    assert s.status["tcp_failed"] == 0 and not s.status["errors"], s.status["errors"]
    assert s.status["tcp_alive"] == TCP and s.status["udp_rebound"] == 0, s.status
    assert s.flows_after == {"tcp": TCP, "udp": UDP}, f"{s.new}'s kernel holds {s.flows_after}"


def hears_both(fw: Firewall, flows: int = 0) -> bool:
    st = fw.request("status")
    peers = st["peers"]
    return (len(peers) == 2 and all(p["alive"] and p["synced"] for p in peers)
            and st["external"]["complete"] and st["external"]["entries"] >= flows)


def test_three_firewalls_over_multicast_fail_over_between_any_two_and_a_restarted_one_rejoins() -> None:
    with lab(Options(apply_mode="inject", notify="fifo", tcp=TCP, udp=UDP, firewalls=3, multicast=True)) as the_lab:
        the_lab.start()
        fw1, fw2, fw3 = the_lab.fws
        for fw in the_lab.fws:  # every node hears the other two over the group, and holds the master's flows
            wait_for(f"{fw.name} to hear both peers", lambda fw=fw: hears_both(fw), timeout=30)
        wait_for("the standbys to hold fw1's flows", lambda: all(
            fw.lab_flows() == {"tcp": TCP, "udp": UDP} for fw in (fw2, fw3)), timeout=30)  # inject mode
        survived(switch(the_lab, "keepalived stopped", fw1, fw2))  # 1 -> 2
        survived(switch(the_lab, "keepalived stopped", fw2, fw3))  # 2 -> 3
        survived(switch(the_lab, "keepalived started", fw1, fw1))  # 3 -> 1
        fw2.start_keepalived()  # back as a standby (a faulty node sends no bulk until it recovers)
        wait_for("fw2 to be a standby again", lambda: fw2.request("status")["role"] == "BACKUP", timeout=30)
        # fw3's daemon killed and started again: a new epoch, a challenge, a bulk from each peer
        the_lab.replicator.stop(fw3, signal.SIGKILL)
        the_lab.replicator.start(fw3)
        wait_for("fw3 to rejoin and hold every flow again", lambda: hears_both(fw3, TCP + UDP), timeout=60)
        assert fw3.request("stats")["sync"]["bulks_received"] >= 2  # one from each peer
        survived(switch(the_lab, "keepalived stopped", fw1, fw2))  # 1 -> 2
        survived(switch(the_lab, "keepalived stopped", fw2, fw3))  # 2 -> 3, to the restarted node
        survived(switch(the_lab, "keepalived started", fw2, fw2))  # 3 -> 2
        survived(switch(the_lab, "keepalived started", fw1, fw1))  # 2 -> 1
        status = the_lab.stop()
        assert status["final"] and status["tcp_failed"] == 0 and status["tcp_open"] == TCP, status
        assert status["udp_rebound"] == 0

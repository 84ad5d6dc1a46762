"""End to end: live connections through a NATing, stateful firewall pair survive failovers.

Real keepalived, real nftables, real kernels (one per namespace), ctbridge daemons, and a client
whose 200 TCP connections and 20 UDP flows are checked byte for byte (ctbridge.lab). Each test
also checks that the active firewall's kernel holds every live flow, with the conntrack CLI."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ctbridge.lab import Lab, Options, lab, wait_for
from ctbridge.lab.firewall import Firewall
from ctbridge.lab.scenario import Switch, switch
from tests.conftest import require
from tests.support import ROOT

pytestmark = [pytest.mark.root, pytest.mark.lab]
TCP, UDP = 200, 20


@pytest.fixture(autouse=True)
def _keepalived() -> None:
    require("keepalived")


@pytest.fixture
def running() -> Iterator[Callable[[Options], Lab]]:
    """A started lab, torn down when the test ends (passed or not)."""
    with contextlib.ExitStack() as stack:
        def start(options: Options) -> Lab:
            the_lab = stack.enter_context(lab(options))
            the_lab.start()
            return the_lab
        yield start


def survived(s: Switch) -> None:
    """Every flow moved data after the switch, none failed or was NATed anew, and the new
    master's kernel holds them all."""
    assert s.recovered is not None, f"{s.how}: flows did not recover: {s.status}"
    assert s.status["tcp_failed"] == 0 and not s.status["errors"], s.status["errors"]
    assert s.status["tcp_alive"] == TCP
    assert s.status["udp_rebound"] == 0, f"{s.how}: UDP flows were NATed anew"
    assert s.flows_after == {"tcp": TCP, "udp": UDP}, f"{s.how}: {s.new}'s kernel holds {s.flows_after}"


def final_check(the_lab: Lab) -> None:
    status = the_lab.stop()
    assert status["final"] and status["tcp_failed"] == 0 and status["tcp_open"] == TCP, status
    assert status["udp_rebound"] == 0 and status["bytes"] > 0


@pytest.mark.parametrize(("mode", "notify"), [("commit", "hook"), ("inject", "fifo")])
def test_connections_survive_failover_and_failback(mode: str, notify: str, running: Callable[[Options], Lab]) -> None:
    the_lab = running(Options(apply_mode=mode, notify=notify, tcp=TCP, udp=UDP))
    fw1, fw2 = the_lab.fws
    assert fw1.lab_flows() == {"tcp": TCP, "udp": UDP}
    survived(switch(the_lab, "keepalived stopped", fw1, fw2))
    survived(switch(the_lab, "keepalived started", fw1, fw1))
    survived(switch(the_lab, "LAN link down", fw1, fw2))
    survived(switch(the_lab, "LAN link up", fw1, fw1))
    if mode == "commit":  # the standby's kernel got the flows only when it became master
        assert fw2.request("stats")["commit"]["entries"] >= TCP + UDP
    final_check(the_lab)


def test_control_without_ctbridge_on_the_standby_flows_break(running: Callable[[Options], Lab]) -> None:
    """The same failover with the standby's ctbridge stopped: the test must see the flows die."""
    the_lab = running(Options(tcp=TCP, udp=UDP))
    fw1, fw2 = the_lab.fws
    the_lab.replicator.stop(fw2)
    s = switch(the_lab, "keepalived stopped", fw1, fw2, recover_timeout=10)
    assert s.recovered is None
    time.sleep(1)
    status = the_lab.status()
    assert status["tcp_newest"] < time.monotonic() - 5, "some TCP connection still moves data"
    assert status["udp_rebound"] == UDP, "UDP flows should have been NATed anew"
    assert fw2.lab_flows()["tcp"] == 0


def test_loss_on_the_sync_link_during_failover(running: Callable[[Options], Lab]) -> None:
    the_lab = running(Options(tcp=TCP, udp=UDP))
    fw1, fw2 = the_lab.fws
    with the_lab.lossy(20):
        time.sleep(3)  # flows keep changing (UDP timeouts, TCP) while a fifth of the sync datagrams are lost
        survived(switch(the_lab, "keepalived stopped", fw1, fw2))
        survived(switch(the_lab, "keepalived started", fw1, fw1))
    final_check(the_lab)


def test_standby_killed_under_traffic_then_restarted(running: Callable[[Options], Lab]) -> None:
    the_lab = running(Options(tcp=TCP, udp=UDP))
    fw1, fw2 = the_lab.fws
    the_lab.replicator.stop(fw2, signal.SIGKILL)
    time.sleep(2)
    the_lab.replicator.start(fw2)
    wait_for("fw2 to hold fw1's flows again", lambda: fw2.request("status")["external"]["entries"] >= TCP + UDP)
    survived(switch(the_lab, "keepalived stopped", fw1, fw2))
    final_check(the_lab)


def test_event_overrun_forced_by_a_tiny_buffer(running: Callable[[Options], Lab], tmp_path: Path) -> None:
    """4 KiB of event buffer: opening 200 connections overruns it on the master, which must rebuild
    its table from a dump and still hand every flow over."""
    the_lab = running(Options(tcp=TCP, udp=UDP, event_buffer=4096))
    fw1, fw2 = the_lab.fws
    # Opening the connections overruns the buffer most of the time, not always (a fast reader
    # keeps up): with the daemon stopped, 300 more flows certainly do (about 60 KB of events).
    # They are not the client's (another destination), so the flow checks below ignore them.
    assert fw1.daemon is not None
    save = "".join(f"-A -t 600 -s 192.0.2.{10 + i // 250} -d 198.51.100.250 -p udp --sport {1000 + i} --dport 9\n"
                   for i in range(300))
    (tmp_path / "more.save").write_text(save)
    os.kill(fw1.daemon.proc.pid, signal.SIGSTOP)
    try:
        fw1.run("conntrack", "-R", str(tmp_path / "more.save"))
    finally:
        os.kill(fw1.daemon.proc.pid, signal.SIGCONT)
    wait_for("fw1 to see the overrun", lambda: fw1.request("stats")["kernel"]["overruns"] >= 1)
    wait_for("fw2 to hold fw1's flows", lambda: fw2.request("status")["external"]["entries"] >= TCP + UDP)
    survived(switch(the_lab, "keepalived stopped", fw1, fw2))
    final_check(the_lab)


def test_twenty_rapid_flips(running: Callable[[Options], Lab]) -> None:
    """MASTER/BACKUP 20 times, about a second apart, with transitions through notify_fifo; then
    every connection still works and the active kernel holds every flow."""
    the_lab = running(Options(tcp=TCP, udp=UDP, notify="fifo"))
    fw1, fw2 = the_lab.fws
    for _ in range(10):
        switch(the_lab, "maintenance on", fw1, fw2, wait_recovery=False)
        switch(the_lab, "maintenance off", fw1, fw1, wait_recovery=False)
    # each switch() above waited until the other firewall alone held the VIPs: 20 real changes
    s = switch(the_lab, "maintenance on", fw1, fw2)
    survived(s)
    final_check(the_lab)


def test_restarting_the_daemons_never_moves_the_vips_nor_leaves_the_pair_without_a_master(
        running: Callable[[Options], Lab]) -> None:
    """Issue 14, deliver 1. Measured before: restarting ctbridge on the master moved the VIPs
    (fw1, none, fw2 x6, fw1 ... in 15 s sampled every 0.25-0.5 s), and restarting both daemons at
    once (a package upgrade on both nodes) left the pair without a master for 3.25 s. Now, sampled
    every 0.1 s for 12 s after each restart, fw1 holds the VIPs throughout and fw2 never does,
    and every connection lives on."""
    the_lab = running(Options(tcp=TCP, udp=UDP))
    fw1, fw2 = the_lab.fws
    wait_for("fw2 to hold fw1's flows", lambda: fw2.request("status")["external"]["entries"] >= TCP + UDP)

    def watch(what: str) -> None:
        seen = []
        for _ in range(120):
            seen.append((fw1.has_vips(), fw2.has_vips()))
            time.sleep(0.1)
        assert all(one and not two for one, two in seen), f"{what}: (fw1, fw2) held the VIPs as {seen}"

    for fws in ([fw1], [fw1, fw2]):
        for fw in fws:
            the_lab.replicator.stop(fw)
        for fw in fws:
            the_lab.replicator.start(fw)
        watch("restart of " + " and ".join(fw.name for fw in fws))
        wait_for("fw2 complete again", lambda: fw2.request("status")["external"]["complete"], timeout=30)
    assert fw1.request("status")["role"] == "MASTER"
    final_check(the_lab)


def test_an_incomplete_node_does_not_preempt_until_synced_and_takes_over_alone(
        running: Callable[[Options], Lab]) -> None:
    """Issue 14, deliver 5, against keepalived itself: fw1 (priority 150) comes back with its
    sync link down and its daemon restarted, so it holds none of fw2's flows. Demoted by the
    interlock (150 - 51 = 99 < 100), it does not take the VIPs from fw2 (100), which would break
    every connection; once its sync link is up and its copy complete, it takes them back with the
    flows. And when the master dies while fw1 is incomplete, fw1 takes over anyway: a node left
    alone must serve, demoted is not FAULT."""
    the_lab = running(Options(tcp=TCP, udp=UDP))
    fw1, fw2 = the_lab.fws
    survived(switch(the_lab, "keepalived stopped", fw1, fw2))  # fw2 is master now
    fw1.link("sync0", up=False)
    the_lab.replicator.stop(fw1)
    the_lab.replicator.start(fw1)  # empty caches, and no link to fill them
    fw1.start_keepalived()
    seen = []
    for _ in range(80):  # 8 s: several advert intervals for a preemption to happen
        seen.append((fw1.has_vips(), fw2.has_vips()))
        time.sleep(0.1)
    assert all(not one and two for one, two in seen), (
        f"fw1 took the VIPs although it holds none of fw2's flows: {seen}; fw1's track file {track(fw1)}")
    assert track(fw1) < 0  # demoted: it has heard no peer
    fw1.link("sync0", up=True)  # it syncs, becomes complete, and preempts with every flow
    wait_for("fw1 to hold fw2's flows", lambda: fw1.request("status")["external"]["entries"] >= TCP + UDP, timeout=30)
    became = the_lab.wait_master(fw1, timeout=30)
    the_lab.wait_recovered(became)
    # fw2 restarts cut off from fw1, so it holds nothing and is demoted; then the master dies:
    # fw2, incomplete, serves anyway
    fw2.link("sync0", up=False)
    the_lab.replicator.stop(fw2)
    the_lab.replicator.start(fw2)
    wait_for("fw2 demoted", lambda: track(fw2) < 0, timeout=30)
    fw1.stop_keepalived()
    the_lab.wait_master(fw2, timeout=30)


def track(fw: Firewall) -> int:
    """The interlock's value in the firewall's track file."""
    return int((fw.run_dir / "complete").read_text().strip())


# N established TCP flows 198.51.100.10-.250 -> 203.0.113.250:443, written at once into this
# namespace's table (no packets: only what a busy master's table holds besides the lab's flows)
BACKGROUND = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from ctbridge.conntrack import abi as ct
from ctbridge.conntrack.table import KernelTable
from tests.support import builders
n = int(sys.argv[1])
flows = []
for i in range(n):
    src, dst, sport = bytes((198, 51, 100, 10 + i // 50000)), bytes((203, 0, 113, 250)), 1024 + i % 50000
    o = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_TCP, src, dst, sport, 443)
    r = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_TCP, dst, src, 443, sport)
    flows.append(builders.build_entry(ct.AF_INET, o, r, status=0xE, timeout=3600, tcp_state=3))
with KernelTable() as table:
    print(table.commit(flows).created)
"""


@pytest.mark.parametrize("gate", [True, False], ids=["gate on", "gate off (control)"])
def test_the_commit_gate_against_its_control(gate: bool, running: Callable[[Options], Lab]) -> None:
    """Issue 14, deliver 5: 100,000 background flows in fw1's table make fw2's MASTER commit take
    about a second, and the lab's flows are written last. Packets reaching fw2 meanwhile find no
    entry. With the gate, they are dropped before NAT (the flows retransmit into the committed
    entries): every flow lives, none is NATed anew, the strict policy drops nothing. The control,
    without the gate: they are NATed anew or dropped by the policy."""
    the_lab = running(Options(tcp=TCP, udp=UDP, gate=gate))
    fw1, fw2 = the_lab.fws
    load = fw1.run(sys.executable, "-c", BACKGROUND, "100000")
    assert load.stdout.strip() == "100000", load.stderr
    wait_for("fw2 to hold the background flows", timeout=60,
             check=lambda: fw2.request("status")["external"]["entries"] >= 100_000 + TCP + UDP)
    before = fw2.drops()
    # the gate's counter goes with its table when the gate opens: watch it meanwhile
    held = [0]
    watching = threading.Event()

    def watch() -> None:
        for _ in range(600):  # bounded: 30 s
            if watching.is_set():
                return
            with contextlib.suppress(Exception):
                held[0] = max(held[0], fw2.drops()["gate"])
            time.sleep(0.05)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        s = switch(the_lab, "keepalived stopped", fw1, fw2, recover_timeout=30)
    finally:
        watching.set()
        watcher.join(timeout=5)
    after = fw2.drops()
    policy, gated = after["policy"] - before["policy"], held[0]
    rebound = s.status.get("udp_rebound", 0)
    harmed = rebound + policy + s.status.get("tcp_failed", 0)
    print(f"gate {'on' if gate else 'off'}: {gated} packets held by the gate, {policy} dropped by the policy, "
          f"{rebound} UDP flows NATed anew, {s.status.get('tcp_failed', 0)} TCP connections failed")
    if gate:
        survived(s)
        # the window was there, and the gate held it. Fresh-root CI once counted 7 policy drops
        # here: replies addressed to the VIP reach the new master's input hook before their entry
        # is committed (they are not de-NATed), which the gate now holds too (daemon/gate.py)
        assert gated > 0 and policy == 0, (policy, gated)
        final_check(the_lab)
    else:
        assert harmed > 0, f"no harm without the gate: rebound {rebound}, policy drops {policy}, {s.status}"


def test_a_standby_cut_off_from_its_peer_is_demoted_without_a_restart(running: Callable[[Options], Lab]) -> None:
    """Found by review: a standby that had heard its peer once read complete for good once the
    peer fell silent (silent peers do not count), so fw1, in FAULT while fw2 served, cut off on
    its sync link, preempted with a stale copy when its LAN link came back; new connections then
    died. A standby is complete only while it hears a peer now."""
    the_lab = running(Options(tcp=TCP, udp=UDP))
    fw1, fw2 = the_lab.fws
    survived(switch(the_lab, "LAN link down", fw1, fw2))  # fw1 in FAULT, fw2 master
    fw1.link("sync0", up=False)
    wait_for("fw1 demoted", lambda: track(fw1) < 0, timeout=30)  # within peer_timeout, no restart
    fw1.link("lan0", up=True)
    seen = []
    for _ in range(60):  # 6 s: fw1 (150, demoted to 99) must not take the VIPs from fw2 (100)
        seen.append((fw1.has_vips(), fw2.has_vips()))
        time.sleep(0.1)
    assert all(not one and two for one, two in seen), seen
    fw1.link("sync0", up=True)  # synced again: it takes the VIPs back with every flow
    wait_for("fw1 to hold fw2's flows", lambda: fw1.request("status")["external"]["entries"] >= TCP + UDP, timeout=30)
    the_lab.wait_recovered(the_lab.wait_master(fw1, timeout=30))
    final_check(the_lab)


def lower_udp_timeouts(the_lab: Lab) -> None:
    """UDP timeouts of 10 s (unreplied) and 15 s (stream) on both firewalls (per network namespace):
    each packet of a flow restarts its countdown, without a kernel event."""
    for fw in the_lab.fws:
        fw.run("sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=10",
               "net.netfilter.nf_conntrack_udp_timeout_stream=15")


LONG_LIVED = 45.0  # seconds the flows run past the lowered timeouts: three times the stream timeout


@pytest.mark.parametrize("mode", ["commit", "inject"])
def test_long_lived_udp_flows_outlive_their_timeouts_on_the_standby(mode: str,
                                                                    running: Callable[[Options], Lab]) -> None:
    """Issue 14, deliver 2: with the UDP timeouts lowered, the flows kept alive three times past
    them. The kernel reports no event when traffic restarts a flow's countdown, so fw1's sweeps
    find those flows and send them again before fw2's copy runs out: fw2 (its cache, in inject mode
    its kernel) still holds every flow at the failover, and none is NATed anew."""
    the_lab = running(Options(apply_mode=mode, tcp=TCP, udp=UDP))
    fw1, fw2 = the_lab.fws
    lower_udp_timeouts(the_lab)
    time.sleep(LONG_LIVED)
    refresh = fw1.request("stats")["refresh"]
    # Sweeps ran and sent the flows again, at an interval inside what sweep_timing() allows for a
    # shortest timeout of 10 s (10 s less its slack of 2 s and three sweeps' durations). Not the
    # configured quarter of 10 s: the interval grows with the sweeps' measured durations, a
    # wall-clock figure (0.13 s for this table on a fresh CI root, a 3.9 s interval).
    assert refresh["refreshed"] >= UDP and refresh["interval"] < 10 - 2, refresh
    if mode == "inject":
        assert fw2.lab_flows()["udp"] == UDP  # the injected copies did not run out
    survived(switch(the_lab, "keepalived stopped", fw1, fw2))
    assert fw2.request("stats")["sync"]["flows_expired"] == 0
    final_check(the_lab)


def test_without_refreshes_injected_udp_flows_run_out_on_the_standby(running: Callable[[Options], Lab]) -> None:
    """The control: sweeps too rare to matter (1000 s), the same lowered timeouts and wait. The
    standby's injected copies run out 15 s after the flows' last event, although traffic keeps
    them alive on the master, and a failover would NAT them anew."""
    the_lab = running(Options(apply_mode="inject", tcp=TCP, udp=UDP, sync=("refresh_interval = 1000",)))
    fw1, fw2 = the_lab.fws
    lower_udp_timeouts(the_lab)
    time.sleep(LONG_LIVED)
    assert fw1.lab_flows()["udp"] == UDP
    assert fw2.lab_flows()["udp"] == 0
    s = switch(the_lab, "keepalived stopped", fw1, fw2, recover_timeout=10)
    assert s.status["udp_rebound"] == UDP, s.status


@pytest.mark.parametrize("notify", ["hook", "fifo"])
def test_failback_drops_no_packet_in_either_notify_mode(notify: str, running: Callable[[Options], Lab]) -> None:
    """Issue 14, deliver 4: the returning master's kernel still holds its own entries from before
    it lost the role, their TCP windows left behind by the traffic fw2 carried meanwhile. Measured
    before the fix with the notify hook: one packet of every flow dropped by the strict policy at
    failback, until the commit replaced them. While BACKUP, ctbridge now marks them liberal."""
    the_lab = running(Options(notify=notify, tcp=TCP, udp=UDP))
    fw1, fw2 = the_lab.fws
    survived(switch(the_lab, "keepalived stopped", fw1, fw2))
    time.sleep(5)  # the flows move on through fw2: fw1's own copies fall behind
    before = fw1.drops()["policy"]
    survived(switch(the_lab, "keepalived started", fw1, fw1))
    policy = fw1.drops()["policy"] - before
    print(f"failback with the {notify}: {policy} packets dropped by fw1's strict policy")
    assert policy == 0
    final_check(the_lab)


def test_strict_tcp_windows_still_carry_every_connection(running: Callable[[Options], Lab]) -> None:
    """Issue 15, deliver 4: apply.liberal_tcp = false writes TCP entries without BE_LIBERAL, so
    the new master checks windows it has to learn from the traffic (the kernel takes the first
    packets' windows when none are set). Every connection still survives the failover and the
    failback, with the strict ruleset dropping nothing."""
    the_lab = running(Options(tcp=TCP, udp=UDP, apply=("liberal_tcp = false",)))
    fw1, fw2 = the_lab.fws
    before = [fw.drops()["policy"] for fw in the_lab.fws]
    survived(switch(the_lab, "keepalived stopped", fw1, fw2))
    # what fw2 committed carries no BE_LIBERAL (read back from its kernel)
    from ctbridge.conntrack import abi as ct
    from ctbridge.conntrack.table import KernelTable
    from ctbridge.conntrack.view import entry_view
    from ctbridge.lab import netns
    with netns.inside(fw2.ns):
        table = KernelTable()
    with table:
        views = [entry_view(e) for e in table.dump()]
    lab_tcp = [v for v in views if v.get("dport") == 5001 and v.get("proto") == "tcp"]
    assert len(lab_tcp) == TCP, len(lab_tcp)
    assert not any(v["tcp_flags_original"] & ct.IP_CT_TCP_FLAG_BE_LIBERAL for v in lab_tcp)
    survived(switch(the_lab, "keepalived started", fw1, fw1))
    after = [fw.drops()["policy"] for fw in the_lab.fws]
    assert after == before, (before, after)
    final_check(the_lab)

"""Redundant sync links with real daemons: each link a bridge of its own between the namespaces.
The active link is cut in the middle of a 100,000-flow burst (at the switch, so neither node sees
its interface go down: only the missing traffic tells), or broken in one direction only."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from ctbridge.conntrack.table import KernelTable
from ctbridge.lab import netns
from tests.support import builders
from tests.support.daemonlab import Node, cluster, wait_for

pytestmark = pytest.mark.root

BURST = 100_000


def link_view(node: Node, link: int) -> dict[str, Any]:
    """What ``node`` says of its one peer on ``link``: up, active, last heard."""
    nodes = node.request("stats")["links"][link]["nodes"]
    assert len(nodes) <= 1, nodes
    return dict(next(iter(nodes.values()))) if nodes else {}  # {}: not heard yet


def entries(node: Node) -> int:
    return int(node.request("stats")["external"]["entries"])


def both_links_up(a: Node, b: Node) -> None:
    for node in (a, b):
        wait_for(f"{node.name} to see both links up",
                 lambda node=node: all(link_view(node, k).get("up") for k in (0, 1)), timeout=20)
    assert link_view(a, 0)["active"] and link_view(b, 0)["active"]


def test_cutting_the_active_link_mid_burst_loses_no_flow_and_traffic_comes_back() -> None:
    with cluster(2, links=2) as c:
        a, b = c.nodes
        a.start()
        b.start()
        both_links_up(a, b)
        flows = builders.tcp_flows(BURST)
        with netns.inside(a.ns):
            table = KernelTable()
        writer = threading.Thread(target=lambda: table.commit(flows))
        writer.start()
        # cut link 0 at the switch once part of the burst has arrived on B
        for _ in range(3000):
            if entries(b) >= 10_000:
                break
            time.sleep(0.01)
        netns.run(c.switch, "ip", "link", "set", "p1", "down")
        cut_at = time.monotonic()
        had = entries(b)
        writer.join(60)
        table.close()
        assert 0 < had < BURST, f"the cut came at {had} flows: not in the middle of the burst"
        wait_for("B to hold every flow of the burst", lambda: entries(b) == BURST, timeout=90)
        for node in (a, b):
            view = link_view(node, 0)
            assert not view["up"] and not view["active"], view
            assert link_view(node, 1)["active"]
        sa = a.request("stats")
        assert sa["link_switches"] >= 1 and sa["sync"]["path_changes"] >= 1
        assert sa["sync"]["gaps_sent"] == 0  # recovered by resends, not by a bulk of the whole table
        assert sa["external"]["complete"] is True or sa["external"]["entries"] == 0
        # complete too (a bulk transfer asked for after a gap may still be on its way)
        wait_for("B's copy of A to be complete", lambda: b.request("stats")["external"]["complete"], timeout=30)
        assert b.request("stats")["peers"][0]["gap"] is None and entries(b) == BURST
        switched = time.monotonic() - cut_at
        # link 0 returns: traffic goes back once it has worked for link_timeout (1 s)
        netns.run(c.switch, "ip", "link", "set", "p1", "up")
        for node in (a, b):
            wait_for(f"{node.name} to move back to link 0", lambda node=node: link_view(node, 0).get("active"),
                     timeout=20)
        more = builders.tcp_flows(BURST + 500)[BURST:]
        with netns.inside(a.ns):
            table = KernelTable()
        with table:
            assert table.commit(more).failed == []
        wait_for("B to get the flows sent after the return", lambda: entries(b) == BURST + 500, timeout=30)
        tx, rx = sa["sync"], b.request("stats")["sync"]
        print(f"cut at {had} flows on B; all {BURST} there {switched:.1f} s after the cut; A resent "
              f"{tx['resent_datagrams']} datagrams, {tx['bulks_sent']} bulks, {tx['gaps_sent']} GAPs, "
              f"{tx['tx_bytes']} bytes; B gave up {rx['gaps_given_up']} gaps")


def test_a_link_broken_in_one_direction_is_left_by_both_nodes() -> None:
    """A's datagrams to B are dropped on link 0; B's to A still arrive there. A hears B on link 0,
    but B's heartbeats say it does not hear A there: both move to link 1."""
    one_way = ("table inet oneway {\n chain output {\n  type filter hook output priority 0;\n"
               "  oifname \"sync0\" udp dport 3780 counter drop\n }\n}\n")
    with cluster(2, links=2) as c:
        a, b = c.nodes
        a.start()
        b.start()
        both_links_up(a, b)
        a.run("nft", "-f", "-", input=one_way)
        wait_for("A to leave link 0", lambda: link_view(a, 1).get("active"), timeout=10)
        wait_for("B to leave link 0", lambda: link_view(b, 1).get("active"), timeout=10)
        assert link_view(a, 0)["last_heard"] < 1.0  # A still hears B there: one-way evidence was not enough
        with netns.inside(a.ns):
            table = KernelTable()
        with table:
            assert table.commit(builders.tcp_flows(2000)).failed == []
        wait_for("B to get A's flows over link 1", lambda: entries(b) == 2000, timeout=30)
        assert b.request("stats")["sync"]["heartbeats_received"] > 0 and b.request("stats")["link_mismatches"] == 0

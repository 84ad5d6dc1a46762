"""The active-active defer in the daemon (daemon/defer.py, apply.defer_queue): node B forwards a
datagram whose flow only node A has made yet (routing is asymmetric: A saw the flow's first
packet, this one reaches B). B's raw table queues it before conntrack; B's daemon holds it until
A's replication has written the flow into B's kernel, and the datagram then passes B's strict
ruleset as part of an established flow. The control: A never makes the flow, the datagram goes on
when its wait ends and the strict ruleset drops it as new. Real daemons, kernels, nftables and
iptables-nft (this kernel has no nftables queue statement); documentation addresses only."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from ctbridge.lab import netns
from ctbridge.lab.process import wait_for
from tests.conftest import require
from tests.support.daemonlab import Cluster, Node, cluster

pytestmark = pytest.mark.root

QUEUE = 9
SOURCE, DEST = "203.0.113.2", "198.51.100.2"  # the flow's reply direction: DEST answered SOURCE first, via A
STRICT = """
table inet strict {
  chain forward_filter { type filter hook forward priority 0; policy drop;
    ct state established,related counter accept
    counter comment "strict-policy drops"
  }
}
"""
LISTEN = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('{dest}', 53)); "
          "s.settimeout({wait}); print(s.recvfrom(100)[0].decode())")
SEND = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('{source}', 5353)); "
        "s.sendto(b'answer', ('{dest}', 53))")


@contextlib.contextmanager
def pair(wait: float) -> Iterator[tuple[Cluster, str, str]]:
    """Two daemons in inject mode with the defer on; B forwards from a source namespace (in0) to a
    destination namespace (out0) under the strict ruleset, SOURCE's datagrams queued in its raw table."""
    require("iptables", "iptables (the NFQUEUE target)")
    with cluster(2, apply={"mode": "inject", "defer_queue": QUEUE, "defer_wait": wait}) as c, \
            netns.namespace("src") as src, netns.namespace("dst") as dst:
        b = c.nodes[1]
        for ns, inner, outer, net in ((src, "s0", "in0", "203.0.113"), (dst, "d0", "out0", "198.51.100")):
            subprocess.run(["ip", "link", "add", inner, "netns", ns, "type", "veth", "peer", "name", outer, "netns",
                            b.ns], check=True, timeout=10)
            netns.run(ns, "ip", "addr", "add", f"{net}.2/24", "dev", inner)
            netns.run(ns, "ip", "link", "set", inner, "up")
            netns.run(ns, "ip", "route", "add", "default", "via", f"{net}.1")
            b.run("ip", "addr", "add", f"{net}.1/24", "dev", outer)
            b.run("ip", "link", "set", outer, "up")
        b.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        b.run("nft", "-f", "-", input=STRICT)
        b.run("iptables", "-t", "raw", "-A", "PREROUTING", "-i", "in0", "-p", "udp", "-j", "NFQUEUE",
              "--queue-num", str(QUEUE), "--queue-bypass")
        try:
            for node in c.nodes:
                node.start()
        except TimeoutError:
            for node in c.nodes:
                print(node.name, node.log.read_text()[-2000:] if node.log.exists() else "(no log)")
            raise
        wait_for("B to hold A's whole table", lambda: all(
            p["synced"] for p in c.nodes[1].request("stats")["peers"]) and c.nodes[1].request("stats")["peers"],
            timeout=30)
        yield c, src, dst


def strict_drops(b: Node) -> int:
    out = b.run("nft", "list", "chain", "inet", "strict", "forward_filter").stdout
    return int(next(x for x in out.splitlines() if "strict-policy drops" in x).split("packets")[1].split()[0])


def send_and_listen(src: str, dst: str, listen: float) -> subprocess.Popen[str]:
    listener = subprocess.Popen(["ip", "netns", "exec", dst, sys.executable, "-c",
                                 LISTEN.format(dest=DEST, wait=listen)], text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
    time.sleep(0.3)  # bound before the datagram leaves
    netns.run(src, sys.executable, "-c", SEND.format(source=SOURCE, dest=DEST))
    return listener


def test_a_datagram_waits_for_its_replicated_flow_and_passes_the_strict_ruleset() -> None:
    with pair(wait=1.0) as (c, src, dst):
        a, b = c.nodes
        listener = send_and_listen(src, dst, listen=5)
        wait_for("B to hold the datagram", lambda: b.request("stats")["defer"]["waiting"] == 1, timeout=5, step=0.02)
        # A makes the flow (DEST answered SOURCE's query: the datagram is its reply), and replicates it
        a.run("conntrack", "-I", "-p", "udp", "-s", DEST, "-d", SOURCE, "--sport", "53", "--dport", "5353",
              "-t", "60")
        out, _ = listener.communicate(timeout=10)
        assert out.strip() == "answer"
        defer = b.request("stats")["defer"]
        assert (defer["held"], defer["released_found"], defer["released_timeout"], defer["waiting"]) == (1, 1, 0, 0)
        assert defer["wait_seconds"]["max"] < 1.0
        assert strict_drops(b) == 0


def test_without_its_flow_the_datagram_goes_on_after_its_wait_and_the_strict_ruleset_drops_it() -> None:
    with pair(wait=0.3) as (c, src, dst):
        b = c.nodes[1]
        listener = send_and_listen(src, dst, listen=2)
        out, _ = listener.communicate(timeout=10)
        assert out.strip() == ""
        defer = b.request("stats")["defer"]
        assert (defer["held"], defer["released_timeout"], defer["released_found"]) == (1, 1, 0)
        assert defer["wait_seconds"]["max"] >= 0.3
        assert strict_drops(b) == 1

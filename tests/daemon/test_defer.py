"""The active-active defer in the daemon (daemon/defer.py, apply.defer_queue): routing is
asymmetric on purpose, a client's packets reach the server over a direct link and the server's
come back through node B, so B never sees the SYN. Node A stands for the firewall that did: the
flow is made there (conntrack -I, as its kernel would on the SYN) and replicated. B's daemon
queues the SYN-ACK in its raw table (the rule it installs itself), holds it until A's
replication has written the flow into B's kernel, and the SYN-ACK then passes B's strict ruleset:
the connection lives. The control: A never makes the flow, the SYN-ACK goes on when its wait ends
and the strict ruleset drops it. Real daemons, kernels, nftables and iptables-nft (this kernel
has no nftables queue statement); documentation addresses only."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from ctbridge.daemon.defer import COMMENT
from ctbridge.lab import netns
from ctbridge.lab.process import wait_for
from tests.conftest import require
from tests.support import ROOT
from tests.support.activeactive import STRICT, counter
from tests.support.daemonlab import Cluster, Node, cluster

pytestmark = pytest.mark.root

QUEUE = 9
CLIENT, SERVER, CPORT, SPORT = "203.0.113.2", "198.51.100.2", 40000, 5001
SERVE = (f"import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
         f"s.bind(('{SERVER}', {SPORT})); s.listen(); s.settimeout(10); c, _ = s.accept(); c.sendall(c.recv(100))")
UDP_PORTS = "40000-40100"  # as a peer's share of the source NAT ports
CONNECT = (f"import socket; s = socket.create_connection(('{SERVER}', {SPORT}), timeout={{wait}}, "
           f"source_address=('{CLIENT}', {CPORT})); s.sendall(b'hello'); print(s.recv(100).decode())")


@contextlib.contextmanager
def pair(wait: float) -> Iterator[tuple[Cluster, str, str]]:
    """Two daemons in inject mode with the defer on (UDP to B at UDP_PORTS too); the client's
    namespace reaches the server's over a direct link, the server's replies go through B (out0 to
    in0) under the strict ruleset."""
    require("iptables", "iptables (the NFQUEUE target)")
    apply = {"mode": "inject", "defer_queue": QUEUE, "defer_wait": wait, "defer_udp_ports": UDP_PORTS}
    with cluster(2, apply=apply) as c, \
            netns.namespace("src") as src, netns.namespace("dst") as dst:
        b = c.nodes[1]
        for ns, inner, outer, net in ((src, "s0", "in0", "203.0.113"), (dst, "d0", "out0", "198.51.100")):
            subprocess.run(["ip", "link", "add", inner, "netns", ns, "type", "veth", "peer", "name", outer, "netns",
                            b.ns], check=True, timeout=10)
            netns.run(ns, "ip", "addr", "add", f"{net}.2/24", "dev", inner)
            netns.run(ns, "ip", "link", "set", inner, "up")
            b.run("ip", "addr", "add", f"{net}.1/24", "dev", outer)
            b.run("ip", "link", "set", outer, "up")
        # the client's way to the server: a direct link; the server's way back: through B
        subprocess.run(["ip", "link", "add", "s1", "netns", src, "type", "veth", "peer", "name", "d1", "netns", dst],
                       check=True, timeout=10)
        netns.run(src, "ip", "link", "set", "s1", "up")
        netns.run(dst, "ip", "link", "set", "d1", "up")
        netns.run(src, "ip", "route", "add", f"{SERVER}/32", "dev", "s1")
        netns.run(dst, "ip", "route", "add", f"{CLIENT}/32", "via", "198.51.100.1")
        for ns in (src, dst):
            netns.run(ns, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0")
        b.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        b.run("nft", "-f", "-", input=STRICT)
        # a rule an earlier life left, for another queue: it would pass every SYN-ACK unheld
        b.run("iptables", "-t", "raw", "-A", "PREROUTING", "-p", "tcp", "--tcp-flags", "SYN,ACK", "SYN,ACK", "-m",
              "comment", "--comment", COMMENT, "-j", "NFQUEUE", "--queue-num", "99", "--queue-bypass")
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
        # an operator's own raw rule, after the defer's: it must still see every SYN-ACK
        b.run("iptables", "-t", "raw", "-A", "PREROUTING", "-p", "tcp", "--tcp-flags", "SYN,ACK", "SYN,ACK", "-m",
              "comment", "--comment", "operator")
        yield c, src, dst


def strict_drops(b: Node) -> int:
    return counter(b, "strict-policy drops")


def operator_seen(b: Node) -> int:
    """SYN-ACKs the operator's raw rule (after the defer's) counted."""
    out = b.run("iptables", "-t", "raw", "-L", "PREROUTING", "-v", "-n", "-x").stdout
    return int(next(x for x in out.splitlines() if "/* operator */" in x).split()[0])


def synacks(source: str, dest: str, count: int, every: float) -> None:
    """``count`` bare SYN-ACKs from SERVER's port to CLIENT's ports 20000.., one per ``every`` seconds
    (a raw socket: the kernel adds the IP header; the TCP checksum is computed here)."""
    import socket
    import struct

    def checksum(data: bytes) -> int:
        total = sum(struct.unpack(f"!{len(data) // 2}H", data))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        return ~total & 0xFFFF
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    src, dst = socket.inet_aton(source), socket.inet_aton(dest)
    for i in range(count):
        head = struct.pack("!HHIIBBHHH", SPORT, 20000 + i, 1000, 1, 5 << 4, 0x12, 65535, 0, 0)
        pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(head))
        head = head[:16] + struct.pack("!H", checksum(pseudo + head)) + head[18:]
        sock.sendto(head, (dest, 0))
        time.sleep(every)
    sock.close()


def connect(src: str, dst: str, wait: float) -> subprocess.Popen[str]:
    server = subprocess.Popen(["ip", "netns", "exec", dst, sys.executable, "-c", SERVE], text=True,
                              stderr=subprocess.DEVNULL)
    time.sleep(0.3)  # listening before the SYN leaves
    client = subprocess.Popen(["ip", "netns", "exec", src, sys.executable, "-c", CONNECT.format(wait=wait)],
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    client.server = server  # type: ignore[attr-defined]
    return client


def finish(client: subprocess.Popen[str]) -> str:
    out, _ = client.communicate(timeout=15)
    server: subprocess.Popen[str] = client.server  # type: ignore[attr-defined]
    server.kill()
    server.wait(timeout=5)
    return out.strip()


def test_a_synack_waits_for_its_replicated_flow_and_passes_the_strict_ruleset() -> None:
    with pair(wait=1.0) as (c, src, dst):
        a, b = c.nodes
        rules = b.run("iptables", "-t", "raw", "-S", "PREROUTING").stdout
        assert "ctbridge defer" in rules and "--queue-num 99" not in rules  # the stale rule is gone
        client = connect(src, dst, wait=5)
        wait_for("B to hold the SYN-ACK", lambda: b.request("stats")["defer"]["waiting"] == 1, timeout=5, step=0.02)
        # A's kernel makes the flow on the client's SYN, and A replicates it
        a.run("conntrack", "-I", "-p", "tcp", "-s", CLIENT, "-d", SERVER, "--sport", str(CPORT), "--dport", str(SPORT),
              "--state", "SYN_SENT", "-u", "SEEN_REPLY", "-t", "120")
        assert finish(client) == "hello"
        defer = b.request("stats")["defer"]
        assert (defer["held"], defer["released_found"], defer["released_timeout"], defer["waiting"]) == (1, 1, 0, 0)
        assert defer["wait_seconds"]["max"] < 1.0
        assert strict_drops(b) == 0
        # the verdict sends the SYN-ACK round the raw chain again: the operator's rule saw it (an
        # ACCEPT would have ended the chain at the defer's rule)
        assert operator_seen(b) >= 1
        b.stop()  # a clean stop takes the rule away (--queue-bypass would pass packets anyway)
        assert "ctbridge defer" not in b.run("iptables", "-t", "raw", "-S", "PREROUTING").stdout


def test_without_its_flow_the_synack_goes_on_after_its_wait_and_the_strict_ruleset_drops_it() -> None:
    with pair(wait=0.3) as (c, src, dst):
        b = c.nodes[1]
        assert finish(connect(src, dst, wait=2)) == ""
        defer = b.request("stats")["defer"]
        assert defer["held"] >= 1 and defer["released_found"] == 0
        assert defer["released_timeout"] == defer["held"]  # the SYN-ACK and its retransmissions
        assert defer["wait_seconds"]["max"] >= 0.3
        assert strict_drops(b) >= 1


def test_a_stream_of_synacks_never_holds_one_past_its_wait() -> None:
    """Found by review: every packet read re-armed the look-again timer, so under a stream of
    SYN-ACKs closer together than the poll, held packets only went on when a flow was written:
    waits of 2 s against a 20 ms defer_wait. 200 SYN-ACKs for flows that never come, 4 ms apart:
    each goes on at its deadline, and on through the operator's rule."""
    with pair(wait=0.1) as (c, _src, dst):
        b = c.nodes[1]
        netns.run(dst, sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                  "from tests.daemon.test_defer import synacks; "
                  f"synacks({SERVER!r}, {CLIENT!r}, 200, 0.004)")
        wait_for("B to let every SYN-ACK go", lambda: b.request("stats")["defer"]["released_timeout"] >= 200,
                 timeout=10, step=0.05)
        defer = b.request("stats")["defer"]
        assert defer["waiting"] == 0 and defer["released_found"] == 0
        assert defer["wait_seconds"]["max"] < 0.1 + 0.05, defer["wait_seconds"]
        assert operator_seen(b) >= 200


RECEIVE = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('{address}', {port})); "
           "s.settimeout(5); print(s.recv(100).decode())")
SEND = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('{source}', {sport})); "
        "s.sendto(b'reply', ('{address}', {port}))")


def test_a_udp_reply_to_this_node_at_a_peers_nat_port_waits_for_its_flow() -> None:
    """apply.defer_udp_ports: a UDP datagram addressed to B at one of them, of a flow B has not
    seen, is the first reply of a peer's NATed flow: it waits until the flow is in B's kernel.
    One at another port is not held (a new flow's first packet looks the same before conntrack)."""
    with pair(wait=1.0) as (c, _src, dst):
        a, b = c.nodes
        here = "198.51.100.1"  # B's own address on the server's side

        def datagram(port: int) -> subprocess.Popen[str]:
            receiver = subprocess.Popen(["ip", "netns", "exec", b.ns, sys.executable, "-c",
                                         RECEIVE.format(address=here, port=port)], text=True, stdout=subprocess.PIPE)
            time.sleep(0.3)
            netns.run(dst, sys.executable, "-c", SEND.format(source=SERVER, sport=5002, address=here, port=port))
            return receiver
        other = datagram(5555)
        assert other.communicate(timeout=10)[0].strip() == "reply"
        assert b.request("stats")["defer"]["packets"] == 0  # not at a peer's port: never queued
        receiver = datagram(40050)
        wait_for("B to hold the datagram", lambda: b.request("stats")["defer"]["waiting"] == 1, timeout=5, step=0.02)
        a.run("conntrack", "-I", "-p", "udp", "-s", here, "-d", SERVER, "--sport", "40050", "--dport", "5002",
              "-t", "60")
        assert receiver.communicate(timeout=10)[0].strip() == "reply"
        defer = b.request("stats")["defer"]
        assert (defer["held"], defer["released_found"], defer["released_timeout"]) == (1, 1, 0)

"""Two firewalls that both forward, with routing asymmetric on purpose (tests and bench/defer.py).

A client network (203.0.113.0/24) and a server network (198.51.100.0/24) are two bridges; each
daemonlab node (fw1, fw2) has a leg on both (lan0 .1/.2 hosts 203.0.113.1/.2, wan0 198.51.100.1/.2)
and forwards between them under a strict ruleset. The client (203.0.113.100) sends through fw1;
the server (198.51.100.100) answers through fw2, or through fw1 when ``symmetric``. Documentation
addresses only; every namespace is removed on the way out.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ctbridge.lab import netns
from ctbridge.lab.process import wait_for
from tests.support.daemonlab import Cluster, Node

CLIENT, SERVER = "203.0.113.100", "198.51.100.100"
STRICT = """
table inet strict {
  chain forward_filter { type filter hook forward priority 0; policy drop;
    ct state established,related counter accept
    ct state new tcp flags & (syn|ack) == syn counter accept
    ct state invalid counter comment "invalid"
    counter comment "strict-policy drops"
  }
}
"""


PORT = 5001  # the server's
SERVE = f"""
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('{SERVER}', {PORT})); s.listen(512)
def echo(c):
    try:
        c.settimeout(5); c.sendall(c.recv(100))
    except OSError:
        pass
    c.close()
while True:
    c, _ = s.accept(); threading.Thread(target=echo, args=(c,), daemon=True).start()
"""
CLIENT_SCRIPT = f"""
import json, socket, sys, threading, time
n, rate = int(sys.argv[1]), float(sys.argv[2])
times, failed = [], [0]
def one():
    t = time.monotonic()
    try:
        s = socket.create_connection(('{SERVER}', {PORT}), timeout=3, source_address=('{CLIENT}', 0))
        times.append(time.monotonic() - t)
        s.settimeout(3); s.sendall(b'hello')
        if s.recv(100) != b'hello':
            raise OSError('no echo')
        s.close()
    except OSError:
        failed[0] += 1
threads = []
start = time.monotonic()
for i in range(n):
    time.sleep(max(0.0, start + i / rate - time.monotonic()))
    t = threading.Thread(target=one); t.start(); threads.append(t)
for t in threads:
    t.join(10)
times.sort()
pick = lambda q: times[min(len(times) - 1, int(q * len(times)))] if times else None
print(json.dumps({{"ok": n - failed[0], "failed": failed[0], "p50": pick(0.5), "p99": pick(0.99),
                  "max": times[-1] if times else None}}))
"""


@dataclass
class Networks:
    client: str  # the client's namespace
    server: str  # the server's namespace


def _bridge(ns: str, name: str) -> None:
    netns.run(ns, "ip", "link", "add", name, "type", "bridge")
    netns.run(ns, "ip", "link", "set", name, "up")


@contextlib.contextmanager
def networks(c: Cluster, symmetric: bool = False) -> Iterator[Networks]:
    with netns.namespace("cli") as client, netns.namespace("srv") as server:
        _bridge(c.switch, "lan")
        _bridge(c.switch, "wan")
        for ns, dev, bridge, address in ((client, "eth0", "lan", f"{CLIENT}/24"),
                                         (server, "eth0", "wan", f"{SERVER}/24")):
            port = f"{bridge}-{ns[-6:]}"[:15]
            subprocess.run(["ip", "link", "add", port, "netns", c.switch, "type", "veth", "peer", "name", dev,
                            "netns", ns], check=True, timeout=10)
            netns.run(c.switch, "ip", "link", "set", port, "master", bridge, "up")
            netns.run(ns, "ip", "addr", "add", address, "dev", dev)
            netns.run(ns, "ip", "link", "set", dev, "up")
        for node in c.nodes:
            for bridge, net in (("lan", "203.0.113"), ("wan", "198.51.100")):
                port = f"{bridge}{node.index}"
                netns.run(c.switch, "ip", "link", "add", port, "type", "veth", "peer", "name", f"{bridge}0",
                          "netns", node.ns)
                netns.run(c.switch, "ip", "link", "set", port, "master", bridge, "up")
                node.run("ip", "addr", "add", f"{net}.{node.index}/24", "dev", f"{bridge}0")
                node.run("ip", "link", "set", f"{bridge}0", "up")
            node.run("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                     "net.ipv4.conf.default.rp_filter=0")
            node.run("nft", "-f", "-", input=STRICT)
        netns.run(client, "ip", "route", "add", "198.51.100.0/24", "via", "203.0.113.1")
        netns.run(server, "ip", "route", "add", "203.0.113.0/24", "via", "198.51.100.1" if symmetric else
                  "198.51.100.2")
        yield Networks(client, server)


def counter_in(ns: str, comment: str) -> int:
    """Packets a STRICT rule counted in namespace ``ns`` (by its comment): "invalid" or
    "strict-policy drops"."""
    out = netns.run(ns, "nft", "list", "chain", "inet", "strict", "forward_filter").stdout
    return int(next(x for x in out.splitlines() if f'"{comment}"' in x).split("packets")[1].split()[0])


def counter(node: Node, comment: str) -> int:
    return counter_in(node.ns, comment)


def start_synced(c: Cluster) -> None:
    """Every daemon started, and each holding the others' whole tables."""
    for node in c.nodes:
        node.start()
    wait_for("every daemon to hold the others' tables", lambda: all(
        n.request("stats")["peers"] and all(p["synced"] for p in n.request("stats")["peers"]) for n in c.nodes),
        timeout=30)


@contextlib.contextmanager
def serving(nets: Networks) -> Iterator[None]:
    """SERVE running in the server's namespace (listening when the block begins)."""
    server = subprocess.Popen(["ip", "netns", "exec", nets.server, sys.executable, "-c", SERVE],
                              stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        yield
    finally:
        server.kill()
        server.wait(timeout=5)

"""What the active-active defer costs and what it saves: TCP connections through two firewalls
that both forward, routing asymmetric on purpose (the client's packets through fw1, the
server's through fw2: tests/support/activeactive.py), both daemons in inject mode with the defer
on; against the same networks routed symmetrically (everything through fw1) without the defer.

    python bench/defer.py [--connections 200] [--rate 50]

For each case, in fresh namespaces: N connections opened at R per second, each a connect, 5
bytes echoed and a close. Printed per case: connections that completed; the client's connect
time (SYN to SYN-ACK received: p50, p99, max); the packets each firewall held (fw1+fw2: the
origin's first packets after the SYN-ACK, and the SYN-ACKs), released when found or at the
wait's end, and how long fw2's SYN-ACKs waited (its `stats` defer section: p50, p99, longest);
the strict rulesets' drops and INVALID packets on each firewall; the CPU of both daemons per
connection.

The symmetric case is the reference: no packet waits. In the asymmetric case the SYN-ACK's wait
is what the defer adds; fw1 holds the client's first packet after it until the SYN-ACK's state,
replicated from fw2, is in its kernel (docs/failover.md, "Active-active").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.activeactive import CLIENT_SCRIPT, counter, networks, serving, start_synced
from tests.support.daemonlab import Node, cluster

QUEUE = 9
def _cpu(node: Node) -> float:
    if node.proc is None:
        return 0.0
    t = psutil.Process(node.proc.pid).cpu_times()
    return float(t.user + t.system)


def run_case(symmetric: bool, connections: int, rate: float) -> dict[str, Any]:
    apply: dict[str, Any] = {"mode": "inject"}
    if not symmetric:
        apply.update(defer_queue=QUEUE, defer_wait=0.05)
    with cluster(2, apply=apply) as c, networks(c, symmetric=symmetric) as nets:
        fw1, fw2 = c.nodes
        start_synced(c)
        with serving(nets):
            cpu = [_cpu(n) for n in c.nodes]
            out = subprocess.run(["ip", "netns", "exec", nets.client, sys.executable, "-c", CLIENT_SCRIPT,
                                  str(connections), str(rate)], capture_output=True, text=True, timeout=600,
                                 check=True).stdout
            used = sum(_cpu(n) - before for n, before in zip(c.nodes, cpu, strict=True))
        result: dict[str, Any] = json.loads(out)
        result["cpu_us_per_connection"] = used / connections * 1e6
        result["defer"] = fw2.request("stats")["defer"]
        result["defer_fw1"] = fw1.request("stats")["defer"]
        result["firewalls"] = {n.name: {"invalid": counter(n, "invalid"), "drops": counter(n, "strict-policy drops")}
                               for n in (fw1, fw2)}
        return result


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--rate", type=float, default=50.0)
    args = parser.parse_args(argv)
    cases = {"symmetric, no defer": run_case(True, args.connections, args.rate),
             "asymmetric, defer": run_case(False, args.connections, args.rate)}
    print(f"\ndefer: {args.connections} TCP connections at {args.rate:g}/s through two firewalls in inject mode")
    print(f"{'':22}{'done':>6}{'connect p50/p99/max (ms)':>28}{'held':>10}{'found':>11}{'timeout':>8}"
          f"{'wait p50/p99/max (ms)':>25}{'fw1 inv/drop':>14}{'fw2 inv/drop':>14}{'CPU us/conn':>13}")
    for name, r in cases.items():
        d = r["defer"] or {}
        d1 = r["defer_fw1"] or {}
        w = d.get("wait_seconds", {})
        fw = r["firewalls"]
        print(f"{name:22}{r['ok']:>6}{_ms(r['p50']) + ' / ' + _ms(r['p99']) + ' / ' + _ms(r['max']):>28}"
              f"{str(d1.get('held', 0)) + '+' + str(d.get('held', 0)):>10}"
              f"{str(d1.get('released_found', 0)) + '+' + str(d.get('released_found', 0)):>11}"
              f"{d1.get('released_timeout', 0) + d.get('released_timeout', 0):>8}"
              f"{_ms(w.get('p50')) + ' / ' + _ms(w.get('p99')) + ' / ' + _ms(w.get('max')):>25}"
              f"{str(fw['fw1']['invalid']) + '/' + str(fw['fw1']['drops']):>14}"
              f"{str(fw['fw2']['invalid']) + '/' + str(fw['fw2']['drops']):>14}"
              f"{r['cpu_us_per_connection']:>13.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sync delay (sync.delay): what replicating only flows that lived long enough saves, and what a
failover then loses. ctbridge without and with delays, and conntrackd (which has no delay), each
in a fresh pair of namespaces, under the same web-like churn.

    python bench/delay.py [--rate 5000] [--seconds 20] [--standing 50000] [--delays 0,1,3]
                          [--no-conntrackd]

Each run: S standing established TCP flows written into A's kernel; once B's copy holds them,
the churn generator (tests/support/churn.py) creates R flows per second for D seconds, each
deleted 0.2-2 s after it was made (ten lives spread evenly; HTTP-like: most web flows end within
a second or two). Measured per run:

- CPU: user + system seconds of both daemons, from just before the churn to SETTLE seconds after
  it (µs per churned flow: that × 10^6 / (flows created + deleted));
- the link: bytes A's interfaces sent meanwhile (`ip -s link`: the sync link is the only one),
  per churned flow;
- what a failover would lose: the moment the churn stops (the generator's last write), A's
  kernel table is read, then B's copy; the flows of A's table that B lacks are what a failover
  at that moment loses. Each is placed by its age, from its index (the generator makes flow i at
  start + (i - first) / R, in 10 ms batches): younger than the delay (the trade the operator
  chose) or older (a flow the delay should not have cost: must be 0; the slack allows for the
  reads themselves).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.conntrackd_harness import measure_conntrackd_churn, tx_bytes
from bench.sync import conntrack_max
from tests.support import churn as gen
from tests.support.daemonlab import Node, cluster

LIFE, LIFE_MAX = 0.2, 2.0  # seconds: the churned flows' lives, spread between the two
SETTLE = 5.0
SYNC_TIMEOUT = 120.0
SLACK = 1.0  # seconds: the reads of A's table and B's copy take this long at most (checked)


def _cpu(node: Node) -> float:
    import psutil
    if node.proc is None:
        return 0.0
    t = psutil.Process(node.proc.pid).cpu_times()
    return float(t.user + t.system)


def _churn(ns: str, rate: int, seconds: float, standing: int) -> dict[str, Any]:
    return gen.generate(ns, "churn", "--rate", str(rate), "--seconds", str(seconds), "--first", str(standing),
                        "--life", str(LIFE), "--life-max", str(LIFE_MAX), timeout=seconds + 120)


def _index(flow: gen.FlowId) -> int:
    """The generator's index of a flow (tests/support/churn.py, Flows.entry: its addresses and port)."""
    src, dst, sport = flow[2], flow[3], flow[4]
    host = (int(src.rsplit(".", 1)[1]) - 1) + 250 * (int(dst.rsplit(".", 1)[1]) - 1)
    return host * gen.PORTS + sport - 1024


def measure_ctbridge(delay: float, rate: int, seconds: float, standing: int) -> dict[str, Any]:
    with cluster(2, sync={"delay": delay}, log={"level": "info"}) as c:
        a, b = c.nodes
        a.start()
        b.start()
        gen.generate(a.ns, "load", str(standing), timeout=120)
        start = time.monotonic()
        while b.request("stats")["external"]["entries"] < standing:
            if time.monotonic() - start > SYNC_TIMEOUT:
                return {"error": f"B's copy did not reach the {standing} standing flows"}
            time.sleep(0.05)
        cpu0, tx0, sync0 = (_cpu(a), _cpu(b)), tx_bytes(a.ns), a.request("stats")["sync"]
        churned = _churn(a.ns, rate, seconds, standing)
        read_at = time.monotonic()
        kernel = json.loads(a.run(sys.executable, "-m", "ctbridge", "kernel", "dump", "--json").stdout)
        copy = {gen.view_id(v) for v in b.external()}
        read_took = time.monotonic() - read_at
        missing = [f for f in map(gen.view_id, kernel) if f not in copy]
        ages = [read_at - (churned["start"] + (_index(f) - standing) / rate) for f in missing]
        time.sleep(max(0.0, churned["end"] + SETTLE - time.monotonic()))
        sync = a.request("stats")["sync"]
        return {"cpu_a": _cpu(a) - cpu0[0], "cpu_b": _cpu(b) - cpu0[1], "link_bytes": tx_bytes(a.ns) - tx0,
                "generator": churned, "missing": len(missing), "flows": len(kernel), "read_took": read_took,
                "older": sum(1 for age in ages if age > delay + SLACK),
                "sent": sum(sync[k] - sync0[k] for k in ("flows_sent", "deletes_sent")),
                "ended_young": sync["flows_ended_young"] - sync0["flows_ended_young"]}


def measure_conntrackd(rate: int, seconds: float, standing: int) -> dict[str, Any]:
    res = measure_conntrackd_churn(standing + int(rate * (LIFE_MAX + 0.5)) + 1000,
                                   load=lambda ns: gen.generate(ns, "load", str(standing), timeout=120),
                                   churn=lambda ns: _churn(ns, rate, seconds, standing),
                                   compare=lambda k, e: (0, 0, 0), settle=SETTLE, log=lambda *a: None)
    return res if res.get("ok") else {"error": res.get("error") or "failed"}


def _row(name: str, r: dict[str, Any], ref: dict[str, Any] | None) -> str:
    if r.get("error"):
        return f"  {name:<18}not measured: {r['error']}"
    g = r["generator"]
    churned = max(g["created"] + g["deleted"], 1)
    cpu = r["cpu_a"] + r["cpu_b"]
    ratio = ""
    if ref is not None and not ref.get("error"):
        ratio = (f"{cpu / max(ref['cpu_a'] + ref['cpu_b'], 1e-9):>7.2f}x"
                 f"{r['link_bytes'] / max(ref['link_bytes'], 1):>7.2f}x")
    lost = "-" if "missing" not in r or r.get("flows") == 0 else f"{r['missing']:,} ({r['older']} older)"
    return (f"  {name:<18}{cpu:>6.2f} ({r['cpu_a']:.2f} A + {r['cpu_b']:.2f} B){cpu * 1e6 / churned:>8.1f}"
            f"{r['link_bytes'] / 1e6:>9.2f}{r['link_bytes'] / churned:>8.1f}  {lost:<20}{ratio}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=int, default=5000, help="flows created per second")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--standing", type=int, default=50_000, help="long-lived flows in A's table")
    ap.add_argument("--delays", default="0,1,3", help="sync.delay of each ctbridge run, seconds, comma-separated")
    ap.add_argument("--no-conntrackd", action="store_true")
    args = ap.parse_args()
    delays = [float(d) for d in args.delays.split(",") if d.strip()]
    if not 0 < args.rate <= gen.MAX_RATE or not 0 < args.seconds <= gen.MAX_SECONDS or args.standing <= 0 \
            or not delays or min(delays) < 0:
        ap.error("rate, seconds and standing must be positive, delays not negative")
    runs: list[tuple[str, dict[str, Any]]] = []
    with conntrack_max(args.standing + int(args.rate * (LIFE_MAX + 0.5)) + 1000):
        if not args.no_conntrackd:
            runs.append(("conntrackd", measure_conntrackd(args.rate, args.seconds, args.standing)))
        for d in delays:
            runs.append((f"ctbridge delay {d:g}", measure_ctbridge(d, args.rate, args.seconds, args.standing)))
    ref = dict(runs).get("conntrackd")
    print(f"bench/delay.py: {args.rate:,} flows/s for {args.seconds:g} s, lives {LIFE:g}-{LIFE_MAX:g} s, over "
          f"{args.standing:,} standing flows; CPU of both daemons and bytes A sent, from the churn's start to "
          f"{SETTLE:g} s after it; 'lost at failover': flows of A's table B lacked when the churn stopped (of them "
          f"older than the delay + {SLACK:g} s); ratios against conntrackd in the same run")
    print(f"  {'':<18}{'CPU s (A + B)':<22}{'µs/flow':>8}{'MB sent':>9}{'B/flow':>8}  {'lost at failover':<20}"
          f"{'CPU':>8}{'bytes':>8}")
    for name, r in runs:
        print(_row(name, r, ref if name != "conntrackd" else None))
    for name, r in runs:
        if not r.get("error") and "sent" in r:
            print(f"  {name}: {r['sent']:,} FLOW and DELETE messages sent, {r['ended_young']:,} flows ended young "
                  f"(never sent); A's table held {r['flows']:,} when read ({r['read_took']:.2f} s for both reads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

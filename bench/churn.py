"""Sustained churn: is the standby's copy exact while the active node's table churns, and what does
replication cost per flow? ctbridge daemons and conntrackd (FTFW/UDP), measured in the same run.

    python bench/churn.py [--rates 5000,20000,50000] [--seconds 20] [--standing 50000] [--trials 3]
                          [--no-conntrackd]

For each rate R and each trial, ctbridge and then conntrackd, each in a fresh pair of namespaces
(A active, B standby, a sync link between them): both daemons start on empty tables; S standing
established TCP flows are written into A's kernel at once; once B's copy holds them, the churn
generator (tests/support/churn.py) creates R established TCP flows per second in A's kernel, in
10 ms batches, and deletes each 2 s after it was created, for D seconds. 5 s after the generator's
last write, B's copy is compared with A's kernel table key by key (original tuple and zone):

- ctbridge: `ctbridge dump external --json` on B against `ctbridge kernel dump --json` in A;
- conntrackd: `conntrackd -e` (B's external cache) against `conntrack -L` in A.

"missing": flows of A's table B lacks; "stale": flows B holds that A's table no longer does. A
copy is exact when both are 0. When ctbridge's is not, it is compared again about every second (up
to CATCH_UP times) and the row says how long after the churn it was exact (the time includes the
comparison's own).

CPU: user + system seconds of both daemons (A and B), from just before the generator starts to
the comparison. The generator runs in A's namespace beside them, on the same 2 cores; its own CPU
is printed too, but not counted. Overruns: how often A's event socket overran meanwhile (ctbridge:
`stats` kernel.overruns; conntrackd: `conntrackd -s runtime` netlink overrun). The host's
nf_conntrack_max is raised for the run (a namespace cannot go above it) and restored.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.conntrackd_harness import measure_conntrackd_churn
from bench.sync import conntrack_max
from tests.support import churn as gen
from tests.support.daemonlab import Node, cluster

LIFE = 2.0  # seconds from a churned flow's creation to its deletion
SETTLE = 5.0  # seconds from the generator's last write to the comparison
SYNC_TIMEOUT = 120.0  # B's copy reaching the standing flows
CATCH_UP = 20  # seconds, compared once a second, after an inexact comparison
PER_FLOW = ("µs per churned flow = CPU seconds of both daemons (user + system, A + B, from the churn's start to "
            "the comparison) × 10^6 / (flows created + flows deleted by the generator)")


def _cpu(node: Node) -> float:
    import psutil
    if node.proc is None:
        return 0.0
    t = psutil.Process(node.proc.pid).cpu_times()
    return float(t.user + t.system)


def _load(ns: str, standing: int) -> dict[str, Any]:
    return gen.generate(ns, "load", str(standing), timeout=120)


def _churn(ns: str, rate: int, seconds: float, standing: int) -> dict[str, Any]:
    return gen.generate(ns, "churn", "--rate", str(rate), "--seconds", str(seconds), "--first", str(standing),
                        "--life", str(LIFE), timeout=seconds + 120)


def _link(node: Node) -> tuple[int, int]:
    """(datagrams, bytes) the node has sent on the sync link (its engine's counters)."""
    s = node.request("stats")["sync"]
    return s["tx_datagrams"], s["tx_bytes"]


def _ctbridge_diff(a: Node, b: Node) -> tuple[int, int, int]:
    kernel = json.loads(a.run(sys.executable, "-m", "ctbridge", "kernel", "dump", "--json").stdout)
    return gen.difference(map(gen.view_id, kernel), map(gen.view_id, b.external()))


def _conntrackd_diff(kernel: str, external: str) -> tuple[int, int, int]:
    ids = [gen.line_id(line) for line in kernel.splitlines()]
    theirs = [gen.line_id(line) for line in external.splitlines()]
    return gen.difference((i for i in ids if i), (i for i in theirs if i))


def measure_ctbridge(rate: int, seconds: float, standing: int) -> dict[str, Any]:
    try:
        return _measure_ctbridge(rate, seconds, standing)
    except gen.ChurnError as exc:
        return {"error": str(exc)}


def _measure_ctbridge(rate: int, seconds: float, standing: int) -> dict[str, Any]:
    with cluster(2, log={"level": "info"}) as c:
        a, b = c.nodes
        a.start()
        b.start()
        _load(a.ns, standing)
        start = time.monotonic()
        while b.request("stats")["external"]["entries"] < standing:
            if time.monotonic() - start > SYNC_TIMEOUT:
                return {"error": f"B held {b.request('stats')['external']['entries']} of {standing} standing flows "
                                 f"after {SYNC_TIMEOUT:.0f} s"}
            time.sleep(0.05)
        overruns0 = a.request("stats")["kernel"]["overruns"]
        link0 = _link(a)
        cpu0 = (_cpu(a), _cpu(b))
        churned = _churn(a.ns, rate, seconds, standing)
        time.sleep(max(0.0, churned["end"] + SETTLE - time.monotonic()))
        res: dict[str, Any] = {"cpu_a": _cpu(a) - cpu0[0], "cpu_b": _cpu(b) - cpu0[1], "generator": churned}
        res["overruns"] = a.request("stats")["kernel"]["overruns"] - overruns0
        res["link"] = tuple(n - n0 for n, n0 in zip(_link(a), link0, strict=True))
        # each daemon's longest event-loop stall of the last minute (daemon/looplag.py): the churn
        # and the settling time, read before the comparison's dumps add stalls of their own
        res["stall"] = tuple(n.request("stats")["loop"]["recent_longest_stall_seconds"] for n in (a, b))
        res["missing"], res["stale"], res["flows"] = _ctbridge_diff(a, b)
        if res["missing"] or res["stale"]:
            for _ in range(CATCH_UP):
                time.sleep(1.0)
                if _ctbridge_diff(a, b)[:2] == (0, 0):
                    res["exact_after"] = time.monotonic() - churned["end"]
                    break
        return res


def measure_conntrackd(rate: int, seconds: float, standing: int) -> dict[str, Any]:
    res = measure_conntrackd_churn(standing + int(rate * (LIFE + 0.5)) + 1000,
                                   load=lambda ns: _load(ns, standing),
                                   churn=lambda ns: _churn(ns, rate, seconds, standing),
                                   compare=_conntrackd_diff, settle=SETTLE, log=lambda *a: None)
    if not res.get("ok"):
        return {"error": res.get("error") or "failed"}
    return res


def _row(name: str, r: dict[str, Any]) -> str:
    if r.get("error"):
        return f"  {name:<14}not measured: {r['error']}"
    g = r["generator"]
    churned = g["created"] + g["deleted"]
    cpu = r["cpu_a"] + r["cpu_b"]
    overruns = "?" if r["overruns"] is None else r["overruns"]
    both = f"{cpu:>7.2f} ({r['cpu_a']:.2f} A + {r['cpu_b']:.2f} B)"
    exact = "exact" if r["missing"] == 0 and r["stale"] == 0 else (
        f"exact +{r['exact_after']:.0f}s" if "exact_after" in r else "no")
    return (f"  {name:<14}{g['created']:>9,}{g['deleted']:>9,}{r['flows']:>9,}{r['missing']:>9,}{r['stale']:>9,}"
            f"  {exact:<11}"
            f"{both:<29}{cpu * 1e6 / max(churned, 1):>7.0f}"
            f"{overruns:>6}{g['max_lag']:>8.3f}{g['cpu']['user'] + g['cpu']['sys']:>7.2f}"
            + (f"  {r['stall'][0]:.3f} / {r['stall'][1]:.3f}" if "stall" in r else "  -"))


def report(rate: int, seconds: float, standing: int, ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> None:
    print(f"\n{rate:,} flows/s for {seconds:g} s over {standing:,} standing flows, each deleted {LIFE:g} s after "
          f"it was made; compared {SETTLE:g} s after the churn")
    print(f"  {'':<14}{'created':>9}{'deleted':>9}{'A holds':>9}{'missing':>9}{'stale':>9}  {'copy':<11}"
          f"{'  CPU s (A + B)':<29}{'µs/flow':>7}{'overr.':>7}{'gen lag':>8}{'gen s':>7}  loop stall s A / B")
    for i, r in enumerate(ours):
        print(_row(f"ctbridge #{i + 1}", r))
    for i, r in enumerate(theirs):
        print(_row(f"conntrackd #{i + 1}", r))
    for i, r in enumerate(ours):
        if not r.get("error") and "link" in r:
            g = r["generator"]
            churned = max(g["created"] + g["deleted"], 1)
            datagrams, nbytes = r["link"]
            print(f"  ctbridge #{i + 1}: A sent {datagrams:,} datagrams, {nbytes:,} bytes over the churn "
                  f"({churned / max(datagrams, 1):.1f} flow changes and {nbytes / churned:.0f} bytes per churned flow)")

    def cpu(rs: list[dict[str, Any]]) -> float | None:
        ok = [r["cpu_a"] + r["cpu_b"] for r in rs if not r.get("error")]
        return statistics.median(ok) if ok and len(ok) == len(rs) else None
    ca, cb = cpu(ours), cpu(theirs)
    exact_a = sum(1 for r in ours if not r.get("error") and r["missing"] == r["stale"] == 0)
    exact_b = sum(1 for r in theirs if not r.get("error") and r["missing"] == r["stale"] == 0)
    line = f"  exact 5 s after the churn: ctbridge {exact_a}/{len(ours)}"
    if theirs:
        line += f", conntrackd {exact_b}/{len(theirs)}"
    print(line)
    if ca is not None and cb:
        print(f"  CPU, median of the trials: ctbridge {ca:.2f} s, conntrackd {cb:.2f} s: ctbridge/conntrackd "
              f"{ca / cb:.2f}x")
    sys.stdout.flush()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="5000,20000,50000", help="flows created per second, comma-separated")
    ap.add_argument("--seconds", type=float, default=20.0, help="how long each churn runs")
    ap.add_argument("--standing", type=int, default=50_000, help="flows in A's table before the churn")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--no-conntrackd", action="store_true")
    args = ap.parse_args()
    rates = [int(r) for r in args.rates.split(",") if r.strip()]
    if not rates or min(rates) <= 0 or not 0 < args.seconds <= gen.MAX_SECONDS or args.standing <= 0 \
            or args.trials <= 0:
        ap.error("rates, seconds, standing and trials must be positive (seconds at most "
                 f"{gen.MAX_SECONDS:.0f})")
    print(f"bench/churn.py: {args.trials} trial(s) per rate, ctbridge and conntrackd alternating, each in fresh "
          f"namespaces\n{PER_FLOW}\n'gen lag': the generator's worst delay behind its schedule, s; 'gen s': its "
          "own CPU seconds (not counted); 'loop stall': each ctbridge daemon's longest event-loop stall over the "
          "churn and the settling time (conntrackd has no such figure)")
    with conntrack_max(args.standing + int(max(rates) * (LIFE + 0.5))):
        for rate in rates:
            ours: list[dict[str, Any]] = []
            theirs: list[dict[str, Any]] = []
            for _ in range(args.trials):
                ours.append(measure_ctbridge(rate, args.seconds, args.standing))
                if not args.no_conntrackd:
                    theirs.append(measure_conntrackd(rate, args.seconds, args.standing))
            report(rate, args.seconds, args.standing, ours, theirs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

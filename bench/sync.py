"""End-to-end sync benchmark: N flows appear in the active node's kernel; how long until the
standby holds them all? ctbridge daemons and conntrackd (FTFW/UDP), measured in the same run.

    python bench/sync.py [--entries N] [--no-conntrackd]

Both run in two fresh namespaces on a veth/bridge sync link, start on empty tables, and get the
same load: one `conntrack -R` of N established TCP flows into A's kernel. The clock runs from the
start of the load until B's external cache holds all N (polled every 50 ms). This is the event
path: kernel events -> A's daemon -> sync link -> B's daemon.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.kernel import save_lines
from tests.support.daemonlab import Node, cluster

TIMEOUT = 120.0


def replicate(a: Node, b: Node, n: int, tmp: str) -> tuple[float, float, int]:
    """Load n flows into A's kernel with conntrack -R; (load seconds, seconds until B holds them
    all, how many B holds)."""
    save = Path(tmp, "flows.save")
    save.write_text(save_lines(n))
    start = time.perf_counter()
    a.run("conntrack", "-R", str(save))
    load = time.perf_counter() - start
    reached = 0
    while time.perf_counter() - start < TIMEOUT:
        reached = b.request("stats")["external"]["entries"]
        if reached >= n:
            break
        time.sleep(0.05)
    return load, time.perf_counter() - start, reached


def measure_ctbridge(n: int) -> dict[str, float | int | bool]:
    with cluster(2) as c, tempfile.TemporaryDirectory() as tmp:
        a, b = c.nodes
        a.start()
        b.start()
        load, took, reached = replicate(a, b, n, tmp)
        stats = a.request("stats")
        return {"load": load, "sync": took, "reached": reached, "converged": reached >= n,
                "overruns": stats["kernel"]["overruns"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--no-conntrackd", action="store_true")
    args = ap.parse_args()
    n = args.entries
    ours = measure_ctbridge(n)
    print(f"\nsync, {n:,} flows loaded into A's kernel with conntrack -R; until B's external cache holds them")
    print(f"{'':<12}{'load s':>9}{'sync s':>9}{'flows/s':>11}  converged")
    print(f"{'ctbridge':<12}{ours['load']:>9.3f}{ours['sync']:>9.3f}{n / ours['sync']:>11,.0f}  "
          f"{ours['converged']} (kernel overruns: {ours['overruns']})")
    if not args.no_conntrackd:
        from bench.conntrackd_harness import measure_conntrackd_events
        res = measure_conntrackd_events(n, log=lambda *a: None)
        if res.get("ok") and res.get("sync_seconds"):
            cd = res["sync_seconds"]
            print(f"{'conntrackd':<12}{res['load_seconds']:>9.3f}{cd:>9.3f}{n / cd:>11,.0f}  {res['converged']}")
            print(f"ctbridge is {cd / ours['sync']:.2f}x conntrackd (same load, same run)")
        else:
            print(f"conntrackd: not measured: {res.get('error') or 'did not converge'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

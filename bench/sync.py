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


def replicate(a: Node, b: Node, n: int, tmp: str, burst: bool = False) -> tuple[float, float, int]:
    """Load n flows into A's kernel with conntrack -R (or, ``burst``, ctbridge's batched commit);
    (load seconds, seconds until B holds them all, how many B holds)."""
    save = Path(tmp, "flows.save")
    save.write_text(save_lines(n))
    start = time.perf_counter()
    if burst:
        a.run(sys.executable, str(Path(__file__).with_name("burst_load.py")), str(n))
    else:
        a.run("conntrack", "-R", str(save))
    load = time.perf_counter() - start
    reached = 0
    while time.perf_counter() - start < TIMEOUT:
        reached = b.request("stats")["external"]["entries"]
        if reached >= n:
            break
        time.sleep(0.05)
    return load, time.perf_counter() - start, reached


def measure_ctbridge(n: int, burst: bool = False) -> dict[str, float | int | bool]:
    with cluster(2, log={"level": "info"}) as c, tempfile.TemporaryDirectory() as tmp:
        a, b = c.nodes
        for node in (a, b):
            node.run("sysctl", "-qw", f"net.netfilter.nf_conntrack_max={max(262144, 2 * n)}", check=False)
        a.start()
        b.start()
        load, took, reached = replicate(a, b, n, tmp, burst)
        stats = a.request("stats")
        return {"load": load, "sync": took, "reached": reached, "converged": reached >= n,
                "overruns": stats["kernel"]["overruns"], "bytes": stats["sync"]["tx_bytes"],
                "resent": stats["sync"]["resent_bytes"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--no-conntrackd", action="store_true")
    ap.add_argument("--burst", action="store_true",
                    help="load with ctbridge's batched commit (bench/burst_load.py) instead of conntrack -R")
    args = ap.parse_args()
    n = args.entries
    ours = measure_ctbridge(n, args.burst)
    how = "a batched CT_NEW burst" if args.burst else "conntrack -R"
    print(f"\nsync, {n:,} flows loaded into A's kernel with {how}; until B's external cache holds them")
    print(f"{'':<12}{'load s':>9}{'sync s':>9}{'flows/s':>11}  converged")
    print(f"{'ctbridge':<12}{ours['load']:>9.3f}{ours['sync']:>9.3f}{n / ours['sync']:>11,.0f}  "
          f"{ours['converged']} (kernel overruns: {ours['overruns']}; {ours['bytes'] / 1e6:.1f} MB sent, "
          f"{ours['resent'] / 1e6:.1f} MB of it resent)")
    if not args.no_conntrackd:
        from bench.conntrackd_harness import measure_conntrackd_events
        res = measure_conntrackd_events(n, log=lambda *a: None, burst=args.burst)
        if res.get("ok") and res.get("sync_seconds"):
            cd = res["sync_seconds"]
            print(f"{'conntrackd':<12}{res['load_seconds']:>9.3f}{cd:>9.3f}{n / cd:>11,.0f}  {res['converged']}")
            print(f"ctbridge is {cd / ours['sync']:.2f}x conntrackd (same load, same run)")
        else:
            print(f"conntrackd: not measured: {res.get('error') or 'did not converge'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Failover benchmark: ctbridge and conntrackd side by side, same flows, same run.

    python bench/failover.py [--entries N]

For each: two namespaces on a sync link, N established TCP flows loaded into A's kernel with one
`conntrack -R`, replicated to B, then B becomes master.
  replication  A's kernel -> B's external cache (kernel events, end to end)   ctbridge: bench/sync.py's path
  commit       ctbridge: `notify INSTANCE VI_1 MASTER` until it answers (the flows are in B's kernel);
               conntrackd: `conntrackd -c` until B's kernel holds them
  memory       growth of B's daemon RSS (psutil) per flow held in its external cache
Goals: commit >= 2x faster than conntrackd, replication >= 1x, memory <= 1x.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sync import replicate
from tests.support.daemonlab import cluster


def measure_ctbridge(n: int) -> dict[str, float]:
    with cluster(2) as c, tempfile.TemporaryDirectory() as tmp:
        a, b = c.nodes
        a.start()
        b.start()
        assert b.proc is not None
        rss_before = psutil.Process(b.proc.pid).memory_info().rss
        _load, replication, held = replicate(a, b, n, tmp)
        rss_after = psutil.Process(b.proc.pid).memory_info().rss
        t0 = time.perf_counter()
        answer = b.request("notify", args=["INSTANCE", "VI_1", "MASTER", "100"])
        commit = time.perf_counter() - t0
        in_kernel = int(b.run("conntrack", "-C").stdout.strip())
        return {"replication": replication, "held": held, "commit": commit, "committed": answer.get("committed", 0),
                "in_kernel": in_kernel, "rss_per_flow": (rss_after - rss_before) / max(held, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=100_000)
    args = ap.parse_args()
    n = args.entries
    ours = measure_ctbridge(n)
    from bench.conntrackd_harness import measure_conntrackd, measure_conntrackd_events
    cd = measure_conntrackd(n, log=lambda *a: None)
    cd_events = measure_conntrackd_events(n, log=lambda *a: None)
    print(f"\nfailover, {n:,} TCP flows, same run")
    print(f"{'':<38}{'ctbridge':>12}{'conntrackd':>12}{'ratio':>8}  goal")

    def row(what: str, mine: float, theirs: float | None, unit: str, goal: str, higher_is_better: bool) -> None:
        if not theirs:
            print(f"{what:<38}{mine:>11.3f}{unit}{'n/a':>12}")
            return
        ratio = (theirs / mine) if not higher_is_better else (mine / theirs)
        print(f"{what:<38}{mine:>11.3f}{unit}{theirs:>11.3f}{unit}{ratio:>7.2f}x  {goal}")
    row("replication A kernel -> B cache (s)", ours["replication"], cd_events.get("sync_seconds"), " ", ">= 1x", False)
    row("commit into B's kernel (s)", ours["commit"], cd.get("commit_seconds"), " ", ">= 2x", False)
    theirs_rss = cd.get("rss_per_flow")
    if theirs_rss:
        print(f"{'memory per cached flow (bytes)':<38}{ours['rss_per_flow']:>12.0f}{theirs_rss:>12.0f}"
              f"{theirs_rss / ours['rss_per_flow']:>7.2f}x  <= 1x memory (ratio >= 1)")
    else:
        print(f"{'memory per cached flow (bytes)':<38}{ours['rss_per_flow']:>12.0f}{'n/a':>12}")
    print(f"ctbridge: {ours['held']:,} flows held, {ours['committed']:,} committed, "
          f"{ours['in_kernel']:,} in B's kernel; ratio: how many times better ctbridge is")
    return 0


if __name__ == "__main__":
    sys.exit(main())

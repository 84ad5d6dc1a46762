"""End-to-end sync benchmark: N flows appear in the active node's kernel; how long until the
standby holds them all? ctbridge daemons and conntrackd (FTFW/UDP), measured in the same run.

    python bench/sync.py [--entries N] [--burst] [--loss P] [--no-conntrackd]
    python bench/sync.py --suite [--trials 3]

Both run in two fresh namespaces on a veth sync link, start on empty tables, and get the same
load: one `conntrack -R` of N established TCP flows into A's kernel, or (--burst) ctbridge's
batched CT_NEW commit, which writes 100,000 flows in about 0.2 s (a mass reconnect). The clock
runs from the start of the load until B's external cache holds all N. This is the event path:
kernel events -> A's daemon -> sync link -> B's daemon. --loss P drops P % of the sync datagrams
in each direction (nftables numgen on B).

Each row also shows the bytes both sync interfaces sent during the run (Ethernet frames, as the
kernel counts them) against what the flows need (ctbridge's encoding of each flow once, in full
datagrams), and the CPU seconds both daemons used. --suite runs the burst and loss cases, each case
`--trials` times, ctbridge and conntrackd alternating: bursts of 100,000 and 250,000 flows, and
5,000 and 100,000 flows under 5 % and 20 % loss. The host's nf_conntrack_max is raised for the
run (a namespace cannot go above it) and restored.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.conntrackd_harness import link_bytes, loss_ruleset, measure_conntrackd_events
from bench.kernel import save_lines
from ctbridge.sync import wire
from tests.support import builders
from tests.support.daemonlab import Node, cluster
from tests.support.hostlimit import conntrack_max

TIMEOUT = 120.0
ETHERNET = 14 + 28  # bytes around each datagram on the wire: Ethernet header, IPv4 and UDP headers


def needed_bytes(n: int, mtu: int = 1500) -> int:
    """What n of the benchmark's flows take on the wire, each sent once in full datagrams (the floor
    any sender of ctbridge's encoding meets; acknowledgements not counted)."""
    msg = len(wire.flow_msg(1, builders.tcp_flows(1)[0]))
    room = mtu - 28 - wire.HEADER_LEN - wire.MAC_ENTRY_LEN - 20
    per = room // msg
    datagrams = -(-n // per)
    return n * msg + datagrams * (wire.HEADER_LEN + wire.MAC_ENTRY_LEN + ETHERNET)


def _cpu(node: Node) -> float:
    import psutil
    if node.proc is None:
        return 0.0
    t = psutil.Process(node.proc.pid).cpu_times()
    return float(t.user + t.system)


def replicate(a: Node, b: Node, n: int, tmp: str, burst: bool = False) -> tuple[float, float, int]:
    """Load n flows into A's kernel with conntrack -R (or, ``burst``, ctbridge's batched commit);
    (load seconds, seconds until B holds them all, how many B holds)."""
    save = Path(tmp, "flows.save")
    save.write_text(save_lines(n))
    start = time.monotonic()
    if burst:  # the clock starts when the kernel write does (burst_load.py says when)
        out = a.run(sys.executable, str(Path(__file__).with_name("burst_load.py")), str(n)).stdout.split()
        start = float(out[1])
    else:
        a.run("conntrack", "-R", str(save))
    load = time.monotonic() - start
    reached = 0
    delay = 0.002
    while time.monotonic() - start < TIMEOUT:
        reached = b.request("stats")["external"]["entries"]
        if reached >= n:
            break
        time.sleep(delay)
        delay = min(2 * delay, 0.02)
    return load, time.monotonic() - start, reached


def measure_ctbridge(n: int, burst: bool = False, loss: int = 0) -> dict[str, Any]:
    with cluster(2, log={"level": "info"}) as c, tempfile.TemporaryDirectory() as tmp:
        a, b = c.nodes
        a.start()
        b.start()
        if loss:
            b.run("nft", "-f", "-", input=loss_ruleset(loss))
        cpu0 = _cpu(a) + _cpu(b)
        bytes0 = link_bytes(a.ns, "sync0") + link_bytes(b.ns, "sync0")
        load, took, reached = replicate(a, b, n, tmp, burst)
        cpu = _cpu(a) + _cpu(b) - cpu0
        wire_bytes = link_bytes(a.ns, "sync0") + link_bytes(b.ns, "sync0") - bytes0
        stats = a.request("stats")
        return {"load": load, "sync": took, "reached": reached, "converged": reached >= n,
                "overruns": stats["kernel"]["overruns"], "bytes": stats["sync"]["tx_bytes"],
                "resent": stats["sync"]["resent_bytes"], "cpu": cpu, "link_bytes": wire_bytes}


LOSS_TIMEOUT = 60.0  # seconds conntrackd gets under loss (it did not converge within 120 s in any trial)


def measure_conntrackd(n: int, burst: bool = False, loss: int = 0) -> dict[str, Any]:
    res = measure_conntrackd_events(n, log=lambda *a: None, burst=burst, loss=loss,
                                    timeout=LOSS_TIMEOUT if loss else TIMEOUT)
    if not res.get("ok"):
        return {"error": res.get("error") or "failed", "converged": False}
    return {"load": res["load_seconds"], "sync": res["sync_seconds"], "reached": res["external_reached"],
            "converged": res["converged"], "cpu": res["cpu_seconds"], "link_bytes": res["link_bytes"]}


def _row(name: str, runs: list[dict[str, Any]], need: int) -> str:
    ok = [r for r in runs if r.get("converged")]
    times = [r["sync"] for r in ok]
    med = statistics.median(times) if len(ok) == len(runs) and times else None
    each = " ".join(f"{r['sync']:.2f}" if r.get("converged") else f"no:{r.get('reached', 0)}" for r in runs)
    mb = statistics.median(r["link_bytes"] for r in ok) if ok else 0
    cpu = statistics.median(r["cpu"] for r in ok) if ok else 0
    return (f"  {name:<11}{(f'{med:.3f}' if med is not None else '-'):>9}  {each:<26}{len(ok)}/{len(runs):<6}"
            f"{mb / 1e6:>8.1f}{mb / need:>8.2f}x{cpu:>8.2f}")


def suite(trials: int, conntrackd: bool) -> int:
    cases = [("burst", 100_000, 0), ("burst", 250_000, 0), ("restore", 5_000, 5), ("restore", 5_000, 20),
             ("restore", 100_000, 5), ("restore", 100_000, 20)]
    print(f"bench/sync.py --suite: {trials} trials per case, ctbridge and conntrackd alternating\n")
    with conntrack_max(max(n for _, n, _ in cases)):
        for loader, n, loss in cases:
            burst = loader == "burst"
            ours: list[dict[str, Any]] = []
            theirs: list[dict[str, Any]] = []
            for _ in range(trials):
                ours.append(measure_ctbridge(n, burst, loss))
                if conntrackd:
                    theirs.append(measure_conntrackd(n, burst, loss))
            need = needed_bytes(n)
            how = "batched CT_NEW burst" if burst else "conntrack -R"
            print(f"{n:,} flows, {how}, {loss}% loss each way (the flows need {need / 1e6:.1f} MB on the link)")
            print(f"  {'':<11}{'median s':>9}  {'each trial, s':<26}{'conv.':<8}{'MB link':>8}{'/need':>9}{'CPU s':>8}")
            if loss and theirs:
                print(f"  (conntrackd: 'no:N' = B held N flows when its {LOSS_TIMEOUT:.0f} s were up)")
            print(_row("ctbridge", ours, need))
            if theirs:
                print(_row("conntrackd", theirs, need))
                errors = {r["error"] for r in theirs if r.get("error")}
                if errors:
                    print("  conntrackd: " + "; ".join(sorted(errors)))
                a = [r["sync"] for r in ours if r.get("converged")]
                b = [r["sync"] for r in theirs if r.get("converged")]
                if len(a) == trials and len(b) == trials:
                    ta, tb = statistics.median(a), statistics.median(b)
                    ca = statistics.median(r["cpu"] for r in ours)
                    cb = statistics.median(r["cpu"] for r in theirs)
                    print(f"  ctbridge takes {ta / tb:.2f}x conntrackd's time ({tb / ta:.2f}x as fast) and "
                          f"{ca / cb:.2f}x its CPU seconds")
            print(flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--no-conntrackd", action="store_true")
    ap.add_argument("--burst", action="store_true",
                    help="load with ctbridge's batched commit (bench/burst_load.py) instead of conntrack -R")
    ap.add_argument("--loss", type=int, default=0, help="percent of sync datagrams dropped in each direction")
    ap.add_argument("--suite", action="store_true", help="the burst and loss cases, --trials each")
    ap.add_argument("--trials", type=int, default=3)
    args = ap.parse_args()
    if args.suite:
        return suite(args.trials, not args.no_conntrackd)
    n = args.entries
    with conntrack_max(n):
        ours = measure_ctbridge(n, args.burst, args.loss)
        theirs = None if args.no_conntrackd else measure_conntrackd(n, args.burst, args.loss)
    how = "a batched CT_NEW burst" if args.burst else "conntrack -R"
    print(f"\nsync, {n:,} flows loaded into A's kernel with {how}, {args.loss}% loss; until B's external "
          "cache holds them")
    print(f"{'':<12}{'load s':>9}{'sync s':>9}{'flows/s':>11}{'MB link':>9}{'CPU s':>7}  converged")
    for name, r in (("ctbridge", ours), ("conntrackd", theirs)):
        if r is None:
            continue
        if r.get("error"):
            print(f"{name:<12}not measured: {r['error']}")
            continue
        print(f"{name:<12}{r['load']:>9.3f}{r['sync'] or 0:>9.3f}{n / (r['sync'] or 1):>11,.0f}"
              f"{r['link_bytes'] / 1e6:>9.1f}{r['cpu']:>7.2f}  {r['converged']}")
    if theirs and theirs.get("converged") and ours["converged"]:
        print(f"ctbridge is {theirs['sync'] / ours['sync']:.2f}x conntrackd (same load, same run); "
              f"the flows need {needed_bytes(n) / 1e6:.1f} MB on the link")
    return 0


if __name__ == "__main__":
    sys.exit(main())

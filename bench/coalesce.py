"""Coalescing (sync.coalesce) on real connections: how many messages and bytes each short TCP
connection puts on the sync link, with the window off (the default), at 5 ms and at 25 ms, and
with conntrackd replicating the same traffic, each in a fresh lab.

    python bench/coalesce.py [--rate 200] [--seconds 20] [--windows 0,0.005,0.025] [--wan-delay 0.02]
                             [--no-conntrackd]

The lab's client opens RATE new connections a second through the active firewall (fw1), besides
10 long-lived TCP connections and 2 UDP flows: each connects, sends a line, reads its echo and
closes (a handshake, a teardown, then TIME_WAIT's end), and every fifth also asks a UDP question
from a new socket. Over SECONDS of that, on fw1 (ctbridge's own counters): the kernel events its
daemon read, the FLOW and DELETE messages it sent, per new connection; for every replicator, the
bytes fw1's sync interface sent (`ip -s link`: the same count for ctbridge and conntrackd)
and the CPU of both daemons (or both conntrackds), per new connection, and as ratios to
conntrackd's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ctbridge.lab import Firewall, Lab, Options, lab

WARM_UP = 3.0  # seconds of traffic before the measurement: the long-lived flows replicated


def _tx(fw: Firewall) -> int:
    """Bytes the firewall's sync interface sent (`ip -s link`)."""
    return int(json.loads(fw.run("ip", "-j", "-s", "link", "show", "sync0").stdout)[0]["stats64"]["tx"]["bytes"])


def _cpu(the_lab: Lab) -> float:
    total = 0.0
    for fw in the_lab.fws:
        proc = fw.conntrackd if the_lab.options.backend == "conntrackd" else fw.daemon  # the replicator
        if proc is not None:
            t = psutil.Process(proc.proc.pid).cpu_times()
            total += t.user + t.system
    return total


def _counts(the_lab: Lab) -> dict[str, float]:
    fw1 = the_lab.fws[0]
    status = the_lab.status()
    out: dict[str, float] = {"tx": _tx(fw1), "cpu": _cpu(the_lab),
                             "conns": status.get("new_tcp_ok", 0) + status.get("new_tcp_failed", 0)}
    if the_lab.options.backend == "ctbridge":
        stats = fw1.request("stats")
        out["events"] = stats["kernel"]["events"]
        out["messages"] = stats["sync"]["flows_sent"] + stats["sync"]["deletes_sent"]
        out["coalesced"] = stats["sync"]["updates_coalesced"]
    return out


def measure(options: Options, seconds: float) -> dict[str, float]:
    with lab(options) as the_lab:
        the_lab.start()
        time.sleep(WARM_UP)
        before = _counts(the_lab)
        time.sleep(seconds)
        after = _counts(the_lab)
    return {k: after[k] - before[k] for k in after}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=200.0, help="new connections a second")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--windows", default="0,0.005,0.025", help="sync.coalesce of each ctbridge lab, seconds")
    ap.add_argument("--wan-delay", type=float, default=0.02, help="seconds the server's packets are held "
                    "(Options.wan_delay: a WAN round trip; 0: the lab's sub-millisecond one)")
    ap.add_argument("--no-conntrackd", action="store_true")
    args = ap.parse_args()
    windows = [float(w) for w in args.windows.split(",") if w.strip()]
    if not 0 < args.rate <= 1000 or not 0 < args.seconds <= 600 or not windows or min(windows) < 0:
        ap.error("rate 1-1000, seconds up to 600, windows not negative")
    base = {"tcp": 10, "udp": 2, "new": args.rate, "wan_delay": args.wan_delay}
    runs: list[tuple[str, dict[str, float]]] = []
    if not args.no_conntrackd:
        runs.append(("conntrackd", measure(Options(backend="conntrackd", **base), args.seconds)))
    for w in windows:
        runs.append((f"ctbridge coalesce {w * 1000:g} ms",
                     measure(Options(sync=(f"coalesce = {w}",), **base), args.seconds)))
    ref = dict(runs).get("conntrackd")
    print(f"bench/coalesce.py: {args.rate:g} new connections/s for {args.seconds:g} s through fw1, the server "
          f"{args.wan_delay * 1000:g} ms away; per new "
          "connection: kernel events fw1's daemon read, FLOW and DELETE messages it sent, bytes fw1's sync "
          "interface sent, CPU µs of both replicators; ratios against conntrackd in the same run")
    print(f"  {'':<24}{'conns':>7}{'events':>8}{'messages':>9}{'coalesced':>10}{'bytes':>8}{'CPU µs':>8}"
          f"{'bytes/cd':>9}{'CPU/cd':>8}")
    for name, r in runs:
        n = max(r["conns"], 1)
        ratio = ""
        if ref is not None and name != "conntrackd":
            ratio = f"{r['tx'] / max(ref['tx'], 1):>8.2f}x{r['cpu'] / max(ref['cpu'], 1e-9):>7.2f}x"
        per = (f"{r['events'] / n:>8.2f}{r['messages'] / n:>9.2f}{r['coalesced'] / n:>10.2f}" if "events" in r
               else f"{'-':>8}{'-':>9}{'-':>10}")
        print(f"  {name:<24}{r['conns']:>7.0f}{per}{r['tx'] / n:>8.0f}{r['cpu'] / n * 1e6:>8.0f}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A large table end to end: N flows (default 1,000,000) replicated, resynced after a restart and
committed, ctbridge's daemons and conntrackd in the same run.

    python bench/scale.py [--entries 1000000] [--no-conntrackd]

ctbridge, in a fresh pair of namespaces (A active, B standby):
  replicate   N established TCP flows written into A's kernel at once (bench/burst_load.py, the
              clock from the first kernel write) until B's external cache holds N; CPU of both
              daemons (user + system); A's event-socket overruns; B's resident memory growth per
              flow held
  resync      B's daemon restarted (SIGTERM, started again) until its new life holds N again, and
              how many bulks A sent for it (one is right)
  commit      B becomes MASTER (`notify INSTANCE VI_1 MASTER`, waiting while the daemon reports
              progress) until it answers; B's kernel then counted with `conntrack -C`
  loop        each daemon's longest event-loop stall over the whole run (`stats`: loop), and the
              times a daemon logged a peer silent (a busy node must never look dead)
conntrackd (FTFW over UDP), in its own fresh pair: the same burst loaded into A until B's external
cache holds N (bench/conntrackd_harness.py's event path) with the CPU of both daemons; then, in
another pair loaded with `conntrack -R`, `conntrackd -c` until B's kernel holds N, and its memory
per cached flow; its resync: B's conntrackd restarted after the load and asked for a resync
(`conntrackd -n`) until its external cache holds N again.

The host's nf_conntrack_max is raised for the run and restored (bench/sync.py). ``--buckets N``
resizes the host's conntrack hash for the run (what `ctbridge check` advises for a large table:
ctbridge/config/sizing.py), for both; by default it is left as it is (262,144 buckets at most). Ratios: how many
times better ctbridge is (above 1: ctbridge ahead). Issue 24's goals: replicate and CPU >= 1x,
commit >= 2x, resync >= 1x, memory <= 1x (ratio >= 1).
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sync import conntrack_max
from ctbridge.daemon import control
from tests.support.daemonlab import Node, cluster
from tests.support.hostlimit import conntrack_buckets

TIMEOUT = 900.0  # seconds any one stage may take at most (1M flows replicated in 52 s on 2026-12-06)
POLL = 0.25  # seconds between two looks at B's cache (each `stats` is an answer B's loop gives)


def _cpu(node: Node) -> float:
    if node.proc is None:
        return 0.0
    t = psutil.Process(node.proc.pid).cpu_times()
    return float(t.user + t.system)


def _rss(node: Node) -> int:
    return int(psutil.Process(node.proc.pid).memory_info().rss) if node.proc is not None else 0


def _until_held(b: Node, n: int, start: float) -> tuple[float, int]:
    """Seconds from ``start`` until B's external cache holds ``n`` (or TIMEOUT), and how many."""
    held = 0
    delay = 0.01
    while time.monotonic() - start < TIMEOUT:
        try:
            held = b.request("stats")["external"]["entries"]
        except control.ControlError:  # a slow answer is a missed look, not a failure
            pass
        if held >= n:
            break
        time.sleep(delay)
        delay = min(2 * delay, POLL)
    return time.monotonic() - start, held


def _silent(node: Node) -> int:
    """How often the daemon logged a peer silent (ctbridge/daemon/datapath.py's line)."""
    return len(re.findall(r"peer [0-9a-f]{8} silent for", node.log.read_text(errors="replace")))


def measure_ctbridge(n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with cluster(2, log={"level": "info"}) as c:
        a, b = c.nodes
        a.start()
        b.start()
        cpu0 = _cpu(a) + _cpu(b)
        rss0 = _rss(b)
        loaded = a.run(sys.executable, str(Path(__file__).with_name("burst_load.py")), str(n)).stdout.split()
        out["replicate"], out["held"] = _until_held(b, n, float(loaded[1]))
        out["cpu"] = _cpu(a) + _cpu(b) - cpu0
        out["rss_per_flow"] = (_rss(b) - rss0) / max(1, out["held"])
        kernel = a.request("stats")["kernel"]
        out["overruns"] = kernel["overruns"]
        out["queue"] = kernel["event_queue"]  # the event thread's queue: its peak, and times it was full
        stalls = [node.request("stats")["loop"]["longest_stall_seconds"] for node in (a, b)]
        out["stalls_replicate"] = list(stalls)
        bulks = a.request("stats")["sync"]["bulks_sent"]
        b.stop(signal.SIGTERM)
        start = time.monotonic()
        b.start()
        out["resync"], out["resynced"] = _until_held(b, n, start)
        time.sleep(2 * 3.0)  # a second bulk, if one were asked for, would begin within resync_retry (3 s)
        out["bulks"] = a.request("stats")["sync"]["bulks_sent"] - bulks
        out["stalls_resync"] = [a.request("stats")["loop"]["longest_stall_seconds"],
                                b.request("stats")["loop"]["longest_stall_seconds"]]  # (B's new life)
        start = time.monotonic()
        before = psutil.Process(b.proc.pid).cpu_times() if b.proc is not None else None
        cpu_a = _cpu(a)
        try:
            answer = control.request(b.socket, "notify", stall=60.0, args=["INSTANCE", "VI_1", "MASTER", "100"])
            out["committed"] = answer.get("committed", 0)
        except control.ControlError as exc:
            out["commit_error"] = str(exc)
        out["commit"] = time.monotonic() - start
        if before is not None and b.proc is not None:  # where B's commit spends its CPU: Python, or the kernel
            after = psutil.Process(b.proc.pid).cpu_times()
            out["commit_cpu"] = (after.user - before.user, after.system - before.system, _cpu(a) - cpu_a)
        out["in_kernel"] = int(b.run("conntrack", "-C").stdout.strip())
        out["stalls_commit"] = [node.request("stats")["loop"]["longest_stall_seconds"] for node in (a, b)]
        out["stall_a"] = max(out["stalls_replicate"][0], out["stalls_commit"][0])
        out["stall_b"] = max(out["stalls_replicate"][1], out["stalls_resync"][1], out["stalls_commit"][1])
        out["silent"] = _silent(a) + _silent(b)
    return out


def measure_conntrackd(n: int) -> dict[str, Any]:
    from bench.conntrackd_harness import measure_conntrackd as commit_run
    from bench.conntrackd_harness import measure_conntrackd_events
    events = measure_conntrackd_events(n, log=lambda *a: None, burst=True, timeout=TIMEOUT, resync=True)
    commit = commit_run(n, log=lambda *a: None)
    return {"replicate": events.get("sync_seconds"), "cpu": events.get("cpu_seconds"),
            "commit": commit.get("commit_seconds"), "rss_per_flow": commit.get("rss_per_flow"),
            "resync": events.get("resync_seconds"),
            "error": events.get("error") or commit.get("error")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--no-conntrackd", action="store_true")
    ap.add_argument("--buckets", type=int, default=0, help="the host's conntrack hash for the run (0: as it is)")
    args = ap.parse_args()
    n = args.entries
    with conntrack_max(n), conntrack_buckets(args.buckets):
        buckets = int(Path("/proc/sys/net/netfilter/nf_conntrack_buckets").read_text())
        ours = measure_ctbridge(n)
        theirs = {} if args.no_conntrackd else measure_conntrackd(n)
    print(f"\nscale: {n:,} established TCP flows, ctbridge and conntrackd (FTFW) in fresh pairs, same run; "
          f"the host's conntrack hash {buckets:,} buckets" + (" for the run" if args.buckets else ""))
    print(f"{'':<44}{'ctbridge':>12}{'conntrackd':>12}{'ratio':>8}  goal")

    def row(what: str, mine: float | None, other: float | None, goal: str) -> None:
        ratio = f"{other / mine:>7.2f}x" if mine and other else f"{'':>8}"
        print(f"{what:<44}{(f'{mine:.2f}' if mine is not None else '-'):>12}"
              f"{(f'{other:.2f}' if other is not None else 'n/a'):>12}{ratio}  {goal}")
    row("replicate: first kernel write -> B holds all (s)", ours["replicate"], theirs.get("replicate"), ">= 1x")
    row("CPU of both daemons for it (s)", ours["cpu"], theirs.get("cpu"), ">= 1x")
    row("commit into B's kernel, MASTER (s)", ours["commit"], theirs.get("commit"), ">= 2x")
    row("resync after restarting B (s)", ours["resync"], theirs.get("resync"), ">= 1x")
    row("memory per cached flow (bytes)", ours["rss_per_flow"], theirs.get("rss_per_flow"), ">= 1x (less memory)")
    print(f"ctbridge: B held {ours['held']:,} after the load and {ours['resynced']:,} after its restart; "
          f"{ours['bulks']} bulk(s) for the restart; A's event socket overran {ours['overruns']} time(s) (its queue "
          f"peaked at {ours['queue']['peak_bytes'] / 2**20:.0f} of {ours['queue']['limit_bytes'] / 2**20:.0f} MiB, "
          f"full {ours['queue']['full']} time(s)); "
          f"longest loop stall A {ours['stall_a']:.3f} s, B {ours['stall_b']:.3f} s; peers logged silent "
          f"{ours['silent']} time(s); committed {ours.get('committed', 0):,}, B's kernel holds {ours['in_kernel']:,}"
          + (f"; commit failed: {ours['commit_error']}" if "commit_error" in ours else "")
          + ("; B's CPU in the commit: user {0[0]:.2f} s, system {0[1]:.2f} s (A's meanwhile {0[2]:.2f} s)".format(
                ours["commit_cpu"])
             if "commit_cpu" in ours else ""))
    print("longest loop stall so far, A / B (s): after the load {0[0]:.3f} / {0[1]:.3f}; after the restart "
          "{1[0]:.3f} / {1[1]:.3f} (B's new life); after the commit {2[0]:.3f} / {2[1]:.3f}".format(
              ours["stalls_replicate"], ours["stalls_resync"], ours["stalls_commit"]))
    if theirs.get("error"):
        print(f"conntrackd: {theirs['error']}")
    print("ratio: conntrackd's figure over ctbridge's, how many times better ctbridge is")
    return 0


if __name__ == "__main__":
    sys.exit(main())

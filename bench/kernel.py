"""Kernel adapter benchmark: ctbridge's dump and commit against the C tools, measured in one run.

    python bench/kernel.py [--entries N] [--repeat R] [--no-conntrackd]

Builds fresh network namespaces, fills one with N established TCP flows through `conntrack -R`,
then times, best of R runs each:
  dump    ctbridge KernelTable.dump()       vs  conntrack -L (output to /dev/null)
  commit  ctbridge KernelTable.commit()     vs  conntrack -R (restore from a file)
                                            and conntrackd -c (external cache -> kernel), if it runs
and what an operator runs, the whole command with its output to /dev/null:
  listing ctbridge kernel dump [--json]     vs  conntrack -L [-o extended]
          ctbridge dump internal|external [--json], from two daemons holding the N flows
and prints rates and ratios against the goals (dump >= 0.8x conntrack -L, commit >= 2x conntrack -R,
listings >= 1x conntrack -L: text against `conntrack -L`, JSON against `conntrack -L -o extended`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ctbridge.conntrack.table import KernelTable
from ctbridge.lab import netns
from ctbridge.sync import wire
from ctbridge.sync.engine import Engine, EngineConfig


def save_lines(n: int) -> str:
    """N distinct established TCP flows in `conntrack -L -o save` format (what `conntrack -R` reads)."""
    lines = []
    for i in range(n):
        sport = 1024 + i % 60000
        host = i // 60000
        src = f"198.51.100.{1 + host % 250}"
        dst = f"203.0.113.{1 + host // 250 % 250}"
        lines.append(f"-A -t 3600 -u SEEN_REPLY,ASSURED -s {src} -d {dst} -r {dst} -q {src} -p tcp "
                     f"--sport {sport} --dport 443 --reply-port-src 443 --reply-port-dst {sport} --state ESTABLISHED")
    return "\n".join(lines) + "\n"


def best(repeat: int, run: Callable[[], float]) -> float:
    return min(run() for _ in range(repeat))


def _timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    """Seconds one command takes, its output to /dev/null. Waited for without a timeout (a timer
    kills it after 600 s instead): Popen.wait(timeout) polls every 50 ms and would round every
    measurement up to the next 50 ms."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            cwd=Path(__file__).resolve().parent.parent)
    killer = threading.Timer(600, proc.kill)
    killer.start()
    try:
        code = proc.wait()
    finally:
        killer.cancel()
    elapsed = time.perf_counter() - start
    if code != 0:
        raise subprocess.CalledProcessError(code, cmd)
    return elapsed


def timed_cmd(ns: str, *argv: str) -> float:
    return _timed(["ip", "netns", "exec", ns, *argv])


def timed_cli(ns: str | None, *argv: str) -> float:
    """The CLI as an operator runs it; with its bytecode cached, as an installed package has it
    (this machine may set PYTHONDONTWRITEBYTECODE)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    cmd = [sys.executable, "-m", "ctbridge", *argv]
    return _timed(["ip", "netns", "exec", ns, *cmd] if ns is not None else cmd, env)


def listings(n: int, repeat: int, save: Path) -> list[tuple[str, float, float]]:
    """(what, our seconds, the C tool's seconds) for the caches' listings, best of ``repeat``, from
    two daemons that replicated the n flows (loaded into A with conntrack -R); the C tool lists
    A's kernel table in the same namespaces, with the daemons running."""
    from tests.support.daemonlab import cluster  # the daemons as the tests run them
    rows = []
    with cluster(2, log={"level": "info"}) as c:
        a, b = c.nodes
        for node in (a, b):
            node.run("sysctl", "-qw", f"net.netfilter.nf_conntrack_max={max(262144, 2 * n)}", check=False)
        a.start()
        b.start()
        a.run("conntrack", "-R", str(save))
        deadline = time.monotonic() + 300
        while b.request("stats")["external"]["entries"] < n and time.monotonic() < deadline:
            time.sleep(0.2)
        assert b.request("stats")["external"]["entries"] == n, "B did not get every flow"
        # and the sync link quiet again (nothing left to send or resend), so that the daemons'
        # work does not weigh on what is measured
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            queues = a.request("stats")["queues"]
            if queues["pending"] == 0 and queues["resend"] <= 2 and queues["bulk"] == 0:
                break
            time.sleep(0.5)
        time.sleep(1)
        plain = best(repeat, lambda: timed_cmd(a.ns, "conntrack", "-L"))
        extended = best(repeat, lambda: timed_cmd(a.ns, "conntrack", "-L", "-o", "extended"))
        for label, argv in (
                ("dump internal", ("dump", "internal", "-c", str(a.config))),
                ("dump external", ("dump", "external", "-c", str(b.config)))):
            rows.append((f"ctbridge {label}", best(repeat, lambda argv=argv: timed_cli(None, *argv)), plain))
            rows.append((f"ctbridge {label} --json",
                         best(repeat, lambda argv=argv: timed_cli(None, *argv, "--json")), extended))
    return rows


def count(ns: str) -> int:
    with netns.inside(ns):
        table = KernelTable()
    with table:
        return table.count()


def sweeps(table: KernelTable, entries: list[Any], repeat: int) -> tuple[float, float]:
    """Seconds of one refresh sweep (the daemon's refresh_loop: the dump as messages, then
    Engine.kernel_refresh), best of ``repeat``: when nothing is due (what almost every sweep
    finds), and when every flow is (each one sent again)."""
    engine = Engine(EngineConfig(node_id=1), wire.Auth([bytes(32)]), epoch=1, now=0.0)
    engine.kernel_resync(entries, 0.0, announce=False)

    def sweep(now: float) -> float:
        start = time.perf_counter()
        messages = table.dump_messages()
        engine.kernel_refresh(messages, now, within=15.0)
        engine.internal_cache.drop_pending()
        return time.perf_counter() - start
    quiet = best(repeat, lambda: sweep(0.0))
    due = []
    for k in range(repeat):  # each at a later time: every flow is due again
        due.append(sweep(4000.0 * (k + 1)))
    return quiet, min(due)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-conntrackd", action="store_true", help="skip the conntrackd -c measurement")
    ap.add_argument("--no-listings", action="store_true", help="skip the CLI listings (they start two daemons)")
    args = ap.parse_args()
    n = args.entries
    if os.geteuid() != 0:
        print("bench/kernel.py: needs root (network namespaces); run `make bench` as root", file=sys.stderr)
        return 1
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        src = stack.enter_context(netns.namespace("bsrc"))
        dst = stack.enter_context(netns.namespace("bdst"))
        for ns in (src, dst):
            netns.run(ns, "sysctl", "-qw", f"net.netfilter.nf_conntrack_max={max(262144, 2 * n)}", check=False)
        save = Path(tmp, "flows.save")
        save.write_text(save_lines(n))

        def restore() -> float:
            netns.run(dst, "conntrack", "-F", check=False)
            return timed_cmd(dst, "conntrack", "-R", str(save))
        t_restore = best(args.repeat, restore)
        assert count(dst) == n, f"conntrack -R left {count(dst)} entries, expected {n}"
        netns.run(dst, "conntrack", "-F", check=False)
        timed_cmd(src, "conntrack", "-R", str(save))
        assert count(src) == n

        t_list = best(args.repeat, lambda: timed_cmd(src, "conntrack", "-L"))
        # what an operator types, against the same table, in the same namespace
        t_ext = best(args.repeat, lambda: timed_cmd(src, "conntrack", "-L", "-o", "extended"))
        kernel_listed = [] if args.no_listings else [
            ("ctbridge kernel dump", best(args.repeat, lambda: timed_cli(src, "kernel", "dump")), t_list),
            ("ctbridge kernel dump --json", best(args.repeat, lambda: timed_cli(src, "kernel", "dump", "--json")),
             t_ext)]
        with netns.inside(src):
            src_table = KernelTable()
        with netns.inside(dst):
            dst_table = KernelTable()
        entries = []

        def dump() -> float:
            nonlocal entries
            start = time.perf_counter()
            entries = src_table.dump()
            return time.perf_counter() - start
        t_dump = best(args.repeat, dump)
        assert len(entries) == n, f"dump returned {len(entries)} entries, expected {n}"
        t_sweep, t_sweep_all = sweeps(src_table, entries, args.repeat)

        def commit() -> float:
            dst_table.flush()
            result = dst_table.commit(entries)
            assert not result.failed and result.created == n, result.failed[:3]
            return result.seconds
        t_commit = best(args.repeat, commit)
        assert count(dst) == n
        src_table.close()
        dst_table.close()
        entries = []
        for ns in (src, dst):  # room for the listings' namespaces
            netns.run(ns, "conntrack", "-F", check=False)
        listed = kernel_listed + (listings(n, args.repeat, save) if not args.no_listings else [])

    rate = n / t_dump
    print(f"\nkernel adapter, {n:,} TCP entries, best of {args.repeat}")
    print(f"{'what':<34}{'seconds':>9}{'entries/s':>12}{'ratio':>9}  goal")
    print(f"{'dump:   conntrack -L (C)':<34}{t_list:>9.3f}{n / t_list:>12,.0f}{1.0:>8.2f}x")
    ratio = t_list / t_dump
    print(f"{'dump:   ctbridge':<34}{t_dump:>9.3f}{rate:>12,.0f}{ratio:>8.2f}x  >= 0.8x  "
          f"{'met' if ratio >= 0.8 else 'MISSED'}")
    for what, t in (("refresh sweep, nothing due", t_sweep), ("refresh sweep, every flow due", t_sweep_all)):
        print(f"{what:<34}{t:>9.3f}{n / t:>12,.0f}{t_list / t:>8.2f}x  "
              f"{100 * t / 7.5:.1f}% of a core at the default 7.5 s")
    print(f"{'commit: conntrack -R (C)':<34}{t_restore:>9.3f}{n / t_restore:>12,.0f}{1.0:>8.2f}x")
    cratio = t_restore / t_commit
    print(f"{'commit: ctbridge':<34}{t_commit:>9.3f}{n / t_commit:>12,.0f}{cratio:>8.2f}x  >= 2x  "
          f"{'met' if cratio >= 2 else 'MISSED'}")
    if not args.no_conntrackd:
        try:
            from bench.conntrackd_harness import measure_conntrackd
        except ImportError as exc:
            print(f"{'commit: conntrackd -c (C)':<34}  not measured: {exc}")
        else:
            res = measure_conntrackd(n, log=lambda *a: None)
            if res.get("ok"):
                t_cd = res["commit_seconds"]
                print(f"{'commit: conntrackd -c (C)':<34}{t_cd:>9.3f}{n / t_cd:>12,.0f}"
                      f"{t_restore / t_cd:>8.2f}x  (ctbridge is {t_cd / t_commit:.2f}x conntrackd)")
            else:
                print(f"{'commit: conntrackd -c (C)':<34}  not measured: {res.get('error')}")
    if listed:
        print("listings, the whole command, output to /dev/null (JSON against conntrack -L -o extended)")
        for what, ours, theirs in listed:
            tool = "conntrack -L -o extended" if what.endswith("--json") else "conntrack -L"
            ratio = theirs / ours
            print(f"{'list:   ' + what:<34}{ours:>9.3f}{n / ours:>12,.0f}{ratio:>8.2f}x  >= 1x  "
                  f"{'met' if ratio >= 1 else 'MISSED'}  ({tool}: {theirs:.3f} s)")
    print("ratio: rate relative to the conntrack CLI in the same group (higher is faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

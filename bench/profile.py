"""Where the daemons' CPU goes: two ctbridge daemons replicate a burst of N flows written into A's
kernel and then their deletion (a flush of A's table), once as they run and once each under
cProfile; each node's CPU per flow change (2N of them) is printed, split by module and by
function in the shares the profile found.

    python bench/profile.py [--entries 100000] [--top 25] [--save DIR]
    python bench/profile.py --churn RATE [--seconds 20] [--standing 50000]

With --churn, the load is tests/support/churn.py's sustained churn over standing flows (as
bench/churn.py runs it), and the CPU is counted from the churn's start to 5 s after its end.

The CPU (user + system, /proc/PID/stat) comes from the run without the profiler; cProfile slows
small Python calls several times, so its run gives only the shares, scaled to that CPU. The
shares are of the time the profile saw the daemon busy: waiting in epoll is left out, and what
the kernel spends in system calls is inside the calls that made them. docs/performance.md keeps
the breakdown.
"""

from __future__ import annotations

import argparse
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ctbridge.lab.process import wait_for
from tests.support.churn import generate
from tests.support.daemonlab import ROOT, Node, cluster

TIMEOUT = 120.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its threads (proc(5), /proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_parts(pid: int) -> dict[str, float]:
    """The same CPU split: user and system time (proc(5) fields 14 and 15), and the event loop's
    thread (the main thread) against the others (the event socket's reader, /proc/PID/task)."""
    tick = os.sysconf("SC_CLK_TCK")
    parts = {"user": 0.0, "system": 0.0, "loop thread": 0.0, "other threads": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # a thread that ended meanwhile
            continue
        user, system = int(fields[11]) / tick, int(fields[12]) / tick
        parts["user"] += user
        parts["system"] += system
        parts["loop thread" if task.name == str(pid) else "other threads"] += user + system
    return parts


def group(path: str) -> str:
    """A profile entry's file as the stage it belongs to: ctbridge's module, or the library."""
    if "/ctbridge/" in path:
        return "ctbridge/" + path.split("/ctbridge/", 1)[1]
    if path.startswith("~") or path == "<built-in>":
        return "built-in (C: hashing, struct, socket calls, dict and bytes operations)"
    if "/asyncio/" in path:
        return "asyncio (the event loop)"
    return "other Python: " + Path(path).name


# The loop's system calls on the sync link and the event socket, counted by perf(1) on the run
# without the profiler (its tracepoints: /sys/kernel/tracing/events/syscalls); epoll_wait is one
# turn of the event loop
SYSCALLS = ("sendto", "sendmmsg", "recvfrom", "recvmmsg", "epoll_wait")


class Syscalls:
    """``perf stat`` on a process from ``start`` to ``stop``: {syscall: count}, {} without perf."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.proc: subprocess.Popen[str] | None = None
        self.out = ""

    def start(self) -> None:
        if shutil.which("perf") is None:
            return
        events = ",".join(f"syscalls:sys_enter_{name}" for name in SYSCALLS)
        self.proc = subprocess.Popen(["perf", "stat", "-x", ",", "-e", events, "-p", str(self.pid)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def stop(self) -> dict[str, int]:
        if self.proc is None:
            return {}
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=30)
        counts = {}
        for line in err.splitlines():  # CSV: count,unit,event,...
            fields = line.split(",")
            if len(fields) > 2 and fields[2].startswith("syscalls:sys_enter_") and fields[0].isdigit():
                counts[fields[2].removeprefix("syscalls:sys_enter_")] = int(fields[0])
        return counts


def wakeups(pid: int) -> int:
    """How often the process's main thread (the event loop) went to sleep: proc(5), voluntary_ctxt_switches."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0


IDLE = {"<method 'poll' of 'select.epoll' objects>", "<method 'select' of 'select.epoll' objects>"}


def breakdown(profile: Path, cpu: float, flows: int, top: int) -> list[str]:
    """The profile's own times, without waiting in epoll, as shares of ``cpu`` per flow change."""
    stats = pstats.Stats(str(profile))
    by_group: dict[str, float] = defaultdict(float)
    total = 0.0
    rows = []
    for (path, line, name), (_cc, calls, tottime, _cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if name in IDLE:
            continue
        by_group[group(path)] += tottime
        total += tottime
        rows.append((tottime, calls, f"{group(path)}:{line}({name})"))
    scale = cpu / total / flows * 1e6  # profiled seconds -> µs of real CPU per flow change
    out = [f"  by module (µs of CPU per flow change, share of the busy time; profiled busy {total:.2f} s):"]
    for name, seconds in sorted(by_group.items(), key=lambda kv: -kv[1])[:14]:
        out.append(f"  {seconds * scale:8.2f} µs  {100 * seconds / total:5.1f}%  {name}")
    out.append(f"  top {top} functions by own time:")
    for tottime, calls, where in sorted(rows, reverse=True)[:top]:
        out.append(f"  {tottime * scale:8.2f} µs  {calls / flows:6.2f} calls per flow change  {where}")
    return out


def burst(a: Node, b: Node, mark: Callable[[], None], n: int) -> tuple[int, str]:
    """N flows written in a burst, then A's table flushed: (flow changes, what happened)."""
    begin = time.monotonic()
    load = a.run(sys.executable, str(ROOT / "bench" / "burst_load.py"), str(n))
    assert load.stdout.split()[0] == str(n), load.stdout + load.stderr
    wait_for(f"B to hold {n} flows", lambda: b.request("status")["external"]["entries"] >= n, timeout=TIMEOUT)
    created = time.monotonic() - begin
    a.run("conntrack", "-F")
    wait_for("B to hold none", lambda: b.request("status")["external"]["entries"] == 0, timeout=TIMEOUT)
    return 2 * n, (f"{n:,} flows written into A's kernel in a burst, in B's copy after {created:.2f} s; then "
                   f"A's table flushed, all gone from B after {time.monotonic() - begin:.2f} s")


def churn(a: Node, b: Node, mark: Callable[[], None], rate: int, seconds: float, standing: int) -> tuple[int, str]:
    """Sustained churn over standing flows (tests/support/churn.py), then 5 s for B to catch up;
    the CPU is counted from the churn's start (the standing flows' load is not the churn's)."""
    generate(a.ns, "load", str(standing), timeout=TIMEOUT)
    wait_for(f"B to hold {standing} flows", lambda: b.request("status")["external"]["entries"] >= standing,
             timeout=TIMEOUT)
    mark()
    done = generate(a.ns, "churn", "--rate", str(rate), "--seconds", str(seconds), "--first", str(standing),
                    timeout=seconds + TIMEOUT)
    time.sleep(5.0)
    return int(done["created"]) + int(done["deleted"]), (
        f"churn of {rate:,} flows/s for {seconds:.0f} s over {standing:,} standing flows (each deleted 2 s after "
        f"it was created): {done['created']:,} created, {done['deleted']:,} deleted; CPU counted from the "
        "churn's start to 5 s after it")


Scenario = Callable[[Node, Node, Callable[[], None]], tuple[int, str]]


Counts = dict[str, dict[str, int]]


def run(scenario: Scenario, profiles: dict[str, Path] | None) -> tuple[dict[str, float], Counts, int, str]:
    """One run in a fresh pair: (CPU seconds of each node, its system calls and wake-ups (without
    the profiler), flow changes, what happened)."""
    with cluster(2) as c:
        a, b = c.nodes
        for node in c.nodes:
            node.write_config(log={"level": "info"})
        for node in c.nodes:  # under cProfile, its profile written when SIGTERM ends it
            node.start(("-m", "cProfile", "-o", str(profiles[node.name])) if profiles else ())
        procs = {node.name: node.proc for node in c.nodes if node.proc is not None}
        before: dict[str, float] = {}
        split: dict[str, dict[str, float]] = {}
        woken: dict[str, int] = {}
        sent: dict[str, dict[str, int]] = {}
        perf = {name: Syscalls(p.pid) for name, p in procs.items()}

        def mark() -> None:  # CPU is counted from here
            before.update((name, cpu_seconds(p.pid)) for name, p in procs.items())
            split.update((name, cpu_parts(p.pid)) for name, p in procs.items())
            woken.update((name, wakeups(p.pid)) for name, p in procs.items())
            sent.update((node.name, node.request("stats")["sync"]) for node in c.nodes)
            if not profiles:
                for counter in perf.values():
                    counter.stop()
                    counter.start()
        mark()
        changes, said = scenario(a, b, mark)
        cpu = {name: cpu_seconds(p.pid) - before[name] for name, p in procs.items()}
        for name, p in procs.items():  # (a thread that ended meanwhile leaves its share out)
            cpu.update({f"{name} {k}": v - split[name][k] for k, v in cpu_parts(p.pid).items()})
        counts = {name: {**perf[name].stop(), "wake-ups": wakeups(p.pid) - woken[name]} for name, p in procs.items()}
        for node in c.nodes:  # the engine's own figures: datagrams sent, and how full
            now = node.request("stats")["sync"]
            datagrams = now["tx_datagrams"] - sent[node.name]["tx_datagrams"]
            counts[node.name]["datagrams sent"] = datagrams
            counts[node.name]["bytes sent"] = now["tx_bytes"] - sent[node.name]["tx_bytes"]
        for node in c.nodes:
            node.stop()
        return cpu, counts, changes, said


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--save", type=Path, help="keep the two profiles (A.prof, B.prof) in this folder")
    ap.add_argument("--churn", type=int, default=0, metavar="RATE",
                    help="instead of a burst: churn of RATE flows/s over --standing flows (tests/support/churn.py)")
    ap.add_argument("--seconds", type=float, default=20.0, help="how long the churn runs")
    ap.add_argument("--standing", type=int, default=50_000, help="flows in the table before the churn")
    ap.add_argument("--no-profile", action="store_true",
                    help="only the run without the profiler: CPU, its split, system calls")
    args = ap.parse_args()
    scenario: Scenario
    if args.churn:
        def scenario(a: Node, b: Node, mark: Callable[[], None]) -> tuple[int, str]:
            return churn(a, b, mark, args.churn, args.seconds, args.standing)
    else:
        def scenario(a: Node, b: Node, mark: Callable[[], None]) -> tuple[int, str]:
            return burst(a, b, mark, args.entries)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    with tempfile.TemporaryDirectory(prefix="ctb-prof-") as tmp:
        folder = args.save or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        profiles = {"fw1": folder / "A.prof", "fw2": folder / "B.prof"}
        cpu, counts, changes, said = run(scenario, None)
        if not args.no_profile:
            run(scenario, profiles)
        print(f"\nprofile: {said}: {changes:,} flow changes")
        for name, role in (("fw1", "A, the sender (kernel events -> datagrams)"),
                           ("fw2", "B, the receiver (datagrams -> its copy)")):
            print(f"\n{role}: CPU {cpu[name]:.2f} s = {cpu[name] / changes * 1e6:.1f} µs per flow change")
            print("  of which " + ", ".join(f"{part} {cpu[f'{name} {part}'] / changes * 1e6:.1f}" for part in
                                            ("user", "system", "loop thread", "other threads")) + " µs")
            figures = dict(counts[name])
            size = figures.pop("bytes sent") / max(1, figures["datagrams sent"])
            print("  per 1,000 flow changes, without the profiler: " + ", ".join(
                f"{n * 1000 / changes:.1f} {what}" for what, n in figures.items()) + f"; {size:.0f} bytes per datagram")
            if not args.no_profile:
                print("\n".join(breakdown(profiles[name], cpu[name], changes, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

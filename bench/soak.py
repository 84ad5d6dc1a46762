"""The soak at full size, ctbridge and then conntrackd in the same lab.

    python bench/soak.py [--tcp 1000] [--udp 100] [--background 100000] [--no-conntrackd]

Ten events in a row (ctbridge/lab/soak.py: keepalived stopped and SIGKILLed, the LAN link down,
the replicator SIGKILLed on the master, both replicators restarted, a maintenance drain, and the
way back after each), with TCP and UDP flows and background entries in the master's table. After
each event: TCP connections alive, UDP flows, packets the strict policy dropped, UDP flows NATed
anew, and whether the master's kernel holds the same NAT bindings as the one before. Then the
totals of both replicators side by side.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ctbridge.lab import Options, lab, soak


def run(replicator: object | None, options: Options, background: int, **timeouts: float) -> list[soak.Row]:
    """The soak with one replicator; the events that ran, if one of them failed (said, not raised)."""
    name = getattr(replicator, "name", "ctbridge")
    print(f"\n{name}: {options.tcp} TCP and {options.udp} UDP flows, {background:,} background entries", flush=True)
    rows: list[soak.Row] = []
    try:
        with lab(options, replicator) as the_lab:  # type: ignore[arg-type]
            the_lab.start()
            soak.load_background(the_lab, background)
            print(soak.HEAD, flush=True)
            soak.run(the_lab, background, log=lambda text: print(text, flush=True), rows=rows, **timeouts)
            the_lab.stop()
    except (TimeoutError, OSError, RuntimeError) as exc:
        print(f"{name}: stopped after {len(rows)} of {len(soak.SEQUENCE)} events: {exc}", flush=True)
    return rows


def totals(rows: list[soak.Row], tcp: int, udp: int) -> dict[str, float]:
    return {"events run": len(rows), "events passed": sum(r.ok(tcp, udp) for r in rows),
            "TCP connections lost": sum(tcp - r.tcp_alive for r in rows),
            "policy drops": sum(r.policy_drops for r in rows),
            "UDP flows NATed anew": sum(r.renat for r in rows),
            "kernel differed": sum(not r.same_bindings for r in rows),
            "recovery, worst (s)": max((r.recovered or 99.0) for r in rows)}


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM tears the lab down as Ctrl-C does (namespaces, processes)


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupted)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tcp", type=int, default=1000)
    ap.add_argument("--udp", type=int, default=100)
    ap.add_argument("--background", type=int, default=100_000)
    ap.add_argument("--no-conntrackd", action="store_true")
    args = ap.parse_args()
    options = Options(tcp=args.tcp, udp=args.udp, ipv6=True)
    ours = totals(run(None, options, args.background), args.tcp, args.udp)
    theirs: dict[str, float] | None = None
    if not args.no_conntrackd:
        from bench.lab import ConntrackdReplicator
        # shorter waits: a replicator that fails an event is not waited for as long
        theirs = totals(run(ConntrackdReplicator(), options, args.background, recover_timeout=20.0,
                            sync_timeout=60.0), args.tcp, args.udp)
    print(f"\nsoak totals over {len(soak.SEQUENCE)} events{'':<6}{'ctbridge':>10}{'conntrackd':>12}")
    for key, mine in ours.items():
        other = f"{theirs[key]:>12g}" if theirs else f"{'n/a':>12}"
        print(f"{key:<36}{mine:>10g}{other}")
    return 0 if ours["events passed"] == len(soak.SEQUENCE) else 1


if __name__ == "__main__":
    sys.exit(main())

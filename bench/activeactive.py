"""Active-active in the lab: what the defer costs and what it saves, and each firewall failing
in turn (ctbridge.lab.activeactive; tests/lab/test_activeactive.py is its CI-sized run).

    python bench/activeactive.py [--rate 200] [--seconds 20] [--no-failures]

Three labs, each fresh, each with 100 long-lived TCP connections, 20 UDP flows and RATE new
connections a second (a UDP question from a new socket with every fifth):

1. **one firewall forwards** (the reference): the rendered active-active configuration with the
   defer off, fw2's keepalived stopped, so fw1 holds both VIPs and sees every packet;
2. **both forward, with the defer**: fw1 holds the LAN VIP and fw2 the WAN VIP, so every
   connection's replies come back through the firewall that did not see its SYN;
3. **both forward, without the defer** (the control).

Printed for each, over SECONDS of traffic: the new connections' connect time (SYN sent to
SYN-ACK received: p50, p99, max), those slowed by a retransmission, the UDP questions lost,
the packets each firewall's strict ruleset dropped, and the CPU of both daemons per new
connection (and as a ratio to the reference). Then, on lab 2, the failures of
ctbridge.lab.activeactive.FAILURES, one row each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ctbridge.lab import Lab, Options, lab
from ctbridge.lab import activeactive as aa
from ctbridge.lab.topology import LAN_VIP, WAN_VIP


def cpu(the_lab: Lab) -> float:
    total = 0.0
    for fw in the_lab.fws:
        if fw.daemon is not None:
            t = psutil.Process(fw.daemon.proc.pid).cpu_times()
            total += t.user + t.system
    return total


def phase(the_lab: Lab, seconds: float) -> dict[str, Any]:
    the_lab.forget_connect_times()
    before = cpu(the_lab)
    step = aa.steady(the_lab, seconds)
    used = cpu(the_lab) - before
    new = step.counts["new_tcp_ok"] + step.counts["new_tcp_failed"]
    return {"step": step, "connect": the_lab.status().get("new_connect") or {},
            "cpu_us": used / max(1, new) * 1e6}


def measure(name: str, options: Options, seconds: float, symmetric: bool = False,
        failures: bool = False) -> tuple[dict[str, Any], list[aa.Step]]:
    with lab(options) as the_lab:
        the_lab.start()
        if symmetric:
            fw1, fw2 = the_lab.fws
            fw2.stop_keepalived()
            the_lab.wait_layout({LAN_VIP: fw1, WAN_VIP: fw1})
            time.sleep(3)  # connections opened before fw1 held both VIPs are done
        result = phase(the_lab, seconds)
        result["name"] = name
        steps = aa.failures(the_lab) if failures else []
        return result, steps


def row(r: dict[str, Any], reference: dict[str, Any]) -> str:
    c, s = r["connect"], r["step"]
    ms = "/".join(f"{c.get(k, 0) * 1000:.1f}" for k in ("p50", "p99", "max"))
    ratio = r["cpu_us"] / reference["cpu_us"] if reference["cpu_us"] else 0.0
    return (f"| {r['name']} | {s.counts['new_tcp_ok']} | {ms} ms | {s.counts['new_slow']} | "
            f"{s.counts['new_udp_ok']} / {s.counts['new_udp_lost']} | {s.drops['fw1']} / {s.drops['fw2']} | "
            f"{r['cpu_us']:,.0f} µs ({ratio:.2f}x) |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=200.0, help="new connections a second")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds of traffic measured per lab")
    p.add_argument("--no-failures", action="store_true", help="skip the failures on lab 2")
    args = p.parse_args()
    base = {"active_active": True, "tcp": 100, "udp": 20, "new": args.rate}
    reference, _ = measure("one firewall forwards, no defer", Options(**base, defer=False), args.seconds,
                       symmetric=True)
    deferred, steps = measure("both forward, defer", Options(**base), args.seconds, failures=not args.no_failures)
    control, _ = measure("both forward, no defer (control)", Options(**base, defer=False), args.seconds)
    print(f"\n{args.rate:.0f} new connections/s, {args.seconds:.0f} s each; CPU: both daemons, per new connection\n")
    print("| lab | new connections | connect p50/p99/max | slowed (retransmission) | UDP questions ok / lost | "
          "drops fw1 / fw2 | CPU per connection |")
    print("|---|---|---|---|---|---|---|")
    for r in (reference, deferred, control):
        print(row(r, reference))
    if steps:
        print()
        print("\n".join(aa.table(steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

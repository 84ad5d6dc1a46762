"""Active-active in the lab (Options.active_active): each firewall failing in turn while both
forward, measured the same way for tests/lab/test_activeactive.py and bench/activeactive.py.

Before the first failure fw1 holds the LAN VIP and fw2 the WAN VIP, so every connection's
packets leave through fw1 and its replies come back through fw2. Each step is a failure (or its
repair) on one firewall, and the layout the VIPs must reach; a Step records how long that took,
how long until every long-lived flow moved data again, and what the client and the firewalls
counted meanwhile.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctbridge.config import settings
from ctbridge.lab.firewall import Firewall
from ctbridge.lab.network import Lab
from ctbridge.lab.scenario import TRIGGERS
from ctbridge.lab.topology import LAN_VIP, WAN_VIP

# trigger, on which firewall (index), who then holds (the LAN VIP, the WAN VIP)
FAILURES = (
    ("keepalived stopped", 0, (1, 1)), ("keepalived started", 0, (0, 1)),
    ("keepalived stopped", 1, (0, 0)), ("keepalived started", 1, (0, 1)),
    # killed and restarted at once, as systemd does: the VIPs stay, or move to the other node
    # until both hold each other's flows again and come back
    ("ctbridge killed", 0, (0, 1)), ("ctbridge killed", 1, (0, 1)),
    ("ctbridge killed, down", 0, (1, 1)), ("ctbridge started", 0, (0, 1)),
    ("ctbridge killed, down", 1, (0, 0)), ("ctbridge started", 1, (0, 1)),
    ("LAN link down", 0, (1, 1)), ("LAN link up", 0, (0, 1)),
    ("WAN link down", 1, (0, 0)), ("WAN link up", 1, (0, 1)),
)
STABLE = 2.0  # seconds a step's layout must hold before it counts as reached (a VIP may move and come back)
# the client's counters a Step reports as differences
COUNTS = ("tcp_failed", "udp_rebound", "new_tcp_ok", "new_tcp_failed", "new_slow", "new_udp_ok", "new_udp_lost")

def _kill(lab: Lab, fw: Firewall, restart: bool) -> None:
    """The daemon dies (SIGKILL: no clean stop); the rendered unit's ExecStopPost writes the
    interlock's demotion into the track file, as done here, and systemd's Restart= starts it
    again (``restart``) or the operator does later ("ctbridge started")."""
    lab.replicator.stop(fw, signal.SIGKILL)
    cfg = settings.load(str(fw.dir / "ctbridge.toml"))
    Path(cfg.keepalived.track_file).write_text(f"{cfg.keepalived.incomplete_value}\n")
    if restart:
        lab.replicator.start(fw)


EXTRA_TRIGGERS = {
    "ctbridge killed": lambda lab, fw: _kill(lab, fw, restart=True),
    "ctbridge killed, down": lambda lab, fw: _kill(lab, fw, restart=False),
    "ctbridge started": lambda lab, fw: lab.replicator.start(fw),
    "WAN link down": lambda lab, fw: fw.link("wan0", up=False),
    "WAN link up": lambda lab, fw: fw.link("wan0", up=True),
}


@dataclass
class Step:
    how: str
    on: str
    layout: str  # who holds the LAN VIP / the WAN VIP afterwards
    took: float  # seconds from the trigger until that layout (first reached; the step ends once it held STABLE s)
    recovered: float | None  # seconds from the trigger until every long-lived flow moved data; None: never
    counts: dict[str, int]  # the client's counters (COUNTS) during the step
    drops: dict[str, int]  # forwarded packets each firewall's ruleset dropped during the step
    alive: int  # long-lived TCP connections alive at the end of the step


def counts(lab: Lab) -> dict[str, int]:
    status = lab.status()
    return {k: int(status.get(k) or 0) for k in COUNTS}


def drops(lab: Lab) -> dict[str, int]:
    return {fw.name: fw.drops()["policy"] for fw in lab.fws}


def _measured(lab: Lab, before: tuple[dict[str, int], dict[str, int]], how: str, on: str, layout: str,
              took: float, recovered: float | None) -> Step:
    """A Step: the client's counters and the firewalls' drops since ``before`` (counts, drops)."""
    after, dropped = counts(lab), drops(lab)
    return Step(how=how, on=on, layout=layout, took=took, recovered=recovered,
                counts={k: after[k] - before[0][k] for k in COUNTS},
                drops={k: dropped[k] - before[1][k] for k in dropped}, alive=int(lab.status()["tcp_alive"]))


def step(lab: Lab, how: str, on: Firewall, want: tuple[Firewall, Firewall], timeout: float = 60.0) -> Step:
    before = counts(lab), drops(lab)
    start = time.monotonic()
    (EXTRA_TRIGGERS.get(how) or TRIGGERS[how])(lab, on)
    layout = {LAN_VIP: want[0], WAN_VIP: want[1]}
    took = lab.wait_layout(layout, timeout=timeout) - start
    recovered: float | None
    try:
        lab.wait_recovered(start, timeout=timeout)
        recovered = time.monotonic() - start
    except TimeoutError:
        recovered = None
    lab.wait_layout(layout, timeout=timeout, stable=STABLE)  # settled: not moving again
    time.sleep(1.0)  # new connections opened just now finish (or are retransmitted) within the step
    return _measured(lab, before, how, on.name, f"{want[0].name} / {want[1].name}", took, recovered)


def steady(lab: Lab, seconds: float) -> Step:
    """No failure: ``seconds`` of traffic as it is."""
    before = counts(lab), drops(lab)
    time.sleep(seconds)
    layout = " / ".join(fw.name if fw else "?" for fw in lab.layout().values())
    return _measured(lab, before, f"{seconds:.0f} s, no failure", "-", layout, 0.0, 0.0)


def failures(lab: Lab, which: tuple[tuple[str, int, tuple[int, int]], ...] = FAILURES) -> list[Step]:
    fws = lab.fws
    return [step(lab, how, fws[on], (fws[want[0]], fws[want[1]])) for how, on, want in which]


def table(steps: list[Step]) -> list[str]:
    head = (f"{'what happened':<24} {'on':>3} {'LAN / WAN':>9} {'took':>6} {'moving':>7} {'alive':>5} "
            f"{'new TCP ok/failed/slow':>22} {'new UDP ok/lost':>15} {'NATed anew':>10} {'drops fw1/fw2':>13}")
    rows = [head, "-" * len(head)]
    for s in steps:
        c = s.counts
        rows.append(f"{s.how:<24} {s.on:>3} {s.layout:>9} {s.took:>5.1f}s "
                    f"{(f'{s.recovered:.1f}s' if s.recovered is not None else 'never'):>7} {s.alive:>5} "
                    f"{c['new_tcp_ok']:>10} / {c['new_tcp_failed']} / {c['new_slow']:<4} "
                    f"{c['new_udp_ok']:>9} / {c['new_udp_lost']:<3} {c['udp_rebound']:>10} "
                    f"{' / '.join(str(v) for v in s.drops.values()):>13}")
    return rows


def summary(steps: list[Step]) -> dict[str, Any]:
    return {k: sum(s.counts[k] for s in steps) for k in COUNTS}

"""Failovers in the lab, measured the same way for `make demo`, the end-to-end tests and bench/lab.py."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ctbridge.lab.firewall import Firewall
from ctbridge.lab.network import Lab
from ctbridge.lab.topology import LAN_VIP, LAN_VIP6, WAN_VIP, WAN_VIP6


@dataclass
class Switch:
    """One change of master and what the flows saw."""

    how: str
    old: str
    new: str
    replicated: int | None  # flows the new master held for its peer when it was triggered
    to_master: float  # seconds from the trigger until the new master alone held the VIPs
    to_committed: float | None  # keepalived's MASTER notification until the new master's kernel had the flows
    recovered: float | None  # seconds from the new master until every flow moved data again; None: never
    dropped: int  # forwarded packets the firewalls dropped meanwhile (ruleset and commit gate)
    flows_before: dict[str, int]  # the client's flows in the old master's kernel (conntrack CLI)
    flows_after: dict[str, int]  # the same in the new master's kernel, once recovered or given up
    tcp_moving: int = 0  # TCP connections moving data when the switch was over (recovered or given up)
    udp_renat: int = 0  # UDP flows NATed anew (to another port) by this switch
    status: dict[str, Any] = field(repr=False, default_factory=dict)


# The failovers `make demo` and bench/lab.py go through: trigger, on which firewall (index), who
# becomes master.
FAILOVERS = (
    ("keepalived stopped", 0, 1),
    ("keepalived started", 0, 0),
    ("LAN link down", 0, 1),
    ("LAN link up", 0, 0),
)

def _kill_keepalived(lab: Lab, fw: Firewall) -> None:
    """keepalived dies (SIGKILL) and cannot take its VIPs down: they are removed as its restart
    would (keepalived deletes the addresses of its instances when it starts as BACKUP)."""
    fw.stop_keepalived(signal.SIGKILL)
    for vip, dev in ((f"{LAN_VIP}/24", "lan0"), (f"{WAN_VIP}/24", "wan0"), (f"{LAN_VIP6}/64", "lan0"),
                     (f"{WAN_VIP6}/64", "wan0")):
        fw.run("ip", "addr", "del", vip, "dev", dev, check=False)


def _kill_ctbridge(lab: Lab, fw: Firewall) -> None:
    """ctbridge dies (SIGKILL: no clean stop) and is started again, as systemd's Restart= does."""
    lab.replicator.stop(fw, signal.SIGKILL)
    lab.replicator.start(fw)


def _restart_daemons(lab: Lab, fw: Firewall) -> None:
    """Every daemon stopped, then started again: what upgrading the package on both nodes does."""
    for each in lab.fws:
        lab.replicator.stop(each)
    for each in lab.fws:
        lab.replicator.start(each)


TRIGGERS: dict[str, Callable[[Lab, Firewall], None]] = {
    "keepalived stopped": lambda lab, fw: fw.stop_keepalived(),
    "keepalived started": lambda lab, fw: fw.start_keepalived(),
    "LAN link down": lambda lab, fw: fw.link("lan0", up=False),
    "LAN link up": lambda lab, fw: fw.link("lan0", up=True),
    "maintenance on": lambda lab, fw: fw.maintenance(True),
    "maintenance off": lambda lab, fw: fw.maintenance(False),
    "keepalived killed": _kill_keepalived,
    "ctbridge killed": _kill_ctbridge,
    "daemons restarted": _restart_daemons,
}


def switch(lab: Lab, how: str, on: Firewall, new: Firewall, recover_timeout: float = 30.0,
           wait_recovery: bool = True) -> Switch:
    """Apply trigger ``how`` to firewall ``on`` and follow the change of master to ``new``."""
    old = lab.master()
    before = old.lab_flows() if old is not None else {}
    replicated = lab.replicator.replicated(new)
    dropped = sum(fw.dropped() for fw in lab.fws)
    hooks_before = len(new.hook_times())
    rebound_before = lab.status().get("udp_rebound", 0)
    start = time.monotonic()
    wall = time.time()
    TRIGGERS[how](lab, on)
    became = lab.wait_master(new)
    recovered: float | None = None
    status: dict[str, Any] = {}
    if wait_recovery:
        try:
            status = lab.wait_recovered(became, timeout=recover_timeout)
            recovered = time.monotonic() - became
        except TimeoutError:
            status = lab.status()
    else:
        status = lab.status()
    committed = lab.replicator.master_seconds(new, wall)
    deadline = time.monotonic() + 10  # flows can move before the hook returns (inject mode, old entries)
    while committed is None and time.monotonic() < deadline:
        for record in new.hook_times()[hooks_before:]:  # hook mode: the notify script's start to end
            if record["state"] == "MASTER":
                committed = record["end"] - record["start"]
        if committed is None:
            time.sleep(0.05)
            committed = lab.replicator.master_seconds(new, wall)
    return Switch(how=how, old=old.name if old else "-", new=new.name, replicated=replicated,
                  to_master=became - start, to_committed=committed, recovered=recovered,
                  dropped=sum(fw.dropped() for fw in lab.fws) - dropped, flows_before=before,
                  flows_after=new.lab_flows(), status=status, tcp_moving=int(status.get("tcp_recent", 0)),
                  udp_renat=int(status.get("udp_rebound", 0)) - rebound_before)


def table(switches: list[Switch]) -> list[str]:
    """The summary `make demo` prints: one row per change of master."""
    head = (f"{'what happened':<20} {'from':>4} {'to':>4} {'flows before':>13} {'replicated':>10} "
            f"{'to master':>9} {'committed':>10} {'recovered':>9} {'dropped':>7} {'flows after':>12}")
    rows = [head, "-" * len(head)]
    for s in switches:
        flows_b = f"{s.flows_before.get('tcp', 0)}+{s.flows_before.get('udp', 0)}"
        flows_a = f"{s.flows_after.get('tcp', 0)}+{s.flows_after.get('udp', 0)}"
        rows.append(f"{s.how:<20} {s.old:>4} {s.new:>4} {flows_b:>13} "
                    f"{s.replicated if s.replicated is not None else '-':>10} {s.to_master:>8.2f}s "
                    f"{_ms(s.to_committed):>10} {_secs(s.recovered, 'never'):>9} {s.dropped:>7} {flows_a:>12}")
    return rows


def _ms(value: float | None) -> str:
    return f"{value * 1000:.0f} ms" if value is not None else "-"


def _secs(value: float | None, none: str = "-") -> str:
    return f"{value:.2f}s" if value is not None else none

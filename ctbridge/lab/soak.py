"""A soak: events of every kind in a row under traffic, each checked the same way.
Used by bench/soak.py (1,000 TCP and 100 UDP flows, 100,000 background entries) and,
smaller, by tests/lab/test_soak.py.

After every event: every flow moved data again, none failed or was NATed anew, neither
firewall's strict policy dropped a packet, and the master's kernel holds exactly the NAT
bindings of the lab's flows that the master before it held.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from ctbridge.lab import netns
from ctbridge.lab.firewall import Firewall
from ctbridge.lab.network import Lab
from ctbridge.lab.process import wait_for
from ctbridge.lab.scenario import Switch, switch
from ctbridge.lab.topology import SERVER, SERVER6

# (event, on firewall index, who is master after it): ten in a row, every kind, each failover
# followed by the way back; a daemon killed or restarted must move nothing
SEQUENCE = (
    ("keepalived stopped", 0, 1),
    ("keepalived started", 0, 0),
    ("keepalived killed", 0, 1),
    ("keepalived started", 0, 0),
    ("LAN link down", 0, 1),
    ("LAN link up", 0, 0),
    ("ctbridge killed", 0, 0),
    ("daemons restarted", 0, 0),
    ("maintenance on", 0, 1),
    ("maintenance off", 0, 0),
)


@dataclass
class Row:
    event: str
    old: str
    new: str
    to_master: float
    recovered: float | None
    tcp_alive: int
    udp: int
    policy_drops: int
    renat: int
    same_bindings: bool
    switch: Switch
    drops_by_rule: str = ""  # which of the ruleset's drop rules counted them, on which firewall

    def ok(self, tcp: int, udp: int) -> bool:
        return (self.recovered is not None and self.tcp_alive == tcp and self.udp == udp and self.policy_drops == 0
                and self.renat == 0 and self.same_bindings)


def bindings(fw: Firewall) -> set[tuple[str, str, str, str]]:
    """The lab's flows in ``fw``'s kernel as (family, protocol, client port, NAT port): what a
    failover must carry over unchanged (the conntrack CLI as the witness)."""
    out = set()
    servers = [("ipv4", SERVER)] + ([("ipv6", SERVER6)] if fw.options.ipv6 else [])
    for family, server in servers:
        for proto, port in (("tcp", "5001"), ("udp", "5002")):
            res = fw.run("conntrack", "-L", "-f", family, "-p", proto, "--orig-dst", server, "--dport", port,
                         check=False)
            for text in res.stdout.splitlines():
                ports = [f.split("=", 1)[1] for f in text.split() if f.startswith(("sport=", "dport="))]
                if len(ports) == 4:  # original sport, dport; reply sport, dport (the NAT binding's port)
                    out.add((family, proto, ports[0], ports[3]))
    return out


def background_lines(n: int) -> str:
    """N established TCP flows that are no lab traffic, as `conntrack -R` reads them (sources from
    198.51.100.10 on: the sync link's addresses below it are never replicated)."""
    lines = []
    for i in range(n):
        src, dst = f"198.51.100.{10 + i // 50000 % 240}", "203.0.113.250"
        sport = 1024 + i % 50000
        lines.append(f"-A -t 3600 -u SEEN_REPLY,ASSURED -s {src} -d {dst} -r {dst} -q {src} -p tcp "
                     f"--sport {sport} --dport 443 --reply-port-src 443 --reply-port-dst {sport} --state ESTABLISHED")
    return "\n".join(lines) + "\n"


def load_background(lab: Lab, n: int) -> None:
    """``n`` background entries in the master's table (conntrack -R), replicated like any flow:
    every commit of the soak writes them, and the lab's flows wait behind them."""
    netns.run(lab.fws[0].ns, "conntrack", "-R", "/dev/stdin", input=background_lines(n))


def replicated(lab: Lab, fw: Firewall, want: int) -> bool:
    return (lab.replicator.replicated(fw) or 0) >= want


def run(lab: Lab, background: int = 0, sequence: tuple[tuple[str, int, int], ...] = SEQUENCE,
        log: Callable[[str], None] = print, recover_timeout: float = 60.0, sync_timeout: float = 120.0,
        rows: list[Row] | None = None) -> list[Row]:
    """Go through ``sequence``, each event once the flows recovered from the one before and the
    standby holds every flow again (whichever replicator the lab runs). ``rows``: filled as the
    events go, so what ran is kept if one of them raises."""
    rows = [] if rows is None else rows
    fws = lab.fws
    want = background + lab.options.tcp + lab.options.udp
    wait_for(f"{fws[1].name} to hold every flow", lambda: replicated(lab, fws[1], want), timeout=sync_timeout)
    for how, on, to in sequence:
        old = lab.master() or fws[0]
        before = bindings(old)
        drops = [fw.drops() for fw in fws]
        s = switch(lab, how, fws[on], fws[to], recover_timeout=recover_timeout)
        new = fws[to]
        same = False
        for _ in range(50):  # bounded: 10 s for the last entries to land (a commit's tail)
            if bindings(new) == before:
                same = True
                break
            time.sleep(0.2)
        after = [fw.drops() for fw in fws]
        detail = ", ".join(f"{fw.name} {name} {a[name] - d.get(name, 0)}"
                           for fw, a, d in zip(fws, after, drops, strict=True)
                           for name in sorted(a) if name.startswith("dropped") and a[name] > d.get(name, 0))
        row = Row(how, s.old, s.new, s.to_master, s.recovered, int(s.status.get("tcp_alive", 0)),
                  s.flows_after.get("udp", 0),
                  sum(a["policy"] - d["policy"] for a, d in zip(after, drops, strict=True)),
                  s.udp_renat, same, s, detail)
        rows.append(row)
        log(line(row))
        standby = fws[1 - to]
        if standby.daemon is not None:  # the next event may be a failover to it
            with contextlib.suppress(TimeoutError):  # a replicator that never catches up fails the next row
                wait_for(f"{standby.name} to hold every flow again",
                         lambda: replicated(lab, standby, want), timeout=sync_timeout)  # noqa: B023
    return rows


HEAD = (f"{'event':<20} {'from':>4} {'to':>4} {'to master':>9} {'recovered':>9} {'TCP alive':>9} {'UDP':>4} "
        f"{'policy drops':>12} {'re-NATed':>8} {'same NAT':>8}")


def line(r: Row) -> str:
    rec = f"{r.recovered:.2f}s" if r.recovered is not None else "never"
    return (f"{r.event:<20} {r.old:>4} {r.new:>4} {r.to_master:>8.2f}s {rec:>9} {r.tcp_alive:>9} {r.udp:>4} "
            f"{r.policy_drops:>12} {r.renat:>8} {'yes' if r.same_bindings else 'NO':>8}"
            + (f"  ({r.drops_by_rule})" if r.drops_by_rule else ""))


def table(rows: list[Row]) -> list[str]:
    return [HEAD, "-" * len(HEAD), *(line(r) for r in rows)]

"""Active-active in the lab (ctbridge.lab.activeactive): both firewalls forward, fw1 holding the
LAN VIP and fw2 the WAN VIP, so every connection leaves through fw1 and its replies come back
through fw2. Real keepalived with the rendered two instances of opposite masters, the lab's
strict ruleset with source NAT from each firewall's own share of the ports (ctbridge-nat.nft),
the rendered defer. The client keeps 100 TCP connections and 20 UDP flows checked byte for byte
and opens 100 new connections a second (a UDP question with every fifth).

- No failure: no packet dropped on either firewall, no new connection slowed by a retransmission.
- Each firewall fails in turn (keepalived stopped, daemon killed and left down, link down) and is
  repaired: the other carries every flow; none fails, none is NATed anew, every new connection
  completes (those opened during a failure's detection may need a retransmission).
- The control, the same lab with the defer off: the strict ruleset drops the replies that beat
  the replication, and new connections wait for retransmissions."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest

from ctbridge.lab import Lab, Options, lab
from ctbridge.lab import activeactive as aa
from tests.conftest import require

pytestmark = [pytest.mark.root, pytest.mark.lab]

TCP, UDP, NEW = 100, 20, 100.0


@contextlib.contextmanager
def started(defer: bool) -> Iterator[Lab]:
    require("keepalived")
    require("iptables", "iptables (the NFQUEUE target)")
    with lab(Options(active_active=True, defer=defer, tcp=TCP, udp=UDP, new=NEW)) as the_lab:
        the_lab.start()
        yield the_lab


def test_both_firewalls_forward_and_each_fails_in_turn_without_losing_a_flow() -> None:
    with started(defer=True) as the_lab:
        quiet = aa.steady(the_lab, 10)
        print("\n".join(aa.table([quiet])))
        assert quiet.layout == "fw1 / fw2"
        assert quiet.drops == {"fw1": 0, "fw2": 0}, quiet
        assert quiet.counts["new_tcp_ok"] > 0 and quiet.counts["new_udp_ok"] > 0, quiet
        assert (quiet.counts["new_tcp_failed"], quiet.counts["new_slow"], quiet.counts["new_udp_lost"]) == (0, 0, 0)
        steps = aa.failures(the_lab)
        print("\n".join(aa.table(steps)))
        for s in steps:
            assert s.recovered is not None, f"{s.how} on {s.on}: the long-lived flows did not all move again"
            assert s.alive == TCP, s
        total = aa.summary(steps)
        assert total["tcp_failed"] == 0 and total["udp_rebound"] == 0, total  # none failed, none NATed anew
        status = the_lab.status()
        assert status["tcp_alive"] == TCP and status["udp_flows"] == UDP
        # keepalived's failures (before any daemon was down) cost new connections nothing worse
        # than a retransmission
        before_outages = [s for s in steps if s.how.startswith("keepalived")]
        assert len(before_outages) == 4 and all(s.counts["new_tcp_failed"] == 0 for s in before_outages)
        time.sleep(2)
        status = the_lab.stop()
        assert status["tcp_failed"] == 0 and status["udp_rebound"] == 0, status["errors"]
        assert status["new_udp_lost"] == 0, status
        # A daemon's outage leaves its kernel with entries its peer changed meanwhile (a client
        # port reused under another binding): a few new connections opened around it are reset
        # later (docs/failover.md, "Active-active"); 6 of about 10,000 in a run at 200 a second
        opened = status["new_tcp_ok"] + status["new_tcp_failed"]
        assert status["new_tcp_failed"] <= opened // 200, status["new_errors"]


def test_without_the_defer_the_strict_ruleset_drops_what_beats_the_replication() -> None:
    with started(defer=False) as the_lab:
        quiet = aa.steady(the_lab, 5)
        print("\n".join(aa.table([quiet])))
        assert quiet.drops["fw2"] > 0 and quiet.counts["new_slow"] > 0, quiet

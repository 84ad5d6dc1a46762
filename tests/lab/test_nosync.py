"""No-sync selection in the lab (issue 26): the firewalls' ruleset marks the client's UDP flows
not worth replicating (ct mark bit 0x100, Options.no_sync) and the cluster description's
[replication] names the bit. The standby never holds them (the active node's event socket drops
their events in the kernel; its own table leaves them out); through a failover every TCP
connection survives, and the UDP flows, which the new master never had, start again there as new
flows, as a no-sync flow does."""

from __future__ import annotations

import io
import json

import pytest

from ctbridge.daemon import control
from ctbridge.lab import Firewall, Options, lab
from ctbridge.lab.process import wait_for
from ctbridge.lab.scenario import switch
from tests.conftest import require

pytestmark = [pytest.mark.root, pytest.mark.lab]

TCP, UDP = 40, 10


def protocols(fw: Firewall, which: str) -> dict[str, int]:
    """How many flows of each protocol a cache of ``fw``'s daemon holds (`ctbridge dump WHICH`)."""
    out = io.BytesIO()
    control.stream(str(fw.run_dir / "ctbridge.sock"), "dump", out, timeout=30, which=which, format="json")
    counts: dict[str, int] = {}
    for view in json.loads(out.getvalue() or b"[]"):
        counts[view["proto"]] = counts.get(view["proto"], 0) + 1
    return counts


def test_flows_the_ruleset_marks_no_sync_are_not_on_the_standby_and_the_others_survive_the_failover() -> None:
    require("keepalived")
    with lab(Options(no_sync=True, tcp=TCP, udp=UDP)) as the_lab:
        the_lab.start()
        fw1, fw2 = the_lab.fws
        wait_for("fw2 to hold fw1's TCP flows", lambda: protocols(fw2, "external").get("tcp", 0) >= TCP, timeout=30)
        assert fw1.request("stats")["kernel"]["event_filter"] > 0  # the selection is in the kernel
        assert fw1.lab_flows()["udp"] == UDP  # they are in the active node's kernel ...
        assert protocols(fw1, "internal").get("udp", 0) == 0  # ... not in what it replicates
        assert protocols(fw2, "external").get("udp", 0) == 0
        s = switch(the_lab, "keepalived stopped", fw1, fw2)
        assert s.recovered is not None and s.status["tcp_alive"] == TCP, s.status
        assert s.status["tcp_failed"] == 0, s.status["errors"]
        # fw2 wrote the TCP flows only; the UDP flows are in its kernel again all the same, each
        # begun anew by its next datagram (NATed anew: often to the same port, which source NAT
        # keeps when it is free, so the client cannot always tell)
        assert fw2.request("stats")["commit"]["entries"] == TCP
        assert s.flows_after["udp"] == UDP

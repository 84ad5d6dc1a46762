"""Active-active with routing asymmetric on purpose (tests/support/activeactive.py): the client's
packets reach the server through fw1, the server's come back through fw2, both firewalls under a
strict ruleset, both daemons in inject mode with the defer on. Every connection completes and
neither firewall drops or finds INVALID a single packet: fw2 holds each SYN-ACK until fw1's flow is
in its kernel, fw1 holds the client's first packet after it until the SYN-ACK's state, replicated
from fw2, is in its own. The control, the same without the defer, drops the SYN-ACKs."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import require
from tests.support.activeactive import CLIENT_SCRIPT, counter, networks, serving, start_synced
from tests.support.daemonlab import cluster

pytestmark = pytest.mark.root

CONNECTIONS, RATE = 30, 30


def run(defer: bool) -> tuple[dict[str, Any], list[dict[str, int]], list[dict[str, Any] | None]]:
    """The client's result, each firewall's INVALID and dropped packets, each daemon's defer stats."""
    require("iptables", "iptables (the NFQUEUE target)")
    apply: dict[str, Any] = {"mode": "inject", **({"defer_queue": 9, "defer_wait": 1.0} if defer else {})}
    with cluster(2, apply=apply) as c, networks(c) as nets:
        start_synced(c)
        with serving(nets):
            out = subprocess.run(["ip", "netns", "exec", nets.client, sys.executable, "-c", CLIENT_SCRIPT,
                                  str(CONNECTIONS), str(RATE)], capture_output=True, text=True, timeout=120,
                                 check=True).stdout
        firewalls = [{"invalid": counter(n, "invalid"), "drops": counter(n, "strict-policy drops")} for n in c.nodes]
        return json.loads(out), firewalls, [n.request("stats")["defer"] for n in c.nodes]


def test_every_connection_lives_and_no_packet_is_dropped_or_invalid() -> None:
    client, firewalls, (fw1, fw2) = run(defer=True)
    assert client["ok"] == CONNECTIONS, client
    assert firewalls == [{"invalid": 0, "drops": 0}] * 2
    assert fw1 is not None and fw2 is not None
    # every SYN-ACK waited on fw2 for its flow, and every origin's packet on fw1 for the reply's state
    assert fw2["released_found"] >= CONNECTIONS and fw1["released_found"] >= CONNECTIONS
    assert fw1["released_timeout"] == fw2["released_timeout"] == 0


def test_without_the_defer_the_strict_ruleset_drops_the_synacks() -> None:
    client, firewalls, _ = run(defer=False)
    assert client["ok"] < CONNECTIONS or firewalls[1]["drops"] > 0
    assert firewalls[1]["drops"] + firewalls[1]["invalid"] > 0

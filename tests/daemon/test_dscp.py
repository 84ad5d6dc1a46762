"""The sync datagrams' DSCP (sync.dscp): read off the datagrams as they arrive, by nftables
counters in the receiving node's namespace (`ip dscp`: the TOS byte's upper six bits). The
control: sync.dscp = 0 sends them unmarked. (Their SO_PRIORITY does not cross a veth; the unit
test reads it back from the socket.)"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.activeactive import start_synced
from tests.support.daemonlab import cluster

pytestmark = pytest.mark.root

COUNTERS = """
table inet dscp_probe {
    counter cs6 { }
    counter other { }
    chain input {
        type filter hook input priority -500; policy accept;
        udp dport 3780 ip dscp cs6 counter name "cs6"
        udp dport 3780 ip dscp != cs6 counter name "other"
    }
}
"""


def seen(sync: dict[str, Any]) -> dict[str, int]:
    """The sync datagrams node 2 received after the pair synced, by DSCP."""
    with cluster(2, sync=sync) as c:
        c.nodes[1].run("nft", "-f", "-", input=COUNTERS)
        start_synced(c)
        listed = json.loads(c.nodes[1].run("nft", "-j", "list", "counters", "table", "inet", "dscp_probe").stdout)
        return {item["counter"]["name"]: int(item["counter"]["packets"]) for item in listed["nftables"]
                if "counter" in item}


def test_sync_datagrams_carry_cs6_by_default() -> None:
    counts = seen({})
    assert counts["cs6"] > 0 and counts["other"] == 0, counts


def test_without_a_dscp_they_go_unmarked() -> None:
    counts = seen({"dscp": 0})
    assert counts["cs6"] == 0 and counts["other"] > 0, counts

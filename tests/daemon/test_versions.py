"""Protocol versions between daemons (issue 23, deliver 2): a rolling upgrade. A daemon of the
release of 2026-12-01 (commit 06f3993, protocol version 2, run from its own venv:
tests/support/oldrelease.py) beside one of this tree: flows made in each kernel reach the other's
copy key by key, the new node speaks version 2 with it and sends it nothing it cannot read, and a
MASTER commit on either side writes the other's flows into its kernel. Two nodes of this tree
speak version 3 and send compact FLOWs. The conntrack CLI is the witness."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support import oldrelease, witness
from tests.support.daemonlab import Node, cluster, wait_for

pytestmark = pytest.mark.root

NEW_FLOWS = [
    "-p tcp -s 198.51.100.10 -d 203.0.113.80 --sport 40000 --dport 443 --state ESTABLISHED "
    "-u SEEN_REPLY,ASSURED -t 3600 -m 17",
    "-p tcp -s 198.51.100.11 -d 203.0.113.1 --sport 50000 --dport 80 -r 203.0.113.1 -q 192.0.2.200 "
    "--reply-port-src 80 --reply-port-dst 61000 --state ESTABLISHED -u SEEN_REPLY,ASSURED -t 3600",
    "-p udp -s 198.51.100.12 -d 203.0.113.53 --sport 33333 --dport 53 -t 120 --zone 4",
    "-p tcp -s 2001:db8::10 -d 2001:db8:1::20 --sport 40001 --dport 22 --state ESTABLISHED "
    "-u SEEN_REPLY,ASSURED -t 3600",
    "-p icmp -s 198.51.100.13 -d 203.0.113.9 --icmp-type 8 --icmp-code 0 --icmp-id 77 -t 30",
]
OLD_FLOWS = [
    "-p tcp -s 198.51.100.20 -d 203.0.113.80 --sport 41000 --dport 443 --state ESTABLISHED "
    "-u SEEN_REPLY,ASSURED -t 3600",
    "-p udp -s 198.51.100.21 -d 203.0.113.53 --sport 33334 --dport 53 -r 203.0.113.53 -q 192.0.2.201 "
    "--reply-port-src 53 --reply-port-dst 40001 -t 120 -m 5",
    "-p tcp -s 2001:db8::21 -d 2001:db8:1::20 --sport 40002 --dport 443 --state ESTABLISHED "
    "-u SEEN_REPLY,ASSURED -t 3600",
]


@pytest.fixture(scope="module")
def release() -> Path:
    """The python of the release of 2026-12-01's venv (skips where the repository lacks it)."""
    try:
        return oldrelease.release()
    except oldrelease.Unavailable as exc:
        pytest.skip(f"no release of 2026-12-01 to run: {exc}")


def kernel_ids(node: Node) -> set[tuple[Any, ...]]:
    return {witness.flow_id(v) for v in witness.listing(node.ns)}


def copy_ids(node: Node) -> set[tuple[Any, ...]]:
    return {witness.flow_id(v) for v in node.external()}


def make(node: Node, flows: list[str]) -> None:
    for args in flows:
        node.run("conntrack", "-I", *args.split())


def peer(node: Node) -> dict[str, Any]:
    (p,) = node.request("stats")["peers"]
    return p


def test_the_release_of_2026_12_01_and_this_one_replicate_both_ways_and_commit(release: Path) -> None:
    assert oldrelease.version(release) == "ctbridge 0.2.0"  # the release runs, not this tree
    with cluster(2) as c:
        new, old = c.nodes
        new.start()
        old.start(python=release)
        make(new, NEW_FLOWS)
        make(old, OLD_FLOWS)
        wait_for("each node's copy to be the other's kernel table, key by key",
                 lambda: copy_ids(old) == kernel_ids(new) and copy_ids(new) == kernel_ids(old), timeout=30)
        assert len(kernel_ids(new)) == len(NEW_FLOWS) and len(kernel_ids(old)) == len(OLD_FLOWS)
        theirs = {witness.flow_id(v): v for v in witness.listing(new.ns)}
        for v in old.external():  # the old node's copy is the new node's table, field by field
            assert witness.mismatches(v, theirs[witness.flow_id(v)], timeout_slack=10) == []
        p = peer(new)
        assert p["protocol"] == 2 and p["proven"] and p["synced"]
        stats = new.request("stats")["sync"]
        assert stats["tx_compact"] == 0 and stats["rx_v3_datagrams"] == 0
        assert "protocol" not in peer(old)  # the old release: no such field, nothing else either
        assert old.request("stats")["rejected"]["malformed"] == 0  # nothing it could not read
        # a deletion goes both ways too
        new.run("conntrack", "-D", "-p", "udp", "-s", "198.51.100.12", "--zone", "4")
        old.run("conntrack", "-D", "-p", "tcp", "-s", "198.51.100.20")
        wait_for("the deletions to reach the copies",
                 lambda: copy_ids(old) == kernel_ids(new) and copy_ids(new) == kernel_ids(old), timeout=30)
        own = {n.name: kernel_ids(n) for n in (new, old)}
        # keepalived makes each a master in turn: the other's flows go into its kernel
        for node, other in ((new, old), (old, new)):
            answer = node.request("notify", args=["INSTANCE", "VI_1", "MASTER", "100"])
            assert answer.get("ok"), answer
            wait_for(f"{other.name}'s flows in {node.name}'s kernel",
                     lambda node=node, other=other: kernel_ids(node) >= own[other.name] | own[node.name], timeout=30)
            node.request("notify", args=["INSTANCE", "VI_1", "BACKUP", "100"])
        assert old.request("stats")["rejected"]["malformed"] == 0


def test_two_nodes_of_this_release_speak_version_3_and_send_compact_flows() -> None:
    with cluster(2) as c:
        a, b = c.nodes
        a.start()
        b.start()
        make(a, NEW_FLOWS)
        make(b, OLD_FLOWS)
        wait_for("each node's copy to be the other's kernel table",
                 lambda: copy_ids(b) == kernel_ids(a) and copy_ids(a) == kernel_ids(b), timeout=30)
        for node in (a, b):
            p = peer(node)
            stats = node.request("stats")
            assert p["protocol"] == 3, p
            # the flows went compact (the ICMP echo's reply too: its values, not an inverse)
            assert stats["sync"]["tx_compact"] >= len(OLD_FLOWS) and stats["sync"]["rx_v3_datagrams"] > 0
            assert stats["rejected"]["malformed"] == 0
        theirs = {witness.flow_id(v): v for v in witness.listing(a.ns)}
        for v in b.external():
            assert witness.mismatches(v, theirs[witness.flow_id(v)], timeout_slack=10) == []

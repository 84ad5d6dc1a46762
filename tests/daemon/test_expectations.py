"""Expectation sync between daemons (issue 15, deliver 1), with expectations the test writes into
each kernel itself (a master flow with the FTP helper, and the helper's expectation)."""

from __future__ import annotations

import pytest

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec
from ctbridge.conntrack.table import KernelTable
from ctbridge.lab import netns
from tests.support import builders
from tests.support.daemonlab import Node, cluster, wait_for

pytestmark = pytest.mark.root

CLIENT, SERVER = bytes((192, 0, 2, 30)), bytes((198, 51, 100, 30))


def master() -> codec.Entry:
    return builders.ftp_control_flow(CLIENT, SERVER)


EXP = builders.build_expectation(ct.AF_INET, CLIENT, SERVER, 30002, 40000)


def table(node: Node) -> KernelTable:
    with netns.inside(node.ns):
        return KernelTable()


def counts(node: Node) -> tuple[int, int]:
    x = node.request("status")["expectations"]
    return int(x["internal"]), int(x["external"])


def test_an_expectation_a_peer_used_leaves_this_nodes_own_cache_too() -> None:
    """Both nodes hold the expectation (each its own, each the other's copy). B's is used: B's
    daemon says so, A's deletes its own from A's kernel, and must forget it as its own as well.
    It did not (the kernel's report of our own deletion was skipped with our other echoes): A
    announced it again later, and written into B's kernel it evicted B's live one (the FTP
    helper keeps one expectation per master): the FTP lab test lost its data connection at a
    failback to exactly that."""
    with cluster(2, apply={"mode": "inject"}, sync={"expectations": True}) as c:
        a, b = c.nodes
        a.start()
        b.start()
        for node in (a, b):
            with table(node) as t:
                assert not t.commit([master()]).failed
                assert t.commit_expectations([EXP]).done == 1
        wait_for("both to hold theirs and the other's", lambda: counts(a) == (1, 1) and counts(b) == (1, 1))
        with table(b) as t:  # used on B: gone from B's kernel
            assert t.delete_expectations([EXP.key]).done == 1
        wait_for("A's kernel to lose it", lambda: "dport=30002" not in a.run("conntrack", "-L", "expect").stdout)
        wait_for("A to forget it as its own", lambda: counts(a) == (0, 0), timeout=5)
        assert counts(b) == (0, 0)

"""Sustained churn between two daemons, CI-sized: while A's table gains and loses flows every 10 ms,
B's copy follows, and once the churn stops it equals A's table flow by flow (bench/churn.py is the
full-sized run, with conntrackd beside it). No timing is asserted: a slow CI machine only makes
the wait longer."""

from __future__ import annotations

import json
import sys
import time

import pytest

from tests.support import churn
from tests.support.daemonlab import Node, cluster

pytestmark = pytest.mark.root

STANDING = 50
RATE = 300  # flows created per second
SECONDS = 3.5
LIFE = 1.0  # each flow is deleted this long after it was made, so most of them are deleted during the run
CONVERGE = 60.0  # seconds B gets to equal A's table after the churn (it takes well under one)


def kernel_ids(node: Node) -> set[churn.FlowId]:
    views = json.loads(node.run(sys.executable, "-m", "ctbridge", "kernel", "dump", "--json").stdout)
    return {churn.view_id(v) for v in views}


def copy_ids(node: Node) -> set[churn.FlowId]:
    return {churn.view_id(v) for v in node.external()}


def test_copy_equals_the_table_after_sustained_churn() -> None:
    with cluster(2, log={"level": "info"}) as c:
        a, b = c.nodes
        a.start()
        b.start()
        churn.generate(a.ns, "load", str(STANDING), timeout=60)
        did = churn.generate(a.ns, "churn", "--rate", str(RATE), "--seconds", str(SECONDS), "--first", str(STANDING),
                             "--life", str(LIFE), timeout=120)
        # the generator did what the test is about: flows made and deleted, some left at the end
        assert did["created"] > RATE and did["deleted"] > RATE // 2 and did["created"] > did["deleted"]
        table = kernel_ids(a)
        assert len(table) == STANDING + did["created"] - did["deleted"]
        deadline = time.monotonic() + CONVERGE
        held = copy_ids(b)
        while held != table and time.monotonic() < deadline:
            time.sleep(0.2)
            held = copy_ids(b)
        assert not table - held, f"B lacks {len(table - held)} of A's {len(table)} flows"
        assert not held - table, f"B holds {len(held - table)} flows A's table no longer has"
        assert kernel_ids(a) == table  # nothing in A changed meanwhile: the comparison was against the final table

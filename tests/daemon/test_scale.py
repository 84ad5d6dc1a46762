"""A large table, CI-sized (bench/scale.py is the full-sized run, 1M flows, conntrackd beside):
200,000 flows written into A's kernel at once reach B without an overrun; B restarted gets them
back in one bulk; B's MASTER commit goes through the keepalived hook, which waits while the
daemon reports progress; and no daemon ever logged its peer silent meanwhile (a busy node must
not look dead). No timing is asserted: a slow machine only makes the waits longer."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from ctbridge.lab.process import wait_for
from tests.support import ROOT
from tests.support.daemonlab import Node, cluster
from tests.support.hostlimit import conntrack_max

pytestmark = pytest.mark.root

N = 200_000
WAIT = 600.0  # seconds any stage may take (about 5 s on the reference machine)


def held(node: Node) -> int:
    return int(node.request("stats")["external"]["entries"])


def silent(node: Node) -> list[str]:
    return re.findall(r"peer [0-9a-f]{8} silent for [0-9.]+ s", node.log.read_text(errors="replace"))


def test_a_table_of_200000_flows_replicates_resyncs_in_one_bulk_and_commits_through_the_hook() -> None:
    with conntrack_max(N), cluster(2, log={"level": "info"}) as c:
        a, b = c.nodes
        a.start()
        b.start()
        a.run(sys.executable, str(ROOT / "bench" / "burst_load.py"), str(N))
        wait_for("B to hold every flow", lambda: held(b) >= N, timeout=WAIT)
        assert a.request("stats")["kernel"]["overruns"] == 0
        bulks = a.request("stats")["sync"]["bulks_sent"]
        b.stop(signal.SIGTERM)
        b.start()
        wait_for("B's new life to hold every flow", lambda: held(b) >= N, timeout=WAIT)
        time.sleep(7)  # a second bulk, had B asked again after resync_retry (3 s), would have begun
        assert a.request("stats")["sync"]["bulks_sent"] - bulks == 1
        env = {**os.environ, "CTBRIDGE_CONFIG": str(b.config), "CTBRIDGE_TIMEOUT": "60"}
        res = subprocess.run([str(ROOT / "hooks" / "ctbridge-notify"), "INSTANCE", "VI_1", "MASTER", "100"],
                             env=env, capture_output=True, text=True, timeout=WAIT)
        assert res.returncode == 0, res.stderr
        assert f"committed: {N}" in res.stdout
        assert int(b.run("conntrack", "-C").stdout.strip()) >= N
        assert silent(a) == [] and silent(b) == []


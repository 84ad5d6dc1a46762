"""The LAN's flows in conntrack zone 1 (`ct original zone set`, Options.zones) through a failover
and a failback, with the rendered configuration: every flow survives, every committed entry is
written (commit.failed = 0), and the firewalls' own flows (keepalived's unicast VRRP between the
nodes' addresses) are not among them: the rendered filter leaves them out (issue 26). The
control, `own_flows = true` in the cluster description, commits them too."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from ctbridge.lab import Lab, Options, lab
from ctbridge.lab.scenario import switch
from tests.conftest import require

pytestmark = [pytest.mark.root, pytest.mark.lab]

TCP, UDP = 50, 10


@contextlib.contextmanager
def zoned(own_flows: bool) -> Iterator[Lab]:
    require("keepalived")
    with lab(Options(zones=True, own_flows=own_flows, tcp=TCP, udp=UDP)) as the_lab:
        the_lab.start()
        yield the_lab


def committed(own_flows: bool) -> list[dict[str, object]]:
    """The new master's commit at a failover and at the failback."""
    with zoned(own_flows) as the_lab:
        fw1, fw2 = the_lab.fws
        assert fw1.run("conntrack", "-L", "--orig-zone", "1").stdout.count("\n") >= TCP + UDP
        out = []
        for how, on, new in (("keepalived stopped", fw1, fw2), ("keepalived started", fw1, fw1)):
            s = switch(the_lab, how, on, new)
            assert s.recovered is not None and s.status["tcp_alive"] == TCP, s.status
            assert s.status["tcp_failed"] == 0 and s.status["udp_rebound"] == 0, s.status["errors"]
            out.append(new.request("stats")["commit"])
        return out


def test_zoned_flows_fail_over_and_the_firewalls_own_flows_are_left_out() -> None:
    for commit in committed(own_flows=False):
        assert (commit["entries"], commit["failed"]) == (TCP + UDP, 0), commit


def test_with_own_flows_the_firewalls_flows_are_committed_too() -> None:
    for commit in committed(own_flows=True):
        assert isinstance(commit["entries"], int) and commit["entries"] > TCP + UDP and commit["failed"] == 0, commit

"""The soak in its CI size (issue 14, deliver 7): ten events of every kind in a row, under
traffic over IPv4 and IPv6 (every other flow, NAT66 to VIPs of their own), with background
entries in the master's table; bench/soak.py runs the full size."""

from __future__ import annotations

import contextlib

import pytest

from ctbridge.lab import Options, lab, soak
from tests.conftest import require

pytestmark = [pytest.mark.root, pytest.mark.lab]
TCP, UDP = 200, 20
BACKGROUND = 10_000


def test_ten_events_in_a_row_lose_nothing() -> None:
    require("keepalived")
    with contextlib.ExitStack() as stack:
        the_lab = stack.enter_context(lab(Options(tcp=TCP, udp=UDP, ipv6=True)))
        the_lab.start()
        soak.load_background(the_lab, BACKGROUND)
        rows = soak.run(the_lab, BACKGROUND)
        print("\n" + "\n".join(soak.table(rows)))
        bad = [soak.line(r) for r in rows if not r.ok(TCP, UDP)]
        assert not bad, "\n".join([soak.HEAD, *bad])
        status = the_lab.stop()
        assert status["final"] and status["tcp_failed"] == 0 and status["udp_rebound"] == 0, status

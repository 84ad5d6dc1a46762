"""Expectation sync end to end (issue 15, deliver 1): a real FTP server (pyftpdlib) behind the
firewall pair, the kernel's FTP helper on the control connection (`ct helper`), and the passive
data ports open only to what the helper expects. A client asks for a passive data port (PASV),
the pair fails over, and only then does the client open the data connection: the new master lets
it in only if it holds the expectation the old master's helper made."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from ctbridge.lab import Lab, Options, lab, wait_for
from ctbridge.lab.firewall import Firewall
from ctbridge.lab.scenario import switch
from ctbridge.lab.topology import FTP_FILE
from tests.conftest import require

pytestmark = [pytest.mark.root, pytest.mark.lab]


@pytest.fixture(autouse=True)
def _tools() -> None:
    require("keepalived")
    pytest.importorskip("pyftpdlib", reason="the lab's FTP server (pip install pyftpdlib; make test installs it)")


@contextlib.contextmanager
def ftp_lab(mode: str, notify: str, expectations: bool) -> Iterator[Lab]:
    options = Options(apply_mode=mode, notify=notify, tcp=20, udp=4, ftp=True,
                      sync=("expectations = true",) if expectations else ())
    with lab(options) as the_lab:
        the_lab.start()
        yield the_lab


def replicated_to(fw: Firewall) -> bool:
    return int(fw.request("status")["expectations"]["external"]) >= 1


@pytest.mark.parametrize(("mode", "notify"), [("commit", "fifo"), ("inject", "hook")])
def test_a_passive_data_connection_opened_after_a_failover_is_related(mode: str, notify: str) -> None:
    with ftp_lab(mode, notify, expectations=True) as the_lab:
        fw1, fw2 = the_lab.fws
        ftp = the_lab.ftp_session()
        assert ftp.ask("get file")["bytes"] == FTP_FILE  # the helper and the ruleset let FTP through
        assert ftp.ask("pasv")["ok"]
        wait_for("fw2 to hold fw1's expectation", lambda: replicated_to(fw2), timeout=10)
        s = switch(the_lab, "keepalived stopped", fw1, fw2)
        assert s.recovered is not None and s.status["tcp_failed"] == 0
        got = ftp.ask("retr file")  # the data connection of the PASV asked before the failover
        assert got["ok"] and got["bytes"] == FTP_FILE and got["reply"].startswith("226"), got
        assert ftp.ask("noop")["ok"]  # the control connection lives on
        # a PASV after the failover: fw2's helper reads the committed control connection (CTA_HELP)
        assert ftp.ask("get file")["bytes"] == FTP_FILE
        assert fw2.ftp_refused() == 0
        assert fw2.request("stats")["expectations"]["written"] >= 1
        # and back: an expectation fw2's helper made goes to fw1
        assert ftp.ask("pasv")["ok"]
        wait_for("fw1 to hold fw2's expectation", lambda: replicated_to(fw1), timeout=10)
        s = switch(the_lab, "keepalived started", fw1, fw1)
        assert s.recovered is not None
        held = fw1.run("conntrack", "-L", "expect").stdout
        got = ftp.ask("retr file")
        assert got["ok"] and got["bytes"] == FTP_FILE, (got, held, fw1.request("stats")["expectations"],
                                                        fw1.ftp_refused())
        assert fw1.ftp_refused() == 0 and fw2.ftp_refused() == 0


def test_control_without_expectation_sync_the_data_connection_is_refused() -> None:
    """The same failover with sync.expectations off: the new master drops the data connection."""
    with ftp_lab("commit", "fifo", expectations=False) as the_lab:
        fw1, fw2 = the_lab.fws
        ftp = the_lab.ftp_session()
        assert ftp.ask("pasv")["ok"]
        assert fw1.run("conntrack", "-L", "expect").stdout.count("helper=ftp") == 1  # the old master has it
        s = switch(the_lab, "keepalived stopped", fw1, fw2)
        assert s.recovered is not None
        got = ftp.ask("retr file")
        assert not got["ok"] and "timed out" in got["error"], got
        assert fw2.ftp_refused() >= 1  # its SYNs, NEW to fw2
        assert fw2.request("status")["expectations"] == {"written": 0, "failed": 0, "enabled": False,
                                                          "internal": 0, "external": 0}
        # the control connection itself survives, and a PASV after the failover works: what
        # expectation sync adds is the data connection announced before it
        assert ftp.ask("noop")["ok"]
        assert ftp.ask("get file")["bytes"] == FTP_FILE

"""The operator's toolbox, pure parts (issue 15, deliver 5): the status table, the journal's
priorities, per-peer metrics and the commit histogram as Prometheus reads them."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ctbridge.cli.control import format_status
from ctbridge.daemon import journal, metrics

PEER = {"node": "0000000b", "address": "192.0.2.11", "alive": True, "synced": False, "proven": True,
        "last_heard": 0.25, "entries": 1200, "refused_total": 3, "rejected": {"replay": 2, "unproven": 1,
                                                                              "bounds": 0},
        "gap": [17, 20], "restarts": 1, "protocol": 3}
STATUS = {"node": "fw1", "node_id": "0000000a", "role": "BACKUP", "apply_mode": "commit", "gate": "closed",
          "internal": {"entries": 10}, "external": {"entries": 1200, "complete": False},
          "expectations": {"enabled": True, "internal": 2, "external": 0},
          "interlock": {"value": -254, "may_take_over": False}, "peers": [PEER],
          "queues": {"pending": 0, "resend": 3, "bulk": 0, "inject": 0},
          "commit": {"entries": 1150, "failed": 1, "seconds": 0.0421, "at": 1000.0}}


def test_the_status_table_shows_what_an_operator_looks_at_first() -> None:
    text = format_status(STATUS, now=1090.0)
    lines = text.splitlines()
    assert lines[0].split() == ["node", "fw1", "(0000000a)", "role", "BACKUP", "apply", "commit", "gate", "closed"]
    assert "10 entries (this node's flows, 2 of them expectations)" in text
    assert "1200 entries (the peers'), INCOMPLETE; interlock holds it back" in text
    header = lines.index(next(line for line in lines if "PEER" in line))
    assert lines[header].split() == ["PEER", "ADDRESS", "ALIVE", "SYNCED", "PROVEN", "LAST", "HEARD", "FLOWS",
                                     "REFUSED", "REJECTED", "GAP", "PROTOCOL"]
    assert lines[header + 1].split() == ["0000000b", "192.0.2.11", "yes", "no", "yes", "0.2", "s", "ago", "1200",
                                         "3", "3", "17-20", "3"]
    assert "queues    pending 0, resend 3, bulk 0, inject 0" in text
    assert "commit    1150 flows in 0.042 s, 1 failed, 90.0 s ago" in text


def test_the_status_table_of_a_node_alone() -> None:
    alone = {**STATUS, "peers": [], "commit": {"at": None}, "gate": None, "interlock": {"value": None}}
    text = format_status(alone, now=0.0)
    assert "peers     none heard yet" in text and "commit    none since the start" in text
    assert "gate not used" in text and "interlock" not in text


def test_log_lines_carry_syslog_priorities_only_when_stderr_is_the_journal(tmp_path: Path) -> None:
    assert [journal.priority(level) for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR,
                                                  logging.CRITICAL)] == [7, 6, 4, 3, 2]
    log = tmp_path / "stderr"
    log.touch()
    st = log.stat()
    with open(log, "ab") as f:
        assert journal.is_journal(f.fileno(), {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not journal.is_journal(f.fileno(), {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not journal.is_journal(f.fileno(), {})
        assert not journal.is_journal(f.fileno(), {"JOURNAL_STREAM": "not:numbers"})
    record = logging.LogRecord("ctbridge.daemon", logging.ERROR, __file__, 1, "commit failed:\n%s", ("ENOMEM",),
                               None)
    # every line of a message keeps the priority: journald reads each line apart
    assert journal.PriorityFormatter().format(record) == "<3>ctbridge.daemon: commit failed:\n<3>ENOMEM"
    assert not journal.use_journal_priorities(os.open(os.devnull, os.O_WRONLY))


def test_per_peer_metrics_and_the_commit_histogram_render_as_prometheus_reads_them() -> None:
    h = metrics.Histogram((0.1, 1.0))
    for seconds in (0.05, 0.5, 3.0):
        h.observe(seconds)
    text = metrics.render({"peers": [PEER], "commit_histogram": h.snapshot()})
    for line in ('ctbridge_peer_alive{peer="0000000b"} 1', 'ctbridge_peer_synced{peer="0000000b"} 0',
                 'ctbridge_peer_last_heard_seconds{peer="0000000b"} 0.25', 'ctbridge_peer_flows{peer="0000000b"} 1200',
                 'ctbridge_peer_refused_total{peer="0000000b"} 3',
                 'ctbridge_peer_protocol_version{peer="0000000b"} 3',
                 'ctbridge_peer_rejected_total{peer="0000000b",reason="replay"} 2',
                 'ctbridge_peer_rejected_total{peer="0000000b",reason="unproven"} 1',
                 # cumulative buckets, then +Inf, the sum and the count
                 'ctbridge_commit_duration_seconds_bucket{le="0.1"} 1',
                 'ctbridge_commit_duration_seconds_bucket{le="1.0"} 2',
                 'ctbridge_commit_duration_seconds_bucket{le="+Inf"} 3',
                 "ctbridge_commit_duration_seconds_sum 3.55", "ctbridge_commit_duration_seconds_count 3",
                 "# TYPE ctbridge_commit_duration_seconds histogram"):
        assert line in text.splitlines(), line


def test_the_status_table_says_how_conntrackd_is_doing() -> None:
    st = {**STATUS, "backend": {"name": "conntrackd", "alive": False, "failures": 1,
                                "steps": [{"flag": "-c", "ok": False, "error": "conntrackd -c exited with 1: x"}]}}
    assert ("backend   conntrackd, DOES NOT ANSWER; 1 steps failed; last step -c FAILED: conntrackd -c exited "
            "with 1: x") in format_status(st, now=0.0)
    assert "backend" not in format_status({**STATUS, "backend": {"name": "ctbridge"}}, now=0.0)

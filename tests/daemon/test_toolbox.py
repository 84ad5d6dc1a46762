"""The operator's toolbox against running daemons (issue 15, deliver 5): every control command
(commit, flush, resync, bulk-send, dump, rebuild) through the CLI, with the kernel and the
conntrack CLI as witnesses; `ctbridge status` as a table and as JSON; per-peer metrics and the
commit histogram; log lines with the journal's priorities and the log level; the systemd
watchdog's keep-alives, and their stop while the daemon's loop is stuck."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ctbridge.config import settings
from ctbridge.daemon.service import Daemon
from ctbridge.lab import netns
from tests.daemon.test_daemon import FLOWS, replicated
from tests.support import witness
from tests.support.daemonlab import Node, cluster, wait_for

pytestmark = pytest.mark.root


def cli(node: Node, *args: str) -> str:
    return node.ctbridge(*args, "-c", str(node.config)).stdout


def scrape(node: Node, port: int) -> str:
    code = ("import urllib.request\n"
            f"print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics', timeout=10).read().decode())")
    return node.run(os.sys.executable, "-c", code).stdout


def test_every_control_command_does_what_it_says() -> None:
    with cluster(2) as c:
        a, b = c.nodes
        b.write_config(metrics={"listen": "127.0.0.1:9781"})
        replicated(a, b)
        # dump internal: A's own flows, as the conntrack CLI lists them
        internal = json.loads(cli(a, "dump", "internal", "--json"))
        assert sorted(v["src"] for v in internal) == sorted(v["src"] for v in witness.listing(a.ns))
        # commit: B's kernel had none of A's flows; now it has them all
        assert witness.listing(b.ns) == []
        assert "committed: 4" in cli(b, "commit")
        assert len(witness.listing(b.ns)) == len(FLOWS)
        text = scrape(b, 9781)
        assert "ctbridge_commit_duration_seconds_count 1" in text
        assert 'ctbridge_commit_duration_seconds_bucket{le="+Inf"} 1' in text
        # flush external, then resync: the copy is gone, and comes back from A
        cli(b, "flush", "external")
        assert b.external() == []
        cli(b, "resync")
        wait_for("B's copy back after resync", lambda: len(b.external()) == len(FLOWS))
        # bulk-send: A streams its cache unasked
        bulks = b.request("stats")["sync"]["bulks_received"]
        cli(a, "bulk-send")
        wait_for("the bulk A sent", lambda: b.request("stats")["sync"]["bulks_received"] > bulks)
        # flush internal: read again from the kernel at once
        assert "flushed: internal" in cli(a, "flush", "internal")
        assert len(a.dump("internal")) == len(FLOWS)
        # rebuild: a flow the kernel made without an event (events off) reaches B only by it
        a.run("sysctl", "-q", "-w", "net.netfilter.nf_conntrack_events=0")
        a.run("conntrack", "-I", *"-p udp -s 198.51.100.99 -d 203.0.113.9 --sport 9 --dport 9 -t 300".split())
        time.sleep(1.0)  # an event, had there been one, would have reached B by now
        assert len(b.external()) == len(FLOWS)
        answer = cli(a, "rebuild")
        assert f"flows: {len(FLOWS) + 1}" in answer, answer
        wait_for("the rebuilt flow at B", lambda: len(b.external()) == len(FLOWS) + 1)
        # per-peer metrics: A as B sees it
        text = scrape(b, 9781)
        peer = b.request("status")["peers"][0]["node"]
        assert f'ctbridge_peer_alive{{peer="{peer}"}} 1' in text
        assert f'ctbridge_peer_synced{{peer="{peer}"}} 1' in text
        assert f'ctbridge_peer_flows{{peer="{peer}"}} {len(FLOWS) + 1}' in text
        assert f'ctbridge_peer_rejected_total{{peer="{peer}",reason="replay"}}' in text


def test_status_is_a_table_for_people_and_json_for_machines() -> None:
    with cluster(2) as c:
        a, b = c.nodes
        replicated(a, b)
        table = cli(b, "status")
        lines = table.splitlines()
        assert lines[0].startswith(f"node      {b.name} (") and "role BACKUP" in lines[0]
        assert f"external  {len(FLOWS)} entries (the peers'), complete" in table
        header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["PEER", "ADDRESS"])
        row = lines[header + 1].split()
        peer = b.request("status")["peers"][0]
        assert row[:5] == [peer["node"], a.address, "yes", "yes", "yes"] and str(len(FLOWS)) in row
        assert "commit    none since the start" in table
        as_json = json.loads(cli(b, "status", "--json"))
        assert as_json["peers"][0]["entries"] == len(FLOWS) and as_json["role"] == "BACKUP"
        assert set(as_json) >= {"node", "role", "internal", "external", "peers", "queues", "commit", "gate", "loop"}
        assert "loop      longest stall " in table


def journal_log(node: Node) -> None:
    """Make the node's log file what $JOURNAL_STREAM names: the daemon takes its stderr for the journal."""
    node.log.touch()
    st = node.log.stat()
    os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"


@pytest.mark.parametrize("level", ["info", "warning"])
def test_log_lines_carry_the_journals_priorities_and_follow_the_log_level(level: str) -> None:
    with cluster(2) as c:
        a, _b = c.nodes
        a.write_config(log={"level": level})
        journal_log(a)
        try:
            a.start()
        finally:
            del os.environ["JOURNAL_STREAM"]
        # a reload that cannot be taken: said at error priority (3)
        good = a.config.read_text()
        a.config.write_text(good + "\n[nonsense]\n")
        os.killpg(a.proc.pid, signal.SIGHUP)
        wait_for("the refused reload", lambda: "reload refused" in a.log.read_text())
        lines = [line for line in a.log.read_text().splitlines() if line.startswith("<")]
        errors = [line for line in lines if "reload refused" in line]
        assert errors and all(line.startswith("<3>ctbridge") for line in errors), errors
        infos = [line for line in lines if line.startswith("<6>")]
        assert bool(infos) == (level == "info"), lines[:5]
        assert not any(line.startswith(("<6>INFO", "<3>ERROR")) for line in lines)  # the journal shows the level
        assert a.stop() == 0


def test_watchdog_keepalives_stop_while_the_loop_is_stuck_and_come_back(tmp_path: Path) -> None:
    """The daemon runs here, in this process, so the test can hold its event loop; keep-alives
    (WATCHDOG=1, sd_notify(3)) must come from that loop, never from a thread that outlives it."""
    with cluster(2) as c:
        node = c.nodes[0]  # its peer never starts: nothing but the loop matters here
        path = str(tmp_path / "notify.sock")
        got: list[tuple[float, bytes]] = []
        held: dict[str, Any] = {}
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
            listener.bind(path)
            listener.settimeout(0.2)
            done = threading.Event()

            def listen() -> None:
                for _ in range(2000):  # bounded: 0.2 s each
                    if done.is_set():
                        return
                    try:
                        got.append((time.monotonic(), listener.recv(4096)))
                    except TimeoutError:
                        continue

            def drive() -> None:
                try:
                    wait_for("READY=1", lambda: any(b"READY=1" in m for _, m in got), timeout=20)
                    wait_for("keep-alives", lambda: sum(m == b"WATCHDOG=1" for _, m in got) >= 5, timeout=10)
                    loop, daemon = held["loop"], held["daemon"]
                    stuck: list[int] = []

                    def hold() -> None:
                        # in the loop: what arrived until now (0.3 s for the last one sent before
                        # to be received), then what arrives while the loop stays held
                        time.sleep(0.3)
                        stuck.append(sum(m == b"WATCHDOG=1" for _, m in got))
                        time.sleep(1.2)
                        stuck.append(sum(m == b"WATCHDOG=1" for _, m in got))
                    loop.call_soon_threadsafe(hold)
                    wait_for("the loop to be held and let go", lambda: len(stuck) == 2, timeout=10)
                    after = len(got)
                    wait_for("keep-alives again", lambda: any(m == b"WATCHDOG=1" for _, m in got[after:]), timeout=5)
                    held["stuck"] = stuck
                    held["stall"] = daemon.lag.longest  # a float read from this thread: no race
                    loop.call_soon_threadsafe(daemon.stop.set)
                except BaseException as exc:  # reported by the test, after the daemon is stopped
                    held["error"] = exc
                    if "loop" in held:
                        held["loop"].call_soon_threadsafe(held["daemon"].stop.set)

            cfg = settings.load(str(node.config))

            async def run() -> int:
                held["loop"] = asyncio.get_running_loop()
                held["daemon"] = Daemon(cfg)
                return await held["daemon"].run()

            threads = [threading.Thread(target=listen, daemon=True), threading.Thread(target=drive, daemon=True)]
            for t in threads:
                t.start()
            os.environ.update(NOTIFY_SOCKET=path, WATCHDOG_USEC="100000")  # a keep-alive every 50 ms
            try:
                with netns.inside(node.ns):
                    assert asyncio.run(asyncio.wait_for(run(), 60)) == 0
            finally:
                for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC"):
                    os.environ.pop(name, None)
                done.set()
                for t in threads:
                    t.join(10)
        if "error" in held:
            raise held["error"]
        before, after = held["stuck"]
        assert before >= 5 and after == before, f"{after - before} keep-alives while the loop was held"
        # the loop's own lag probe saw the stall: held 1.5 s, a probe due every 0.1 s ran at least
        # 1.4 s late (the probe's figure can only be larger than what the test held, never smaller)
        assert held["stall"] >= 1.4


def test_diff_says_equal_or_names_the_flows_that_differ() -> None:
    with cluster(2) as c:
        a, b = c.nodes
        replicated(a, b)
        same = b.ctbridge("diff", "-c", str(b.config), check=False)
        assert same.returncode == 0 and same.stdout.strip().endswith(f"equal ({len(FLOWS)} flows)"), same
        cli(b, "flush", "external")  # B's copy is empty now: every flow of A's missing here
        gone = b.ctbridge("diff", "-c", str(b.config), check=False)
        assert gone.returncode == 1, gone
        assert f"{len(FLOWS)} missing here, 0 extra here, 0 in another state" in gone.stdout
        listed = [line.split(None, 1)[1] for line in gone.stdout.splitlines() if line.startswith("  missing")]
        assert sorted(line.split("src=")[1].split()[0] for line in listed) == sorted(
            v["src"] for v in witness.listing(a.ns))  # named as the conntrack CLI knows them
        as_json = json.loads(b.ctbridge("diff", "-c", str(b.config), "--json", check=False).stdout)
        assert as_json["equal"] is False and len(as_json["peers"][0]["missing"]) == len(FLOWS)
        cli(b, "resync")
        wait_for("B's copy back", lambda: len(b.external()) == len(FLOWS))
        assert b.ctbridge("diff", "-c", str(b.config), check=False).returncode == 0
        bad = b.ctbridge("diff", "-c", str(b.config), "--peer", "00000bad", check=False)
        assert bad.returncode == 1 and "no live peer '00000bad'" in bad.stderr and bad.stderr.count("\n") == 1, bad


def test_a_restarted_standby_closes_its_gate_again_and_a_master_keeps_it_open() -> None:
    """A daemon's clean stop opens the gate (it fails open); one started on a standby (none of
    keepalived.vips held) closes it again. Found by the package test in CI: after both daemons
    were restarted, a failover NATed every UDP flow anew on the open gate."""
    with cluster(2, apply={"gate": True}, keepalived={"vips": ["192.0.2.254"]}) as c:
        a, b = c.nodes

        def gate(node: Node) -> bool:
            return node.run("nft", "list", "table", "inet", "ctbridge_gate", check=False).returncode == 0
        b.start()
        assert gate(b) and b.request("stats")["gate"] == "closed"  # a standby from the start
        assert b.stop() == 0 and not gate(b)  # fails open on the way out
        b.start()
        assert gate(b)
        a.run("ip", "addr", "add", "192.0.2.254/32", "dev", "sync0")  # A holds the VIP: a master
        a.start()
        assert not gate(a) and a.request("stats")["gate"] is None

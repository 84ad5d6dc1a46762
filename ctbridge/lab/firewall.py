"""A firewall of the lab (its namespace, keepalived, what its ruleset counted, its flows as the
conntrack CLI sees them) and the replicators that run on it: ctbridge here, conntrackd beside it
in the benches (bench/conntrackd_harness.py).
"""

from __future__ import annotations

import contextlib
import json
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from ctbridge.daemon import control
from ctbridge.daemon.conntrackd import cache_sizes
from ctbridge.lab import netns
from ctbridge.lab.process import Process, wait_for
from ctbridge.lab.topology import (
    HOOK,
    LAN,
    LAN6,
    LAN_VIP,
    LAN_VIP6,
    ROOT,
    SERVER,
    SERVER6,
    WAN,
    WAN6,
    WAN_VIP,
    WAN_VIP6,
    Options,
)


class Replicator(Protocol):
    """What runs on each firewall to keep the standby's conntrack table: ctbridge or conntrackd."""

    name: str
    interlock: bool

    def prepare(self, fw: Firewall, fws: Sequence[Firewall]) -> None:
        """Write what runs on ``fw`` (its configuration, keepalived's notify script); ``fws``:
        every firewall of the lab, ``fw`` among them."""

    def start(self, fw: Firewall) -> None: ...

    def stop(self, fw: Firewall, sig: int = signal.SIGTERM) -> None: ...

    def replicated(self, fw: Firewall) -> int | None:
        """How many peer flows ``fw`` holds, ready for a takeover."""

    def master_seconds(self, fw: Firewall, since: float) -> float | None:
        """From keepalived's MASTER notification (after wall time ``since``) to the flows committed,
        where the replicator itself knows it (notify_fifo); None: the notify hook's duration says."""


class Firewall:
    def __init__(self, lab_dir: Path, options: Options, index: int) -> None:
        self.options = options
        self.index = index
        self.name = f"fw{index}"
        self.ns = ""
        self.dir = lab_dir / self.name
        self.run_dir = self.dir / "run"
        self.lan = f"{LAN}.{1 + index}"
        self.wan = f"{WAN}.{1 + index}"
        self.lan6 = f"{LAN6}{1 + index}"
        self.wan6 = f"{WAN6}{1 + index}"
        self.sync = f"198.51.100.{index}"
        self.keepalived: Process | None = None
        self.daemon: Process | None = None
        self.conntrackd: Process | None = None  # Options.backend = "conntrackd"

    # --- processes --------------------------------------------------------------------------------

    def start_keepalived(self) -> None:
        self.keepalived = Process(f"{self.name} keepalived", self.ns, [
            "keepalived", "--dont-fork", "--log-console", "--log-detail", "--vrrp", "--no-syslog",
            "-f", str(self.dir / "keepalived.conf"), "-p", str(self.run_dir / "keepalived.pid"),
            "-r", str(self.run_dir / "vrrp.pid")], self.dir / "keepalived.log")

    def stop_keepalived(self, sig: int = signal.SIGTERM) -> None:
        if self.keepalived is not None:
            self.keepalived.stop(sig)
            self.keepalived = None

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return netns.run(self.ns, *argv, check=check)

    def link(self, name: str, up: bool) -> None:
        self.run("ip", "link", "set", name, "up" if up else "down")

    # --- state --------------------------------------------------------------------------------------

    def holds(self, vip: str) -> bool:
        return f" {vip}/" in self.run("ip", "-o", "addr", "show", check=False).stdout

    def has_vips(self) -> bool:
        out = self.run("ip", "-o", "addr", "show", check=False).stdout
        held = f" {LAN_VIP}/" in out and f" {WAN_VIP}/" in out
        if self.options.ipv6:
            return held and f" {LAN_VIP6}/" in out and f" {WAN_VIP6}/" in out
        return held

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        try:
            return control.request(str(self.run_dir / "ctbridge.sock"), cmd, timeout=60, **args)
        except control.ControlError as exc:
            daemon = self.daemon
            if daemon is None or daemon.alive():
                raise
            # the daemon is gone: say how it ended, and its last words (the lab's files go with it)
            tail = " | ".join(daemon.log.read_text(errors="replace").splitlines()[-12:])
            raise control.ControlError(f"{exc} ({self.name}'s ctbridge exited with status "
                                       f"{daemon.proc.returncode}; its log ends: {tail})") from exc

    def dropped(self) -> int:
        """Forwarded packets this firewall dropped: its ruleset's counter plus ctbridge's commit gate."""
        return sum(self.drops().values())

    def drops(self) -> dict[str, int]:
        """Forwarded packets dropped, by whom: the strict ruleset ("policy": a packet of a flow it
        does not know) and ctbridge's commit gate ("gate": a new flow before the commit)."""
        out = {"policy": 0, "gate": 0}
        for item in json.loads(self.run("nft", "-j", "list", "ruleset").stdout)["nftables"]:
            if "counter" in item and item["counter"].get("name", "").startswith("dropped"):
                out["policy"] += int(item["counter"]["packets"])
                out[item["counter"]["name"]] = int(item["counter"]["packets"])
            rule = item.get("rule")
            if rule and rule["table"] == "ctbridge_gate":
                out["gate"] += sum(int(e["counter"]["packets"]) for e in rule["expr"] if "counter" in e)
        return out

    def ftp_refused(self) -> int:
        """New connections to the FTP data ports this firewall dropped (FTP_RULES): the ones no
        expectation made RELATED."""
        out = self.run("nft", "-j", "list", "counter", "inet", "lab_ftp", "refused").stdout
        return sum(int(item["counter"]["packets"]) for item in json.loads(out)["nftables"] if "counter" in item)

    def conntrackd_caches(self) -> dict[str, int] | None:
        """The cache sizes this firewall's conntrackd reports (`conntrackd -s`); None if it does not answer."""
        out = self.run("conntrackd", "-C", str(self.dir / "conntrackd.conf"), "-s", check=False)
        return cache_sizes(out.stdout) if out.returncode == 0 else None

    def maintenance(self, on: bool) -> None:
        """The rendered keepalived.conf's maintenance track file: 1 drains this firewall."""
        path = self.run_dir / "maintenance"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("1\n" if on else "0\n")
        tmp.replace(path)

    def lab_flows(self) -> dict[str, int]:
        """The client's flows in this kernel (conntrack CLI as the witness): TCP ones established."""
        out = {}
        servers = [("ipv4", SERVER)] + ([("ipv6", SERVER6)] if self.options.ipv6 else [])
        for proto, port in (("tcp", "5001"), ("udp", "5002")):
            lines = []
            for family, server in servers:
                res = self.run("conntrack", "-L", "-f", family, "-p", proto, "--orig-dst", server, "--dport", port,
                               check=False)
                lines += [line for line in res.stdout.splitlines() if line.strip()]
            if proto == "tcp":
                lines = [line for line in lines if " ESTABLISHED " in line]
            out[proto] = len(lines)
        return out

    def write_notify_wrapper(self, command: str) -> None:
        """keepalived's notify script for this firewall: runs ``command`` with keepalived's arguments and
        logs when it started and ended, the lab's measure of "MASTER to committed"."""
        script = self.dir / "notify"
        times = self.dir / "notify.times"
        script.write_text(f"""#!/bin/sh
start=$(date +%s.%N)
{command} "$@" >>{shlex.quote(str(self.dir / "notify.log"))} 2>&1
rc=$?
echo "$3 $start $(date +%s.%N) $rc" >>{shlex.quote(str(times))}
exit $rc
""")
        script.chmod(0o755)

    def hook_times(self) -> list[dict[str, Any]]:
        """What the notify wrapper logged: state, start and end of each hook run."""
        path = self.dir / "notify.times"
        records = []
        with contextlib.suppress(FileNotFoundError):
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 4:
                    records.append({"state": parts[0], "start": float(parts[1]), "end": float(parts[2]),
                                    "rc": int(parts[3])})
        return records


class CtbridgeReplicator:
    name = "ctbridge"
    interlock = True

    def __init__(self, options: Options) -> None:
        self.options = options

    def prepare(self, fw: Firewall, fws: Sequence[Firewall]) -> None:
        cfg = fw.dir / "ctbridge.toml"
        if self.options.event_buffer:
            text = cfg.read_text().replace("[apply]\n", f"[apply]\nevent_buffer = {self.options.event_buffer}\n")
            cfg.write_text(text)
        for section, lines in (("sync", self.options.sync), ("apply", self.options.apply)):
            if lines:
                head = f"[{section}]\n"
                cfg.write_text(cfg.read_text().replace(head, head + "".join(f"{line}\n" for line in lines), 1))
        fw.write_notify_wrapper(f"CTBRIDGE_CONFIG={shlex.quote(str(cfg))} {shlex.quote(str(HOOK))}")

    def start(self, fw: Firewall) -> None:
        if self.options.backend == "conntrackd":  # the replicator first: ctbridge asks it at start
            conf = str(fw.dir / "conntrackd.conf")
            fw.conntrackd = Process(f"{fw.name} conntrackd", fw.ns, ["conntrackd", "-C", conf],
                                    fw.dir / "conntrackd.console")
            wait_for(f"{fw.name}'s conntrackd to answer", lambda: fw.conntrackd_caches() is not None, timeout=30)
        command = list(self.options.ctbridge) or [sys.executable, "-m", "ctbridge"]
        env = {"PYTHONPATH": str(ROOT)} if not self.options.ctbridge else {
            "PYTHONPATH": "", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}  # nothing of this tree or venv
        fw.daemon = Process(f"{fw.name} ctbridge", fw.ns, [*command, "run", "-c", str(fw.dir / "ctbridge.toml")],
                            fw.dir / "ctbridge.log", env=env)
        wait_for(f"{fw.name}'s ctbridge to answer", lambda: fw.request("status"), timeout=30)

    def stop(self, fw: Firewall, sig: int = signal.SIGTERM) -> None:
        if fw.daemon is not None:
            fw.daemon.stop(sig)
            fw.daemon = None
        if fw.conntrackd is not None:
            fw.conntrackd.stop(sig)
            fw.conntrackd = None

    def replicated(self, fw: Firewall) -> int | None:
        if fw.daemon is None:
            return None
        if self.options.backend == "conntrackd":
            caches = fw.conntrackd_caches()
            return caches.get("external") if caches else None
        return int(fw.request("status")["external"]["entries"])

    def master_seconds(self, fw: Firewall, since: float) -> float | None:
        if self.options.notify != "fifo" or fw.daemon is None:
            return None
        # the daemon reads keepalived's FIFO line as it is written: its transition record runs from
        # that line to the end of the commit
        for record in reversed(fw.request("stats")["transitions"]):
            if record["state"] == "MASTER" and record["at"] >= since and not record.get("noop"):
                return float(record.get("committed_after", record["seconds"]))
        return None

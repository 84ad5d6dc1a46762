"""The HA lab: a client, two firewalls and a server in network namespaces, with real keepalived,
real nftables and a replicator (ctbridge, or conntrackd for comparison) on each firewall.

    client 192.0.2.100 ── br-lan ──┬── lan0 fw1 wan0 ──┬── br-wan ── server 203.0.113.100
       (gateway: LAN VIP           └── lan0 fw2 wan0 ──┘
        192.0.2.1)                      sync0 ═ sync0  (198.51.100.0/30, a veth of their own)

The firewalls forward LAN -> WAN only for new TCP SYNs and UDP, accept established and related
packets, drop and count everything else, and source-NAT LAN traffic to the WAN VIP with
fully-random ports: a flow the active firewall does not know is dropped, and a flow NATed anew gets
another port. Their keepalived.conf and ctbridge.toml are rendered from one cluster description by
`ctbridge render`'s code.

Everything (processes, namespaces, files) is removed on the way out, after an error or Ctrl-C too.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ctbridge.config import cluster as cluster_mod
from ctbridge.config import keyfile, render, resources
from ctbridge.daemon import control
from ctbridge.daemon.conntrackd import cache_sizes
from ctbridge.lab import netns

ROOT = Path(__file__).resolve().parent.parent.parent
HOOK = resources.hook_path()

LAN = "192.0.2"
WAN = "203.0.113"
CLIENT = f"{LAN}.100"
SERVER = f"{WAN}.100"
LAN_VIP = f"{LAN}.1"
WAN_VIP = f"{WAN}.1"
# IPv6 (Options.ipv6): the same plan in 2001:db8::/32, NAT66 to the WAN VIP
LAN6 = "2001:db8:1::"
WAN6 = "2001:db8:2::"
CLIENT6 = f"{LAN6}100"
SERVER6 = f"{WAN6}100"
LAN_VIP6 = f"{LAN6}1"
WAN_VIP6 = f"{WAN6}1"
SYNC_PORT = 3780
SYNC_GROUP = "239.255.37.80"  # Options.multicast: as examples/three-nodes-multicast.toml

# The firewall's own ruleset: what an operator of a stateful NAT firewall would run.
FIREWALL_RULES = f"""
table inet lab
delete table inet lab
table inet lab {{
    counter dropped {{ }}
    counter dropped_input {{ }}
    counter dropped_input6 {{ }}

    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan0" oifname "wan0" tcp flags & (fin | syn | rst | ack) == syn ct state new accept
        iifname "lan0" oifname "wan0" meta l4proto udp ct state new accept
        counter name "dropped" drop
    }}

    chain input {{
        type filter hook input priority filter; policy accept;
        ct state established,related accept
        iifname "wan0" ip protocol != vrrp counter name "dropped_input" drop
        iifname "wan0" meta nfproto ipv6 meta l4proto != {{ icmpv6, vrrp }} counter name "dropped_input6" drop
    }}

    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan0" ip saddr {LAN}.0/24 snat ip to {WAN_VIP} fully-random
        oifname "wan0" ip6 saddr {LAN6}/64 snat ip6 to {WAN_VIP6} fully-random
    }}
}}
"""
# Options.ftp: the FTP helper on the control connections (nf_conntrack_ftp, `ct helper`), and the
# passive data ports open only to what the helper expects (RELATED): how an operator lets FTP
# through a strict firewall. A table of its own, before the lab's forward chain.
FTP_PORTS = (30000, 30099)
FTP_RULES = f"""
table inet lab_ftp
delete table inet lab_ftp
table inet lab_ftp {{{{
    ct helper ftp-standard {{{{ type "ftp" protocol tcp; }}}}
    counter refused {{{{ }}}}

    chain prerouting {{{{
        type filter hook prerouting priority filter; policy accept;
        iifname "lan0" tcp dport 21 ct helper set "ftp-standard"
    }}}}

    chain forward {{{{
        type filter hook forward priority filter - 1; policy accept;
        iifname "lan0" tcp dport {FTP_PORTS[0]}-{FTP_PORTS[1]} ct state new counter name "refused" drop
    }}}}
}}}}
"""
FTP_FILE = 256 << 10  # bytes of the file the FTP tests retrieve

# 'numgen random' drops: this kernel has no netem. A table of its own, added and removed by lossy().
LOSS_RULES = """
table inet lab_loss {{
    chain input {{
        type filter hook input priority raw; policy accept;
        iifname "sync0" udp dport {port} numgen random mod 100 < {percent} counter drop
    }}
}}
"""


class Replicator(Protocol):
    """What runs on each firewall to keep the standby's conntrack table: ctbridge or conntrackd."""

    name: str
    interlock: bool

    def prepare(self, fw: Firewall, lab: Lab) -> None: ...

    def start(self, fw: Firewall) -> None: ...

    def stop(self, fw: Firewall, sig: int = signal.SIGTERM) -> None: ...

    def replicated(self, fw: Firewall) -> int | None:
        """How many peer flows ``fw`` holds, ready for a takeover."""

    def master_seconds(self, fw: Firewall, since: float) -> float | None:
        """From keepalived's MASTER notification (after wall time ``since``) to the flows committed,
        where the replicator itself knows it (notify_fifo); None: the notify hook's duration says."""


@dataclass
class Options:
    apply_mode: str = "commit"
    notify: str = "fifo"  # keepalived -> ctbridge through notify_fifo (ordered), or "hook"
    tcp: int = 200
    udp: int = 20
    event_buffer: int = 0  # bytes for the firewalls' kernel event socket (0: ctbridge's default)
    advert_int: float = 1.0
    verbose: bool = False
    gate: bool = True  # commit mode: ctbridge's commit gate (the control experiment turns it off)
    sync: tuple[str, ...] = ()  # lines added to each ctbridge.toml's [sync] section ("key = value")
    apply: tuple[str, ...] = ()  # ... and to its [apply] section
    ipv6: bool = False  # IPv6 too: VIPs of their own (VRRP 3), NAT66, every other flow over IPv6
    ctbridge: tuple[str, ...] = ()  # the command that runs ctbridge (default: this tree's, with this Python);
    # ("/usr/bin/ctbridge",): the installed package's, with Debian's Python and its libraries
    ftp: bool = False  # an FTP server behind the pair, the FTP helper on the firewalls (FTP_RULES)
    firewalls: int = 2  # how many firewalls (three: the three-node example's cluster)
    multicast: bool = False  # sync and VRRP adverts over multicast (SYNC_GROUP), the sync link a bridge
    backend: str = "ctbridge"  # "conntrackd": each firewall's ctbridge drives a conntrackd (apply.backend)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0, step: float = 0.1) -> Any:
    """Poll check() until it returns something true (bounded in time); that value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(control.ControlError, OSError):
            last = check()
            if last:
                return last
        time.sleep(step)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


class Process:
    """A command in a namespace, in its own session (so Ctrl-C in a terminal reaches only us), whose
    output goes to a log file; stop() ends its whole process group."""

    def __init__(self, name: str, ns: str, argv: list[str], log: Path, env: dict[str, str] | None = None,
                 stdout_pipe: bool = False) -> None:
        self.name = name
        self.log = log
        self.logf = open(log, "ab")
        try:
            self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE if stdout_pipe else self.logf, stderr=self.logf,
                                         start_new_session=True, env={**os.environ, **(env or {})}, cwd=ROOT)
        except BaseException:
            self.logf.close()
            raise

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        # children left in the group (keepalived's VRRP process, a hook) go too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self.logf.close()
        return self.proc.returncode


class Firewall:
    def __init__(self, lab: Lab, index: int) -> None:
        self.lab = lab
        self.index = index
        self.name = f"fw{index}"
        self.ns = ""
        self.dir = lab.dir / self.name
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

    def has_vips(self) -> bool:
        out = self.run("ip", "-o", "addr", "show", check=False).stdout
        held = f" {LAN_VIP}/" in out and f" {WAN_VIP}/" in out
        if self.lab.options.ipv6:
            return held and f" {LAN_VIP6}/" in out and f" {WAN_VIP6}/" in out
        return held

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        return control.request(str(self.run_dir / "ctbridge.sock"), cmd, timeout=60, **args)

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
        servers = [("ipv4", SERVER)] + ([("ipv6", SERVER6)] if self.lab.options.ipv6 else [])
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

    def prepare(self, fw: Firewall, lab: Lab) -> None:
        cfg = fw.dir / "ctbridge.toml"
        if self.options.event_buffer:
            text = cfg.read_text().replace("[apply]\n", f"[apply]\nevent_buffer = {self.options.event_buffer}\n")
            cfg.write_text(text)
        for section, lines in (("sync", self.options.sync), ("apply", self.options.apply)):
            if lines:
                head = f"[{section}]\n"
                cfg.write_text(cfg.read_text().replace(head, head + "".join(f"{line}\n" for line in lines), 1))
        lab.write_notify_wrapper(fw, f"CTBRIDGE_CONFIG={shlex.quote(str(cfg))} {shlex.quote(str(HOOK))}")

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


@dataclass
class FtpSession:
    """The lab's FTP client: one command, one JSON answer (ctbridge.lab.ftp)."""

    proc: Process

    def answer(self) -> dict[str, Any]:
        assert self.proc.proc.stdout is not None
        line = self.proc.proc.stdout.readline()  # the client bounds every step (ftp.TIMEOUT)
        if not line:
            raise RuntimeError(f"the FTP client ended: {self.proc.log.read_text()[-400:]}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.proc.stdin is not None
        self.proc.proc.stdin.write(command.encode() + b"\n")
        self.proc.proc.stdin.flush()
        return self.answer()


@dataclass
class Traffic:
    """The client's status lines, read in a thread; the latest is ``status``."""

    proc: Process
    status: dict[str, Any] = field(default_factory=dict)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.proc.stdout is not None
        for line in self.proc.proc.stdout:
            with contextlib.suppress(ValueError):
                self.status = json.loads(line)

    def stop(self) -> dict[str, Any]:
        if self.proc.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.proc.wait(15)
        if self.thread is not None:
            self.thread.join(5)
        self.proc.stop()
        return self.status


class Lab:
    def __init__(self, directory: Path, options: Options, replicator: Replicator | None = None) -> None:
        self.dir = directory
        self.options = options
        self.replicator = replicator or CtbridgeReplicator(options)
        self.fws = [Firewall(self, i) for i in range(1, options.firewalls + 1)]
        self.client_ns = self.server_ns = self.switch_ns = ""
        self.server: Process | None = None
        self.ftp_server: Process | None = None
        self.ftp_clients: list[Process] = []
        self.traffic: Traffic | None = None
        self.key = directory / "sync.key"

    # --- building -------------------------------------------------------------------------------

    def build(self, stack: contextlib.ExitStack) -> None:
        self.switch_ns = stack.enter_context(netns.namespace("sw"))
        self.client_ns = stack.enter_context(netns.namespace("client"))
        self.server_ns = stack.enter_context(netns.namespace("server"))
        for fw in self.fws:
            fw.ns = stack.enter_context(netns.namespace(fw.name))
            fw.dir.mkdir()
            fw.run_dir.mkdir()
        if self.options.ipv6:
            # No duplicate address detection: an address is usable at once, as on a lab link it can
            # be. Addresses kept when a link goes down ("LAN link down"): without it the kernel
            # drops a firewall's IPv6 addresses with the link, and its peer's VRRP and neighbour
            # solicitations to them were forwarded back out of the LAN (and dropped) after it came up.
            for ns in (self.client_ns, self.server_ns, *(fw.ns for fw in self.fws)):
                for scope in ("all", "default"):
                    netns.run(ns, "sysctl", "-q", "-w", f"net.ipv6.conf.{scope}.accept_dad=0",
                              f"net.ipv6.conf.{scope}.dad_transmits=0", f"net.ipv6.conf.{scope}.keep_addr_on_down=1")
        sw = self.switch_ns
        for bridge in ("br-lan", "br-wan"):
            netns.run(sw, "ip", "link", "add", bridge, "type", "bridge")
            netns.run(sw, "ip", "link", "set", bridge, "up")

        def port(ns: str, ifname: str, bridge: str, swport: str) -> None:
            netns.run(sw, "ip", "link", "add", swport, "type", "veth", "peer", "name", ifname, "netns", ns)
            netns.run(sw, "ip", "link", "set", swport, "master", bridge, "up")

        port(self.client_ns, "eth0", "br-lan", "client")
        port(self.server_ns, "eth0", "br-wan", "server")
        netns.run(self.client_ns, "ip", "addr", "add", f"{CLIENT}/24", "dev", "eth0")
        netns.run(self.client_ns, "ip", "link", "set", "eth0", "up")
        netns.run(self.client_ns, "ip", "route", "add", "default", "via", LAN_VIP)
        netns.run(self.server_ns, "ip", "addr", "add", f"{SERVER}/24", "dev", "eth0")
        netns.run(self.server_ns, "ip", "link", "set", "eth0", "up")
        if self.options.ipv6:
            netns.run(self.client_ns, "ip", "-6", "addr", "add", f"{CLIENT6}/64", "dev", "eth0", "nodad")
            netns.run(self.client_ns, "ip", "-6", "route", "add", "default", "via", LAN_VIP6)
            netns.run(self.server_ns, "ip", "-6", "addr", "add", f"{SERVER6}/64", "dev", "eth0", "nodad")
        if self.sync_bridged:
            # more than two firewalls, or multicast: the sync link is a bridge of its own, without
            # IGMP snooping (every port hears the group, as on a sync switch with it off)
            netns.run(sw, "ip", "link", "add", "br-sync", "type", "bridge", "mcast_snooping", "0")
            netns.run(sw, "ip", "link", "set", "br-sync", "up")
            for fw in self.fws:
                port(fw.ns, "sync0", "br-sync", f"{fw.name}-sync")
        else:
            fw1, fw2 = self.fws
            fw1.run("ip", "link", "add", "sync0", "type", "veth", "peer", "name", "sync0", "netns", fw2.ns)
        for fw in self.fws:
            port(fw.ns, "lan0", "br-lan", f"{fw.name}-lan")
            port(fw.ns, "wan0", "br-wan", f"{fw.name}-wan")
            for ifname, addr in (("lan0", f"{fw.lan}/24"), ("wan0", f"{fw.wan}/24"),
                                 ("sync0", f"{fw.sync}/{self.sync_prefix}")):
                fw.run("ip", "addr", "add", addr, "dev", ifname)
                fw.run("ip", "link", "set", ifname, "up")
            fw.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
            if self.options.ipv6:
                for ifname, addr in (("lan0", f"{fw.lan6}/64"), ("wan0", f"{fw.wan6}/64")):
                    fw.run("ip", "-6", "addr", "add", addr, "dev", ifname, "nodad")
                fw.run("sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1")
            netns.run(fw.ns, "nft", "-f", "-", input=FIREWALL_RULES)
            if self.options.ftp:
                netns.run(fw.ns, "nft", "-f", "-", input=FTP_RULES.format())
        subprocess.run([sys.executable, "-m", "ctbridge", "keygen", str(self.key)], check=True, timeout=60,
                       capture_output=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.render()

    @property
    def sync_bridged(self) -> bool:
        return len(self.fws) > 2 or self.options.multicast

    @property
    def sync_prefix(self) -> int:
        return 29 if self.sync_bridged else 30

    def cluster_text(self) -> str:
        o = self.options
        nodes = "".join(f"""
[[node]]
name = "{fw.name}"
priority = {200 - 50 * fw.index}
sync = {{ name = "sync0", address = "{fw.sync}/{self.sync_prefix}" }}
interfaces.lan = {{ name = "lan0", address = "{fw.lan}/24" }}
interfaces.wan = {{ name = "wan0", address = "{fw.wan}/24" }}
""" + (f"""interfaces.lan6 = {{ name = "lan0", address = "{fw.lan6}/64" }}
interfaces.wan6 = {{ name = "wan0", address = "{fw.wan6}/64" }}
""" if o.ipv6 else "") for fw in self.fws)
        instances = "".join(f"""
[[instance]]
name = "{name}"
side = "{side}"
virtual_router_id = {vrid}
vips = ["{vip}"]
advert_int = {o.advert_int}
""" for name, side, vrid, vip in (("LAN", "lan", 51, f"{LAN_VIP}/24"), ("WAN", "wan", 52, f"{WAN_VIP}/24"),
                                 *((("LAN6", "lan6", 61, f"{LAN_VIP6}/64"), ("WAN6", "wan6", 62, f"{WAN_VIP6}/64"))
                                   if o.ipv6 else ())))
        return f"""# The lab's cluster description, rendered into each firewall's directory.
[cluster]
name = "lab"
key_file = "{self.dir}/{{node}}/sync.key"
secret = "{self.key}"
apply_mode = "{o.apply_mode}"
transport = "{'multicast' if o.multicast else 'unicast'}"
{f'sync_group = "{SYNC_GROUP}"' if o.multicast else ''}
notify = "{o.notify}"
interlock = {"true" if self.replicator.interlock else "false"}
backend = "{o.backend}"
gate = {"true" if o.gate else "false"}
vrrp_version = {3 if o.advert_int != int(o.advert_int) or o.ipv6 else 2}
group = "FW"

[paths]
config_dir = "{self.dir}/{{node}}"
run_dir = "{self.dir}/{{node}}/run"
state_dir = "{self.dir}/{{node}}/run"
hook = "{self.dir}/{{node}}/notify"
{nodes}{instances}"""

    def render(self) -> None:
        path = self.dir / "cluster.toml"
        path.write_text(self.cluster_text())
        c = cluster_mod.checked(cluster_mod.load(str(path)))
        secret = keyfile.read_secret(c.secret_path())  # each firewall gets only its own pairwise keys
        for fw in self.fws:
            render.write(render.render(c, c.node(fw.name), secret=secret), fw.dir)
            netns.run(fw.ns, "nft", "-f", str(fw.dir / "ctbridge-sync.nft"))
            self.replicator.prepare(fw, self)

    def write_notify_wrapper(self, fw: Firewall, command: str) -> None:
        """keepalived's notify script for ``fw``: runs ``command`` with keepalived's arguments and
        logs when it started and ended, the lab's measure of "MASTER to committed"."""
        script = fw.dir / "notify"
        times = fw.dir / "notify.times"
        script.write_text(f"""#!/bin/sh
start=$(date +%s.%N)
{command} "$@" >>{shlex.quote(str(fw.dir / "notify.log"))} 2>&1
rc=$?
echo "$3 $start $(date +%s.%N) $rc" >>{shlex.quote(str(times))}
exit $rc
""")
        script.chmod(0o755)

    # --- running ----------------------------------------------------------------------------------

    def start(self) -> None:
        for fw in self.fws:
            self.replicator.start(fw)
        self.fws[0].start_keepalived()
        wait_for("fw1 to become master", self.fws[0].has_vips, timeout=60)
        for fw in self.fws[1:]:
            fw.start_keepalived()
        six = self.options.ipv6
        self.server = Process("server", self.server_ns, [sys.executable, "-m", "ctbridge.lab.traffic", "server",
                                                         "--address", SERVER, *(["--address", SERVER6] if six else [])],
                              self.dir / "server.log", env={"PYTHONPATH": str(ROOT)})
        wait_for("the server to listen", lambda: b"listening" in (self.dir / "server.log").read_bytes(), timeout=30)
        if self.options.ftp:
            root = self.dir / "ftp"
            root.mkdir()
            (root / "file").write_bytes(os.urandom(FTP_FILE))
            self.ftp_server = Process("ftp server", self.server_ns, [
                sys.executable, "-m", "ctbridge.lab.ftp", "server", SERVER, str(root),
                f"{FTP_PORTS[0]}-{FTP_PORTS[1]}"], self.dir / "ftp-server.log", env={"PYTHONPATH": str(ROOT)})
            wait_for("the FTP server to listen",
                     lambda: b"starting FTP server" in (self.dir / "ftp-server.log").read_bytes(), timeout=30)
        client = Process("client", self.client_ns, [
            sys.executable, "-m", "ctbridge.lab.traffic", "client", "--server", SERVER,
            *(["--server", SERVER6] if six else []), "--tcp",
            str(self.options.tcp), "--udp", str(self.options.udp)], self.dir / "client.log",
            env={"PYTHONPATH": str(ROOT)}, stdout_pipe=True)
        self.traffic = Traffic(client)
        self.traffic.start()
        o = self.options
        wait_for("every connection to be open and moving data",
                 lambda: self.status().get("tcp_alive") == o.tcp and self.status().get("udp_flows") == o.udp,
                 timeout=60)

    def status(self) -> dict[str, Any]:
        return dict(self.traffic.status) if self.traffic else {}

    def ftp_session(self) -> FtpSession:
        """A logged-in FTP control connection from the client (ctbridge.lab.ftp), stopped with the lab."""
        proc = Process("ftp client", self.client_ns, [sys.executable, "-m", "ctbridge.lab.ftp", SERVER],
                       self.dir / f"ftp-client{len(self.ftp_clients)}.log", env={"PYTHONPATH": str(ROOT)},
                       stdout_pipe=True)
        self.ftp_clients.append(proc)
        session = FtpSession(proc)
        session.answer()
        return session

    def master(self) -> Firewall | None:
        holders = [fw for fw in self.fws if fw.has_vips()]
        return holders[0] if len(holders) == 1 else None

    def wait_master(self, fw: Firewall, timeout: float = 60.0) -> float:
        """Wait until ``fw`` alone holds the VIPs; when that happened (monotonic)."""
        wait_for(f"{fw.name} to be the only master", lambda: self.master() is fw, timeout=timeout, step=0.05)
        return time.monotonic()

    def wait_recovered(self, since: float, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until every TCP connection and UDP flow has moved data after ``since``."""
        def moved() -> dict[str, Any] | None:
            s = self.status()
            ok = (s.get("tcp_oldest") is not None and s["tcp_oldest"] > since
                  and s.get("udp_oldest") is not None and s["udp_oldest"] > since)
            return s if ok else None
        return dict(wait_for("every flow to move data again", moved, timeout=timeout, step=0.1))

    def lossy(self, percent: int) -> contextlib.AbstractContextManager[None]:
        @contextlib.contextmanager
        def loss() -> Iterator[None]:
            for fw in self.fws:
                netns.run(fw.ns, "nft", "-f", "-", input=LOSS_RULES.format(port=SYNC_PORT, percent=percent))
            try:
                yield
            finally:
                for fw in self.fws:
                    fw.run("nft", "delete", "table", "inet", "lab_loss", check=False)
        return loss()

    def stop(self) -> dict[str, Any]:
        """Stop every process; one that fails to stop does not keep the others running."""
        final: dict[str, Any] = {}
        errors: list[BaseException] = []

        def attempt(fn: Callable[[], Any]) -> Any:
            try:
                return fn()
            except Exception as exc:
                errors.append(exc)
                return None
        if self.traffic is not None:
            final = attempt(self.traffic.stop) or {}
            self.traffic = None
        if self.server is not None:
            attempt(self.server.stop)
            self.server = None
        for proc in [*self.ftp_clients, *([self.ftp_server] if self.ftp_server else [])]:
            attempt(proc.stop)
        self.ftp_clients, self.ftp_server = [], None
        for fw in self.fws:
            attempt(fw.stop_keepalived)
        for fw in self.fws:
            attempt(functools.partial(self.replicator.stop, fw))
        if errors:
            raise errors[0]
        return final


@contextlib.contextmanager
def lab(options: Options | None = None, replicator: Replicator | None = None,
        keep: bool = False) -> Iterator[Lab]:
    """A built and started lab; torn down completely on the way out, whatever happened."""
    with contextlib.ExitStack() as stack:
        directory = Path(tempfile.mkdtemp(prefix="ctb-lab-"))
        if not keep:
            stack.callback(shutil.rmtree, directory, True)
        the_lab = Lab(directory, options or Options(), replicator)
        the_lab.build(stack)
        stack.callback(the_lab.stop)  # before the namespaces go (the stack unwinds in reverse)
        yield the_lab

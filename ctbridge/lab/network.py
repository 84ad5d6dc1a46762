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
The plan (addresses, rulesets, Options) is ctbridge.lab.topology's; a firewall and its replicator
are ctbridge.lab.firewall's; processes and bounded waits ctbridge.lab.process's.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
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
from typing import Any

from ctbridge.config import cluster as cluster_mod
from ctbridge.config import keyfile, render
from ctbridge.lab import netns
from ctbridge.lab.delayline import delay_rule
from ctbridge.lab.firewall import CtbridgeReplicator, Firewall, Replicator
from ctbridge.lab.process import Process, wait_for
from ctbridge.lab.topology import (
    ACTIVE_ACTIVE_NAT,
    CLIENT,
    CLIENT6,
    DELAY_QUEUE,
    FIREWALL_RULES,
    FTP_FILE,
    FTP_PORTS,
    FTP_RULES,
    LAN_VIP,
    LAN_VIP6,
    LOSS_RULES,
    NAT_PORTS,
    NO_SYNC_MARK,
    NO_SYNC_RULES,
    ROOT,
    SERVER,
    SERVER6,
    SYNC_GROUP,
    SYNC_PORT,
    WAN_VIP,
    WAN_VIP6,
    ZONE_RULES,
    Options,
)


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
        self.fws = [Firewall(directory, options, i) for i in range(1, options.firewalls + 1)]
        self.client_ns = self.server_ns = self.switch_ns = ""
        self.server: Process | None = None
        self.delay_line: Process | None = None  # Options.wan_delay
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
            if self.options.zones:
                netns.run(fw.ns, "nft", "-f", "-", input=ZONE_RULES)
            if self.options.no_sync:
                netns.run(fw.ns, "nft", "-f", "-", input=NO_SYNC_RULES)
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
{f'master = "{self.fws[0 if side.startswith("lan") else 1].name}"' if o.active_active else ""}
""" for name, side, vrid, vip in (("LAN", "lan", 51, f"{LAN_VIP}/24"), ("WAN", "wan", 52, f"{WAN_VIP}/24"),
                                 *((("LAN6", "lan6", 61, f"{LAN_VIP6}/64"), ("WAN6", "wan6", 62, f"{WAN_VIP6}/64"))
                                   if o.ipv6 else ())))
        return f"""# The lab's cluster description, rendered into each firewall's directory.
[cluster]
name = "lab"
key_file = "{self.dir}/{{node}}/sync.key"
secret = "{self.key}"
apply_mode = "{"inject" if o.active_active else o.apply_mode}"
{f'mode = "active-active"{chr(10)}nat_ports = "{NAT_PORTS}"' if o.active_active else ""}
{"own_flows = true" if o.own_flows else ""}
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
{f'{chr(10)}[replication]{chr(10)}no_sync_marks = ["{NO_SYNC_MARK}"]{chr(10)}' if o.no_sync else ""}
{nodes}{instances}"""

    def render(self) -> None:
        path = self.dir / "cluster.toml"
        path.write_text(self.cluster_text())
        c = cluster_mod.checked(cluster_mod.load(str(path)))
        secret = keyfile.read_secret(c.secret_path())  # each firewall gets only its own pairwise keys
        for fw in self.fws:
            render.write(render.render(c, c.node(fw.name), secret=secret), fw.dir)
            netns.run(fw.ns, "nft", "-f", str(fw.dir / "ctbridge-sync.nft"))
            if self.options.active_active:
                netns.run(fw.ns, "nft", "-f", "-", input=ACTIVE_ACTIVE_NAT.format(
                    nat_file=fw.dir / "ctbridge-nat.nft"))
                if not self.options.defer:  # the control: the rendered configuration, the defer off
                    cfg = fw.dir / "ctbridge.toml"
                    cfg.write_text("".join(line for line in cfg.read_text().splitlines(keepends=True)
                                           if not line.startswith(("defer_queue", "defer_udp_ports"))))
            self.replicator.prepare(fw, self.fws)

    # --- running ----------------------------------------------------------------------------------

    def start(self) -> None:
        for fw in self.fws:
            self.replicator.start(fw)
        if self.options.active_active:
            for fw in self.fws:
                fw.start_keepalived()
            self.wait_layout({LAN_VIP: self.fws[0], WAN_VIP: self.fws[1]})
        else:
            self.fws[0].start_keepalived()
            wait_for("fw1 to become master", self.fws[0].has_vips, timeout=60)
            for fw in self.fws[1:]:
                fw.start_keepalived()
        six = self.options.ipv6
        if self.options.wan_delay:
            netns.run(self.server_ns, *delay_rule(DELAY_QUEUE))
            self.delay_line = Process("delay line", self.server_ns, [
                sys.executable, "-m", "ctbridge.lab.delayline", str(DELAY_QUEUE), str(self.options.wan_delay * 1000)],
                self.dir / "delayline.log", env={"PYTHONPATH": str(ROOT)})
            wait_for("the delay line", lambda: b"delaying" in (self.dir / "delayline.log").read_bytes(), timeout=30)
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
            str(self.options.tcp), "--udp", str(self.options.udp), "--new", str(self.options.new)],
            self.dir / "client.log",
            env={"PYTHONPATH": str(ROOT)}, stdout_pipe=True)
        self.traffic = Traffic(client)
        self.traffic.start()
        o = self.options
        wait_for("every connection to be open and moving data",
                 lambda: self.status().get("tcp_alive") == o.tcp and self.status().get("udp_flows") == o.udp,
                 timeout=60)

    def forget_connect_times(self) -> None:
        """The client's connect times (Options.new) from now on only (a bench's phase)."""
        if self.traffic is not None:
            self.traffic.proc.proc.send_signal(signal.SIGUSR1)
            time.sleep(0.1)

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

    def layout(self) -> dict[str, Firewall | None]:
        """Who holds each IPv4 VIP (None: nobody, or more than one)."""
        held = {vip: [fw for fw in self.fws if fw.holds(vip)] for vip in (LAN_VIP, WAN_VIP)}
        return {vip: fws[0] if len(fws) == 1 else None for vip, fws in held.items()}

    def wait_layout(self, want: dict[str, Firewall], timeout: float = 60.0, stable: float = 0.0) -> float:
        """Wait until each VIP is held by ``want``'s firewall alone (active-active: each instance
        has its own master), and has been for ``stable`` seconds; when it began (monotonic)."""
        names = ", ".join(f"{vip} on {fw.name}" for vip, fw in want.items())
        since: list[float] = []

        def held() -> bool:
            if self.layout() != want:
                since.clear()
                return False
            since[:] = since or [time.monotonic()]
            return time.monotonic() - since[0] >= stable
        wait_for(names, held, timeout=timeout, step=0.05)
        return since[0]

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
        if self.delay_line is not None:
            attempt(self.delay_line.stop)
            self.delay_line = None
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

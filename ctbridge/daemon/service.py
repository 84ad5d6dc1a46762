"""`ctbridge run`: the daemon. Thin adapters around the pure engine, wired here.

Its channels: kernel events (flows, and with sync.expectations the helpers' expectations, each
on a netlink socket of its own), the refresh sweeps' dumps, the sync links (one UDP socket each),
the control socket (the CLI, keepalived's notify hook), the metrics endpoint, keepalived's notify
FIFO and track file, and systemd's notify socket. With apply.backend = "conntrackd" the sync
links, kernel events and sweeps are conntrackd's, and this daemon drives it.

``Daemon`` builds the parts, starts them in one order for both backends, and stops them:
- datapath: datagrams in and out, the engine's events and timer, heartbeats;
- kernelio: reading this kernel (events, dumps) and writing it (commit, inject, expectations);
- refresh: the sweeps for timeouts traffic restarted;
- transitions: keepalived's transitions (failover's steps), the role kept across restarts, the FIFO;
- gate (GateKeeper), interlock (the track file), handlers (control requests), stats.
Kernel writes run in a worker thread so the sync link is served meanwhile. Signals only set
flags; the loop acts on them. Imports every layer below; the CLI's `run` imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any, Protocol

from ctbridge.config import host, replication, sizing
from ctbridge.config import settings as config_mod
from ctbridge.config.settings import Config
from ctbridge.daemon import conntrackd, control, heap, journal, metrics
from ctbridge.daemon import stats as stats_mod
from ctbridge.daemon.datapath import Datapath
from ctbridge.daemon.defer import DeferQueue
from ctbridge.daemon.gate import GateKeeper
from ctbridge.daemon.handlers import Handlers
from ctbridge.daemon.interlock import Interlock
from ctbridge.daemon.kernelio import Kernel, KernelReader, KernelWriter
from ctbridge.daemon.looplag import LoopLag
from ctbridge.daemon.looplag import watch as watch_lag
from ctbridge.daemon.refresh import refresh_loop
from ctbridge.daemon.synclink import SyncLinks
from ctbridge.daemon.transitions import RoleKeeper, Transitions, read_fifo
from ctbridge.sync.engine import Engine

log = logging.getLogger("ctbridge")

Tasks = list["asyncio.Task[Any]"]


class Replication(Protocol):
    """What a backend adds to the start-up: its own tasks and sockets before keepalived's
    channels open (``start``), and the line that says the daemon runs (``running``)."""

    async def start(self, tasks: Tasks) -> None: ...

    async def running(self) -> None: ...


@dataclass
class OwnReplication:
    """apply.backend = "ctbridge": this daemon replicates. The table first (events meanwhile
    wait in the event socket), then the sync link: a peer that asks for a bulk transfer at once
    must get the whole table."""

    cfg: Config
    epoch: int
    engine: Engine
    kernel: Kernel
    reader: KernelReader
    datapath: Datapath
    links: SyncLinks
    refresh_stats: dict[str, Any]  # the "refresh" section of the stats
    flows: int = 0  # in the kernel at start
    defer: DeferQueue | None = None  # apply.defer_queue: the active-active defer

    async def start(self, tasks: Tasks) -> None:
        self.flows = await self.reader.resync(announce=False)
        tasks.append(asyncio.ensure_future(self.reader.read_events()))
        tasks.append(asyncio.ensure_future(refresh_loop(self.cfg, self.engine, self.kernel, self.refresh_stats,
                                                        self.datapath.after_input)))
        if self.reader.expect_events is not None:
            tasks.append(asyncio.ensure_future(self.reader.read_expectations()))
        loop = asyncio.get_running_loop()
        self.links.open(loop, self.datapath.on_datagram, self.datapath.after_input)
        self.datapath.start_heartbeats()
        self.engine.request_resync(loop.time())
        if self.cfg.apply.defer_queue:
            engine = self.engine
            # bound last: a packet held now waits for peers whose sessions are opening
            self.defer = DeferQueue(self.cfg.apply.defer_queue, self.cfg.apply.defer_wait, loop,
                                    lambda: bool(engine.live_peers()),
                                    self.cfg.apply.defer_udp_ports, self.cfg.sync.port)

    async def running(self) -> None:
        self.datapath.after_input()
        cfg = self.cfg
        log.info("ctbridge %s running: node %s (%08x), epoch %d, %d flows in the kernel, sync %s port %d, %s",
                 cfg.apply.mode, cfg.node.name, self.engine.node_id, self.epoch, self.flows,
                 " + ".join(link.local for link in self.links.links), cfg.sync.port,
                 f"multicast {cfg.sync.group}" if cfg.multicast else "peers " + ", ".join(cfg.sync.peers))
        warning = sizing.host_warning()
        if warning is not None:
            log.warning("%s", warning)
        heap.freeze_long_lived()  # the caches and parts made at start: out of every later collection


@dataclass
class ConntrackdReplication:
    """apply.backend = "conntrackd": conntrackd has the sync link and the kernel events; this
    daemon keeps keepalived's FIFO, the interlock, the gate, the control socket and the metrics."""

    cfg: Config
    backend: conntrackd.Conntrackd

    async def start(self, tasks: Tasks) -> None:
        return None

    async def running(self) -> None:
        caches = await self.backend.caches()
        log.info("ctbridge %s running with the conntrackd backend: node %s, conntrackd -C %s %s",
                 self.cfg.apply.mode, self.cfg.node.name, self.backend.config,
                 f"answers ({caches})" if caches is not None else "does not answer (yet)")


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self.auth = host.auth(cfg)
        self.epoch = host.next_epoch(cfg.node.state_dir)
        now = self.loop.time()
        # the challenge of this life: random, so no earlier life's answers (a captured stream) fit it
        self.engine = Engine(replication.engine_config(cfg), self.auth, self.epoch, now,
                             clock_offset=time.time() - now, nonce=secrets.randbits(64))
        self.stop = asyncio.Event()
        self.reload = False
        self.kept = stats_mod.sections()  # the figures the parts keep as they work
        self.kernel = Kernel(self.loop)
        self.writer = KernelWriter(self.kernel, self.engine, cfg.apply.liberal_tcp, self.kept)
        self.links = SyncLinks(cfg, bind=cfg.apply.backend == "ctbridge")
        self.datapath = Datapath(self.engine, self.links, self.loop, cfg.node.state_dir, inject=self.writer.inject)
        self.reader = KernelReader(self.kernel, self.engine, cfg.apply.event_buffer, cfg.sync.expectations,
                                   self.kept["kernel"], self.datapath.input_done, cfg.apply.event_queue)
        # apply.backend = "conntrackd": it replicates, this daemon drives it (daemon/conntrackd.py)
        self.backend: conntrackd.Conntrackd | None = None
        self.replication: Replication
        if cfg.apply.backend == "conntrackd":
            self.backend = conntrackd.Conntrackd(cfg.apply.conntrackd, cfg.apply.conntrackd_config,
                                                 cfg.apply.step_timeout)
            self.replication = ConntrackdReplication(cfg, self.backend)
        else:
            self.replication = OwnReplication(cfg, self.epoch, self.engine, self.kernel, self.reader, self.datapath,
                                              self.links, self.kept["refresh"])
        self.gate = GateKeeper(cfg.apply.gate and cfg.apply.mode == "commit", cfg.keepalived.vips, self.kept)
        self.roles = RoleKeeper(self.engine, self.kernel, self.gate, cfg.control.socket, tuple(cfg.keepalived.vips))
        self.transitions = Transitions(cfg, self.engine, self.reader, self.writer, self.gate, self.roles,
                                       self.backend, self.datapath.after_input, self.kept)
        self.interlock = Interlock(self.engine, self.backend, cfg.keepalived.track_file,
                                   cfg.keepalived.incomplete_value, self.kept,
                                   gone_complete=cfg.keepalived.peer_gone_complete)
        self.lag = LoopLag()
        self.stats = stats_mod.Stats(cfg, self.engine, self.links, self.reader, self.writer, self.interlock,
                                     self.backend, self.kept, self.loop.time, self.lag)
        self.handlers = Handlers(self.engine, self.reader, self.transitions, self.stats, self.datapath.after_input)

    @property
    def defer(self) -> DeferQueue | None:
        """The active-active defer, once the replication has started it (apply.defer_queue)."""
        return self.replication.defer if isinstance(self.replication, OwnReplication) else None

    async def run(self) -> int:
        """Start (one path for both backends), serve until a signal, stop."""
        tasks: Tasks = []
        servers: list[asyncio.AbstractServer] = []
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.loop.add_signal_handler(signum, self.on_signal, signum)
        try:
            tasks.append(asyncio.ensure_future(watch_lag(self.lag)))
            await self.roles.restore()  # before any transition can come (the hook, the FIFO)
            servers.append(await control.serve(self.cfg.control.socket, self.handlers.handle,
                                               self.transitions.progress))
            if self.cfg.metrics.listen:
                servers.append(await metrics.serve(self.cfg.metrics.listen, self.stats, self.kept["metrics_endpoint"]))
            await self.replication.start(tasks)
            keepalived_cfg = self.cfg.keepalived
            if keepalived_cfg.notify_fifo:
                tasks.append(asyncio.ensure_future(read_fifo(keepalived_cfg.notify_fifo, self.transitions.transition)))
            if keepalived_cfg.track_file:
                tasks.append(asyncio.ensure_future(self.interlock.run()))
            tasks.append(asyncio.ensure_future(self.systemd()))
            await self.replication.running()
            if self.defer is not None:
                self.stats.defer = self.defer.stats
                self.writer.after_inject = self.defer.written
            return await self.serve_until_stopped(tasks)
        finally:
            await self.close(tasks, servers)

    async def close(self, tasks: Tasks, servers: list[asyncio.AbstractServer]) -> None:
        """Everything run() started, stopped; the gate fails open, a standby stays demoted."""
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        for server in servers:
            server.close()
        await self.gate.stop()
        if self.defer is not None:
            self.defer.close()  # what it holds goes on; the ruleset's bypass passes the rest
        self.datapath.stop_heartbeats()
        self.interlock.stop()
        self.links.close()
        self.reader.close()
        self.kernel.close()
        with contextlib.suppress(OSError):
            os.unlink(self.cfg.control.socket)

    async def serve_until_stopped(self, tasks: Tasks) -> int:
        """Until a signal; a task that fails ends the daemon (run()'s finally cancels the rest)."""
        stopper = asyncio.ensure_future(self.stop.wait())
        tasks.append(stopper)
        waiting: set[asyncio.Future[Any]] = set(tasks)
        while not self.stop.is_set():
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopper and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        log.info("stopping")
        return 0

    def on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self.reload = True
            self.loop.call_soon(self.do_reload)
        else:
            self.stop.set()

    def do_reload(self) -> None:
        if not self.reload:
            return
        self.reload = False
        try:
            cfg = config_mod.load(self.cfg.path)
            auth = host.auth(cfg)
        except Exception as exc:  # keep running with what works
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        # Only filters and keys change on SIGHUP; addresses, ports and the node name need a restart.
        self.engine.reconfigure(auth=auth, flow_filter=replication.flow_filter(cfg),
                                peer_filters=replication.peer_filters(cfg))
        self.reader.select(self.engine.config.filter.no_sync)
        log.info("reloaded filters and keys from %s", cfg.path)

    async def systemd(self) -> None:
        """Type=notify readiness and the watchdog, when systemd asks for them ($NOTIFY_SOCKET)."""
        path = os.environ.get("NOTIFY_SOCKET")
        if not path:
            return
        if path.startswith("@"):
            path = "\0" + path[1:]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            def notify(msg: str) -> None:
                with contextlib.suppress(OSError):
                    s.sendto(msg.encode(), path)
            notify("READY=1\nSTATUS=replicating")
            usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
            if not usec:
                await self.stop.wait()
                return
            while not self.stop.is_set():
                notify("WATCHDOG=1")
                await asyncio.sleep(usec / 2e6)


def main(path: str) -> int:
    """Load, check against this host, and run; ConfigError/ControlError/KeyFileError say why not."""
    cfg = config_mod.load(path)
    logging.getLogger().setLevel(cfg.log.level.upper())
    journal.use_journal_priorities()
    problems = host.problems(cfg)
    if problems:
        raise config_mod.ConfigError(problems)

    async def run() -> int:
        return await Daemon(cfg).run()
    return asyncio.run(run())

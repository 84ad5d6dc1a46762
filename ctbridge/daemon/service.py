"""`ctbridge run`: the daemon. Thin adapters around the pure engine.

It moves bytes between the engine and three sockets (kernel events, the sync link, the control
socket), re-arms one timer, and runs keepalived's transitions one at a time. Kernel writes
(commits, purges, injected flows) run in a worker thread so the sync link is served meanwhile.
Signals only set flags; the loop acts on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import signal
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import Any

from ctbridge import atomicfile
from ctbridge.config import host
from ctbridge.config import settings as config_mod
from ctbridge.config.settings import Config
from ctbridge.conntrack import codec, expectation
from ctbridge.conntrack.abi import CTA_TUPLE_ORIG
from ctbridge.conntrack.codec import CodecError, Entry, EventKind, attr
from ctbridge.conntrack.eventsocket import EventSocket
from ctbridge.conntrack.expectation import is_expectation
from ctbridge.conntrack.listing import Listing, format_line
from ctbridge.conntrack.table import KernelError, KernelTable
from ctbridge.conntrack.view import entry_view
from ctbridge.daemon import conntrackd, control, failover, gate, journal, keepalived, metrics
from ctbridge.daemon.synclink import SyncLinks
from ctbridge.sync import wire
from ctbridge.sync.engine import (
    EVERYTHING,
    BulkCompleted,
    CompletenessChanged,
    Engine,
    EngineConfig,
    EngineEvent,
    EpochChanged,
    KernelOp,
    LimitReached,
    LinkReport,
    PeerRestarted,
    PeerSilent,
    Role,
)
from ctbridge.sync.filter import LOOPBACK, FlowFilter

log = logging.getLogger("ctbridge")

TRACK_INTERVAL = 0.5  # seconds between checks of the priority interlock


LISTING_CHUNK = 2000  # entries formatted between two writes to a listing's client (about 0.4 MB)


async def _listing(flows: list[tuple[bytes, bytes]], form: str) -> AsyncIterator[bytes]:
    """A cache's listing in chunks, exactly the bytes `ctbridge dump` prints. The event loop runs
    between chunks (each is written out before the next is made), so sync and kernel events go on
    while a large cache is listed. ``flows`` is the snapshot of (key, FLOW message) taken when the
    listing was asked; the formatter reads each message where it lies, copying nothing."""
    listing = Listing(form)
    one = listing.one
    head = wire.FLOW_HEADER
    text = form == "text"
    for i in range(0, max(len(flows), 1), LISTING_CHUNK):
        # a FLOW message: its family at byte 1, the kernel's attributes after its head; the zone
        # is the flow key's (bytes 1-2 of the key)
        lines = [one(msg[1], msg, head, len(msg), (key[1] << 8) | key[2]) for key, msg in flows[i:i + LISTING_CHUNK]]
        if text:
            yield ("\n".join(lines) + "\n").encode() if lines else b""
        else:
            last = i + LISTING_CHUNK >= len(flows)
            yield (("[" if i == 0 else ",") + ",".join(lines) + ("]\n" if last else "")).encode()
        await asyncio.sleep(0)


def _totals(rows: Iterable[dict[str, int]]) -> dict[str, int]:
    """The sync sockets' kernel figures, summed over the links."""
    total: dict[str, int] = {}
    for row in rows:
        for k, v in row.items():
            total[k] = total.get(k, 0) + v
    return total


def flow_filter(cfg: Config) -> FlowFilter:
    """The configured filter, plus what is never replicated: loopback and the sync addresses (of
    every sync link)."""
    sync = [a for link in cfg.sync_links() for a in (link.local, *link.peers)]
    ignore = (*LOOPBACK, *(ipaddress.ip_network(a) for a in sync),
              *(ipaddress.ip_network(c, strict=False) for c in cfg.filter.ignore))
    protos = frozenset(config_mod.PROTOCOLS.get(p, p) if isinstance(p, str) else p for p in cfg.filter.protocols)
    return FlowFilter(protocols=frozenset(int(p) for p in protos),
                      accept=tuple(ipaddress.ip_network(c, strict=False) for c in cfg.filter.accept),
                      ignore=ignore,
                      tcp_states=frozenset(config_mod.TCP_STATE_NUMBERS[s] for s in cfg.filter.tcp_states))


def peer_filters(cfg: Config) -> dict[int, FlowFilter]:
    """filter.peer_accept as the engine takes it: node id -> what that peer may send (also
    within the filter's own accept and ignore lists, which the engine checks apart)."""
    nets: dict[int, list[ipaddress.IPv4Network | ipaddress.IPv6Network]] = {}
    for item in cfg.filter.peer_accept:
        name, cidr = item.split()
        nets.setdefault(config_mod.node_id(name), []).append(ipaddress.ip_network(cidr, strict=False))
    return {node: FlowFilter(accept=tuple(n), ignore=()) for node, n in nets.items()}


def conntrack_max() -> int:
    """The kernel's table size (nf_conntrack_max, in proc_sys_net_netfilter(5)'s nf_conntrack
    sysctls): a peer can never need more, so it caps each peer's copy; 0 if it cannot be read."""
    try:
        with open("/proc/sys/net/netfilter/nf_conntrack_max") as f:
            return max(0, int(f.read().strip()))
    except (OSError, ValueError):
        return 0


# the timeouts traffic restarts without an event, in proc_sys_net_netfilter(5): a sweep must come
# well within the shortest, or an injected copy (and a peer's cache) runs out between two sweeps
REFRESHED_TIMEOUTS = ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream", "nf_conntrack_icmp_timeout",
                      "nf_conntrack_icmpv6_timeout", "nf_conntrack_generic_timeout")
REFRESH_SHARE = 20  # a sweep starts at least 20 times its last duration after it: at most 5% of a core
REFRESH_CHUNK = 8192  # dump messages the engine reads per turn of the event loop (about 20 ms)
REFRESH_HISTORY = 8  # sweeps whose longest duration estimates the next one


def sweep_timing(interval: float, shortest: float, dumped: float, last: float) -> tuple[float, float]:
    """(seconds until the next sweep, how far ahead this one refreshes), once this sweep's dump
    took ``dumped`` seconds and the longest of the last sweeps ``last`` (REFRESH_HISTORY of
    them); ``shortest``: the shortest timeout traffic restarts (refreshed_timeouts()).

    A flow this sweep does not send must still be held by its peers when the next sweep has
    read it: after this sweep's own remaining work, the wait, and the next sweep's dump and
    work. So this sweep refreshes what runs out within the wait plus twice a sweep's duration
    (the estimate: the longer of the last sweeps and 1.5 times this dump) plus a fifth of the
    shortest timeout (at least a second) for a next sweep slower than any before. The wait is
    decided here and kept, whatever this sweep then takes: ``within`` rests on it.

    The next sweep waits REFRESH_SHARE times a sweep's duration (at most 5% of a core), but
    never so long that a flow refreshed now with the shortest timeout would run out before the
    next sweep has sent it again: correctness first, so a table whose sweep takes more than a
    few percent of the shortest timeout is swept more often (found by review: 3 s sweeps waited
    60 s, and 30 s UDP flows ran out on every peer)."""
    estimate = max(last, 1.5 * dumped)
    slack = max(1.0, shortest / 5)
    ceiling = shortest - 3 * estimate - slack  # what a flow refreshed now must outlive
    wait = max(interval if ceiling >= interval else 0.25, min(REFRESH_SHARE * estimate, ceiling))
    return wait, wait + 2 * estimate + slack


def refreshed_timeouts() -> float:
    """The shortest of this network namespace's REFRESHED_TIMEOUTS, in seconds (30, the kernel's
    UDP default, if none can be read). Read again before each sweep: an operator may lower them
    while the daemon runs."""
    seen = []
    for name in REFRESHED_TIMEOUTS:
        try:
            with open(f"/proc/sys/net/netfilter/{name}") as f:
                seen.append(float(f.read().strip()))
        except (OSError, ValueError):
            continue
    return min(seen) if seen else 30.0


DIFF_TIMEOUT = 10.0  # seconds `ctbridge diff` waits for the peers' answers
DIFF_RETRY = 1.2  # ... asking again this often (a peer answers one question for its sums a second)


def _describe(key: bytes, msg: bytes | None) -> str:
    """A flow (or expectation) as a listing line: as our copy has it, or from its key alone."""
    if msg is not None:
        entry = wire.flow_entry(key, msg)
        if is_expectation(key):  # its tuple is what names it
            entry = Entry(key, entry.family, attr(CTA_TUPLE_ORIG, key[3:], nested=True))
    else:
        entry = Entry(key, key[0] & 0x7F, attr(CTA_TUPLE_ORIG, key[3:], nested=True))
    try:
        line = format_line(entry_view(entry))
    except (CodecError, ValueError, IndexError, KeyError) as exc:  # a peer's key is a peer's bytes
        line = f"(a key that does not read: {exc or type(exc).__name__})"
    return ("expectation " + line) if is_expectation(key) else line


# What `ctbridge status` shows (ctbridge.cli.control formats it); `ctbridge stats` has everything
STATUS_KEYS = ("node", "node_id", "role", "apply_mode", "backend", "internal", "external", "expectations",
               "interlock", "peers", "queues", "commit", "gate")


def refresh_interval(cfg: Config, shortest: float) -> float:
    """Seconds between sweeps: sync.refresh_interval, or a quarter of ``shortest``, within 1-10 s."""
    if cfg.sync.refresh_interval > 0:
        return cfg.sync.refresh_interval
    return min(10.0, max(1.0, shortest / 4))


def engine_config(cfg: Config) -> EngineConfig:
    return EngineConfig(node_id=cfg.node_id, reliable=cfg.sync.mode == "reliable", apply_mode=cfg.apply.mode,
                        max_datagram=cfg.max_datagram(), alive_interval=cfg.sync.alive_interval,
                        peer_timeout=cfg.sync.peer_timeout, resend_limit=cfg.sync.resend_limit,
                        max_age=cfg.sync.max_age, filter=flow_filter(cfg), peer_filters=peer_filters(cfg),
                        max_entries=cfg.sync.max_flows or conntrack_max(), expiry_margin=cfg.sync.expiry_margin,
                        expectations=cfg.sync.expectations)


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self.auth = host.auth(cfg)
        self.epoch = host.next_epoch(cfg.node.state_dir)
        now = self.loop.time()
        # the challenge of this life: random, so no earlier life's answers (a captured stream) fit it
        self.engine = Engine(engine_config(cfg), self.auth, self.epoch, now, clock_offset=time.time() - now,
                             nonce=secrets.randbits(64))
        self.kernel = KernelTable()
        self.events = EventSocket(rcvbuf=cfg.apply.event_buffer)
        # the echo of our own commits (100,000 events after a failover) is not even decoded
        self.events.skip_portid = self.kernel.portid
        self.events.raw = True  # the engine reads the buffers itself (ctbridge.sync.intake)
        # the helpers' expectations (sync.expectations): few, read as they come on a socket of their own
        self.expect_events: EventSocket | None = None
        if cfg.sync.expectations:
            # our own writes' echo is read too (few): read_expectations keeps their ends
            self.expect_events = EventSocket(rcvbuf=1 << 20, groups=EventSocket.EXPECT_GROUPS,
                                             decode=expectation.decode_events)
        self.links = SyncLinks(cfg, bind=cfg.apply.backend == "ctbridge")
        self.heartbeat: asyncio.Handle | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.flush_scheduled = False
        self.stop = asyncio.Event()
        self.reload = False
        self.transition_lock = asyncio.Lock()
        self.purge_task: asyncio.Task[None] | None = None
        self.master_followup: asyncio.Future[None] | None = None
        self.kernel_lock = asyncio.Lock()  # one kernel request at a time (KernelTable is not thread-safe)
        self.inject_ops: list[KernelOp] = []
        self.inject_task: asyncio.Task[None] | None = None
        # inject mode: peers' expectations whose master this kernel lacked -> until when to try again
        self.expect_retry: dict[bytes, float] = {}
        self.track_value: int | None = None
        self.role_restored = False  # MASTER taken back at start, no MASTER transition since
        self.watching: list[set[bytes]] = []  # while dumps run: for each, the flows events changed meanwhile
        self.stats_extra: dict[str, Any] = {
            "commit": {"entries": 0, "failed": 0, "seconds": 0.0, "at": None},
            "kernel": {"overruns": 0, "events": 0, "resyncs": 0, "superseded": 0},
            # sweeps for timeouts traffic restarted: the last one's table size and duration
            "refresh": {"interval": None, "flows": 0, "seconds": 0.0, "refreshed": 0, "errors": 0, "superseded": 0},
            "transitions": [],
            "gate": None,
            "track_errors": 0,
            # peers' expectations written into this kernel (commit, inject), and those refused
            "expectations": {"written": 0, "failed": 0},
            "metrics_endpoint": {"refused": 0, "timed_out": 0, "bad_requests": 0},
        }
        self.gated = cfg.apply.gate and cfg.apply.mode == "commit"
        # apply.backend = "conntrackd": it replicates, this daemon drives it (daemon/conntrackd.py)
        self.backend: conntrackd.Conntrackd | None = None
        self.backend_alive = False  # conntrackd answered its last `-s` (the interlock's word)
        self.backend_errors: list[str] = []  # the steps of the transition under way that failed
        if cfg.apply.backend == "conntrackd":
            self.backend = conntrackd.Conntrackd(cfg.apply.conntrackd, cfg.apply.conntrackd_config,
                                                 cfg.apply.step_timeout)
        self.commit_histogram = metrics.Histogram()
        self.gate_retry: asyncio.Future[None] | None = None

    # --- sockets -> engine -> sockets -----------------------------------------------------------

    def on_datagram(self, data: bytes, addr: tuple[Any, int], link: int) -> None:
        self.engine.receive_datagram(data, self.loop.time(), time.time())
        sender = self.engine.last_sender
        if sender is not None:  # authentic and new: that link carries its traffic
            self.links.heard(sender, addr, link, self.loop.time(), self.engine.last_link)
        # the engine's answers go out once the batch read with this datagram is done (after_input)

    def _heartbeat(self) -> None:
        """Redundant links: a heartbeat over every link, then the link choice made again."""
        now = self.loop.time()
        selector = self.links.selector
        self.links.send_heartbeats(self.engine.heartbeats(now, selector.hearing(now), len(self.links.links)))
        for switch in self.links.update(now):
            self.engine.path_changed(now, switch.node)
        self.heartbeat = self.loop.call_later(selector.heartbeat_interval, self._heartbeat)
        self.after_input()

    def after_input(self) -> None:
        """Send what the engine has to send, take its kernel writes, re-arm its timer."""
        now = self.loop.time()
        out = self.engine.datagrams_to_send(now)
        send = self.links.send
        for data, dest in out:
            send(data, dest)
        for event in self.engine.events():
            self.on_engine_event(event)
        ops = self.engine.kernel_ops()
        if ops:
            self.inject_ops.extend(ops)
            if self.inject_task is None or self.inject_task.done():
                self.inject_task = asyncio.ensure_future(self.apply_injected())
        deadline = self.engine.get_timer()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if deadline is None:
            return
        if deadline <= now:
            if not self.flush_scheduled:  # more output than one burst: yield to the loop first
                self.flush_scheduled = True
                self.loop.call_soon(self._flush_again)
        else:
            self.timer = self.loop.call_at(deadline, self._on_timer)

    def on_engine_event(self, event: EngineEvent) -> None:
        if isinstance(event, PeerRestarted):
            log.info("peer %08x restarted (epoch %d -> %d)", event.node, event.old_epoch, event.new_epoch)
        elif isinstance(event, PeerSilent):
            log.info("peer %08x silent for %.1f s", event.node, event.seconds)
            self.links.forget(event.node)
        elif isinstance(event, BulkCompleted):
            if event.complete:
                log.info("bulk from peer %08x complete: %d flows, %d stale removed", event.node, event.flows,
                         event.stale_removed)
            else:
                log.info("bulk from peer %08x lost datagrams; stale flows kept", event.node)
        elif isinstance(event, EpochChanged):
            try:
                host.save_epoch(self.cfg.node.state_dir, event.epoch)
                log.info("sequence numbers ran out: epoch %d begins", event.epoch)
            except host.EpochError as exc:  # running on is right; the next start would be refused
                log.error("%s", exc)
        elif isinstance(event, LinkReport):
            self.links.selector.reported(event.node, event.links, self.loop.time())
        elif isinstance(event, CompletenessChanged):
            log.info("external cache %s", "complete" if event.complete else "incomplete")
        elif isinstance(event, LimitReached):
            log.warning("peer %08x reached the cap of %d %s: %s", event.node, event.limit, event.what,
                        "its further flows are refused, its copy is incomplete (sync.max_flows)"
                        if event.what == "flows" else "the oldest deletions are forgotten")

    def _flush_again(self) -> None:
        self.flush_scheduled = False
        # a deadline that passed (not only output waiting, -inf) is the engine's timer: run it,
        # or the loop spins here without ever doing what is due (a probe, an acknowledgement)
        now = self.loop.time()
        deadline = self.engine.get_timer()
        if deadline is not None and deadline != float("-inf") and deadline <= now:
            self.engine.handle_timer(now)
        self.after_input()

    def _on_timer(self) -> None:
        self.timer = None
        self.engine.handle_timer(self.loop.time())
        self.after_input()

    async def read_events(self) -> None:
        async for batch in self.events.stream():
            kernel_stats = self.stats_extra["kernel"]
            if batch.overrun:
                kernel_stats["overruns"] += 1
                log.warning("kernel events were lost (netlink overrun); rebuilding the internal cache from a dump")
                await self.resync_internal()
                # Every event of this batch was read before the dump began: the dump is newer, and
                # applying them after it would put back states the lost events had moved on from.
                kernel_stats["superseded"] += len(batch.events) + len(batch.buffers)
                continue
            # the echo of our own writes is skipped unread (skip_portid)
            keys = self.engine.kernel_messages(batch.buffers, self.loop.time(), self.events.skip_portid)
            kernel_stats["events"] += len(keys)
            if keys:
                for touched in self.watching:
                    touched.update(keys)
                self.after_input()

    async def read_expectations(self) -> None:
        sock = self.expect_events
        assert sock is not None
        async for batch in sock.stream():
            if batch.overrun:
                self.stats_extra["kernel"]["overruns"] += 1
                log.warning("expectation events were lost (netlink overrun); reading them again from a dump")
                await self.resync_internal()
                continue
            # Our own writes (peers' expectations) are not this node's to announce, but their end
            # is: an expectation this node had, deleted here because a peer said it was used,
            # must leave the internal cache too, or it is announced again later, and written
            # into a peer's kernel it evicts the live one (FTP's helper keeps one per master; the
            # FTP lab test lost its data connection at a failback to exactly that)
            own = self.kernel.portid
            events = [e for e in batch.events if e.portid != own or e.kind is EventKind.DESTROY]
            self.engine.kernel_expectations(events, self.loop.time())
            for touched in self.watching:  # a dump under way read them before: these are newer
                touched.update(e.entry.key for e in events)
            self.after_input()

    async def in_thread(self, fn: Any, *args: Any) -> Any:
        async with self.kernel_lock:
            return await self.loop.run_in_executor(None, fn, *args)

    async def resync_internal(self, announce: bool = True) -> int:
        async with self.kernel_lock:
            # flows whose events arrive while the dump runs: their events are newer than the dump
            touched = set[bytes]()
            self.watching.append(touched)
            try:
                entries = await self.loop.run_in_executor(None, self.kernel.dump)
                # after the flows: an expectation whose master the dump missed is refused by no one
                expected = (await self.loop.run_in_executor(None, self.kernel.dump_expectations)
                            if self.expect_events is not None else None)
            finally:
                self.watching.remove(touched)
        self.engine.kernel_resync(entries, self.loop.time(), announce=announce, newer=touched)
        if expected is not None:
            self.engine.kernel_expect_resync(expected, self.loop.time(), announce=announce, newer=touched)
        for other in self.watching:  # a sweep under way read the table before this: it is older
            other.add(EVERYTHING)
        self.stats_extra["kernel"]["resyncs"] += 1
        self.after_input()
        return len(entries)

    async def refresh_loop(self) -> None:
        """Sweeps of this kernel's table for flows whose timeouts traffic restarted
        (Engine.kernel_refresh), on a socket of their own: a sweep never waits for a commit, nor
        holds one up. The dump is read in a thread; the engine takes it in chunks, so datagrams
        and events are served in between. When the next sweep comes, and so how far ahead this
        one refreshes, is sweep_timing()'s."""
        sweeper = KernelTable()
        info = self.stats_extra["refresh"]
        recent: deque[float] = deque([0.0], maxlen=REFRESH_HISTORY)
        wait = refresh_interval(self.cfg, refreshed_timeouts())
        try:
            while True:
                info["interval"] = round(wait, 3)
                await asyncio.sleep(wait)
                start = time.monotonic()
                touched = set[bytes]()
                self.watching.append(touched)
                refreshed = 0
                try:
                    messages = await self.loop.run_in_executor(None, sweeper.dump_messages)
                    shortest = refreshed_timeouts()
                    wait, within = sweep_timing(refresh_interval(self.cfg, shortest), shortest,
                                                time.monotonic() - start, max(recent))
                    for at in range(0, len(messages), REFRESH_CHUNK):
                        if EVERYTHING in touched:  # the table was read again meanwhile: this dump is older
                            info["superseded"] += 1
                            break
                        refreshed += self.engine.kernel_refresh(messages[at:at + REFRESH_CHUNK], self.loop.time(),
                                                                within, newer=touched)
                        self.after_input()
                        await asyncio.sleep(0)
                except (OSError, KernelError) as exc:
                    info["errors"] += 1
                    if info["errors"] == 1:  # once: the counter tells how often
                        log.warning("refresh sweep failed: %s (peers may expire flows traffic keeps alive)", exc)
                    wait = refresh_interval(self.cfg, refreshed_timeouts())
                    continue
                finally:
                    self.watching.remove(touched)
                recent.append(time.monotonic() - start)
                info.update(flows=len(messages), seconds=round(recent[-1], 4), refreshed=info["refreshed"] + refreshed)
        finally:
            sweeper.close()

    async def apply_injected(self) -> None:
        """Inject mode: peers' flows go into this kernel as they arrive, in batches."""
        while self.inject_ops:
            ops, self.inject_ops = self.inject_ops, []
            latest: dict[bytes, KernelOp] = {}
            for op in ops:  # only the last word on each flow counts
                latest[op.key] = op
            commits = [op.entry for op in latest.values() if op.kind == "commit" and op.entry is not None]
            deletes = [op.key for op in latest.values() if op.kind == "delete"]
            # expectations after the flows (their masters may be among them), with their timeouts
            expected = [e for e in commits if is_expectation(e.key)]
            gone = [k for k in deletes if is_expectation(k)]
            if expected or gone:
                commits = [e for e in commits if not is_expectation(e.key)]
                deletes = [k for k in deletes if not is_expectation(k)]
            for key in gone:
                self.expect_retry.pop(key, None)
            try:
                if commits:
                    result = await self.in_thread(self.kernel.commit, commits, self.cfg.apply.liberal_tcp)
                    if result.failed:
                        log.warning("inject: %d of %d flows refused by the kernel (first: %s)", len(result.failed),
                                    len(commits), os.strerror(result.failed[0].errno))
                if deletes:
                    await self.in_thread(self.kernel.delete, deletes)
                cap = expectation.TIMEOUT_MAX
                todo = {e.key: (e, max(1, min(cap, expectation.timeout_of(e.attrs)))) for e in expected}
                if commits:  # a master that came now may be one an earlier expectation waited for
                    todo.update((e.key, (e, s)) for e, s in self.retried_expectations() if e.key not in todo)
                if todo:
                    await self.write_expectations(list(todo.values()), retry=True)
                if gone:
                    await self.in_thread(self.kernel.delete_expectations, gone)
            except (OSError, KernelError, codec.CodecError) as exc:
                # said here, once: the flows come again with the next bulk or commit, and a later
                # MASTER must not fail for a batch that could not be written before it
                log.error("inject: %d flows not written into the kernel: %s", len(commits) + len(deletes), exc)

    # --- keepalived transitions -------------------------------------------------------------------

    def facts(self, t: keepalived.Transition | None = None) -> failover.Facts:
        role = self.engine.role
        if self.role_restored and t is not None and t.state == "MASTER":
            # a master kept from before the start has committed nothing in this life: its first
            # MASTER is a full one (taken for a no-op, a stale kept role committed nothing)
            role = Role.BACKUP
        return failover.Facts(
            role=role, mode=self.cfg.apply.mode, gated=self.gated,
            instances=tuple(self.cfg.keepalived.instances), purging=self.purge_task is not None,
            injecting=self.inject_task is not None and not self.inject_task.done())

    async def transition(self, t: keepalived.Transition) -> dict[str, Any]:
        """Apply one transition (the policy is ctbridge.daemon.failover); a second waits for the
        first, never interleaves."""
        ignored = failover.ignored(t, tuple(self.cfg.keepalived.instances))
        if ignored:
            return {"ok": True, "ignored": ignored}
        async with self.transition_lock:  # the facts are read again: they may have changed meanwhile
            start = time.monotonic()
            decision = failover.decide(t, self.facts(t), self.cfg.apply.purge_timeout)
            self.role_restored = False
            record: dict[str, Any] = {"state": t.state, "name": t.name, "at": time.time()}
            if decision.noop:
                record["noop"] = True
            self.backend_errors = []
            try:
                out = await self.execute(decision.actions, start)
            finally:
                self.keep_role()  # what the role became, also when a step failed
            record.update(out)
            if not decision.noop:
                log.info("%s%s", decision.note, f" {out}" if out else "")
            record["seconds"] = round(time.monotonic() - start, 6)
            self.stats_extra["transitions"] = [*self.stats_extra["transitions"][-9:], record]
            self.after_input()
            if self.backend_errors:  # every step ran; the transition still failed, and says why
                raise conntrackd.StepError("; ".join(self.backend_errors))
            return {"ok": True, "role": self.engine.role.value, **record}

    def role_path(self) -> str:
        return os.path.join(os.path.dirname(os.path.abspath(self.cfg.control.socket)), keepalived.ROLE_FILE)

    def keep_role(self) -> None:
        """The role keepalived gave this node, kept across a restart of the daemon (not of the
        host: the runtime directory is a tmpfs): a master whose daemon restarts, or is upgraded,
        must come back as master, or its interlock demotes it and the VIPs move."""
        try:
            atomicfile.write(self.role_path(), self.engine.role.value + "\n", mode=0o644)
        except OSError as exc:
            log.warning("cannot keep the role in %s: %s", self.role_path(), exc.strerror or exc)

    async def restore_role(self) -> None:
        """At start: MASTER, if that is the role kept before and this node holds one of
        keepalived.vips (what keepalived adds as master; ctbridge render writes them). The hook
        mode loses a transition made while the daemon was down, and a VIP can outlive a killed
        keepalived: a node restored so still commits at its next MASTER (facts()). Transitions
        keepalived wrote into its FIFO meanwhile are kept by the pipe and follow in order."""
        role = keepalived.read_role(self.role_path())
        vips = {str(ipaddress.ip_interface(v).ip) for v in self.cfg.keepalived.vips}
        # in a thread: pyroute2 0.9's synchronous API cannot run inside a running event loop
        holds = bool(vips & set(await self.in_thread(host.addresses))) if vips else None
        if holds is False and self.gated:
            # a standby: the gate the last daemon opened on its way out (it fails open) is closed
            # again, or packets that reach this node at a failover before its commit are NATed
            # anew (the package test's upgrade, both daemons restarted: all 10 UDP flows, once in CI)
            await self.set_gate(closed=True)
        if role != "MASTER":
            return
        if holds is None:
            log.info("role MASTER kept from before this start, and no keepalived.vips to check it by: BACKUP")
            return
        if not holds:
            log.info("role MASTER kept from before this start, but this node holds none of its VIPs: BACKUP")
            return
        self.engine.set_role(Role.MASTER)
        self.role_restored = True
        log.info("role MASTER kept from before this start (%s): the interlock reads complete", self.role_path())

    async def execute(self, actions: list[failover.Action], start: float) -> dict[str, Any]:
        """Run the policy's steps in order. After a step fails only the ``ensure`` ones run (a
        master's gate opens, kernel events come back), then the failure is raised."""
        out: dict[str, Any] = {}
        error: BaseException | None = None
        for action in actions:
            if error is not None and not action.ensure:
                continue
            try:
                out.update(await self.step(action, start) or {})
            except BaseException as exc:  # cancellation too: a master's gate opens, events come back
                error = error or exc
        if error is not None:
            raise error
        return out

    async def step(self, action: failover.Action, start: float) -> dict[str, Any] | None:
        name = action.name
        if self.backend is not None:
            if name in conntrackd.IDLE:
                return None
            flag = conntrackd.FLAGS.get(name)
            if flag is not None:  # the replicator's step: conntrackd's, to its end
                try:
                    await self.backend.run(flag)
                except conntrackd.StepError as exc:
                    # said, and the transition fails at its end; the steps after it still run, as
                    # the primary-backup script's do (a master whose commit failed still resyncs)
                    log.error("%s: %s", name, exc)
                    self.backend_errors.append(str(exc))
                    return {name.replace("-", "_"): f"FAILED: {exc}"}
                log.info("%s: conntrackd %s done", name, flag)
                return {name.replace("-", "_"): f"conntrackd {flag}"}
        if name == failover.GATE:
            await self.set_gate(closed=action.closed)
        elif name == failover.CANCEL_PURGE and self.purge_task is not None:
            self.purge_task.cancel()
            self.purge_task = None
        elif name == failover.WAIT_INJECT and self.inject_task is not None:
            await asyncio.shield(self.inject_task)
        elif name == failover.PAUSE_EVENTS:
            # the dump of the follow-up brings the internal cache up to date: meanwhile the echo
            # of the commit is not even delivered to this process
            self.events.pause()
        elif name == failover.COMMIT:
            return await self.commit()
        elif name == failover.RESUME_EVENTS:
            self.events.resume()
        elif name == failover.COMMITTED:
            return {"committed_after": round(time.monotonic() - start, 6)}  # notification -> flows in place
        elif name == failover.FLUSH_EXTERNAL:
            self.engine.flush_external()
        elif name == failover.ROLE and action.role is not None:
            self.engine.set_role(action.role)
        elif name == failover.ANNOUNCE:
            # The flows are in the kernel: answer now, so keepalived's hook returns. The follow-up
            # waits for the transition lock, so a next transition waits for it too.
            self.master_followup = asyncio.ensure_future(self.announce_as_master())
        elif name == failover.REQUEST_RESYNC:
            self.engine.request_resync(self.loop.time())
        elif name == failover.START_PURGE and self.purge_task is None:
            self.purge_task = asyncio.ensure_future(self.purge())
        elif name == failover.RELEASE:
            keys = self.former_flows()
            result = await self.in_thread(self.kernel.release, keys)
            log.info("release: %d former TCP flows marked liberal", result.done)
        elif name == failover.DUMP:
            return {"announced": await self.resync_internal()}
        elif name == failover.BULK_SEND:
            self.engine.bulk_send(self.loop.time())
            self.after_input()
        return None

    async def run_with_conntrackd(self, servers: list[asyncio.AbstractServer], tasks: list[asyncio.Task[Any]]) -> int:
        """run() for apply.backend = "conntrackd": keepalived's FIFO, the interlock, the gate, the
        control socket and the metrics, and no sync link or kernel events of our own (conntrackd
        has them). The caller's finally closes what is opened here."""
        assert self.backend is not None
        servers.append(await control.serve(self.cfg.control.socket, self.handle))
        if self.cfg.metrics.listen:
            servers.append(await metrics.serve(self.cfg.metrics.listen, self.stats,
                                               self.stats_extra["metrics_endpoint"]))
        if self.cfg.keepalived.notify_fifo:
            tasks.append(asyncio.ensure_future(self.read_fifo(self.cfg.keepalived.notify_fifo)))
        if self.cfg.keepalived.track_file:
            tasks.append(asyncio.ensure_future(self.track_loop(self.cfg.keepalived.track_file)))
        tasks.append(asyncio.ensure_future(self.systemd()))
        caches = await self.backend.caches()
        log.info("ctbridge %s running with the conntrackd backend: node %s, conntrackd -C %s %s",
                 self.cfg.apply.mode, self.cfg.node.name, self.backend.config,
                 f"answers ({caches})" if caches is not None else "does not answer (yet)")
        return await self.serve_until_stopped(tasks)

    async def serve_until_stopped(self, tasks: list[asyncio.Task[Any]]) -> int:
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

    async def announce_as_master(self) -> None:
        async with self.transition_lock:
            out = await self.execute(failover.followup(self.engine.role), time.monotonic())
            if self.engine.role is Role.MASTER:
                log.info("MASTER: %d flows of this kernel announced to the peers", out.get("announced", 0))

    async def commit(self) -> dict[str, Any]:
        # each with what is left of its timeout
        entries = self.engine.commit_records(self.loop.time())
        # flows this kernel already holds (a node taking back the master role): updated at once
        existing = frozenset(self.engine.internal)
        result = await self.in_thread(self.kernel.commit, entries, self.cfg.apply.liberal_tcp, existing)
        info = {"entries": result.created + result.updated, "failed": len(result.failed),
                "seconds": round(result.seconds, 6), "at": time.time()}
        self.stats_extra["commit"] = info
        self.commit_histogram.observe(result.seconds)
        log.info("committed %d flows into the kernel in %.3f s (%d created, %d updated, %d failed)",
                 info["entries"], result.seconds, result.created, result.updated, len(result.failed))
        for failure in result.failed[:5]:
            log.warning("commit: the kernel refused a flow: %s", os.strerror(failure.errno))
        answer = {"committed": info["entries"], "commit_failed": info["failed"], "commit_seconds": info["seconds"]}
        expected = self.engine.external_expectations(self.loop.time())
        if expected:  # after their masters, which the kernel looks up (and which carry the helper)
            answer["expectations"] = await self.write_expectations(expected)
        return answer

    async def write_expectations(self, expected: list[tuple[Entry, int]], retry: bool = False) -> int:
        """Peers' expectations into this kernel, each with what is left of its timeout; the
        number written. A master the kernel lacks (its flow was refused, ended, or, in inject
        mode, has not arrived yet: ``retry``, tried again with the next injected flows) fails
        that one."""
        left = {entry.key: seconds for entry, seconds in expected}
        result = await self.in_thread(self.kernel.commit_expectations, [e for e, _ in expected],
                                      lambda entry: left[entry.key])
        info = self.stats_extra["expectations"]
        info["written"] += result.done
        for key in left:
            self.expect_retry.pop(key, None)
        if retry:
            self.expect_retry.update((key, self.loop.time() + left[key]) for key in result.missing)
        else:
            info["failed"] += len(result.missing)
        info["failed"] += len(result.failed)
        if result.failed or (result.missing and not retry):
            first = os.strerror(result.failed[0].errno) if result.failed else "no master flow"
            log.warning("%d of %d expectations not written into the kernel (first: %s)",
                        len(result.missing) + len(result.failed), len(expected), first)
        return int(result.done)

    def retried_expectations(self) -> list[tuple[Entry, int]]:
        """Inject mode: peers' expectations written before their master was in this kernel, as
        the cache holds them now (gone or run out: forgotten)."""
        if not self.expect_retry:
            return []
        now = self.loop.time()
        current = {e.key: (e, s) for e, s in self.engine.external_expectations(now) if e.key in self.expect_retry}
        for key in [k for k, until in self.expect_retry.items() if k not in current or until <= now]:
            del self.expect_retry[key]
            self.stats_extra["expectations"]["failed"] += 1
        return list(current.values())

    async def set_gate(self, closed: bool) -> None:
        """Close the commit gate while not MASTER, open it once the flows are committed.

        At start the daemon closes it only on a node holding none of keepalived.vips (a standby,
        restore_role); a master's is left as it is, and keepalived's next word sets it. A gate
        that cannot be opened is retried in the background: a master must never keep new flows out."""
        want = "closed" if closed else "open"
        if not self.gated or self.stats_extra["gate"] == want:
            return
        if self.gate_retry is not None:
            self.gate_retry.cancel()
            self.gate_retry = None
        try:
            await (gate.close(self.cfg.keepalived.vips) if closed else gate.open_())
        except (gate.GateError, OSError) as exc:
            log.error("%s", exc)
            self.stats_extra["gate"] = f"failed to {'close' if closed else 'open'}"
            if not closed:
                self.gate_retry = asyncio.ensure_future(self.open_gate_until_done())
            return
        self.stats_extra["gate"] = want
        log.info("commit gate %s", want)

    async def open_gate_until_done(self) -> None:
        for attempt in range(1, 61):  # a minute, then the operator has the error in the log
            await asyncio.sleep(1)
            try:
                await gate.open_()
            except (gate.GateError, OSError) as exc:
                log.error("attempt %d: %s", attempt, exc)
                continue
            self.stats_extra["gate"] = "open"
            log.info("commit gate open (attempt %d)", attempt)
            break
        self.gate_retry = None

    async def purge(self) -> None:
        """Flows this node had as master: their timeout becomes the purge timeout, so those no
        packet refreshes (the new master forwards them now) go away; flows peers tell us about
        (inject mode) are left alone."""
        result = await self.in_thread(self.kernel.release, self.former_flows(),
                                      max(1, int(self.cfg.apply.purge_timeout)))
        log.info("purge: %d flows of the former master expire in %.0f s (TCP ones marked liberal)", result.done,
                 self.cfg.apply.purge_timeout)
        self.purge_task = None

    def former_flows(self) -> list[bytes]:
        """This kernel's flows that no peer told us about: the ones this node had as master."""
        external = self.engine.external_keys()
        return [k for k in self.engine.internal if k not in external and not is_expectation(k)]

    async def read_fifo(self, path: str) -> None:
        """keepalived's notify_fifo: the one channel where transitions arrive in order."""
        async for t in keepalived.fifo_transitions(path):
            try:
                answer = await self.transition(t)
            except Exception as exc:  # said, and the next line is read: a failed step ends no daemon
                log.error("notify_fifo %s %s %s failed: %s", t.kind, t.name, t.state, exc)
                continue
            log.info("notify_fifo %s %s %s: %s", t.kind, t.name, t.state, answer.get("role"))

    # --- interlock, stats, control ----------------------------------------------------------------

    async def may_take_over(self) -> bool:
        if self.backend is not None:  # conntrackd's caches cannot be judged whole: it must answer, at least
            self.backend_alive = await self.backend.answers(self.loop.time())
            return self.engine.role is Role.MASTER or self.backend_alive
        return failover.may_take_over(self.engine.complete(), self.engine.role,
                                      heard_a_peer=any(p.proven and p.alive for p in self.engine.peers.values()))

    async def track_loop(self, path: str) -> None:
        """Priority interlock: the track file follows failover.track_value, checked every
        TRACK_INTERVAL."""
        failing = False
        while True:
            may = await self.may_take_over()
            value = failover.track_value(may, self.cfg.keepalived.incomplete_value)
            if value != self.track_value:
                try:
                    keepalived.write_track_file(path, value)
                except OSError as exc:  # a full tmpfs, no file descriptors: counted, tried again
                    self.stats_extra["track_errors"] += 1
                    if not failing:  # logged when it starts failing, and when it works again
                        log.error("track file %s cannot be written (%s); trying again every %.1f s", path,
                                  exc.strerror or exc, TRACK_INTERVAL)
                    failing = True
                else:
                    if failing:
                        log.info("track file %s written again", path)
                    failing = False
                    log.info("track file %s = %d (external cache %s)", path, value,
                             "complete" if may else "incomplete")
                    self.track_value = value
            await asyncio.sleep(TRACK_INTERVAL)

    def stats(self) -> dict[str, Any]:
        e = self.engine
        s = e.stats
        now = self.loop.time()
        links = self.links.stats(now)
        peers = []
        for p in e.peers.values():
            peers.append({"node": f"{p.node:08x}", "address": self.links.address(p.node),
                          "epoch": p.epoch, "alive": p.alive, "synced": p.synced, "proven": p.proven,
                          "refused": len(p.refused), "limits": sorted(p.limits),
                          "entries": len(p.external), "last_heard": round(now - p.last_heard, 3),
                          "restarts": p.restarts, "bulks": p.bulks, "refused_total": p.refused_total,
                          "rejected": dict(p.rejected),
                          "gap": p.rx.missing() if p.rx is not None else None})
        return {
            "node": self.cfg.node.name, "node_id": f"{e.node_id:08x}", "epoch": e.epoch, "role": e.role.value,
            "apply_mode": self.cfg.apply.mode,
            "internal": {"entries": len(e.internal)},
            "external": {"entries": sum(len(p.external) for p in e.peers.values()), "complete": e.complete()},
            # the interlock's verdict (external.complete is the engine's: true with no peer heard)
            "interlock": {"value": self.track_value, "may_take_over": self.track_value == 0
                          if self.track_value is not None else None},
            "rejected": {"auth": s["rejected_auth"], "replay": s["rejected_replay"],
                         "malformed": s["rejected_malformed"], "peers": s["rejected_peers"],
                         "oversize": s["rejected_oversize"], "bounds": s["rejected_bounds"],
                         "unproven": s["rejected_unproven"]},
            "refused": {"policy": s["flows_refused_policy"], "cap": s["flows_refused_cap"],
                        "tombstones_dropped": s["tombstones_dropped"],
                        "bulk_count_mismatches": s["bulk_count_mismatches"]},
            "peers": peers,
            "queues": {**e.queue_sizes(), "inject": len(self.inject_ops)},
            "flow": {"window": round(e.window, 1), "in_flight": e.in_flight(),
                     "rtt_seconds": round(e.srtt, 6) if e.srtt is not None else None,
                     "rto_seconds": round(e.rto(), 6)},
            "sync": dict(s),
            "process": metrics.process_stats(),
            "sync_socket": _totals(link["socket"] for link in links),
            "links": links,
            "link_switches": self.links.switches,
            "send_errors": self.links.send_errors,
            "link_mismatches": self.links.mismatches,
            **self.stats_extra,
            "commit_histogram": self.commit_histogram.snapshot(),
            "backend": {"name": self.cfg.apply.backend, **({
                "alive": self.backend_alive, "failures": self.backend.failures, "steps": list(self.backend.steps)}
                if self.backend is not None else {})},
            "expectations": {**self.stats_extra["expectations"], "enabled": self.expect_events is not None,
                             **dict(zip(("internal", "external"), e.expectation_counts(), strict=True))},
        }

    async def handle(self, req: dict[str, Any]) -> dict[str, Any] | control.Stream:
        """A control request (ctbridge.daemon.control.COMMANDS names them)."""
        cmd = req["cmd"]
        if cmd not in control.COMMANDS:
            raise ValueError(control.unknown(cmd))
        handler = getattr(self, "on_" + cmd.replace("-", "_"))
        return await handler(req)  # type: ignore[no-any-return]

    async def on_status(self, req: dict[str, Any]) -> dict[str, Any]:
        st = self.stats()
        return {"ok": True, **{k: st[k] for k in STATUS_KEYS}}

    async def on_stats(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, **self.stats()}

    async def on_notify(self, req: dict[str, Any]) -> dict[str, Any]:
        args = req.get("args")
        if not isinstance(args, list):
            raise ValueError('notify needs "args": the keepalived notify arguments')
        return await self.transition(keepalived.parse_args([str(a) for a in args]))

    async def on_commit(self, req: dict[str, Any]) -> dict[str, Any]:
        async with self.transition_lock:
            if self.backend is not None:
                await self.backend.run(conntrackd.FLAGS[failover.COMMIT])
                return {"ok": True, "committed": "conntrackd -c"}
            return {"ok": True, **await self.commit()}

    async def on_flush(self, req: dict[str, Any]) -> dict[str, Any]:
        which = req.get("which", "both")
        if which not in ("internal", "external", "both"):
            raise ValueError("flush takes internal, external or nothing (both)")
        if which in ("internal", "both"):
            self.engine.flush_internal()
            # read again at once, and announced: the sweeps refresh only what the cache holds,
            # and what peers were told of the flushed flows is unknown now
            await self.resync_internal()
        if which in ("external", "both"):
            self.engine.flush_external()
        return {"ok": True, "flushed": which}

    async def on_resync(self, req: dict[str, Any]) -> dict[str, Any]:
        self.engine.request_resync(self.loop.time())
        self.after_input()
        return {"ok": True}

    async def on_rebuild(self, req: dict[str, Any]) -> dict[str, Any]:
        """The internal cache from a dump of this kernel's table (and its expectations), as after
        lost events: flows that changed, appeared or went are sent; the others are not."""
        before = self.engine.stats["tx_datagrams"]
        flows = await self.resync_internal()
        return {"ok": True, "flows": flows, "datagrams": self.engine.stats["tx_datagrams"] - before}

    async def on_diff(self, req: dict[str, Any]) -> dict[str, Any]:
        """This node's copy of each live peer's table (or of ``peer``'s) against that table
        (Engine.diff_start: sums by bucket over the sync link, then the keys of the buckets that
        differ): the flows missing here, extra here, or in another state, each as a listing line."""
        want = req.get("peer")
        live = [p for p in self.engine.peers.values() if p.proven and p.alive]
        peers = [p for p in live if want is None or f"{p.node:08x}" == str(want).lower()]
        if not peers:
            known = ", ".join(f"{p.node:08x}" for p in live) or "none"
            raise ValueError(f"no live peer {want!r} to compare with (live peers: {known})" if want is not None
                             else "no live peer to compare with")
        started = {p.node: self.engine.diff_start(p.node, self.loop.time()) for p in peers}
        self.after_input()
        results: dict[int, dict[str, Any]] = {}
        deadline = self.loop.time() + DIFF_TIMEOUT
        again = self.loop.time() + DIFF_RETRY
        while len(results) < len(started) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
            for node, request in started.items():
                result = self.engine.diff_result(request)
                if result is not None:
                    results[node] = result
                elif self.loop.time() >= again:
                    self.engine.diff_retry(request)
            if self.loop.time() >= again:
                again = self.loop.time() + DIFF_RETRY
                self.after_input()
        out = []
        for node in started:
            result = results.get(node)
            if result is None:
                out.append({"peer": f"{node:08x}", "answered": False, "equal": False})
                continue
            external = self.engine.peers[node].external
            lines = {what: [_describe(k, external[k].message if k in external else None) for k in result[what]]
                     for what in ("missing", "extra", "stale")}
            out.append({"peer": f"{node:08x}", "answered": True, "equal": result["equal"],
                        "theirs": result["theirs"], "ours": result["ours"], **lines,
                        "refused": len(result["refused"]), "truncated": result["truncated"]})
        return {"ok": True, "equal": all(p["equal"] for p in out), "peers": out}

    async def on_bulk_send(self, req: dict[str, Any]) -> dict[str, Any]:
        self.engine.bulk_send(self.loop.time())
        self.after_input()
        return {"ok": True, "flows": len(self.engine.internal)}

    async def on_dump(self, req: dict[str, Any]) -> control.Stream:
        which = req.get("which")
        if which not in ("internal", "external"):
            raise ValueError("dump takes internal or external")
        form = req.get("format", "text")
        if form not in ("text", "json"):
            raise ValueError("dump's format is text or json")
        flows = self.engine.internal_messages() if which == "internal" else self.engine.external_messages()
        stream = control.Stream(_listing(flows, form))
        stream.trailer["entries"] = len(flows)
        return stream

    # --- life cycle ---------------------------------------------------------------------------------

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
        self.engine.reconfigure(auth=auth, flow_filter=flow_filter(cfg), peer_filters=peer_filters(cfg))
        log.info("reloaded filters and keys from %s", cfg.path)

    async def run(self) -> int:
        tasks: list[asyncio.Task[Any]] = []
        servers: list[asyncio.AbstractServer] = []
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.loop.add_signal_handler(signum, self.on_signal, signum)
        try:
            await self.restore_role()  # before any transition can come (the hook, the FIFO)
            if self.backend is not None:
                return await self.run_with_conntrackd(servers, tasks)
            servers.append(await control.serve(self.cfg.control.socket, self.handle))
            if self.cfg.metrics.listen:
                servers.append(await metrics.serve(self.cfg.metrics.listen, self.stats,
                                                   self.stats_extra["metrics_endpoint"]))
            # The table first (events meanwhile wait in the event socket), then the sync link: a
            # peer that asks for a bulk transfer at once must get the whole table.
            count = await self.resync_internal(announce=False)
            tasks.append(asyncio.ensure_future(self.read_events()))
            tasks.append(asyncio.ensure_future(self.refresh_loop()))
            if self.expect_events is not None:
                tasks.append(asyncio.ensure_future(self.read_expectations()))
            self.links.open(self.loop, self.on_datagram, self.after_input)
            if self.links.redundant:
                self.heartbeat = self.loop.call_soon(self._heartbeat)
            self.engine.request_resync(self.loop.time())
            if self.cfg.keepalived.notify_fifo:
                tasks.append(asyncio.ensure_future(self.read_fifo(self.cfg.keepalived.notify_fifo)))
            if self.cfg.keepalived.track_file:
                tasks.append(asyncio.ensure_future(self.track_loop(self.cfg.keepalived.track_file)))
            tasks.append(asyncio.ensure_future(self.systemd()))
            self.after_input()
            log.info("ctbridge %s running: node %s (%08x), epoch %d, %d flows in the kernel, sync %s port %d, %s",
                     self.cfg.apply.mode, self.cfg.node.name, self.engine.node_id, self.epoch, count,
                     " + ".join(link.local for link in self.links.links), self.cfg.sync.port,
                     f"multicast {self.cfg.sync.group}" if self.cfg.multicast
                     else "peers " + ", ".join(self.cfg.sync.peers))
            return await self.serve_until_stopped(tasks)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t
            for server in servers:
                server.close()
            if self.gate_retry is not None:
                self.gate_retry.cancel()
            if self.stats_extra["gate"] not in (None, "open"):  # fail open: a stopped daemon blocks nothing
                with contextlib.suppress(Exception):
                    await gate.open_()
            if self.heartbeat is not None:
                self.heartbeat.cancel()
            if self.cfg.keepalived.track_file and self.engine.role is not Role.MASTER:
                # a stopped daemon replicates nothing: demoted until it runs again (a master's own
                # table stays the truth, so a master's restart keeps its priority)
                with contextlib.suppress(OSError):
                    keepalived.write_track_file(self.cfg.keepalived.track_file, self.cfg.keepalived.incomplete_value)
            self.links.close()
            self.events.close()
            if self.expect_events is not None:
                self.expect_events.close()
            self.kernel.close()
            with contextlib.suppress(OSError):
                os.unlink(self.cfg.control.socket)

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


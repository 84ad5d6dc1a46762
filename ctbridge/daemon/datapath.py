"""The sync path: datagrams from the sync links into the engine, the engine's output back out.

``Datapath`` is the thin adapter around the pure engine: a datagram read goes to
Engine.receive_datagram; after each batch read (``after_input``) the engine's datagrams go out
on the links, its events are said (a table from event type to handler), its kernel writes go
to ``inject`` (KernelWriter.inject, inject mode), and its one timer is re-armed. Redundant
links also get a heartbeat on every link and the link choice made again (``start_heartbeats``).

The event socket's reader says ``input_done`` after a batch: its output is made in the next
turn of the loop, and a sync socket read in the same turn makes it for both (its reader calls
``after_input``, which takes the pending output along). Whoever else feeds the engine calls
``after_input`` directly. When a peer first appears (its copy of a million flows is made then),
the daemon's long-lived objects are frozen out of the collector's reach again (daemon/heap.py).

Imports ctbridge.config.host (the epoch file), ctbridge.sync (the engine and its events),
daemon.heap and daemon.synclink; service wires it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from ctbridge.config import host
from ctbridge.daemon import heap
from ctbridge.daemon.synclink import SyncLinks
from ctbridge.sync.engine import (
    BulkCompleted,
    CompletenessChanged,
    Engine,
    EngineEvent,
    EpochChanged,
    KernelOp,
    LimitReached,
    LinkReport,
    PeerRestarted,
    PeerSilent,
)

log = logging.getLogger("ctbridge")


class Datapath:
    """Bytes between the sync sockets and the engine, and the engine's timer.

    ``inject`` takes the engine's kernel writes (inject mode); ``state_dir`` keeps the epoch."""

    def __init__(self, engine: Engine, links: SyncLinks, loop: asyncio.AbstractEventLoop, state_dir: str,
                 inject: Callable[[list[KernelOp]], None]) -> None:
        self.engine = engine
        self.links = links
        self.loop = loop
        self.state_dir = state_dir
        self.inject = inject
        self.heartbeat: asyncio.Handle | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.output: asyncio.Handle | None = None  # the output input_done scheduled
        self.flush_scheduled = False
        self.peers_frozen = 0  # peers the engine knew at the last heap.freeze_long_lived()
        self.on_event: dict[type[Any], Callable[[Any], None]] = {
            PeerRestarted: self._peer_restarted, PeerSilent: self._peer_silent, BulkCompleted: self._bulk_completed,
            EpochChanged: self._epoch_changed, LinkReport: self._link_report,
            CompletenessChanged: self._completeness_changed, LimitReached: self._limit_reached,
        }

    def on_datagram(self, data: bytes, addr: tuple[Any, int], link: int) -> None:
        now = self.loop.time()
        heard = self.engine.receive_datagram(data, now, time.time())
        if heard is not None:  # authentic and new: that link carries its traffic
            self.links.heard(heard.node, addr, link, now, heard.link)
        # the engine's answers go out once the batch read with this datagram is done (after_input)

    def start_heartbeats(self) -> None:
        """Redundant links only: a heartbeat over every link from now on."""
        if self.links.redundant:
            self.heartbeat = self.loop.call_soon(self._heartbeat)

    def stop_heartbeats(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.cancel()

    def _heartbeat(self) -> None:
        """Redundant links: a heartbeat over every link, then the link choice made again."""
        now = self.loop.time()
        selector = self.links.selector
        self.links.send_heartbeats(self.engine.heartbeats(now, selector.hearing(now), len(self.links.links)))
        for switch in self.links.update(now):
            self.engine.path_changed(now, switch.node)
        self.heartbeat = self.loop.call_later(selector.heartbeat_interval, self._heartbeat)
        self.after_input()

    def input_done(self) -> None:
        """The event socket handed the engine a batch: the output follows in the next turn of the
        loop, made once with whatever else this turn reads (``after_input`` takes it along).

        Measured under churn (docs/performance.md, 2026-12-07): waiting longer (0.5 or 2 ms)
        left datagrams no fuller (90% full already) and added a timer wake-up per batch; the
        sync sockets' reader does not wait at all, as a turn more per wake-up cost a standby,
        which reads no events, more than the outputs it saved."""
        if self.output is None:
            self.output = self.loop.call_soon(self.after_input)

    def after_input(self) -> None:
        """Send what the engine has to send, take its kernel writes, re-arm its timer."""
        if self.output is not None:  # this is the output input_done scheduled, or makes it needless
            self.output.cancel()
            self.output = None
        now = self.loop.time()
        out = self.engine.datagrams_to_send(now)
        if out:
            send = self.links.send
            for data, dest in out:
                send(data, dest)
            self.links.flush()  # the turn's datagrams in one sendmmsg per link
        for event in self.engine.events():
            self.on_engine_event(event)
        if len(self.engine.peers) > self.peers_frozen:  # a peer's copy, made now, lives as long as we do
            self.peers_frozen = len(self.engine.peers)
            heap.freeze_long_lived()
        ops = self.engine.kernel_ops()
        if ops:
            self.inject(ops)
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

    # --- the engine's events (EngineEvent), one handler each ------------------------------------

    def on_engine_event(self, event: EngineEvent) -> None:
        handler = self.on_event.get(type(event))
        if handler is not None:
            handler(event)

    def _peer_restarted(self, event: PeerRestarted) -> None:
        log.info("peer %08x restarted (epoch %d -> %d)", event.node, event.old_epoch, event.new_epoch)

    def _peer_silent(self, event: PeerSilent) -> None:
        log.info("peer %08x silent for %.1f s", event.node, event.seconds)
        self.links.forget(event.node)

    def _bulk_completed(self, event: BulkCompleted) -> None:
        if event.complete:
            log.info("bulk from peer %08x complete: %d flows, %d stale removed", event.node, event.flows,
                     event.stale_removed)
        else:
            log.info("bulk from peer %08x lost datagrams; stale flows kept", event.node)

    def _epoch_changed(self, event: EpochChanged) -> None:
        try:
            host.save_epoch(self.state_dir, event.epoch)
            log.info("sequence numbers ran out: epoch %d begins", event.epoch)
        except host.EpochError as exc:  # running on is right; the next start would be refused
            log.error("%s", exc)

    def _link_report(self, event: LinkReport) -> None:
        self.links.selector.reported(event.node, event.links, self.loop.time())

    def _completeness_changed(self, event: CompletenessChanged) -> None:
        log.info("external cache %s", "complete" if event.complete else "incomplete")

    def _limit_reached(self, event: LimitReached) -> None:
        log.warning("peer %08x reached the cap of %d %s: %s", event.node, event.limit, event.what,
                    "its further flows are refused, its copy is incomplete (sync.max_flows)"
                    if event.what == "flows" else "the oldest deletions are forgotten")

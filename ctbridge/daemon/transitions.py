"""keepalived's transitions carried out: the policy's steps run, the role kept across restarts.

The rules:
- One transition at a time, in the order they come (the lock): a second waits for the first,
  never interleaves, and the facts the policy decides on are read once the lock is held.
- What to do is ctbridge.daemon.failover's (pure); here each step name maps to one handler
  (``Transitions.steps``). After a step fails only the ``ensure`` ones run, then the failure
  is raised; cancellation counts as a failure (a master's gate opens, kernel events come back).
- With the conntrackd backend a replicator's step is conntrackd's command for it, run to its
  end (daemon/conntrackd.py); a failed one is said, the steps after it still run, and the
  transition fails at its end.
- A MASTER answers once its flows are in the kernel; the follow-up (a dump, then a bulk send if
  still MASTER) runs in the background, still in turn with later transitions.
- The role is written beside the control socket after every transition (``RoleKeeper``), so a
  master whose daemon restarts comes back as master if it still holds one of keepalived.vips.
- keepalived's notify_fifo is the one channel where transitions arrive in order (``read_fifo``);
  the notify hook comes through the control socket.

Imports ctbridge.atomicfile, ctbridge.config, ctbridge.sync (the engine's role and commands) and
the daemon's kernelio, gate, conntrackd, failover and keepalived; service wires it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ctbridge import atomicfile
from ctbridge.config import host
from ctbridge.config.settings import Config
from ctbridge.daemon import conntrackd, failover, keepalived
from ctbridge.daemon.gate import GateKeeper
from ctbridge.daemon.kernelio import Kernel, KernelReader, KernelWriter
from ctbridge.sync.engine import Engine, Role

log = logging.getLogger("ctbridge")

TRANSITIONS_KEPT = 10  # the last transitions the stats show

Step = Callable[[failover.Action, float], Awaitable[dict[str, Any] | None]]


class RoleKeeper:
    """The role keepalived gave this node, kept across a restart of the daemon (not of the host:
    the runtime directory is a tmpfs): a master whose daemon restarts, or is upgraded, must come
    back as master, or its interlock demotes it and the VIPs move."""

    def __init__(self, engine: Engine, kernel: Kernel, gate: GateKeeper, control_socket: str,
                 vips: tuple[str, ...]) -> None:
        self.engine = engine
        self.kernel = kernel
        self.gate = gate
        self.path = os.path.join(os.path.dirname(os.path.abspath(control_socket)), keepalived.ROLE_FILE)
        self.vips = vips
        self.restored = False  # MASTER taken back at start, no MASTER transition since

    def keep(self) -> None:
        try:
            atomicfile.write(self.path, self.engine.role.value + "\n", mode=0o644)
        except OSError as exc:
            log.warning("cannot keep the role in %s: %s", self.path, exc.strerror or exc)

    async def restore(self) -> None:
        """At start: MASTER, if that is the role kept before and this node holds one of
        keepalived.vips (what keepalived adds as master; ctbridge render writes them). The hook
        mode loses a transition made while the daemon was down, and a VIP can outlive a killed
        keepalived: a node restored so still commits at its next MASTER (Transitions.facts).
        Transitions keepalived wrote into its FIFO meanwhile are kept by the pipe and follow in
        order."""
        role = keepalived.read_role(self.path)
        vips = {str(ipaddress.ip_interface(v).ip) for v in self.vips}
        # in a thread: pyroute2 0.9's synchronous API cannot run inside a running event loop
        holds = bool(vips & set(await self.kernel.run(host.addresses))) if vips else None
        if holds is False and self.gate.gated:
            # a standby: the gate the last daemon opened on its way out (it fails open) is closed
            # again, or packets that reach this node at a failover before its commit are NATed anew
            await self.gate.set(closed=True)
        if role != "MASTER":
            return
        if holds is None:
            log.info("role MASTER kept from before this start, and no keepalived.vips to check it by: BACKUP")
            return
        if not holds:
            log.info("role MASTER kept from before this start, but this node holds none of its VIPs: BACKUP")
            return
        self.engine.set_role(Role.MASTER)
        self.restored = True
        log.info("role MASTER kept from before this start (%s): the interlock reads complete", self.path)


class Transitions:
    """The transitions of one daemon. ``stats``: the daemon's stats sections, whose
    "transitions" (the last TRANSITIONS_KEPT) this keeps."""

    def __init__(self, cfg: Config, engine: Engine, reader: KernelReader, writer: KernelWriter, gate: GateKeeper,
                 roles: RoleKeeper, backend: conntrackd.Conntrackd | None, after_input: Callable[[], None],
                 stats: dict[str, Any]) -> None:
        self.cfg = cfg
        self.engine = engine
        self.reader = reader
        self.writer = writer
        self.gate = gate
        self.roles = roles
        self.backend = backend
        self.after_input = after_input
        self.stats = stats
        self.lock = asyncio.Lock()
        self.purge_task: asyncio.Task[None] | None = None
        self.master_followup: asyncio.Future[None] | None = None
        self.backend_errors: list[str] = []  # the steps of the transition under way that failed
        self.under_way = ""  # the step running now (a client waiting for it is told: progress())
        self.since = time.monotonic()  # when it began
        self.steps: dict[str, Step] = {
            failover.GATE: self._gate, failover.CANCEL_PURGE: self._cancel_purge,
            failover.WAIT_INJECT: self._wait_inject, failover.PAUSE_EVENTS: self._pause_events,
            failover.COMMIT: self._commit, failover.RESUME_EVENTS: self._resume_events,
            failover.COMMITTED: self._committed, failover.FLUSH_EXTERNAL: self._flush_external,
            failover.ROLE: self._role, failover.ANNOUNCE: self._announce,
            failover.REQUEST_RESYNC: self._request_resync, failover.START_PURGE: self._start_purge,
            failover.RELEASE: self._release, failover.DUMP: self._dump, failover.BULK_SEND: self._bulk_send,
        }

    def facts(self, t: keepalived.Transition | None = None) -> failover.Facts:
        role = self.engine.role
        if self.roles.restored and t is not None and t.state == "MASTER":
            # a master kept from before the start has committed nothing in this life: its first
            # MASTER is a full one (taken for a no-op, a stale kept role committed nothing)
            role = Role.BACKUP
        return failover.Facts(
            role=role, mode=self.cfg.apply.mode, gated=self.gate.gated,
            instances=tuple(self.cfg.keepalived.instances), purging=self.purge_task is not None,
            injecting=self.writer.injecting)

    async def transition(self, t: keepalived.Transition) -> dict[str, Any]:
        """Apply one transition (the policy is ctbridge.daemon.failover); a second waits for the
        first, never interleaves."""
        ignored = failover.ignored(t, tuple(self.cfg.keepalived.instances))
        if ignored:
            return {"ok": True, "ignored": ignored}
        async with self.lock:  # the facts are read again: they may have changed meanwhile
            start = time.monotonic()
            decision = failover.decide(t, self.facts(t), self.cfg.apply.purge_timeout)
            self.roles.restored = False
            record: dict[str, Any] = {"state": t.state, "name": t.name, "at": time.time()}
            if decision.noop:
                record["noop"] = True
            self.backend_errors = []
            try:
                out = await self.execute(decision.actions, start)
            finally:
                self.roles.keep()  # what the role became, also when a step failed
            record.update(out)
            if not decision.noop:
                log.info("%s%s", decision.note, f" {out}" if out else "")
            record["seconds"] = round(time.monotonic() - start, 6)
            self.stats["transitions"] = [*self.stats["transitions"][1 - TRANSITIONS_KEPT:], record]
            self.after_input()
            if self.backend_errors:  # every step ran; the transition still failed, and says why
                raise conntrackd.StepError("; ".join(self.backend_errors))
            return {"ok": True, "role": self.engine.role.value, **record}

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
        """One step: conntrackd's command for it with that backend, else its handler."""
        self.under_way, self.since = action.name, time.monotonic()
        try:
            if self.backend is not None:
                if action.name in conntrackd.IDLE:
                    return None
                flag = conntrackd.FLAGS.get(action.name)
                if flag is not None:
                    return await self._conntrackd(self.backend, action.name, flag)
            handler = self.steps.get(action.name)
            return None if handler is None else await handler(action, start)
        finally:
            self.under_way = ""

    async def _conntrackd(self, backend: conntrackd.Conntrackd, name: str, flag: str) -> dict[str, Any]:
        """The replicator's step: conntrackd's, to its end."""
        try:
            await backend.run(flag)
        except conntrackd.StepError as exc:
            # said, and the transition fails at its end; the steps after it still run, as the
            # primary-backup script's do (a master whose commit failed still resyncs)
            log.error("%s: %s", name, exc)
            self.backend_errors.append(str(exc))
            return {name.replace("-", "_"): f"FAILED: {exc}"}
        log.info("%s: conntrackd %s done", name, flag)
        return {name.replace("-", "_"): f"conntrackd {flag}"}

    async def commit_now(self) -> dict[str, Any]:
        """The operator's `ctbridge commit`, in turn with the transitions."""
        async with self.lock:
            self.under_way, self.since = failover.COMMIT, time.monotonic()
            try:
                if self.backend is not None:
                    await self.backend.run(conntrackd.FLAGS[failover.COMMIT])
                    return {"ok": True, "committed": "conntrackd -c"}
                return {"ok": True, **await self.writer.commit()}
            finally:
                self.under_way = ""

    def progress(self) -> dict[str, Any]:
        """What a client waiting for a transition or a commit is told while it runs (control.py's
        progress lines): the step under way and the kernel's answers so far, and in a commit the
        entries written of how many. Any change is progress; none for long is a stall."""
        if self.backend is not None:
            # conntrackd's commands show no progress; each is bounded by apply.step_timeout, so
            # the seconds a step has run stand for it (a client waits until that bound fails it);
            # between steps nothing moves
            seconds = round(time.monotonic() - self.since) if self.under_way else 0
            return {"step": self.under_way, "backend": "conntrackd", "seconds": seconds}
        table = self.writer.kernel.table
        out: dict[str, Any] = {"step": self.under_way, "kernel_requests": table.requests_done}
        if self.under_way == failover.COMMIT:
            out["written"] = table.requests_done - table.commit_base
            out["of"] = table.commit_entries
        return out

    # --- the steps (failover's names), one handler each ---------------------------------------

    async def _gate(self, action: failover.Action, start: float) -> None:
        await self.gate.set(closed=action.closed)

    async def _cancel_purge(self, action: failover.Action, start: float) -> None:
        if self.purge_task is not None:
            self.purge_task.cancel()
            self.purge_task = None

    async def _wait_inject(self, action: failover.Action, start: float) -> None:
        if self.writer.task is not None:
            await asyncio.shield(self.writer.task)

    async def _pause_events(self, action: failover.Action, start: float) -> None:
        # the dump of the follow-up brings the internal cache up to date: meanwhile the echo of
        # the commit is not even delivered to this process
        self.reader.events.pause()

    async def _commit(self, action: failover.Action, start: float) -> dict[str, Any]:
        return await self.writer.commit()

    async def _resume_events(self, action: failover.Action, start: float) -> None:
        self.reader.events.resume()

    async def _committed(self, action: failover.Action, start: float) -> dict[str, Any]:
        return {"committed_after": round(time.monotonic() - start, 6)}  # notification -> flows in place

    async def _flush_external(self, action: failover.Action, start: float) -> None:
        self.engine.flush_external()

    async def _role(self, action: failover.Action, start: float) -> None:
        if action.role is not None:
            self.engine.set_role(action.role)

    async def _announce(self, action: failover.Action, start: float) -> None:
        # The flows are in the kernel: answer now, so keepalived's hook returns. The follow-up
        # waits for the transition lock, so a next transition waits for it too.
        self.master_followup = asyncio.ensure_future(self.announce_as_master())

    async def _request_resync(self, action: failover.Action, start: float) -> None:
        self.engine.request_resync(asyncio.get_running_loop().time())

    async def _start_purge(self, action: failover.Action, start: float) -> None:
        if self.purge_task is None:
            self.purge_task = asyncio.ensure_future(self.purge())

    async def _release(self, action: failover.Action, start: float) -> None:
        done = await self.writer.release()
        log.info("release: %d former TCP flows marked liberal", done)

    async def _dump(self, action: failover.Action, start: float) -> dict[str, Any]:
        return {"announced": await self.reader.resync()}

    async def _bulk_send(self, action: failover.Action, start: float) -> None:
        self.engine.bulk_send(asyncio.get_running_loop().time())
        self.after_input()

    async def announce_as_master(self) -> None:
        async with self.lock:
            out = await self.execute(failover.followup(self.engine.role), time.monotonic())
            if self.engine.role is Role.MASTER:
                log.info("MASTER: %d flows of this kernel announced to the peers", out.get("announced", 0))

    async def purge(self) -> None:
        """Flows this node had as master: their timeout becomes the purge timeout, so those no
        packet refreshes (the new master forwards them now) go away; flows peers tell us about
        (inject mode) are left alone."""
        done = await self.writer.release(max(1, int(self.cfg.apply.purge_timeout)))
        log.info("purge: %d flows of the former master expire in %.0f s (TCP ones marked liberal)", done,
                 self.cfg.apply.purge_timeout)
        self.purge_task = None


async def read_fifo(path: str, transition: Callable[[keepalived.Transition], Awaitable[dict[str, Any]]]) -> None:
    """keepalived's notify_fifo: the one channel where transitions arrive in order."""
    async for t in keepalived.fifo_transitions(path):
        try:
            answer = await transition(t)
        except Exception as exc:  # said, and the next line is read: a failed step ends no daemon
            log.error("notify_fifo %s %s %s failed: %s", t.kind, t.name, t.state, exc)
            continue
        log.info("notify_fifo %s %s %s: %s", t.kind, t.name, t.state, answer.get("role"))

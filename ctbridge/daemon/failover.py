"""What a node does when keepalived changes its state: a pure policy.

``decide(transition, facts)`` returns the ordered actions for one keepalived transition; the
daemon executes them one after the other under its transition lock (daemon/transitions.py,
``Transitions.execute``). Nothing here touches the kernel, a socket or the clock, so every rule is
tested without root (tests/unit/test_failover.py). The rules:

- MASTER: stop a pending purge; wait for flows still being injected; in commit mode, keep kernel
  events away (pause) while the peers' flows are committed, then let them in again; open the
  commit gate once the flows are in place (also when the commit failed: a master must never keep
  new flows out); drop the external caches; become MASTER; then, in the background but still in
  turn with other transitions, rebuild the internal cache from a dump and, if still MASTER, send it
  to the peers (``followup``).
- BACKUP: become BACKUP and ask the peers for their flows; a node that was MASTER also starts the
  purge of its former flows (their timeouts become apply.purge_timeout, and TCP ones are marked
  BE_LIBERAL: see below).
- FAULT, STOP, DELETED: stop advertising this node's flows; the caches are kept. A node that was
  MASTER marks its former TCP flows BE_LIBERAL (release): their windows fall behind the traffic
  the new master carries, and if it took the role back before its commit landed, the first packet
  of each flow would be INVALID here (measured: one packet of every flow dropped at failback).
- A transition to the role the node already has does nothing (except STOP, which always stands
  down), but the gate still follows keepalived: right after a start the engine says BACKUP while
  the gate has not been closed yet.
- A transition of an instance that is not in keepalived.instances is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ctbridge.daemon.keepalived import Transition
from ctbridge.sync.engine import Role


@dataclass(frozen=True)
class Action:
    """One step. ``ensure``: it runs even when an earlier step failed (the failure is raised
    after the ensured steps have run)."""

    name: str
    closed: bool = False  # for "gate"
    role: Role | None = None  # for "role"
    ensure: bool = False


# The steps, by name (Transitions.steps maps each to its handler):
GATE = "gate"  # close (closed=True) or open the commit gate
CANCEL_PURGE = "cancel-purge"  # stop the purge of a former master's flows
WAIT_INJECT = "wait-inject"  # let the flows being injected into the kernel land
PAUSE_EVENTS = "pause-events"  # leave the kernel's event groups: the commit's echo is not needed
COMMIT = "commit"  # write the external caches into the kernel
RESUME_EVENTS = "resume-events"
COMMITTED = "committed"  # note the time from the notification until the flows were in place
FLUSH_EXTERNAL = "flush-external"  # a master holds no peer's flows: its kernel is the truth
ROLE = "role"  # the engine's role
ANNOUNCE = "announce"  # start the follow-up: a dump, then a bulk send if still MASTER
REQUEST_RESYNC = "request-resync"  # ask the peers for their flows
START_PURGE = "start-purge"  # release this node's former flows with the purge timeout
RELEASE = "release"  # mark this node's former TCP flows BE_LIBERAL, timeouts left alone
DUMP = "dump"  # rebuild the internal cache from the kernel
BULK_SEND = "bulk-send"  # send the internal cache to the peers


@dataclass(frozen=True)
class Facts:
    """What the policy needs to know about the node when the transition comes."""

    role: Role  # the engine's role now
    mode: str = "commit"  # apply.mode: "commit" or "inject"
    gated: bool = True  # the commit gate is used (apply.gate in commit mode)
    instances: tuple[str, ...] = ()  # keepalived.instances; empty: every instance counts
    purging: bool = False  # a purge of a former master's flows is running
    injecting: bool = False  # flows are being written into the kernel (inject mode)


@dataclass(frozen=True)
class Decision:
    actions: list[Action] = field(default_factory=list)
    role: Role | None = None  # the role keepalived asks for; None when ignored
    noop: bool = False  # the node already has that role
    ignored: str = ""  # why the transition does not count, if it does not
    note: str = ""  # one line for the log


def role_of(state: str) -> Role:
    """keepalived's word as a role: anything but MASTER and BACKUP stands the node down."""
    return {"MASTER": Role.MASTER, "BACKUP": Role.BACKUP}.get(state, Role.FAULT)


def ignored(t: Transition, instances: tuple[str, ...]) -> str:
    """Why ``t`` does not count ("" if it does): its instance is not in keepalived.instances
    (notify_master & co. name none, and always count)."""
    if instances and t.name and t.name not in instances:
        return f"{t.kind.lower()} {t.name} is not in keepalived.instances"
    return ""


def decide(t: Transition, facts: Facts, purge_timeout: float = 60.0) -> Decision:
    """The ordered actions for transition ``t`` (see the module docstring for the rules)."""
    why = ignored(t, facts.instances)
    if why:
        return Decision(ignored=why)
    role = role_of(t.state)
    noop = role is facts.role and t.state != "STOP"
    actions: list[Action] = []
    if facts.gated and (role is not Role.MASTER or noop):
        # a new master opens the gate below, once its flows are committed
        actions.append(Action(GATE, closed=role is not Role.MASTER))
    if noop:
        return Decision(actions, role, noop=True, note=f"{t.state}: already {role.value}")
    if role is Role.MASTER:
        if facts.purging:
            actions.append(Action(CANCEL_PURGE))
        if facts.injecting:
            actions.append(Action(WAIT_INJECT))
        if facts.mode == "commit":
            actions += [Action(PAUSE_EVENTS), Action(COMMIT), Action(RESUME_EVENTS, ensure=True)]
        actions.append(Action(COMMITTED))
        if facts.gated:
            actions.append(Action(GATE, closed=False, ensure=True))
        # The role follows keepalived even when the commit failed: a master that stayed BACKUP
        # here was demoted by its own interlock, and a higher incomplete node took the VIPs.
        actions += [Action(FLUSH_EXTERNAL), Action(ROLE, role=Role.MASTER, ensure=True), Action(ANNOUNCE)]
        return Decision(actions, role, note="MASTER:")
    if role is Role.BACKUP:
        actions += [Action(ROLE, role=Role.BACKUP), Action(REQUEST_RESYNC)]
        note = "BACKUP: asked peers for their flows"
        if facts.role is Role.MASTER and not facts.purging:
            actions.append(Action(START_PURGE))
            note += f"; flows of the former master expire in {purge_timeout:.0f} s unless packets keep them alive"
        return Decision(actions, role, note=note)
    actions.append(Action(ROLE, role=Role.FAULT))
    note = f"{t.state}: stopped advertising this node's flows; caches kept"
    if facts.role is Role.MASTER:
        actions.append(Action(RELEASE))
        note += "; its former TCP flows marked liberal"
    return Decision(actions, role, note=note)


def followup(role_now: Role) -> list[Action]:
    """After a MASTER transition, in turn with later transitions: the dump runs whatever came
    meanwhile (kernel events were paused during the commit, and only a dump brings the internal
    cache back in step); the announce only if the node is still MASTER."""
    return [Action(DUMP)] + ([Action(BULK_SEND)] if role_now is Role.MASTER else [])


def may_take_over(complete: bool, role: Role, heard_a_peer: bool) -> bool:
    """Whether the priority interlock lets this node win an election against a complete node.

    A master never needs a peer's flows: its own kernel is the truth. A standby must hold every
    live peer's flows, and must have heard a peer at all: a node that hears nobody (just started,
    or its sync link down) cannot know what a master elsewhere holds. Losing does not keep it from
    serving: the interlock demotes and never faults, so a node left alone becomes master anyway.
    """
    if role is Role.MASTER:
        return True
    return complete and heard_a_peer


def track_value(may: bool, incomplete_value: int) -> int:
    """What the track file holds: 0 while the node may take over, else ``incomplete_value``
    (keepalived adds it, times the weight, to the priority)."""
    return 0 if may else incomplete_value

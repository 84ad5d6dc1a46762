"""The failover policy, without root: what MASTER, BACKUP, FAULT and STOP make a node do, in order."""

from __future__ import annotations

import pytest

from ctbridge.daemon import failover
from ctbridge.daemon.failover import Action, Facts, decide, followup
from ctbridge.daemon.keepalived import Transition
from ctbridge.sync.engine import Role


def t(state: str, name: str = "G1", kind: str = "GROUP") -> Transition:
    return Transition(kind, name, state, 0)


def names(actions: list[Action]) -> list[str]:
    return [a.name + (f"({'closed' if a.closed else 'open'})" if a.name == failover.GATE else "")
            + (f"({a.role.value})" if a.role else "") for a in actions]


def test_master_in_commit_mode_commits_then_opens_the_gate_then_announces() -> None:
    d = decide(t("MASTER"), Facts(role=Role.BACKUP))
    assert names(d.actions) == ["pause-events", "commit", "resume-events", "committed", "gate(open)",
                                "flush-external", "role(MASTER)", "announce"]
    assert not d.noop and d.role is Role.MASTER
    # what must happen even if the commit fails: events back, and a master never keeps new flows out
    assert [a.name for a in d.actions if a.ensure] == ["resume-events", "gate", "role"]


def test_master_in_inject_mode_waits_for_the_injected_flows_and_cancels_a_purge() -> None:
    d = decide(t("MASTER"), Facts(role=Role.BACKUP, mode="inject", gated=False, purging=True, injecting=True))
    assert names(d.actions) == ["cancel-purge", "wait-inject", "committed", "flush-external", "role(MASTER)",
                                "announce"]


def test_backup_asks_for_the_peers_flows_and_a_former_master_purges() -> None:
    d = decide(t("BACKUP"), Facts(role=Role.MASTER))
    assert names(d.actions) == ["gate(closed)", "role(BACKUP)", "request-resync", "start-purge"]
    assert "expire in 60 s" in d.note
    # a node that was not master has nothing of its own to purge; a running purge is not restarted
    assert names(decide(t("BACKUP"), Facts(role=Role.FAULT)).actions) == ["gate(closed)", "role(BACKUP)",
                                                                           "request-resync"]
    assert "start-purge" not in names(decide(t("BACKUP"), Facts(role=Role.MASTER, purging=True)).actions)


@pytest.mark.parametrize("state", ["FAULT", "STOP", "DELETED"])
def test_fault_stop_and_deleted_stand_down_and_close_the_gate(state: str) -> None:
    d = decide(t(state), Facts(role=Role.MASTER))
    # a former master marks its own TCP flows liberal: it may take the role back before its commit
    assert names(d.actions) == ["gate(closed)", "role(FAULT)", "release"]
    assert d.role is Role.FAULT
    assert names(decide(t(state), Facts(role=Role.BACKUP)).actions) == ["gate(closed)", "role(FAULT)"]


def test_a_repeated_state_does_nothing_but_the_gate_still_follows_keepalived() -> None:
    # just started: the engine says BACKUP, the gate was never closed
    d = decide(t("BACKUP"), Facts(role=Role.BACKUP))
    assert d.noop and names(d.actions) == ["gate(closed)"]
    d = decide(t("MASTER"), Facts(role=Role.MASTER))
    assert d.noop and names(d.actions) == ["gate(open)"]
    assert decide(t("FAULT"), Facts(role=Role.FAULT)).noop


def test_stop_always_stands_down_even_when_already_in_fault() -> None:
    d = decide(t("STOP"), Facts(role=Role.FAULT))
    assert not d.noop and names(d.actions) == ["gate(closed)", "role(FAULT)"]


def test_without_a_gate_no_gate_step() -> None:
    for state, role in (("MASTER", Role.BACKUP), ("BACKUP", Role.MASTER), ("BACKUP", Role.BACKUP)):
        assert not [a for a in decide(t(state), Facts(role=role, gated=False)).actions if a.name == failover.GATE]


def test_instances_not_listed_are_ignored() -> None:
    facts = Facts(role=Role.BACKUP, instances=("VI_1",))
    d = decide(t("MASTER", "VI_2", "INSTANCE"), facts)
    assert d.actions == [] and d.ignored == "instance VI_2 is not in keepalived.instances"
    assert decide(t("MASTER", "VI_1", "INSTANCE"), facts).actions
    # notify_master & co. name no instance: they always count
    assert decide(Transition("", "", "MASTER", 0), facts).actions


def test_the_followup_dumps_always_and_announces_only_as_master() -> None:
    assert names(followup(Role.MASTER)) == ["dump", "bulk-send"]
    # a BACKUP came while the commit ran: the internal cache is rebuilt, nothing is announced
    assert names(followup(Role.BACKUP)) == ["dump"]
    assert names(followup(Role.FAULT)) == ["dump"]


def test_the_interlock_keeps_an_incomplete_standby_from_winning() -> None:
    """When the interlock faulted instead of demoting, a node that had heard nobody for
    peer_timeout counted as complete, so that it could become master alone; with its sync link
    down and its caches empty it then preempted a complete master."""
    may = failover.may_take_over
    # a standby whose external cache is whole may take over
    assert may(True, Role.BACKUP, heard_a_peer=True)
    # one that lacks flows may not
    assert not may(False, Role.BACKUP, heard_a_peer=True)
    # nobody heard (just started, or the sync link down): never complete, however long; found by
    # the lab test of an incomplete node's preemption (it read complete after peer_timeout)
    assert not may(True, Role.BACKUP, heard_a_peer=False)
    # a master's own kernel is the truth: it never needs a peer's flows
    assert may(False, Role.MASTER, heard_a_peer=False)
    assert failover.track_value(True, -254) == 0 and failover.track_value(False, -254) == -254


def test_the_daemon_runs_the_ensured_steps_after_a_failure_or_a_cancellation() -> None:
    """Found by review: a cancelled MASTER commit left kernel events paused and the gate closed."""
    import asyncio

    from ctbridge.daemon.transitions import Transitions

    class Steps:
        def __init__(self, fail_with: BaseException) -> None:
            self.ran: list[str] = []
            self.fail_with = fail_with

        async def step(self, action: Action, start: float) -> dict[str, object] | None:
            self.ran.append(action.name)
            if action.name == failover.COMMIT:
                raise self.fail_with
            return None

    actions = decide(t("MASTER"), Facts(role=Role.BACKUP)).actions
    for failure in (OSError("ENOBUFS"), asyncio.CancelledError()):
        steps = Steps(failure)
        with pytest.raises(type(failure)):
            asyncio.run(Transitions.execute(steps, actions, 0.0))  # type: ignore[arg-type]
        assert steps.ran == ["pause-events", "commit", "resume-events", "gate", "role"]


def test_a_failed_commit_still_makes_the_node_master() -> None:
    """Found by review: the ROLE step was skipped after a failed commit, so the new master stayed
    BACKUP for the engine, its interlock demoted it, and an incomplete higher node could take the
    VIPs; the kept role was wrong for the next restart too."""
    d = decide(t("MASTER"), Facts(role=Role.BACKUP, mode="commit", gated=True))
    role_steps = [a for a in d.actions if a.name == failover.ROLE]
    assert role_steps == [failover.Action(failover.ROLE, role=Role.MASTER, ensure=True)]


def test_every_step_of_the_policy_has_a_handler() -> None:
    """The daemon runs each step through one table (Transitions.steps); a step the policy names
    and the table lacks would silently do nothing."""
    from ctbridge.daemon.transitions import Transitions

    expected = {failover.GATE, failover.CANCEL_PURGE, failover.WAIT_INJECT, failover.PAUSE_EVENTS, failover.COMMIT,
             failover.RESUME_EVENTS, failover.COMMITTED, failover.FLUSH_EXTERNAL, failover.ROLE, failover.ANNOUNCE,
             failover.REQUEST_RESYNC, failover.START_PURGE, failover.RELEASE, failover.DUMP, failover.BULK_SEND}
    steps = Transitions(*[None] * 8, {}).steps  # type: ignore[arg-type]
    assert set(steps) == expected
    produced = {a.name for state in ("MASTER", "BACKUP", "FAULT", "STOP")
                for role in (Role.MASTER, Role.BACKUP, Role.FAULT)
                for facts in (Facts(role=role), Facts(role=role, purging=True, injecting=True))
                for a in decide(t(state), facts).actions} | {a.name for a in followup(Role.MASTER)}
    assert produced == expected

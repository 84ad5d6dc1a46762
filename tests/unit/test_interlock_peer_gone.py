"""Active-active's interlock (keepalived.peer_gone_complete): a peer that was whole here and went
silent or restarted does not count against this node until its flows are all here again.

Without it a survivor that hears nobody demoted itself; with both nodes demoted the masters' own
priorities decided, so the node of a killed daemon (demoted by its unit's ExecStopPost) kept its
VIP, and at a peer's restart the restarting node kept its VIP before its defer could hold
anything. It never raises a priority above 0 (an earlier version did, and a sync link failing
one way then moved VIPs to the node that lacked the flows: found by review)."""

from __future__ import annotations

import asyncio

from ctbridge.conntrack.codec import EventKind
from ctbridge.daemon import failover
from ctbridge.daemon.interlock import Interlock
from tests.support.enginelab import Lab, flow

INCOMPLETE = -51


def value(il: Interlock) -> int:
    return failover.track_value(asyncio.run(il.may_take_over(il.engine.clock.latest)), il.incomplete_value)


def interlock(lab: Lab, node: int, on: bool = True) -> Interlock:
    return Interlock(lab.engines[node], None, "", INCOMPLETE, {}, gone_complete=on)


def test_a_peer_gone_silent_does_not_demote_the_node_that_holds_its_flows() -> None:
    lab = Lab(2)
    one = interlock(lab, 1)
    assert value(one) == INCOMPLETE  # nobody heard yet: never "gone", and not complete either
    lab.quiet()
    lab.run(2)
    assert value(one) == 0  # the peer is live and its flows are all here
    del lab.engines[2]  # its daemon killed: nothing more is heard from it
    for _ in range(int((lab.engines[1].config.peer_timeout + 1) / 0.1)):
        lab.run(0.1)
        assert value(one) == 0  # before, past peer_timeout: INCOMPLETE
    lab.start(2)  # a new life: still gone until its bulk is here, then whole again
    seen_incomplete = False
    for _ in range(1000):
        lab.step(0.002)
        seen_incomplete |= not lab.engines[1].complete()
        if lab.engines[1].complete() and lab.engines[1].live_peers():
            break
        assert value(one) == 0  # not down to INCOMPLETE while its bulk comes
    assert seen_incomplete and value(one) == 0 and not one.gone


def test_without_it_a_silent_peer_demotes_as_before() -> None:
    lab = Lab(2)
    one = interlock(lab, 1, on=False)
    lab.quiet()
    lab.run(2)
    del lab.engines[2]
    lab.run(lab.engines[1].config.peer_timeout + 1)
    assert value(one) == INCOMPLETE  # active-standby: a node that hears nobody may not win


def test_a_peer_restarting_does_not_demote_the_node_that_holds_its_flows() -> None:
    lab = Lab(2)
    one = interlock(lab, 1)
    lab.quiet()
    lab.run(2)
    assert value(one) == 0
    lab.start(2)  # restarted within peer_timeout: never silent
    values = []
    for _ in range(2000):
        lab.step(0.01)
        values.append(value(one))
        if lab.engines[1].complete() and lab.engines[1].live_peers() and not one.gone:
            break
    assert set(values) == {0} and not one.gone, sorted(set(values))


def test_a_node_that_lacked_the_peers_flows_is_not_made_whole_by_its_silence() -> None:
    """Found by review: a node whose bulk from the peer was lost, then the peer died, counted as
    complete and would have taken the peer's instances without its flows."""
    lab = Lab(2)
    one = interlock(lab, 1)
    for i in range(3000):
        lab.event(2, EventKind.NEW, flow(i))
    # node 2's session is proven (small datagrams), but no datagram with flows reaches node 1
    lab.drop = lambda src, dst, data: src == 2 and dst == 1 and len(data) > 400
    lab.run(3)
    assert lab.engines[1].peers[2].proven
    assert not lab.engines[1].complete() and value(one) == INCOMPLETE
    del lab.engines[2]
    lab.run(lab.engines[1].config.peer_timeout + 1)
    assert value(one) == INCOMPLETE and not one.gone


def test_a_stranger_heard_once_is_not_a_peer_gone() -> None:
    """Only a peer whose session was proven counts: datagrams nobody could prove (a replay, a node
    that never answered its challenge) do not make anyone whole."""
    lab = Lab(2)
    one = interlock(lab, 1)
    lab.drop = lambda src, dst, data: src == 1  # node 2 hears nothing of node 1: never proven
    lab.run(lab.engines[1].config.peer_timeout + 2)
    assert not any(p.proven for p in lab.engines[1].peers.values())
    assert value(one) == INCOMPLETE and not one.gone

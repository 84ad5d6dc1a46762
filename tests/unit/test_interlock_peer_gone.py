"""Active-active's interlock (keepalived.peer_gone_value): a node whose peer's daemon has gone
silent takes the peer's instances. Without it, the killed daemon's node kept its VIPs (its
track file said what it last said) and forwarded new flows nobody replicated; the survivor, which
heard nobody, even demoted itself below it."""

from __future__ import annotations

from ctbridge.daemon import failover
from ctbridge.daemon.interlock import Interlock
from tests.support.enginelab import Lab

GONE, INCOMPLETE = 51, -51


def value(il: Interlock) -> int:
    e = il.engine
    may = failover.may_take_over(e.complete(), e.role, heard_a_peer=bool(e.live_peers()))
    return failover.track_value(may, il.incomplete_value, il.peer_gone(), il.gone_value)


def test_a_peer_gone_silent_lifts_the_node_that_holds_its_flows() -> None:
    lab = Lab(2)
    one = Interlock(lab.engines[1], None, "", INCOMPLETE, {}, gone_value=GONE)
    assert value(one) == INCOMPLETE  # nobody heard yet: never "gone", and not complete either
    lab.quiet()
    lab.run(2)
    assert value(one) == 0  # the peer is live and its flows are all here
    del lab.engines[2]  # its daemon killed: nothing more is heard from it
    lab.run(lab.engines[1].config.peer_timeout + 1)
    assert value(one) == GONE
    lab.start(2)  # a new life: still gone until its bulk is here, then no longer
    seen_incomplete = False
    for _ in range(1000):
        lab.step(0.002)
        seen_incomplete |= not lab.engines[1].complete()
        if lab.engines[1].complete() and lab.engines[1].live_peers():
            break
        assert value(one) == GONE  # not back to 0, nor down to INCOMPLETE, while its bulk comes
    assert seen_incomplete
    lab.quiet()
    lab.run(2)
    assert value(one) == 0


def test_without_a_gone_value_a_silent_peer_demotes_as_before() -> None:
    lab = Lab(2)
    one = Interlock(lab.engines[1], None, "", INCOMPLETE, {})
    lab.quiet()
    lab.run(2)
    del lab.engines[2]
    lab.run(lab.engines[1].config.peer_timeout + 1)
    assert value(one) == INCOMPLETE  # active-standby: a node that hears nobody may not win


def test_a_stranger_heard_once_is_not_a_peer_gone() -> None:
    """Only a peer that proved a session counts: datagrams nobody could prove (a replay, a node
    that never answered its challenge) do not lift anyone."""
    lab = Lab(2)
    one = Interlock(lab.engines[1], None, "", INCOMPLETE, {}, gone_value=GONE)
    lab.drop = lambda src, dst, data: src == 1  # node 2 hears nothing of node 1: never proven
    lab.run(lab.engines[1].config.peer_timeout + 2)
    assert not any(p.proven for p in lab.engines[1].peers.values())
    assert value(one) != GONE

"""Protocol versions, negotiated per peer (docs/protocol.md, "Versions"), with a fake clock: engines
of version 3 beside engines that speak only version 2 (``max_version=2``: as far as the wire goes,
the release of 2026-12-01, which refuses a datagram of version 3 and announces nothing).

Rules checked: a node announces the highest version it speaks; a peer is taken to speak 2 until
a datagram of its session says more (an announcement, or a datagram of version 3); a datagram's
version is the lowest its receivers speak, and only a datagram of version 3 carries compact
FLOWs; a peer's new epoch forgets what its old one spoke; a lost HELLO costs nothing."""

from __future__ import annotations

from ctbridge.conntrack.codec import EventKind
from ctbridge.sync import wire
from ctbridge.sync.engine import Engine
from tests.support.enginelab import Lab, flow


def exact(lab: Lab) -> bool:
    """Every node's copy of every other node's flows is, message for message, the sender's own
    (version included): the compact forms rebuilt exactly what was sent."""
    for s, sender in lab.engines.items():
        for r, receiver in lab.engines.items():
            if r == s:
                continue
            peer = receiver.peers.get(s)
            have = {k: v[0] for k, v in peer.external.items()} if peer else {}
            if have != sender.internal:
                return False
    return True


def versions_sent(lab: Lab, node: int, seconds: float) -> set[int]:
    """The header versions of the datagrams ``node`` sends over the next ``seconds``."""
    seen: set[int] = set()
    eng = lab.engines[node]
    send = eng.datagrams_to_send

    def watched(now: float) -> list[tuple[bytes, int | None]]:
        out = send(now)
        seen.update(data[2] for data, _ in out)
        return out
    eng.datagrams_to_send = watched  # type: ignore[method-assign]
    try:
        lab.run(seconds)
    finally:
        eng.datagrams_to_send = send  # type: ignore[method-assign]
    return seen


def churn(lab: Lab, node: int, first: int, n: int) -> None:
    for i in range(first, first + n):
        lab.event(node, EventKind.NEW, flow(i))
    for i in range(first, first + n, 3):
        lab.event(node, EventKind.DESTROY, flow(i))


def protocol(eng: Engine, node: int) -> int:
    (report,) = [r for r in eng.peer_reports(0.0) if r.node == node]
    return report.protocol


def test_two_nodes_of_version_3_speak_it_and_send_compact_flows() -> None:
    lab = Lab(2)
    lab.run(1)
    a, b = lab.engines[1], lab.engines[2]
    assert protocol(a, 2) == protocol(b, 1) == 3
    churn(lab, 1, 0, 300)
    churn(lab, 2, 1000, 300)
    assert versions_sent(lab, 1, 1) == {3}
    assert exact(lab)
    assert a.stats["tx_compact"] >= 300 and b.stats["rx_v3_datagrams"] > 0
    assert a.stats["rejected_malformed"] == b.stats["rejected_malformed"] == 0
    # a third of the datagrams version 2 needs for the same flows
    assert a.stats["flows_sent"] / a.stats["tx_datagrams"] > 10


def test_a_node_of_version_2_is_spoken_to_in_version_2_and_never_sent_what_it_cannot_read() -> None:
    """The rolling upgrade's first step: a new node beside an old one. Both replicate both ways,
    the new one sends only datagrams of version 2 (no compact FLOW), the old one refuses nothing."""
    lab = Lab(2)
    old = lab.start(2, max_version=2)
    lab.run(1)
    new = lab.engines[1]
    churn(lab, 1, 0, 200)
    churn(lab, 2, 1000, 200)
    assert versions_sent(lab, 1, 2) == {2}
    assert exact(lab)
    assert protocol(new, 2) == 2 and protocol(old, 1) == 2
    assert new.stats["tx_compact"] == 0 and old.stats["rejected_malformed"] == 0
    assert old.stats["flows_sent"] > 0 and new.stats["flows_sent"] > 0


def test_a_peer_restarted_at_version_2_is_forgotten_as_3_and_one_upgraded_is_learnt() -> None:
    """Downgrade: B restarts as a node of version 2 (a new epoch). A, which spoke 3 with B's
    old life, speaks 2 as soon as it hears the new life, and B's copy becomes A's table. Then
    B restarts at version 3 again: A learns it from B's new session and speaks 3 again."""
    lab = Lab(2)
    lab.run(1)
    a = lab.engines[1]
    churn(lab, 1, 0, 200)
    lab.run(1)
    assert protocol(a, 2) == 3 and exact(lab)
    b = lab.start(2, max_version=2)
    lab.run(0.01)
    assert a.peers[2].speaks == 2  # its first datagram (another epoch) was enough
    churn(lab, 1, 500, 100)
    assert versions_sent(lab, 1, 3) == {2}
    assert exact(lab) and protocol(a, 2) == 2 and b.stats["bulks_received"] >= 1
    malformed = b.stats["rejected_malformed"]
    churn(lab, 1, 700, 100)
    lab.run(2)
    assert b.stats["rejected_malformed"] == malformed  # nothing of version 3 once A heard it
    lab.start(2)
    lab.run(1)
    assert protocol(a, 2) == 3 and protocol(lab.engines[2], 1) == 3
    churn(lab, 1, 900, 100)
    assert versions_sent(lab, 1, 1) == {3} and exact(lab)


def test_a_lost_hello_is_recovered_by_the_announcements_that_follow() -> None:
    """Every datagram of B with HELLO in it is lost: A learns B's version from the ECHO that
    starts B's session, and from ACK and ALIVE after it. (HELLO opens an epoch, which is never
    proven by its first datagram: what counts is what the session's datagrams say.)"""
    lab = Lab(2)
    hello = wire.MsgType.HELLO

    def no_hello(src: int, dst: int, data: bytes) -> bool:
        return src == 2 and data[wire.HEADER_LEN] == hello
    lab.drop = no_hello
    lab.start(2)
    lab.run(1)
    a = lab.engines[1]
    assert lab.dropped >= 1
    assert protocol(a, 2) == 3
    churn(lab, 1, 0, 100)
    assert versions_sent(lab, 1, 1) == {3} and exact(lab)


def test_an_announcement_is_taken_only_from_a_peers_proven_session() -> None:
    """A datagram of another epoch of B (not proven: a restart, or a replay of an old life) says
    nothing A believes: it resets what A takes B to speak to version 2, and its announcement is
    not taken until that epoch answers A's challenge."""
    lab = Lab(2)
    lab.run(1)
    a, b = lab.engines[1], lab.engines[2]
    assert a.peers[2].speaks == 3
    stranger = wire.datagram(wire.Header(2, b.epoch + 5, 1, 0, version=3), wire.hello_msg(3), lab.auth)
    a.receive_datagram(stranger, lab.now)
    assert a.peers[2].speaks == 2 and a.stats["rejected_unproven"] >= 1
    assert a.sender.datagram_version() == 2
    lab.run(1)  # B's real session goes on, but a newer life of B was heard: A holds back
    assert a.peers[2].speaks == 2
    lab.run(a.config.peer_timeout)  # that life never proved itself: B's announcements count again
    assert a.peers[2].speaks == 3


def test_a_late_datagram_of_a_peers_old_life_does_not_bring_version_3_back() -> None:
    """B restarts as a node of version 2 while a datagram of its old life (version 3) is still
    on the way. Once A has heard the new life, that late datagram (not a replay: A never had it)
    must not make A speak 3 again: the new life reads only 2 (found by an adversarial review;
    the old node then dropped A's next datagram, its challenge and bulk with it, as malformed)."""
    lab = Lab(2)
    lab.run(1)
    a = lab.engines[1]
    churn(lab, 2, 0, 50)
    lab.run(1)
    assert a.peers[2].speaks == 3
    held: list[bytes] = []

    def hold(src: int, dst: int, data: bytes) -> bool:  # B's last datagrams to A, delayed
        if src == 2 and dst == 1:
            held.append(data)
            return True
        return False
    lab.drop = hold
    churn(lab, 2, 100, 10)
    lab.run(0.05)
    lab.drop = None
    assert held and all(d[2] == 3 for d in held)
    b = lab.start(2, max_version=2)
    for data, _dest in b.datagrams_to_send(lab.now):  # the new life's first datagram reaches A
        a.receive_datagram(data, lab.now)
    assert a.peers[2].speaks == 2
    a.receive_datagram(held[-1], lab.now)  # then the old life's, late
    assert a.peers[2].speaks == 2 and a.sender.datagram_version() == 2
    malformed = b.stats["rejected_malformed"]
    assert versions_sent(lab, 1, 2) == {2}
    assert b.stats["rejected_malformed"] == malformed and exact(lab)


def test_in_a_mixed_cluster_the_stream_and_its_resends_go_in_the_lowest_version() -> None:
    """Three nodes, C of version 2: A's stream (one datagram for every peer) is of version 2.
    A resend asked for by B alone goes in version 2 too: on a multicast link (or a unicast one
    that does not know B's address) C receives it as well, and C reads only version 2."""
    lab = Lab(3)
    lab.start(3, max_version=2)
    lab.run(1)
    a = lab.engines[1]
    assert [protocol(a, n) for n in (2, 3)] == [3, 2]
    assert a.sender.datagram_version() == 2
    churn(lab, 1, 0, 300)
    assert versions_sent(lab, 1, 1) == {2} and exact(lab)
    resent: list[tuple[int, int | None]] = []
    send = a.datagrams_to_send
    lost = {"done": False}

    def drop_once(src: int, dst: int, data: bytes) -> bool:
        if src == 1 and dst == 2 and not lost["done"] and len(data) > 600:
            lost["done"] = True
            return True
        return False

    def watched(now: float) -> list[tuple[bytes, int | None]]:
        out = send(now)
        resent.extend((data[2], dest) for data, dest in out if dest is not None)
        return out
    a.datagrams_to_send = watched  # type: ignore[method-assign]
    lab.drop = drop_once
    churn(lab, 1, 1000, 300)
    lab.run(1)
    assert lost["done"] and (2, 2) in resent and all(v == 2 for v, _dest in resent)
    assert lab.engines[3].stats["rejected_malformed"] == 0
    assert exact(lab)


def test_a_malformed_compact_flow_is_counted_and_drops_its_datagram() -> None:
    """A compact FLOW that does not read (here a descriptor that starts with the reply) in an
    authentic datagram of version 3: counted as malformed, nothing of the datagram applied, the
    session goes on."""
    lab = Lab(2)
    lab.run(1)
    a, b = lab.engines[1], lab.engines[2]
    good = wire.squeeze(wire.flow_msg(1, flow(7)))
    bad = bytearray(good)
    bad[16] = 0x02  # the descriptor's first code: CTA_TUPLE_REPLY
    before = dict(b.stats)
    seq = a.stream.sent_upto + 1
    short = good[:2] + (40).to_bytes(2, "big") + good[4:40]  # and one shorter than its descriptor needs
    for msg in (bytes(bad), short):
        data = wire.datagram(wire.Header(1, a.epoch, seq, 0, version=3), msg + good, lab.auth)
        assert b.receive_datagram(data, lab.now) is None
    assert b.stats["rejected_malformed"] == before["rejected_malformed"] + 2
    assert flow(7).key not in b.peers[1].external and b.stats["flows_received"] == before["flows_received"]
    churn(lab, 1, 0, 50)
    lab.run(1)
    assert exact(lab)

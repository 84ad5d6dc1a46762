"""`ctbridge diff` between engines (issue 15, deliver 5), with a fake clock: the sums by bucket,
then the keys of the buckets that differ, find exactly the flows a copy lacks, holds beyond the
peer's table, or holds in another state."""

from __future__ import annotations

from ctbridge.conntrack.codec import EventKind
from ctbridge.sync import digest, wire
from ctbridge.sync.engine import ExternalFlow, Role
from tests.support.enginelab import Lab, flow


def diff(lab: Lab, asker: int, peer: int) -> dict[str, object]:
    request = lab.engines[asker].diff_start(peer, lab.now)
    for _ in range(20):
        lab.run(0.1)
        result = lab.engines[asker].diff_result(request)
        if result is not None:
            return result
    raise AssertionError("no answer")


def test_a_copy_in_sync_is_equal() -> None:
    lab = Lab(3)
    for i in range(500):
        lab.event(1, EventKind.NEW, flow(i))
    lab.quiet()
    result = diff(lab, 2, 1)
    assert result["equal"] and result["theirs"] == result["ours"] == 500
    assert diff(lab, 1, 3)["equal"]  # nothing of 3's, on either side


def test_missing_extra_and_stale_flows_are_named_and_nothing_else() -> None:
    lab = Lab(2)
    for i in range(2000):
        lab.event(1, EventKind.NEW, flow(i))
    lab.quiet()
    copy = lab.engines[2].peers[1].external
    # what a lost deletion, a lost flow and a lost update leave behind
    del copy[flow(7).key]
    copy[flow(9999).key] = ExternalFlow(wire.flow_msg(1, flow(9999)), 1, lab.now)
    copy[flow(11).key] = ExternalFlow(wire.flow_msg(1, flow(11, mark=5)), 1, lab.now)
    result = diff(lab, 2, 1)
    assert not result["equal"] and result["theirs"] == 2000 and result["ours"] == 2000
    assert result["missing"] == [flow(7).key] and result["extra"] == [flow(9999).key]
    assert result["stale"] == [flow(11).key] and not result["truncated"]


def test_a_faulty_peer_vouches_for_nothing() -> None:
    lab = Lab(2)
    for i in range(10):
        lab.event(1, EventKind.NEW, flow(i))
    lab.quiet()
    lab.engines[1].set_role(Role.FAULT)
    result = diff(lab, 2, 1)
    assert not result["equal"] and result["theirs"] == 0 and len(result["extra"]) == 10


def test_a_peer_answers_the_sums_once_a_second() -> None:
    """Each answer is a pass over the whole table: a peer asking in a loop gets one a second."""
    lab = Lab(2)
    lab.event(1, EventKind.NEW, flow(1))
    lab.quiet()
    two = lab.engines[2]
    first, second = two.diff_start(1, lab.now), two.diff_start(1, lab.now)
    lab.run(0.5)
    assert two.diff_result(first) is not None and two.diff_result(second) is None


def test_buckets_and_hashes_do_not_depend_on_order() -> None:
    items = [(flow(i).key, wire.flow_msg(i, flow(i))) for i in range(300)]
    assert digest.summary(items) == digest.summary(list(reversed(items)))
    assert sum(b.flows for b in digest.summary(items)) == 300
    assert digest.differing(digest.summary(items), digest.summary(items[1:])) == [digest.bucket_of(items[0][0])]

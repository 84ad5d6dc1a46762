"""`ctbridge diff` between engines (issue 15, deliver 5), with a fake clock: the sums by bucket,
then the keys of the buckets that differ, find exactly the flows a copy lacks, holds beyond the
peer's table, or holds in another state."""

from __future__ import annotations

from ctbridge.conntrack.codec import EventKind
from ctbridge.sync import digest, wire
from ctbridge.sync.engine import Role
from ctbridge.sync.events import Heard
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
    life = lab.engines[2].peers[1].life  # stored sequence numbers of this life (ctbridge.sync.peer.LIFE)
    copy[flow(9999).key] = (wire.flow_msg(1, flow(9999)), life + 1, lab.now)
    copy[flow(11).key] = (wire.flow_msg(1, flow(11, mark=5)), life + 1, lab.now)
    result = diff(lab, 2, 1)
    assert not result["equal"] and result["theirs"] == 2000 and result["ours"] == 2000
    assert result["missing"] == [flow(7).key] and result["extra"] == [flow(9999).key]
    assert result["stale"] == [flow(11).key] and not result["truncated"]


def test_a_faulty_peer_is_compared_as_its_table_is() -> None:
    """A faulty node's flows are what its successor commits: its copy is not emptied, nor does
    a comparison pretend it is."""
    lab = Lab(2)
    for i in range(10):
        lab.event(1, EventKind.NEW, flow(i))
    lab.quiet()
    lab.engines[1].set_role(Role.FAULT)
    result = diff(lab, 2, 1)
    assert result["equal"] and result["theirs"] == 10


def test_a_lost_part_of_an_answer_gives_no_result_and_a_cut_short_one_compares_what_it_listed() -> None:
    lab = Lab(2)
    for i in range(20_000):
        lab.event(1, EventKind.NEW, flow(i))
    lab.quiet()
    copy = lab.engines[2].peers[1].external
    gone = [flow(i).key for i in range(0, 20_000, 50)]  # 400 flows missing here, in most buckets
    for key in gone:
        del copy[key]
    two = lab.engines[2]
    request = two.diff_start(1, lab.now)
    lost = [0]

    def drop_a_part(src: int, dst: int, data: bytes) -> bool:
        if src == 1 and lost[0] == 0 and b"\x11" in data[32:33]:  # the first DIGEST_KEYS datagram
            lost[0] = 1
            return True
        return False
    lab.drop = drop_a_part
    lab.run(1.0)
    assert lost[0] == 1 and two.diff_result(request) is None  # a part is missing: no result yet
    lab.drop = None
    two.diff_retry(request)
    for _ in range(30):
        lab.run(0.5)
        if two.diff_result(request) is not None:
            break
    result = two.diff_result(request)
    assert result is not None and not result["extra"] and not result["stale"]
    assert set(result["missing"]) <= set(gone) and len(result["missing"]) > 0
    assert result["truncated"] == (len(result["missing"]) < len(gone))  # a cut is said, never guessed past


def test_a_peer_answers_the_sums_once_a_second() -> None:
    """Each answer is a pass over the whole table: a peer asking in a loop gets one a second."""
    lab = Lab(2)
    lab.event(1, EventKind.NEW, flow(1))
    lab.quiet()
    two = lab.engines[2]
    first, second = two.diff_start(1, lab.now), two.diff_start(1, lab.now)
    lab.run(0.5)
    assert two.diff_result(first) is not None and two.diff_result(second) is None
    assert lab.engines[1].stats["digests_refused"] == 1


def test_buckets_and_hashes_do_not_depend_on_order() -> None:
    items = [(flow(i).key, wire.flow_msg(i, flow(i))) for i in range(300)]
    assert digest.summary(items) == digest.summary(list(reversed(items)))
    assert sum(b.flows for b in digest.summary(items)) == 300
    assert digest.differing(digest.summary(items), digest.summary(items[1:])) == [digest.bucket_of(items[0][0])]


def test_an_asker_takes_only_what_it_asked_for() -> None:
    """A peer's later DIGESTs change nothing once the sums are in, and keys of buckets not asked
    for are dropped (found by review: both made the asker redo its work, or report them missing)."""
    lab = Lab(2)
    for i in range(100):
        lab.event(1, EventKind.NEW, flow(i))
    lab.quiet()
    two = lab.engines[2]
    del two.peers[1].external[flow(5).key]
    request = two.diff_start(1, lab.now)
    lab.run(0.02)  # the sums came; the keys are asked for
    one = lab.engines[1]
    fakes = b""
    for i in range(3):  # keys of buckets never asked (most of them), none the answer's last part
        fake = bytearray(wire.digest_keys_msgs(2, request, [(1, flow(9999 + i).key)])[0])
        fake[1] = 0
        fakes += bytes(fake)
    fakes += wire.digest_msgs(2, request, [(7, 7)] * 64)[0]  # and a DIGEST after the sums were in
    forged = wire.datagram(wire.Header(1, one.epoch, one.stream.sent_upto + 40, int(lab.now * 1000)), fakes, lab.auth)
    assert two.receive_datagram(forged, lab.now) == Heard(1, None)  # authentic (the lab's group key): applied
    for _ in range(20):
        lab.run(0.1)
        if two.diff_result(request) is not None:
            break
    result = two.diff_result(request)
    assert result is not None and result["missing"] == [flow(5).key] and result["extra"] == []

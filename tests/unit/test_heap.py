"""The cyclic collector paused around work that holds an object per flow (daemon/heap.py)."""

from __future__ import annotations

import gc

from ctbridge.conntrack.codec import EventKind
from ctbridge.daemon import heap
from tests.support.enginelab import Lab, flow


def test_pauses_nest_and_overlap_and_the_collector_runs_again_after_the_last() -> None:
    assert gc.isenabled()
    first = heap.collector_paused()
    second = heap.collector_paused()
    first.__enter__()
    assert not gc.isenabled()
    second.__enter__()
    first.__exit__(None, None, None)  # the first ends while the second goes on
    assert not gc.isenabled()
    second.__exit__(None, None, None)
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    try:
        with heap.collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_an_error_in_the_work_still_ends_the_pause() -> None:
    try:
        with heap.collector_paused():
            raise ValueError("the commit failed")
    except ValueError:
        pass
    assert gc.isenabled()


def test_a_peers_cached_flows_are_not_walked_by_full_collections() -> None:
    """The external cache holds a tuple of bytes and numbers per flow, which the collector stops
    tracking: with an object per flow, every full collection walked a million of them at a 1M
    table, 0.09-0.17 s of a standby's loop each (bench/scale.py)."""
    lab = Lab(2)
    for i in range(300):
        lab.event(1, EventKind.NEW, flow(i))
    lab.event(1, EventKind.UPDATE, flow(7, mark=3))  # an update replaces the flow's tuple
    lab.quiet()
    copy = lab.engines[2].peers[1].external
    assert len(copy) == 300
    gc.collect()
    assert [k for k, cur in copy.items() if gc.is_tracked(cur)] == []


def test_what_exists_at_a_freeze_is_left_out_of_later_collections() -> None:
    cache = {i: (b"flow", i, 0.5) for i in range(100)} | {-1: [b"a list is tracked"]}
    assert gc.is_tracked(cache)
    try:
        heap.freeze_long_lived()
        assert gc.get_freeze_count() > 0
        assert not any(o is cache for o in gc.get_objects())  # no generation holds it
        cache[-2] = [b"a tracked value added later is collected as before"]
        assert any(o is cache[-2] for o in gc.get_objects(generation=0))
    finally:
        gc.unfreeze()

"""The cyclic collector paused around work that holds an object per flow (daemon/heap.py)."""

from __future__ import annotations

import gc

from ctbridge.daemon import heap


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

"""The dumps under way (daemon/kernelio.py, Kernel.watch): each has its own set of the flows
events touched meanwhile, and a dump that ends takes its own set out of the list, never another
that happens to hold the same keys. No kernel: the table is not opened."""

from __future__ import annotations

import asyncio

import pytest

from ctbridge.daemon import kernelio
from ctbridge.sync.engine import EVERYTHING


def test_a_dump_that_ends_during_a_sweep_takes_out_its_own_set_not_the_sweeps(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The lab's soak stopped a daemon: a MASTER's resync ended during a refresh sweep, neither
    having seen an event (two empty sets, equal), list.remove took the sweep's set out instead
    of the resync's, the resync then marked its own set stale instead of the sweep's, and the
    sweep's end found nothing to remove (ValueError)."""
    monkeypatch.setattr(kernelio, "KernelTable", lambda: None)
    kernel = kernelio.Kernel(asyncio.new_event_loop())
    try:
        with kernel.watch() as sweep:
            with kernel.watch() as dump:
                assert sweep == dump and sweep is not dump
            assert len(kernel.watching) == 1 and kernel.watching[0] is sweep
            for other in kernel.watching:  # what KernelReader.resync does after its dump
                other.add(EVERYTHING)
            kernel.touched([b"k"])
            assert sweep == {EVERYTHING, b"k"}
        assert kernel.watching == []
    finally:
        kernel.loop.close()


def test_a_resync_makes_an_older_sweep_stale_before_it_writes_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: a refresh sweep whose dump was read before a resync's went on refreshing
    between the rebuild's turns, until the rebuild ended. The rebuild writes in place, so a flow
    its dump saw closing (a short timeout: due for a refresh at once) was written back by the
    sweep as established and kept (changed during the rebuild). The sweep is stale from the
    moment the resync's dump is read: before the first flow is written."""
    from tests.support.enginelab import flow
    from tests.unit.test_timeouts import pair

    class Table:
        portid = 0

        def dump(self) -> list[object]:
            return [flow(1), flow(2)]

        def close(self) -> None:
            pass

    monkeypatch.setattr(kernelio, "KernelTable", Table)
    kernel = kernelio.Kernel(asyncio.new_event_loop())
    engine = pair()[0]
    stale_when_written: list[bool] = []
    real = engine.kernel_rebuild

    def rebuild(now: float, announce: bool = True) -> object:
        stale_when_written.append(EVERYTHING in sweep)
        return real(now, announce)
    engine.kernel_rebuild = rebuild  # type: ignore[method-assign]
    reader = object.__new__(kernelio.KernelReader)  # no event socket: resync reads only the table
    reader.kernel, reader.engine, reader.after_input = kernel, engine, lambda: None
    reader.stats = {"resyncs": 0, "overruns": 0, "superseded": 0}
    reader.drain = type("Drain", (), {"overruns": 0, "dropped": 0, "cut": lambda self: None})()  # type: ignore[assignment]
    reader.counted, reader.expect_events, reader.rebuilding = (0, 0), None, asyncio.Lock()
    try:
        with kernel.watch() as sweep:
            assert kernel.loop.run_until_complete(reader.resync()) == 2
            assert stale_when_written == [True] and EVERYTHING in sweep
        assert sorted(engine.internal) == sorted([flow(1).key, flow(2).key])
        assert kernel.watching == []
    finally:
        kernel.loop.close()

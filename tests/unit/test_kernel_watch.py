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

"""The daemon's parts, pure pieces: the tables that dispatch the engine's events, the output
made once per batch, and the configuration as the engine takes it (ctbridge.config.replication)."""

from __future__ import annotations

import asyncio
import typing

from ctbridge.config import replication, settings
from ctbridge.daemon.datapath import Datapath
from ctbridge.sync.engine import EngineEvent
from tests.unit.test_config import GOOD


def test_every_engine_event_has_a_handler() -> None:
    """The data path says each of the engine's events through one table; an event type the
    table lacks would pass unsaid."""
    table = Datapath(None, None, None, "", lambda ops: None).on_event  # type: ignore[arg-type]
    assert set(table) == set(typing.get_args(EngineEvent))


def test_the_refresh_interval_is_the_configured_one_or_a_quarter_of_the_shortest_timeout() -> None:
    cfg = settings.parse(GOOD)
    assert cfg.sync.refresh_interval == 0
    assert replication.refresh_interval(cfg, 30.0) == 7.5
    assert replication.refresh_interval(cfg, 2.0) == 1.0 and replication.refresh_interval(cfg, 600.0) == 10.0
    fixed = settings.parse(GOOD.replace("[sync]", "[sync]\nrefresh_interval = 2.5", 1))
    assert replication.refresh_interval(fixed, 30.0) == 2.5


def test_the_engine_never_replicates_loopback_or_the_sync_link() -> None:
    cfg = settings.parse(GOOD)
    engine = replication.engine_config(cfg)
    assert engine.node_id == cfg.node_id and engine.filter == replication.flow_filter(cfg)
    ignored = {str(n) for n in engine.filter.ignore}
    assert {"127.0.0.0/8", "::1/128"} <= ignored
    assert all(f"{a}/{32 if ':' not in a else 128}" in ignored
               for link in cfg.sync_links() for a in (link.local, *link.peers))


class _Engine:
    """The engine's outputs, empty; counts how often the output was made."""

    def __init__(self) -> None:
        self.outputs = 0
        self.peers: dict[int, object] = {}

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, int | None]]:
        self.outputs += 1
        return []

    def events(self) -> list[EngineEvent]:
        return []

    def kernel_ops(self) -> list[object]:
        return []

    def get_timer(self) -> float | None:
        return None


def test_batches_read_in_the_same_turn_of_the_loop_make_one_output() -> None:
    """Batches of events said in one turn: one output, in the next; a sync socket's batch read
    meanwhile makes the output at once, for both."""
    loop = asyncio.new_event_loop()
    try:
        engine = _Engine()
        path = Datapath(engine, None, loop, "", lambda ops: None)  # type: ignore[arg-type]
        path.input_done()  # a batch of kernel events
        path.input_done()  # and another, the same turn
        assert engine.outputs == 0
        loop.run_until_complete(asyncio.sleep(0))  # the next turn of the loop
        assert engine.outputs == 1
        path.input_done()
        path.after_input()  # a sync socket's batch, the same turn: its output takes the events' along
        loop.run_until_complete(asyncio.sleep(0))  # the next turn of the loop
        assert engine.outputs == 2
    finally:
        loop.close()

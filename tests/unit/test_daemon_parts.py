"""The daemon's parts, pure pieces: the tables that dispatch the engine's events, and the
configuration as the engine takes it (ctbridge.config.replication)."""

from __future__ import annotations

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

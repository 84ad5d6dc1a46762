"""The daemon's figures: what `ctbridge stats` answers, `ctbridge status` shows a part of
(STATUS_KEYS), and the metrics endpoint renders (daemon/metrics.py).

``sections()`` holds the figures the daemon's parts keep as they work (each part's docstring
names the sections it writes); ``Stats`` reads them together with the engine's and the links'
into one dict. Its keys are an interface: the CLI, the metrics and the tests read them.
Imports ctbridge.config, ctbridge.sync (the engine) and the daemon's metrics, synclink,
kernelio, interlock and conntrackd; service wires it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ctbridge.config.settings import Config
from ctbridge.daemon import conntrackd, metrics
from ctbridge.daemon.interlock import Interlock
from ctbridge.daemon.kernelio import KernelReader, KernelWriter
from ctbridge.daemon.looplag import LoopLag
from ctbridge.daemon.synclink import SyncLinks
from ctbridge.sync.engine import Engine, PeerReport

# What `ctbridge status` shows (ctbridge.cli.control formats it); `ctbridge stats` has everything
STATUS_KEYS = ("node", "node_id", "role", "apply_mode", "backend", "internal", "external", "expectations",
               "interlock", "peers", "queues", "commit", "gate", "gate_packets", "loop")


def sections() -> dict[str, Any]:
    """The figures the parts keep, as they are at start."""
    return {
        "commit": {"entries": 0, "failed": 0, "seconds": 0.0, "at": None},  # KernelWriter.commit
        # KernelReader; event_filter: instructions of the event socket's kernel-side filter (0: none)
        "kernel": {"overruns": 0, "events": 0, "resyncs": 0, "superseded": 0, "event_filter": 0},
        # sweeps for timeouts traffic restarted: the last one's table size and duration (refresh)
        "refresh": {"interval": None, "flows": 0, "seconds": 0.0, "refreshed": 0, "errors": 0, "superseded": 0,
                    "skipped": 0},
        "transitions": [],  # Transitions.transition
        "gate": None,  # GateKeeper
        "gate_packets": 0,  # GateKeeper: packets the gate dropped before the commits that opened it
        "track_errors": 0,  # Interlock
        # peers' expectations written into this kernel (commit, inject), and those refused (KernelWriter)
        "expectations": {"written": 0, "failed": 0},
        "metrics_endpoint": {"refused": 0, "timed_out": 0, "bad_requests": 0},  # metrics.serve
    }


def totals(rows: Iterable[dict[str, int]]) -> dict[str, int]:
    """The sync sockets' kernel figures, summed over the links."""
    total: dict[str, int] = {}
    for row in rows:
        for k, v in row.items():
            total[k] = total.get(k, 0) + v
    return total


@dataclass
class Stats:
    """The whole answer of `ctbridge stats`, made when asked (``stats()``)."""

    cfg: Config
    engine: Engine
    links: SyncLinks
    reader: KernelReader
    writer: KernelWriter
    interlock: Interlock
    backend: conntrackd.Conntrackd | None
    kept: dict[str, Any]  # sections()
    clock: Callable[[], float]  # the event loop's
    lag: LoopLag  # the event loop's own lag
    # the active-active defer (apply.defer_queue), once started: its counts and waits
    defer: Callable[[], dict[str, Any]] | None = None

    def peers(self, reports: list[PeerReport]) -> list[dict[str, Any]]:
        """Each peer's section of the status, in Engine.peer_reports' order of fields."""
        out = []
        for r in reports:
            fields = r._asdict()
            del fields["node"]
            fields["last_heard"] = round(r.last_heard, 3)
            out.append({"node": f"{r.node:08x}", "address": self.links.address(r.node), **fields})
        return out

    def __call__(self) -> dict[str, Any]:
        e = self.engine
        s = e.stats
        now = self.clock()
        reports = e.peer_reports(now)
        links = self.links.stats(now)
        track_value = self.interlock.value
        backend = self.backend
        return {
            "node": self.cfg.node.name, "node_id": f"{e.node_id:08x}", "epoch": e.epoch, "role": e.role.value,
            "apply_mode": self.cfg.apply.mode,
            "internal": {"entries": len(e.internal)},
            "external": {"entries": sum(r.entries for r in reports), "complete": e.complete()},
            # the interlock's verdict (external.complete is the engine's: true with no peer heard)
            "interlock": {"value": track_value, "may_take_over": track_value == 0
                          if track_value is not None else None},
            "rejected": {"auth": s["rejected_auth"], "replay": s["rejected_replay"],
                         "malformed": s["rejected_malformed"], "peers": s["rejected_peers"],
                         "oversize": s["rejected_oversize"], "bounds": s["rejected_bounds"],
                         "unproven": s["rejected_unproven"]},
            "refused": {"policy": s["flows_refused_policy"], "cap": s["flows_refused_cap"],
                        "tombstones_dropped": s["tombstones_dropped"],
                        "bulk_count_mismatches": s["bulk_count_mismatches"]},
            "peers": self.peers(reports),
            "queues": {**e.queue_sizes(), "inject": len(self.writer.ops)},
            "flow": {"window": round(e.window, 1), "in_flight": e.in_flight(),
                     "rtt_seconds": round(e.srtt, 6) if e.srtt is not None else None,
                     "rto_seconds": round(e.rto(), 6)},
            "sync": dict(s),
            "process": metrics.process_stats(),
            "sync_socket": totals(link["socket"] for link in links),
            "links": links,
            "link_switches": self.links.switches,
            "send_errors": self.links.send_errors,
            "send_waits": self.links.send_waits,
            "link_mismatches": self.links.mismatches,
            **self.kept,
            "kernel": {**self.kept["kernel"], "event_queue": self.reader.queue_stats()},
            "commit_histogram": self.writer.histogram.snapshot(),
            "loop": self.lag.snapshot(now),
            "defer": self.defer() if self.defer is not None else None,
            "backend": {"name": self.cfg.apply.backend, **({
                "alive": backend.alive, "failures": backend.failures, "steps": list(backend.steps)}
                if backend is not None else {})},
            "expectations": {**self.kept["expectations"], "enabled": self.reader.expect_events is not None,
                             **dict(zip(("internal", "external"), e.expectation_counts(), strict=True))},
        }

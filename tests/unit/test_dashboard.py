"""examples/grafana/ctbridge.json: every metric a panel or variable queries is one the endpoint
exports (a renamed metric would leave a panel empty without a word)."""

from __future__ import annotations

import json
import re

from ctbridge.daemon import metrics
from tests.support import ROOT

DASHBOARD = ROOT / "examples" / "grafana" / "ctbridge.json"


def exported() -> set[str]:
    """Every metric name the endpoint writes for a node with a peer and a link."""
    stats = {"role": "MASTER", "links": [{"nodes": {"0000000b": {"up": True, "active": True}}}],
             "peers": [{"node": "0000000b"}], "commit_histogram": {}, "loop": {"lag_histogram": {}}}
    text = metrics.render(stats)
    names = set(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    out = {name for name, _ in names}
    histograms = [name for name, kind in names if kind == "histogram"]
    out |= {f"{name}{suffix}" for name in histograms for suffix in ("_bucket", "_sum", "_count")}
    return out


def queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    return exprs + [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]


def test_every_query_names_a_metric_the_endpoint_exports() -> None:
    known = exported()
    used = {name for q in queries() for name in re.findall(r"\b(ctbridge_[a-z0-9_]+)", q)}
    assert used and used <= known, sorted(used - known)


def test_the_dashboard_shows_what_an_operator_looks_at_first() -> None:
    text = " ".join(queries())
    for metric in ("ctbridge_role", "ctbridge_peer_alive", "ctbridge_peer_synced", "ctbridge_internal_entries",
                   "ctbridge_commit_duration_seconds_bucket", "ctbridge_resent_datagrams_total",
                   "ctbridge_loop_lag_seconds_bucket", "ctbridge_gate_packets_total"):
        assert metric in text, metric

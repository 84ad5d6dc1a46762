"""What the tests share: the lab of engines in memory (enginelab), of daemons in namespaces
(daemonlab), the conntrack CLI as a witness (witness), entries built from fields (builders,
strategies), a table churning at a steady rate (churn), the golden wire vectors (wirevectors),
and where things are."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the source tree
FIXTURES = ROOT / "tests" / "fixtures"  # captured kernel messages, wire vectors
SNAPSHOTS = ROOT / "tests" / "snapshots"  # rendered files of the example clusters
EXAMPLES = {"two-nodes-unicast": ("fw1", "fw2"), "three-nodes-multicast": ("fw1", "fw2", "fw3"),
            "two-nodes-active-active": ("fw1", "fw2")}

"""Write N established TCP flows into this namespace's conntrack table at once, with ctbridge's
batched CT_NEW commit: what a mass reconnect after an upstream outage, or a scan through a NAT,
looks like to the replicator (100,000 flows in about 0.2 s, against about 1 s for `conntrack -R`).

    ip netns exec NS python bench/burst_load.py N

Prints the number of flows written and, on a second line, the CLOCK_MONOTONIC time (the same in
every network namespace) at which the kernel write began: benchmarks start their clock there, not
at the start of this process (building 100,000 entries in Python takes longer than writing them).
The flows are those of bench/kernel.py's save_lines."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ctbridge.conntrack.table import KernelTable
from tests.support.builders import tcp_flows


def main() -> int:
    n = int(sys.argv[1])
    entries = tcp_flows(n)
    with KernelTable() as table:
        began = time.monotonic()
        result = table.commit(entries)
    if result.failed:
        print(f"burst_load: {len(result.failed)} of {n} flows refused by the kernel", file=sys.stderr)
        return 1
    print(result.created)
    print(f"{began:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

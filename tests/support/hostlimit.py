"""The host's conntrack table limit, raised for a run that needs a large table and restored."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def conntrack_max(n: int) -> Iterator[None]:
    """Raise the host's nf_conntrack_max to hold n flows (twice, with room), and restore it. A
    network namespace cannot hold more than the host's limit (proc_sys_net_netfilter(5))."""
    path = Path("/proc/sys/net/netfilter/nf_conntrack_max")
    try:
        before = int(path.read_text())
    except OSError:
        yield
        return
    want = max(before, 2 * n + 16384)
    if want != before:
        path.write_text(str(want))
    try:
        yield
    finally:
        if want != before:
            path.write_text(str(before))

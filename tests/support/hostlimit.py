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


@contextlib.contextmanager
def conntrack_buckets(n: int) -> Iterator[None]:
    """The host's conntrack hash resized to ``n`` buckets for the run (0: left as it is), and
    restored. What `ctbridge check` advises for a large table (ctbridge/config/sizing.py); the
    kernel rehashes what the table holds, and takes the value only in the host's namespace."""
    path = Path("/proc/sys/net/netfilter/nf_conntrack_buckets")
    try:
        before = int(path.read_text())
    except OSError:
        yield
        return
    if n <= 0 or n == before:
        yield
        return
    path.write_text(str(n))
    try:
        yield
    finally:
        path.write_text(str(before))

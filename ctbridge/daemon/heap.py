"""The garbage collector paused while the daemon holds a million short-lived objects at once.

A commit makes a record per flow and a rebuild reads a dump of an entry per flow, all of them
tracked by CPython's cyclic collector and alive until the work ends. Making them triggers
collections (every 700 allocations a young one, and a full one whenever a quarter more objects
survived than at the last), and a full collection walks every tracked object: at a 1M-flow
commit, 0.05-0.40 s each, 23 of them longer than 20 ms, collecting nothing (a probe on
gc.callbacks, docs/performance.md). None of those objects is in a reference cycle (records and
entries hold bytes and numbers): reference counting frees them when the work ends. So while such
work runs the cyclic collector is paused, and afterwards it runs as before; the few cycles the
event loop makes meanwhile (an exception's traceback) wait until then.

Pauses nest and overlap (a commit and an inject batch at once): the collector runs again when
the last one ends, and only if it was running before the first.

The caches themselves are a few dicts that live as long as the daemon, each holding a million
entries at a 1M table. Their entries are bytes and tuples of bytes and numbers, which the
collector does not track (ctbridge.sync.peer: ExternalFlow), but a full collection still visits
every entry of every tracked dict to get there: 0.11-0.13 s per full collection on each node at
1M, with some 30,000 tracked objects in all (a probe on gc.callbacks, docs/performance.md). So
what exists once the daemon has started, and again once a peer first appears (its copy is made
then), is frozen (gc.freeze): moved where collections never look. Frozen objects are still freed
by reference counting; only a reference cycle among them, broken later, would never be freed,
and these are the daemon's own long-lived parts, frozen a handful of times in its life.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

_paused = 0
_was_enabled = True


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic collector off for the block (reference counting goes on)."""
    global _paused, _was_enabled
    if _paused == 0:
        _was_enabled = gc.isenabled()
        gc.disable()
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1
        if _paused == 0 and _was_enabled:
            gc.enable()


def freeze_long_lived() -> None:
    """What exists now lives as long as the daemon (its caches, its parts, its modules): collect
    once, then keep it out of every later collection."""
    gc.collect()
    gc.freeze()

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

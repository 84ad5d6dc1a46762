"""How long one insertion can hold the event loop when a container of the caches' kind grows:
CPython resizes a dict, an OrderedDict or a set at once when it fills, rehashing every entry
inside that one insertion. The caches keep a dict per flow and table (sync/internal.py's
``table`` and ``told``, a peer's ``external``), an OrderedDict (``pending``) and sets (a
rebuild's ``seen``, the flows touched meanwhile), so a table growing past a power of two holds
the loop this long, whatever the chunking around it (docs/performance.md, "A million flows").

    python bench/resize.py [--keys 2000000]

Prints, per container, each insertion that took more than 5 ms and the size it reached. No C
tool does the same work: the figures are the floor under ctbridge's own loop stalls.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

SLOW = 0.005  # seconds: an insertion longer than this is a resize (a plain one takes ~0.1 us)
KEY_BYTES = 40  # about a conntrack key's length (ctbridge.conntrack.codec.make_key, IPv4 TCP)


def worst_insertions(keys: list[bytes], make: Callable[[], Any],
                     insert: Callable[[Any, bytes], None]) -> list[tuple[float, int]]:
    """(seconds, size reached) of every insertion longer than SLOW."""
    container = make()
    slow = []
    clock = time.perf_counter
    for key in keys:
        start = clock()
        insert(container, key)
        took = clock() - start
        if took > SLOW:
            slow.append((took, len(container)))
    return slow


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=2_000_000)
    args = parser.parse_args(argv)
    keys = [os.urandom(KEY_BYTES) for _ in range(args.keys)]
    kinds: list[tuple[str, Callable[[], Any], Callable[[Any, bytes], None]]] = [
        ("dict (table, told, external)", dict, lambda c, k: c.__setitem__(k, None)),
        ("OrderedDict (pending)", OrderedDict, lambda c, k: c.__setitem__(k, None)),
        ("set (seen, touched)", set, lambda c, k: c.add(k)),
    ]
    print(f"resize: {args.keys:,} keys of {KEY_BYTES} bytes inserted; insertions over {SLOW * 1000:.0f} ms")
    for name, make, insert in kinds:
        slow = worst_insertions(keys, make, insert)
        shown = ", ".join(f"{took * 1000:.0f} ms at {size:,}" for took, size in slow) or "none"
        print(f"  {name:30} {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

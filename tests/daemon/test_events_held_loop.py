"""Issue 23: the event socket must not overrun while the daemon's event loop is busy. Daemon A
runs here, in this process, so the test can hold its event loop (as the watchdog test does);
while it is held, the churn generator makes far more kernel events than A's event buffer holds
(apply.event_buffer). The thread that drains the socket (conntrack/eventdrain.py) keeps reading
meanwhile: no overrun, no dump, and once the loop is let go, B's copy equals A's table key by key.
With the socket read on the loop, the kernel dropped the events and A rebuilt its table from a
dump. No timing is asserted: the loop is held until the generator has finished."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from typing import Any

import pytest

from ctbridge.config import settings
from ctbridge.daemon.service import Daemon
from ctbridge.lab import netns
from tests.support import churn
from tests.support.daemonlab import Node, cluster, wait_for

pytestmark = pytest.mark.root

EVENT_BUFFER = 1 << 20  # the kernel doubles it: about 1,600 events (1,280 bytes of buffer each)
RATE = 10_000  # flows created per second while the loop is held, each deleted LIFE s later
SECONDS = 2.0
LIFE = 1.0
CONVERGE = 90.0  # seconds B gets to equal A's table once the loop is let go


def kernel_ids(node: Node) -> set[churn.FlowId]:
    views = json.loads(node.run(sys.executable, "-m", "ctbridge", "kernel", "dump", "--json").stdout)
    return {churn.view_id(v) for v in views}


def copy_ids(node: Node) -> set[churn.FlowId]:
    return {churn.view_id(v) for v in node.external()}


def test_events_made_while_the_loop_is_held_are_neither_lost_nor_rebuilt_from_a_dump() -> None:
    with cluster(2, apply={"event_buffer": EVENT_BUFFER}) as c:
        a, b = c.nodes
        b.start()
        found: dict[str, Any] = {}

        def drive(loop: asyncio.AbstractEventLoop, daemon: Daemon) -> None:
            try:
                wait_for("A to answer", lambda: a.request("status"), timeout=20)
                churn.generate(a.ns, "load", "1", timeout=60)  # one standing flow: the path works
                wait_for("B to hold A's standing flow", lambda: len(b.external()) == 1, timeout=30)
                held, release = threading.Event(), threading.Event()

                def hold() -> None:  # in A's loop: nothing else runs on it until the test lets go
                    held.set()
                    release.wait(120)
                loop.call_soon_threadsafe(hold)
                try:
                    assert held.wait(30), "A's loop was never held"
                    found["did"] = churn.generate(a.ns, "churn", "--rate", str(RATE), "--seconds", str(SECONDS),
                                                  "--first", "1", "--life", str(LIFE), timeout=120)
                    found["table"] = kernel_ids(a)  # the final table, read while A's loop is still held
                finally:
                    release.set()
                deadline = time.monotonic() + CONVERGE
                held_ids = copy_ids(b)
                while held_ids != found["table"] and time.monotonic() < deadline:
                    time.sleep(0.2)
                    held_ids = copy_ids(b)
                found["copy"] = held_ids
                found["stats"] = a.request("stats")
            except BaseException as exc:  # reported by the test, after the daemon is stopped
                found["error"] = exc
            finally:
                loop.call_soon_threadsafe(daemon.stop.set)

        cfg = settings.load(str(a.config))

        async def run() -> int:
            daemon = Daemon(cfg)
            threading.Thread(target=drive, args=(asyncio.get_running_loop(), daemon), daemon=True).start()
            return await daemon.run()

        with netns.inside(a.ns):
            assert asyncio.run(asyncio.wait_for(run(), 300)) == 0
        if "error" in found:
            raise found["error"]
        did, table, held_ids, stats = found["did"], found["table"], found["copy"], found["stats"]
        # the generator did what the test is about: many times the events the kernel's buffer holds
        assert did["created"] >= RATE * SECONDS and did["deleted"] > 0
        assert len(table) == 1 + did["created"] - did["deleted"]
        kernel = stats["kernel"]
        assert kernel["overruns"] == 0 and kernel["resyncs"] == 1  # the start's dump only
        assert kernel["superseded"] == 0
        # the thread's queue held what the kernel's buffer could not: several times its bytes
        assert kernel["event_queue"]["peak_bytes"] > 2 * EVENT_BUFFER
        assert not table - held_ids, f"B lacks {len(table - held_ids)} of A's {len(table)} flows"
        assert not held_ids - table, f"B holds {len(held_ids - table)} flows A's table no longer has"

"""The metrics endpoint's caps on its clients: per remote address and in all. One address with
16 idle connections held every slot and locked every scraper out until they timed out (5 s), and
then simply connected again; now one address gets at most MAX_PER_SOURCE of them.

Everything runs on loopback: Linux routes all of 127/8 to lo, so a client socket bound to
127.0.0.2 is another source for the endpoint. Every wait is bounded by BOUND; no test measures time."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from ctbridge.daemon import metrics

BOUND = 10.0  # seconds any one wait may take before the test fails (none should take more than a moment)
Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class FakeStats:
    """The daemon's stats source, counting the scrapes it answered (a refused client causes none)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> dict[str, Any]:
        self.calls += 1
        return {"role": "MASTER", "sync": {"tx_datagrams": 7}}


async def start(counters: dict[str, int]) -> tuple[asyncio.AbstractServer, int, FakeStats]:
    """The endpoint as the daemon starts it (metrics.serve), on an ephemeral port."""
    stats = FakeStats()
    server = await metrics.serve("127.0.0.1:0", stats, counters)
    assert isinstance(server, asyncio.Server)  # what asyncio.start_server gives: it has .sockets
    return server, server.sockets[0].getsockname()[1], stats


async def connect(port: int, source: str) -> Conn:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), BOUND)


async def get(conn: Conn) -> bytes:
    """Send a whole scrape request and read to the end: the answer, or b"" if the endpoint closed
    the connection without one (a reset while the request was unread counts the same)."""
    reader, writer = conn
    try:
        writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        await writer.drain()
        return await asyncio.wait_for(reader.read(), BOUND)
    except ConnectionError:
        return b""
    finally:
        writer.close()


async def until(done: Callable[[], bool]) -> None:
    async def poll() -> None:
        while not done():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), BOUND)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 3 * BOUND))


def is_metrics(answer: bytes) -> bool:
    return answer.startswith(b"HTTP/1.0 200 OK\r\n") and b'\nctbridge_role{role="MASTER"} 1\n' in answer


def test_one_source_at_its_maximum_is_refused_unread_and_another_source_is_served(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """MAX_CLIENTS idle connections from 127.0.0.1 (the measured attack): MAX_PER_SOURCE of them hold
    a slot, the others are closed at once, unanswered and counted; a scrape from 127.0.0.2 is
    served while the held ones still wait for their request."""
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 60.0)  # the held connections outlive the test

    async def scenario() -> None:
        counters: dict[str, int] = {}
        server, port, stats = await start(counters)
        held = [await connect(port, "127.0.0.1") for _ in range(metrics.MAX_PER_SOURCE)]
        extra = [await connect(port, "127.0.0.1") for _ in range(metrics.MAX_CLIENTS - metrics.MAX_PER_SOURCE)]
        for conn in extra:  # each sends a whole request: none is read, none answered
            assert await get(conn) == b""
        assert counters["refused_per_source"] == metrics.MAX_CLIENTS - metrics.MAX_PER_SOURCE
        assert counters["refused"] == 0 and stats.calls == 0

        assert is_metrics(await get(await connect(port, "127.0.0.2")))
        assert is_metrics(await get(held[0]))  # it still held its slot: served now
        assert counters["timed_out"] == 0 and counters["bad_requests"] == 0 and stats.calls == 2
        for _reader, writer in held[1:]:
            writer.close()
        server.close()
        await server.wait_closed()
    run(scenario)


def test_the_total_cap_still_holds_across_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    """MAX_CLIENTS idle connections from several sources, none beyond MAX_PER_SOURCE: a new source
    is then closed at once by the total cap, unanswered, and counted as refused (not per source)."""
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 60.0)

    async def scenario() -> None:
        counters: dict[str, int] = {}
        server, port, stats = await start(counters)
        held = [await connect(port, f"127.0.1.{1 + i // metrics.MAX_PER_SOURCE}") for i in range(metrics.MAX_CLIENTS)]
        assert await get(await connect(port, "127.0.2.1")) == b""
        assert counters["refused"] == 1 and counters["refused_per_source"] == 0 and stats.calls == 0
        assert is_metrics(await get(held[-1]))  # the held ones are served
        assert is_metrics(await get(await connect(port, "127.0.2.1")))  # and that one's slot came back
        for _reader, writer in held[:-1]:
            writer.close()
        server.close()
        await server.wait_closed()
    run(scenario)


def test_per_source_slots_are_given_back_when_connections_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """A source's slots come back however its connections end (hung up, reset, timed out), each
    exactly once: the source is then refused again only beyond MAX_PER_SOURCE."""
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 60.0)

    async def fill(port: int) -> list[Conn]:
        """MAX_PER_SOURCE idle connections from 127.0.0.1, and proof that no more get in."""
        held = [await connect(port, "127.0.0.1") for _ in range(metrics.MAX_PER_SOURCE)]
        assert await get(await connect(port, "127.0.0.1")) == b""
        return held

    async def scenario() -> None:
        counters: dict[str, int] = {}
        server, port, stats = await start(counters)

        # hung up: each ends its side; the endpoint answers the empty request and closes
        for reader, writer in await fill(port):
            writer.write_eof()
            assert (await asyncio.wait_for(reader.read(), BOUND)).startswith(b"HTTP/1.0 404 ")
            writer.close()
        assert counters["refused_per_source"] == 1 and counters["bad_requests"] == metrics.MAX_PER_SOURCE

        # reset: each aborts with an RST (SO_LINGER 0); counted and released in one step, no await between
        for _reader, writer in await fill(port):
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        await until(lambda: counters["bad_requests"] == 2 * metrics.MAX_PER_SOURCE)
        assert counters["refused_per_source"] == 2

        # served: the full set again, every one answered (none was refused: no slot was lost)
        held = await fill(port)
        for conn in held:
            assert is_metrics(await get(conn))
        assert counters["refused_per_source"] == 3 and stats.calls == metrics.MAX_PER_SOURCE

        # timed out: held until REQUEST_TIMEOUT, counted and released in one step
        monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 0.2)
        held = [await connect(port, "127.0.0.1") for _ in range(metrics.MAX_PER_SOURCE)]
        await until(lambda: counters["timed_out"] == metrics.MAX_PER_SOURCE)
        monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 60.0)
        for _reader, writer in held:
            writer.close()
        for conn in await fill(port):  # the slots are back, all of them
            assert is_metrics(await get(conn))
        assert counters["refused_per_source"] == 4 and counters["refused"] == 0
        assert stats.calls == 2 * metrics.MAX_PER_SOURCE
        server.close()
        await server.wait_closed()
    run(scenario)

"""Lab traffic: long-lived TCP connections and UDP flows whose every byte is checked.

    python -m ctbridge.lab.traffic server --address ADDR [--address ADDR6]
    python -m ctbridge.lab.traffic client --server ADDR [--server ADDR6] --tcp 200 --udp 20 [--new 200]

With two server addresses (IPv4 and IPv6) the flows alternate between them.

The server echoes TCP byte for byte, and answers each UDP datagram with the datagram plus the
source address and port it saw, so the client notices a NAT binding that changed (a flow the new
firewall did not know would be NATed again, to another random port, and would still "work").

With ``--new RATE`` the client also opens RATE new TCP connections a second (each echoes 16
bytes and closes; its connect time is kept, and SIGUSR1 forgets those kept so far) and, with
every fifth, asks one UDP question from a new socket: a flow's first packets, which a firewall
pair has to know about at once. Each is counted when it completes or gives up.

The client never reconnects: a connection that is reset, closed or echoes a wrong byte is failed
for good. It prints one JSON status line every STATUS_INTERVAL seconds (and a last one on SIGTERM
or when stdin closes), with time.monotonic() stamps, which every process of the machine shares.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

TCP_PORT = 5001
UDP_PORT = 5002
STATUS_INTERVAL = 0.25
SLOW = 0.9  # seconds: a connect slower than this waited for a retransmission (the first is at 1 s)
NEW_TIMEOUT = 40.0  # seconds a new connection or question may take (TCP retransmits its SYN at 1, 3, 7, 15, 31 s)
CONNECT_TIMES_KEPT = 20000
NEW_ERRORS = 20
RECENT = 2.0  # a connection that echoed within this many seconds is moving (round trips are ~0.1 s apart)


# --- server -----------------------------------------------------------------------------------------

async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.transport.sendto(data + f"|{addr[0]}:{addr[1]}".encode(), addr)


async def serve(addresses: list[str]) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    transports = []
    for address in addresses:
        servers.append(await asyncio.start_server(_echo, address, TCP_PORT, backlog=1024))
        transport, _ = await loop.create_datagram_endpoint(_UdpEcho, local_addr=(address, UDP_PORT))
        transports.append(transport)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"listening": addresses}), flush=True)
    await stop.wait()
    for server in servers:
        server.close()
    for transport in transports:
        transport.close()


# --- client -----------------------------------------------------------------------------------------

@dataclass
class Counters:
    started: float = field(default_factory=time.monotonic)
    tcp_open: int = 0
    tcp_failed: int = 0
    errors: list[str] = field(default_factory=list)
    bytes: int = 0
    tcp_last: dict[int, float] = field(default_factory=dict)  # connection -> last full echo
    udp_last: dict[int, float] = field(default_factory=dict)  # flow -> last answer
    udp_seen: dict[int, str] = field(default_factory=dict)  # flow -> the address:port the server saw first
    udp_rebound: set[int] = field(default_factory=set)
    udp_answers: int = 0
    new_tcp_ok: int = 0  # --new: short connections that echoed and closed
    new_tcp_failed: int = 0
    new_slow: int = 0  # ... whose connect took more than SLOW: a SYN or SYN-ACK was retransmitted
    new_udp_ok: int = 0  # --new: questions answered from a new socket within NEW_TIMEOUT
    new_udp_lost: int = 0
    connect_times: list[float] = field(default_factory=list)  # the last CONNECT_TIMES_KEPT
    new_errors: list[str] = field(default_factory=list)

    def fail(self, conn: int, why: str) -> None:
        self.tcp_failed += 1
        self.tcp_last.pop(conn, None)
        if len(self.errors) < 20:
            self.errors.append(f"tcp {conn}: {why}")

    def new_error(self, what: str) -> None:
        """A new connection's failure: the last NEW_ERRORS are kept, with when (monotonic)."""
        self.new_errors.append(f"{time.monotonic():.1f} {what}")
        del self.new_errors[:-NEW_ERRORS]

    def status(self, final: bool = False) -> dict[str, Any]:
        now = time.monotonic()
        return {"t": now, "final": final, "tcp_open": self.tcp_open, "tcp_alive": len(self.tcp_last),
                "tcp_failed": self.tcp_failed, "bytes": self.bytes, "errors": self.errors,
                "tcp_oldest": min(self.tcp_last.values(), default=None),
                "tcp_newest": max(self.tcp_last.values(), default=None),
                "tcp_recent": sum(1 for t in self.tcp_last.values() if now - t < RECENT),
                "udp_flows": len(self.udp_seen), "udp_oldest": min(self.udp_last.values(), default=None),
                "udp_newest": max(self.udp_last.values(), default=None),
                "udp_rebound": len(self.udp_rebound), "udp_answers": self.udp_answers,
                "new_tcp_ok": self.new_tcp_ok, "new_tcp_failed": self.new_tcp_failed, "new_slow": self.new_slow,
                "new_udp_ok": self.new_udp_ok, "new_udp_lost": self.new_udp_lost,
                "new_connect": percentiles(self.connect_times), "new_errors": self.new_errors}


def percentiles(times: list[float]) -> dict[str, float] | None:
    if not times:
        return None
    ordered = sorted(times)
    last = len(ordered) - 1
    return {"p50": ordered[last // 2], "p99": ordered[int(0.99 * last)], "max": ordered[-1]}


async def _tcp_conn(n: int, server: str, chunk: int, interval: float, c: Counters) -> None:
    rng = random.Random(n)  # a different, reproducible byte stream per connection
    try:
        reader, writer = await asyncio.open_connection(server, TCP_PORT)
    except OSError as exc:
        c.fail(n, f"connect: {exc.strerror or exc}")
        return
    c.tcp_open += 1
    c.tcp_last[n] = time.monotonic()
    offset = 0
    try:
        while True:
            data = rng.randbytes(chunk)
            writer.write(data)
            await writer.drain()
            echo = await reader.readexactly(chunk)
            if echo != data:
                at = next(i for i, (a, b) in enumerate(zip(echo, data, strict=True)) if a != b)
                c.fail(n, f"echo differs at byte {offset + at}")
                return
            offset += chunk
            c.bytes += 2 * chunk
            c.tcp_last[n] = time.monotonic()
            await asyncio.sleep(interval * (0.5 + rng.random()))
    except asyncio.IncompleteReadError:
        c.fail(n, f"closed by the other side after {offset} bytes")
    except OSError as exc:
        c.fail(n, f"{exc.strerror or exc} after {offset} bytes")
    finally:
        writer.close()


class _UdpFlow(asyncio.DatagramProtocol):
    def __init__(self, n: int, c: Counters) -> None:
        self.n, self.c = n, c

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        _, _, seen = data.rpartition(b"|")
        where = seen.decode(errors="replace")
        first = self.c.udp_seen.setdefault(self.n, where)
        if where != first:  # the firewall NATed this flow anew: its binding was lost
            self.c.udp_rebound.add(self.n)
        self.c.udp_answers += 1
        self.c.udp_last[self.n] = time.monotonic()


async def _udp_flow(n: int, server: str, interval: float, c: Counters) -> None:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    transport, _ = await loop.create_datagram_endpoint(lambda: _UdpFlow(n, c), remote_addr=(server, UDP_PORT),
                                                       family=family)
    seq = 0
    try:
        while True:
            transport.sendto(f"flow {n} seq {seq}".encode())
            seq += 1
            await asyncio.sleep(interval)
    finally:
        transport.close()


async def _new_tcp(server: str, c: Counters) -> None:
    started = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(server, TCP_PORT), NEW_TIMEOUT)
    except (TimeoutError, OSError) as exc:
        c.new_tcp_failed += 1
        c.new_error(f"new tcp: connect: {exc!r}")
        return
    took = time.monotonic() - started
    c.connect_times.append(took)
    del c.connect_times[:-CONNECT_TIMES_KEPT]
    c.new_slow += took > SLOW
    try:
        writer.write(b"0123456789abcdef")
        if await asyncio.wait_for(reader.readexactly(16), NEW_TIMEOUT) != b"0123456789abcdef":
            raise OSError("wrong echo")
        c.new_tcp_ok += 1
    except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
        c.new_tcp_failed += 1
        c.new_error(f"new tcp: {exc!r}")
    finally:
        writer.close()


class _Question(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answered = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if not self.answered.done():
            self.answered.set_result(data)


async def _new_udp(server: str, c: Counters) -> None:
    """One question from a new socket, asked again every second (as a resolver does) until
    NEW_TIMEOUT: lost only when no answer ever came."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    transport, question = await loop.create_datagram_endpoint(_Question, remote_addr=(server, UDP_PORT),
                                                              family=family)
    try:
        for _ in range(int(NEW_TIMEOUT)):
            transport.sendto(b"question")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(question.answered), 1.0)
                c.new_udp_ok += 1
                return
        c.new_udp_lost += 1
    finally:
        transport.close()


async def _new_flows(servers: list[str], rate: float, c: Counters) -> None:
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()
    start = loop.time()
    for i in range(1 << 40):  # until cancelled
        await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
        server = servers[i % len(servers)]
        for coro in (_new_tcp(server, c), *((_new_udp(server, c),) if i % 5 == 0 else ())):
            task = asyncio.ensure_future(coro)
            pending.add(task)
            task.add_done_callback(pending.discard)


async def client(servers: list[str], tcp: int, udp: int, chunk: int, interval: float, new: float = 0.0) -> None:
    loop = asyncio.get_running_loop()
    c = Counters()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, c.connect_times.clear)  # a bench's phase begins
    def stdin_readable() -> None:
        if not os.read(sys.stdin.fileno(), 4096):  # the lab closed our stdin: stop
            stop.set()
    loop.add_reader(sys.stdin.fileno(), stdin_readable)
    k = len(servers)
    tasks = [asyncio.ensure_future(_tcp_conn(i, servers[i % k], chunk, interval, c)) for i in range(tcp)]
    tasks += [asyncio.ensure_future(_udp_flow(i, servers[i % k], interval, c)) for i in range(udp)]
    if new:
        tasks.append(asyncio.ensure_future(_new_flows(servers, new, c)))
    while not stop.is_set():
        print(json.dumps(c.status()), flush=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), STATUS_INTERVAL)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps(c.status(final=True)), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctbridge.lab.traffic", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("--address", required=True, action="append", help="an address to listen on (repeatable)")
    c = sub.add_parser("client")
    c.add_argument("--server", required=True, action="append", help="a server address (repeatable)")
    c.add_argument("--tcp", type=int, default=200, help="TCP connections")
    c.add_argument("--udp", type=int, default=20, help="UDP flows")
    c.add_argument("--chunk", type=int, default=512, help="bytes per TCP round trip")
    c.add_argument("--interval", type=float, default=0.1, help="mean seconds between round trips")
    c.add_argument("--new", type=float, default=0.0, help="new TCP connections a second (and a UDP question "
                   "with every fifth)")
    args = p.parse_args(argv)
    if args.role == "server":
        asyncio.run(serve(args.address))
    else:
        asyncio.run(client(args.server, args.tcp, args.udp, args.chunk, args.interval, args.new))
    return 0


if __name__ == "__main__":
    sys.exit(main())

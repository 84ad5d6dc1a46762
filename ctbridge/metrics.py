"""Prometheus text exposition of the daemon's stats (metric names ctbridge_*), served over HTTP."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# (metric, help, path into the stats JSON, type)
METRICS = (
    ("ctbridge_internal_entries", "Flows in this node's internal cache", ("internal", "entries"), "gauge"),
    ("ctbridge_external_entries", "Flows learnt from peers", ("external", "entries"), "gauge"),
    ("ctbridge_external_complete", "1 if every live peer's external cache is complete", ("external", "complete"),
     "gauge"),
    ("ctbridge_rejected_auth_total", "Datagrams dropped: bad or missing MAC", ("rejected", "auth"), "counter"),
    ("ctbridge_rejected_replay_total", "Datagrams dropped: seen before", ("rejected", "replay"), "counter"),
    ("ctbridge_rejected_malformed_total", "Datagrams dropped: malformed", ("rejected", "malformed"), "counter"),
    ("ctbridge_datagrams_sent_total", "Sync datagrams sent", ("sync", "tx_datagrams"), "counter"),
    ("ctbridge_datagrams_received_total", "Sync datagrams received", ("sync", "rx_datagrams"), "counter"),
    ("ctbridge_resent_datagrams_total", "Datagrams sent again after a NACK", ("sync", "resent_datagrams"), "counter"),
    ("ctbridge_resend_overflows_total", "Resend queue overflows (answered by bulk transfers)",
     ("sync", "resend_overflows"), "counter"),
    ("ctbridge_bulks_received_total", "Bulk transfers completed from peers", ("sync", "bulks_received"), "counter"),
    ("ctbridge_kernel_overruns_total", "Netlink event overruns (answered by a dump)", ("kernel", "overruns"),
     "counter"),
    ("ctbridge_commit_entries", "Flows written by the last commit", ("commit", "entries"), "gauge"),
    ("ctbridge_commit_seconds", "Duration of the last commit", ("commit", "seconds"), "gauge"),
    ("ctbridge_resend_queue", "Datagrams kept for resending", ("queues", "resend"), "gauge"),
)


def render(stats: dict[str, Any]) -> str:
    out = []
    for name, doc, path, kind in METRICS:
        value: Any = stats
        for part in path:
            value = value.get(part, 0) if isinstance(value, dict) else 0
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n{name} {float(value):g}")
    role = stats.get("role", "")
    out.append("# HELP ctbridge_role Current keepalived role (1 for the role held)\n# TYPE ctbridge_role gauge")
    for r in ("MASTER", "BACKUP", "FAULT"):
        out.append(f'ctbridge_role{{role="{r}"}} {1 if role == r else 0}')
    return "\n".join(out) + "\n"


async def serve(listen: str, stats: Callable[[], dict[str, Any]]) -> asyncio.AbstractServer:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)).strip():
                pass  # headers
            if request.split(b" ")[1:2] in ([b"/metrics"], [b"/"]):
                body = render(stats()).encode()
                head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
            else:
                body, head = b"not found\n", b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
            writer.write(head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(client, host, int(port))

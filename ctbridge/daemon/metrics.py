"""Prometheus text exposition of the daemon's stats (metric names ctbridge_*, and process_* for the
daemon's own process, as client libraries name them), served over HTTP."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import psutil

log = logging.getLogger(__name__)
_SELF: psutil.Process | None = None


def process_stats() -> dict[str, float]:
    """The daemon's own process figures, as Prometheus clients report them (psutil reads /proc);
    {} if /proc cannot be read (the stats go on without them)."""
    global _SELF
    try:
        if _SELF is None:
            _SELF = psutil.Process()
        with _SELF.oneshot():
            cpu = _SELF.cpu_times()
            return {"resident_memory_bytes": float(_SELF.memory_info().rss),
                    "cpu_seconds": round(cpu.user + cpu.system, 3),
                    "open_fds": float(_SELF.num_fds()),
                    "start_time_seconds": round(_SELF.create_time(), 3)}
    except (psutil.Error, OSError) as exc:
        log.debug("process figures unavailable: %s", exc)
        return {}

# (metric, help, path into the stats JSON, type)
METRICS = (
    ("ctbridge_loop_longest_stall_seconds", "The event loop's longest stall of the last minute",
     ("loop", "recent_longest_stall_seconds"), "gauge"),
    ("ctbridge_internal_entries", "Flows in this node's internal cache", ("internal", "entries"), "gauge"),
    ("ctbridge_external_entries", "Flows learnt from peers", ("external", "entries"), "gauge"),
    ("ctbridge_external_complete", "1 if every live peer's external cache is complete", ("external", "complete"),
     "gauge"),
    ("ctbridge_rejected_auth_total", "Datagrams dropped: bad or missing MAC", ("rejected", "auth"), "counter"),
    ("ctbridge_rejected_replay_total", "Datagrams dropped: seen before", ("rejected", "replay"), "counter"),
    ("ctbridge_rejected_malformed_total", "Datagrams dropped: malformed", ("rejected", "malformed"), "counter"),
    ("ctbridge_rejected_oversize_total", "Datagrams dropped: larger than the sync link's MTU allows",
     ("rejected", "oversize"), "counter"),
    ("ctbridge_rejected_bounds_total", "Datagrams or messages dropped: numbers out of bounds (a GAP beyond the "
     "datagram's own number, an epoch far ahead)", ("rejected", "bounds"), "counter"),
    ("ctbridge_rejected_unproven_total", "Datagrams dropped: of a peer's session that has not answered this node's "
     "challenge yet (a replayed capture, or the first round trip after a restart)", ("rejected", "unproven"),
     "counter"),
    ("ctbridge_flows_refused_policy_total", "Flows from peers refused by this node's filter or filter.peer_accept",
     ("refused", "policy"), "counter"),
    ("ctbridge_flows_refused_cap_total", "Flows from peers refused: the peer's copy reached sync.max_flows",
     ("refused", "cap"), "counter"),
    ("ctbridge_rejected_peers_total", "Datagrams dropped: from a node id beyond the peer slots", ("rejected", "peers"),
     "counter"),
    ("ctbridge_datagrams_sent_total", "Sync datagrams sent", ("sync", "tx_datagrams"), "counter"),
    ("ctbridge_datagrams_received_total", "Sync datagrams received", ("sync", "rx_datagrams"), "counter"),
    ("ctbridge_compact_messages_sent_total", "FLOW and DELETE messages sent in their compact forms (protocol "
     "version 3)", ("sync", "tx_compact"), "counter"),
    ("ctbridge_v3_datagrams_received_total", "Sync datagrams of protocol version 3 received and authentic",
     ("sync", "rx_v3_datagrams"), "counter"),
    ("ctbridge_resent_datagrams_total", "Datagrams sent again after a NACK", ("sync", "resent_datagrams"), "counter"),
    ("ctbridge_resend_overflows_total", "Resend queue overflows (answered by bulk transfers)",
     ("sync", "resend_overflows"), "counter"),
    ("ctbridge_bulks_received_total", "Bulk transfers completed from peers", ("sync", "bulks_received"), "counter"),
    ("ctbridge_kernel_overruns_total", "Netlink event overruns (answered by a dump)", ("kernel", "overruns"),
     "counter"),
    ("ctbridge_kernel_event_filter_instructions", "Instructions of the event socket's kernel-side filter of "
     "no-sync flows (filter.no_sync_*; 0: none, every event is read)", ("kernel", "event_filter"), "gauge"),
    ("ctbridge_kernel_event_queue_bytes", "Kernel event bytes read by the event thread, not yet taken by the loop",
     ("kernel", "event_queue", "bytes"), "gauge"),
    ("ctbridge_kernel_event_queue_full_total", "Times the event thread's queue was full and it stopped reading "
     "(apply.event_queue)", ("kernel", "event_queue", "full"), "counter"),
    ("ctbridge_gate_packets_total", "Packets the commit gate dropped while this node was not MASTER (new flows "
     "before the commit), counted as it opened", ("gate_packets",), "counter"),
    ("ctbridge_track_errors_total", "Failed writes of the interlock's track file (tried again)", ("track_errors",),
     "counter"),
    ("ctbridge_interlock_value", "What the interlock's track file holds: 0 while this node may win an election, "
     "the demotion while it may not (keepalived adds it to the priority)", ("interlock", "value"), "gauge"),
    ("ctbridge_kernel_malformed_total", "Kernel event messages that could not be read (dropped)",
     ("sync", "kernel_malformed"), "counter"),
    ("ctbridge_commit_entries", "Flows written by the last commit", ("commit", "entries"), "gauge"),
    ("ctbridge_commit_seconds", "Duration of the last commit", ("commit", "seconds"), "gauge"),
    ("ctbridge_expectations", "Expectations of this kernel's helpers replicated (sync.expectations)",
     ("expectations", "internal"), "gauge"),
    ("ctbridge_external_expectations", "Expectations learnt from peers", ("expectations", "external"), "gauge"),
    ("ctbridge_expectations_written_total", "Peers' expectations written into this kernel",
     ("expectations", "written"), "counter"),
    ("ctbridge_expectations_failed_total", "Peers' expectations the kernel refused (no master flow, no helper)",
     ("expectations", "failed"), "counter"),
    ("ctbridge_resend_queue", "Datagrams kept for resending", ("queues", "resend"), "gauge"),
    ("ctbridge_young_flows", "New flows not replicated yet: younger than sync.delay", ("queues", "young"), "gauge"),
    ("ctbridge_flows_ended_young_total", "Flows that ended younger than sync.delay (never sent)",
     ("sync", "flows_ended_young"), "counter"),
    ("ctbridge_flows_came_of_age_total", "Flows replicated once they had lived sync.delay",
     ("sync", "flows_came_of_age"), "counter"),
    ("ctbridge_updates_coalesced_total", "Flow updates that went out with a later one (sync.coalesce)",
     ("sync", "updates_coalesced"), "counter"),
    ("ctbridge_window_datagrams", "Flow control window: datagrams allowed in flight", ("flow", "window"), "gauge"),
    ("ctbridge_in_flight_datagrams", "Datagrams sent and not yet acknowledged by every live peer",
     ("flow", "in_flight"), "gauge"),
    ("ctbridge_rtt_seconds", "Smoothed round-trip time to the peers (0 before the first sample)",
     ("flow", "rtt_seconds"), "gauge"),
    ("ctbridge_resent_bytes_total", "Bytes of datagrams sent again", ("sync", "resent_bytes"), "counter"),
    ("ctbridge_resends_skipped_total", "Resends a NACK asked for within an RTO of the last (not sent)",
     ("sync", "resends_skipped"), "counter"),
    ("ctbridge_window_reductions_total", "Halvings of the window after losses", ("sync", "window_reductions"),
     "counter"),
    ("ctbridge_probes_total", "Probes sent because acknowledgements stopped", ("sync", "probes"), "counter"),
    ("ctbridge_socket_drops_total", "Datagrams the sync sockets dropped: their receive buffers were full",
     ("sync_socket", "drops"), "counter"),
    ("ctbridge_link_switches_total", "Times traffic to a peer moved to another sync link", ("link_switches",),
     "counter"),
    # the active-active defer (apply.defer_queue; 0 while it is off)
    ("ctbridge_defer_packets_total", "Packets the ruleset queued for the defer", ("defer", "packets"), "counter"),
    ("ctbridge_defer_held_total", "Queued packets held until their replicated flow is in this kernel",
     ("defer", "held"), "counter"),
    ("ctbridge_defer_released_found_total", "Held packets let go when their flow was found",
     ("defer", "released_found"), "counter"),
    ("ctbridge_defer_released_timeout_total", "Held packets let go when apply.defer_wait ran out (their flow had "
     "not come)", ("defer", "released_timeout"), "counter"),
    ("ctbridge_defer_waiting", "Packets held now", ("defer", "waiting"), "gauge"),
    ("ctbridge_defer_wait_p99_seconds", "99th percentile of the recent held packets' waits",
     ("defer", "wait_seconds", "p99"), "gauge"),
    # the names every Prometheus client library gives its process collector
    ("process_resident_memory_bytes", "Resident memory size in bytes", ("process", "resident_memory_bytes"), "gauge"),
    ("process_cpu_seconds_total", "Total user and system CPU time spent in seconds", ("process", "cpu_seconds"),
     "counter"),
    ("process_open_fds", "Number of open file descriptors", ("process", "open_fds"), "gauge"),
    ("process_start_time_seconds", "Start time of the process since unix epoch in seconds",
     ("process", "start_time_seconds"), "gauge"),
)


def _number(value: Any) -> str:
    """A sample value, exact: %g would print a counter of 1,179,658 as 1.17966e+06."""
    f = float(value or 0)  # None: not known yet (an RTT before the first sample)
    return str(int(f)) if f.is_integer() and abs(f) < 2**63 else repr(f)


# Upper bounds (seconds) of the commit-duration histogram's buckets: a few flows take
# milliseconds, 100,000 about half a second (bench/failover.py), a million several seconds.
COMMIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    """Observations counted in cumulative buckets, as Prometheus histograms are exposed
    (https://prometheus.io/docs/concepts/metric_types/#histogram): ``le`` bounds, a sum and a count."""

    def __init__(self, buckets: tuple[float, ...] = COMMIT_BUCKETS) -> None:
        self.bounds = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def snapshot(self) -> dict[str, Any]:
        return {"buckets": [[b, c] for b, c in zip(self.bounds, self.counts, strict=True)],
                "sum": round(self.sum, 6), "count": self.count}


# Per peer, labelled peer="<node id>" (status.peers): (name, help, field, type)
PEER_METRICS = (
    ("ctbridge_peer_alive", "1 while the peer is heard (within sync.peer_timeout)", "alive", "gauge"),
    ("ctbridge_peer_synced", "1 while this node holds a whole copy of the peer's flows (a bulk completed, "
     "nothing lost since)", "synced", "gauge"),
    ("ctbridge_peer_proven", "1 while the peer's session answered this node's challenge", "proven", "gauge"),
    ("ctbridge_peer_last_heard_seconds", "Seconds since the peer's last accepted datagram", "last_heard", "gauge"),
    ("ctbridge_peer_flows", "Flows (and expectations) this node holds for the peer", "entries", "gauge"),
    ("ctbridge_peer_refused_total", "Flows of the peer refused by this node's filters", "refused_total", "counter"),
    ("ctbridge_peer_restarts_total", "Restarts of the peer seen (new epochs it proved)", "restarts", "counter"),
    ("ctbridge_peer_protocol_version", "The sync protocol version spoken with the peer (the lower of both nodes' "
     "highest; 2 until the peer says more)", "protocol", "gauge"),
)


def _peer_lines(stats: dict[str, Any]) -> list[str]:
    peers = stats.get("peers", [])
    out = []
    for name, doc, key, kind in PEER_METRICS:
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}")
        out.extend(f'{name}{{peer="{p["node"]}"}} {_number(p.get(key))}' for p in peers)
    out.append("# HELP ctbridge_peer_rejected_total Authentic datagrams (or messages) of the peer refused, by "
               "reason\n# TYPE ctbridge_peer_rejected_total counter")
    for p in peers:
        out.extend(f'ctbridge_peer_rejected_total{{peer="{p["node"]}",reason="{reason}"}} {_number(n)}'
                   for reason, n in sorted(p.get("rejected", {}).items()))
    return out


def _histogram_lines(name: str, doc: str, h: dict[str, Any]) -> list[str]:
    out = [f"# HELP {name} {doc}\n# TYPE {name} histogram"]
    out.extend(f'{name}_bucket{{le="{bound!r}"}} {count}' for bound, count in h.get("buckets", []))
    out.append(f'{name}_bucket{{le="+Inf"}} {h.get("count", 0)}')
    out.append(f"{name}_sum {_number(h.get('sum', 0))}\n{name}_count {h.get('count', 0)}")
    return out


def render(stats: dict[str, Any]) -> str:
    out = []
    for name, doc, path, kind in METRICS:
        value: Any = stats
        for part in path:
            value = value.get(part, 0) if isinstance(value, dict) else 0
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n{name} {_number(value)}")
    role = stats.get("role", "")
    out.append("# HELP ctbridge_role Current keepalived role (1 for the role held)\n# TYPE ctbridge_role gauge")
    for r in ("MASTER", "BACKUP", "FAULT"):
        out.append(f'ctbridge_role{{role="{r}"}} {1 if role == r else 0}')
    for name, field, doc in (
            ("ctbridge_link_up", "up", "1 while a sync link carries a two-way exchange with the peer"),
            ("ctbridge_link_active", "active", "1 for the sync link that carries traffic to the peer")):
        out.append(f"# HELP {name} {doc}\n# TYPE {name} gauge")
        for k, link in enumerate(stats.get("links", [])):
            for peer, view in sorted(link.get("nodes", {}).items()):
                out.append(f'{name}{{link="{k}",peer="{peer}"}} {1 if view.get(field) else 0}')
    out.extend(_peer_lines(stats))
    out.extend(_histogram_lines("ctbridge_commit_duration_seconds", "Durations of MASTER commits (and of "
                                "`ctbridge commit`)", stats.get("commit_histogram", {})))
    out.extend(_histogram_lines("ctbridge_loop_lag_seconds", "How late the event loop ran a probe due every 0.1 s "
                                "(a stall: no datagram read, no transition taken meanwhile)",
                                stats.get("loop", {}).get("lag_histogram", {})))
    return "\n".join(out) + "\n"


MAX_CLIENTS = 16  # connections served at once; more are closed at once (a scraper needs one)
# Connections served at once per remote address. Without it one source held all MAX_CLIENTS slots
# with 16 idle connections and locked every scraper out; 4 leave room for a scraper, its retry
# while an old connection times out, and a person with curl behind the same address, and take 4
# sources to fill the endpoint.
MAX_PER_SOURCE = 4
REQUEST_TIMEOUT = 5.0  # seconds for a whole request, headers included (a slow client cannot hold a slot)
MAX_HEADER_LINES = 100


async def serve(listen: str, stats: Callable[[], dict[str, Any]],
                counters: dict[str, int] | None = None) -> asyncio.AbstractServer:
    """The endpoint. ``counters`` (refused, refused_per_source, timed_out, bad_requests) count what it
    turned away: refused at MAX_CLIENTS in all, refused_per_source at MAX_PER_SOURCE from one address."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    count = counters if counters is not None else {}
    for k in ("refused", "refused_per_source", "timed_out", "bad_requests"):
        count.setdefault(k, 0)
    active = 0
    # connections served per remote address; an address leaves at 0, so this holds at most
    # MAX_CLIENTS entries however many sources come and go
    per_source: dict[str, int] = {}

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readline()
        for _ in range(MAX_HEADER_LINES):
            if not (await reader.readline()).strip():
                break
        else:
            count["bad_requests"] += 1
            return
        if request.split(b" ")[1:2] in ([b"/metrics"], [b"/"]):
            body = render(stats()).encode()
            head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
        else:
            count["bad_requests"] += 1
            body, head = b"not found\n", b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
        writer.write(head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal active
        peer = writer.get_extra_info("peername")
        source = str(peer[0]) if peer else ""  # None: the peer reset before the transport asked
        # Either cap closes the connection before a byte of it is read: a refused client costs
        # no parsing and holds nothing. The source's cap first, so that a flood from one address
        # is counted as that even while the endpoint is full.
        if per_source.get(source, 0) >= MAX_PER_SOURCE:
            count["refused_per_source"] += 1
            writer.close()
            return
        if active >= MAX_CLIENTS:
            count["refused"] += 1
            writer.close()
            return
        active += 1
        per_source[source] = per_source.get(source, 0) + 1
        try:
            await asyncio.wait_for(answer(reader, writer), REQUEST_TIMEOUT)
        except TimeoutError:
            count["timed_out"] += 1
        except (ConnectionError, ValueError, IndexError):  # a line longer than the stream's limit: ValueError
            count["bad_requests"] += 1
        finally:
            active -= 1
            if per_source[source] > 1:
                per_source[source] -= 1
            else:
                del per_source[source]
            writer.close()

    return await asyncio.start_server(client, host, int(port))

"""The Prometheus exposition: exact sample values, and the daemon's own process figures."""

from __future__ import annotations

import time

from ctbridge.daemon import metrics


def test_large_counters_are_exact() -> None:
    # %g printed this one as 1.17966e+06, and a start time to the nearest 10,000 seconds
    text = metrics.render({"sync": {"tx_datagrams": 1_179_658}, "process": {"start_time_seconds": 1796115534.41}})
    assert "\nctbridge_datagrams_sent_total 1179658\n" in text
    assert "\nprocess_start_time_seconds 1796115534.41\n" in text


def test_process_figures_are_this_process() -> None:
    p = metrics.process_stats()
    assert set(p) == {"resident_memory_bytes", "cpu_seconds", "open_fds", "start_time_seconds"}
    assert p["resident_memory_bytes"] > 1e6 and p["open_fds"] >= 3
    assert 0 < time.time() - p["start_time_seconds"] < 24 * 3600
    text = metrics.render({"process": p})
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
                 "process_start_time_seconds"):
        assert f"# TYPE {name} " in text


def test_flow_control_figures_are_exposed() -> None:
    text = metrics.render({"flow": {"window": 128.0, "in_flight": 3, "rtt_seconds": None},
                           "sync": {"resent_bytes": 1500, "probes": 2}})
    for line in ("ctbridge_window_datagrams 128", "ctbridge_in_flight_datagrams 3", "ctbridge_rtt_seconds 0",
                 "ctbridge_resent_bytes_total 1500", "ctbridge_probes_total 2"):
        assert f"\n{line}\n" in text, line


def test_each_sync_link_is_a_labelled_series_per_peer() -> None:
    links = [{"nodes": {"0000000b": {"up": False, "active": False}}},
             {"nodes": {"0000000b": {"up": True, "active": True}}}]
    text = metrics.render({"links": links, "link_switches": 2})
    assert 'ctbridge_link_up{link="0",peer="0000000b"} 0\n' in text
    assert 'ctbridge_link_active{link="1",peer="0000000b"} 1\n' in text
    assert "\nctbridge_link_switches_total 2\n" in text


def test_the_endpoint_caps_its_clients_and_their_time(monkeypatch: object) -> None:
    """Idle connections held every slot of the endpoint for as long as each sent a header line
    every 5 s; now at most MAX_CLIENTS are served, each for REQUEST_TIMEOUT in all."""
    import asyncio

    import pytest
    mp: pytest.MonkeyPatch = monkeypatch  # type: ignore[assignment]
    mp.setattr(metrics, "REQUEST_TIMEOUT", 0.3)

    async def scenario() -> tuple[dict[str, int], bytes]:
        counters: dict[str, int] = {}
        server = await metrics.serve("127.0.0.1:0", lambda: {"role": "MASTER"}, counters)
        port = server.sockets[0].getsockname()[1]
        # from several sources: one source gets only MAX_PER_SOURCE (tests/unit/test_metrics_endpoint.py)
        idle = [await asyncio.open_connection("127.0.0.1", port,
                                              local_addr=(f"127.0.0.{2 + i // metrics.MAX_PER_SOURCE}", 0))
                for i in range(metrics.MAX_CLIENTS + 4)]
        await asyncio.sleep(0.1)
        refused = counters["refused"]
        await asyncio.sleep(0.4)  # the idle ones time out and free their slots
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        body = await asyncio.wait_for(reader.read(), 2)
        for _r, w in idle:
            w.close()
        writer.close()
        server.close()
        return {**counters, "refused_at_first": refused}, body
    counters, body = asyncio.run(scenario())
    assert counters["refused_at_first"] == 4 and counters["timed_out"] == metrics.MAX_CLIENTS
    assert b'ctbridge_role{role="MASTER"} 1' in body


def test_the_defer_is_exposed_and_reads_zero_while_it_is_off() -> None:
    on = metrics.render({"defer": {"packets": 12, "held": 5, "released_found": 4, "released_timeout": 1,
                                   "waiting": 0, "wait_seconds": {"p50": 0.002, "p99": 0.0041, "max": 0.02}}})
    for line in ("ctbridge_defer_packets_total 12", "ctbridge_defer_held_total 5",
                 "ctbridge_defer_released_found_total 4", "ctbridge_defer_released_timeout_total 1",
                 "ctbridge_defer_waiting 0", "ctbridge_defer_wait_p99_seconds 0.0041"):
        assert f"\n{line}\n" in on
    off = metrics.render({"defer": None})
    assert "\nctbridge_defer_held_total 0\n" in off

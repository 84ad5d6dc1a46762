"""The event loop's lag (daemon/looplag.py, issue 23, deliver 5): each probe's lag counted in a
histogram, the longest ever, and the longest of the last minute, which forgets older stalls.
A fake clock: the probe's due and run times are given."""

from __future__ import annotations

from ctbridge.cli.control import format_status
from ctbridge.daemon import metrics
from ctbridge.daemon.looplag import LAG_INTERVAL, RECENT, LoopLag


def test_the_longest_recent_stall_is_forgotten_after_a_minute_and_the_longest_ever_is_not() -> None:
    lag = LoopLag()
    now = 1000.0
    for late in (0.002, 2.5, 0.004, 0.3, 0.001):  # a 2.5 s stall among small lags
        due = now + LAG_INTERVAL
        now = due + late
        lag.observe(due, now)
    assert lag.recent(now) == 2.5 and lag.longest == 2.5
    t = now + RECENT - 1.0  # the 2.5 s stall ran 0.605 s before the last probe: still in the window ...
    assert lag.recent(t) == 2.5
    assert lag.recent(now + RECENT + 0.1) == 0.0  # ... and forgotten a minute after the last probe
    later = now + RECENT + 1.0
    lag.observe(later, later + 0.25)
    assert lag.recent(later + 0.25) == 0.25 and lag.longest == 2.5


def test_a_later_shorter_stall_becomes_the_longest_once_the_longer_one_leaves_the_window() -> None:
    lag = LoopLag()
    lag.observe(0.0, 1.0)  # 1 s late at t=1
    lag.observe(30.0, 30.5)  # 0.5 s late at t=30.5
    assert lag.recent(31.0) == 1.0
    assert lag.recent(61.5) == 0.5  # t=1 left the window; t=30.5 had been kept for this
    assert lag.recent(91.0) == 0.0


def test_the_histogram_counts_each_probe_in_cumulative_buckets_and_a_probe_early_lags_nothing() -> None:
    lag = LoopLag()
    lag.observe(10.0, 10.0004)
    lag.observe(20.0, 20.07)
    lag.observe(30.0, 29.99)  # the clock's resolution: early is no lag
    snap = lag.snapshot(30.0)
    buckets = dict((b, c) for b, c in snap["lag_histogram"]["buckets"])
    assert buckets[0.001] == 2 and buckets[0.05] == 2 and buckets[0.1] == 3 and snap["lag_histogram"]["count"] == 3
    assert snap["longest_stall_seconds"] == 0.07 and snap["recent_longest_stall_seconds"] == 0.07


def test_status_and_metrics_show_the_loops_stall() -> None:
    lag = LoopLag()
    lag.observe(0.0, 0.35)
    stats = {"node": "fw1", "loop": lag.snapshot(1.0)}
    assert "loop      longest stall 0.350 s in the last 60 s (0.350 s since the start)" in format_status(stats, 0.0)
    text = metrics.render(stats)
    assert "ctbridge_loop_longest_stall_seconds 0.35" in text
    assert 'ctbridge_loop_lag_seconds_bucket{le="0.5"} 1' in text and "ctbridge_loop_lag_seconds_count 1" in text

"""The engine's counters: one flat dict (Engine.stats) that every part of the engine adds to,
read by the daemon's metrics and by tests under these names.

Imports: nothing.
"""

from __future__ import annotations

COUNTERS = (
    "rx_datagrams", "rx_bytes", "tx_datagrams", "tx_bytes", "flows_sent", "deletes_sent", "flows_received",
    "deletes_received", "stale_ignored", "resent_datagrams", "nacks_sent", "nacks_received", "gaps_sent",
    "gaps_given_up", "bulks_sent", "bulks_received", "resyncs_requested", "resend_overflows",
    "rejected_auth", "rejected_replay", "rejected_malformed", "rejected_peers", "rejected_oversize",
    "peers_reclaimed", "rejected_bounds", "rejected_unproven", "own_datagrams", "challenges_sent",
    "echoes_sent", "sessions_proven", "flows_refused_policy", "flows_refused_cap", "tombstones_dropped",
    "bulk_count_mismatches", "flows_expired", "refresh_sweeps", "flows_refreshed",
    "oversized_flows", "losses", "window_reductions", "resends_skipped", "window_full", "probes",
    "resent_bytes", "kernel_malformed", "heartbeats_sent", "heartbeats_received", "heartbeats_ignored",
    "path_changes", "digests_refused",
    # protocol version 3: FLOW and DELETE messages sent in their compact forms, datagrams of
    # version 3 taken (docs/protocol.md, "Versions")
    "tx_compact", "rx_v3_datagrams",
    # held back (ctbridge.sync.holdback): flows that ended before sync.delay (never sent), flows
    # that came of age (sent then), updates that went out with a later one (sync.coalesce)
    "flows_ended_young", "flows_came_of_age", "updates_coalesced")


def new_stats() -> dict[str, int]:
    """Every counter at zero (the dict's keys never change after)."""
    return dict.fromkeys(COUNTERS, 0)

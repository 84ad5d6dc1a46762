"""Timeouts across nodes (issue 14, deliver 2 and 3), with a fake clock: the kernel sends no event
when traffic restarts a flow's countdown, so the sender finds those flows in a periodic dump
(Engine.kernel_refresh) and sends them again before its peers' copies run out; peers expire what
stops coming (expiry_margin), and a commit gives each flow what is left of it."""

from __future__ import annotations

import pytest

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec, request
from ctbridge.conntrack.codec import Entry, Event, EventKind
from ctbridge.sync import wire
from ctbridge.sync.engine import Engine, EngineConfig
from ctbridge.sync.peer import runs_out
from tests.support.enginelab import KEY, flow


def pair(**config: object) -> tuple[Engine, Engine]:
    a = Engine(EngineConfig(node_id=1, **config), wire.Auth([KEY]), epoch=1, now=0.0)  # type: ignore[arg-type]
    b = Engine(EngineConfig(node_id=2, **config), wire.Auth([KEY]), epoch=1, now=0.0)  # type: ignore[arg-type]
    for _ in range(3):  # both ways until each answered the other's challenge
        deliver(a, b, 0.0)
        deliver(b, a, 0.0)
    assert a.peers[2].proven and b.peers[1].proven
    return a, b


def deliver(src: Engine, dst: Engine, now: float) -> int:
    sent = 0
    for data, _ in src.datagrams_to_send(now):
        dst.receive_datagram(data, now)
        sent += 1
    return sent


def dump(*entries: Entry) -> list[bytes]:
    """What a dump of the kernel's table gives, one netlink message per flow."""
    return [codec.message(ct.MSG_CT_NEW, ct.NLM_F_MULTI, 1, e.family, e.attrs) for e in entries]


def timeout_at_b(b: Engine, key: bytes) -> int:
    return codec.timeout_of(b.peers[1].external[key][0], wire.FLOW_HEADER)


def test_a_flow_traffic_keeps_alive_is_sent_again_before_its_peers_copy_runs_out() -> None:
    a, b = pair()
    a.kernel_events([Event(EventKind.NEW, flow(1, timeout=30), 0)], 0.0)
    deliver(a, b, 0.0)
    assert flow(1).key in b.peers[1].external
    # t=10: traffic restarted the countdown (30 s left again); what B has runs out at 30, after
    # the next sweep (within=20): nothing to send yet
    assert a.kernel_refresh(dump(flow(1, timeout=30)), 10.0, within=20.0) == 0
    assert deliver(a, b, 10.0) <= 1  # at most an ALIVE
    # t=15: B's copy would run out before the sweep after next: sent again, with 30 s from now
    assert a.kernel_refresh(dump(flow(1, timeout=30)), 15.0, within=20.0) == 1
    deliver(a, b, 15.0)
    assert runs_out(b.peers[1].external[flow(1).key]) == 45.0
    # an idle flow (its countdown only ran down) is not sent again
    assert a.kernel_refresh(dump(flow(1, timeout=20)), 25.0, within=20.0) == 0
    assert a.stats["flows_refreshed"] == 1 and a.stats["refresh_sweeps"] == 3


def test_a_long_timeout_is_not_sent_again_at_every_sweep() -> None:
    """An established TCP connection (5 days) whose packets keep restarting its countdown: what
    peers hold runs out in days, so sweeps every few seconds send nothing."""
    a, _b = pair()
    a.kernel_events([Event(EventKind.NEW, flow(1, timeout=432000), 0)], 0.0)
    for t in range(1, 100):
        assert a.kernel_refresh(dump(flow(1, timeout=432000)), float(t * 10), within=20.0) == 0


def test_a_sweep_brings_back_no_flow_deleted_meanwhile_and_keeps_newer_events() -> None:
    a, _b = pair()
    a.kernel_events([Event(EventKind.NEW, flow(i, timeout=30), 0) for i in range(3)], 0.0)
    a.datagrams_to_send(0.0)
    a.kernel_events([Event(EventKind.DESTROY, flow(0), 0)], 5.0)  # gone after the dump read it
    a.kernel_events([Event(EventKind.UPDATE, flow(1, mark=7, timeout=30), 0)], 5.0)  # changed meanwhile
    before = a.internal[flow(1).key]
    assert a.kernel_refresh(dump(*(flow(i, timeout=30) for i in range(3))), 20.0, within=20.0,
                            newer={flow(1).key}) == 1  # flow 2 only
    assert flow(0).key not in a.internal and a.internal[flow(1).key] == before


def test_a_dead_peers_flows_expire_after_their_timeout_and_the_margin() -> None:
    a, b = pair(expiry_margin=30.0)
    a.kernel_events([Event(EventKind.NEW, flow(1, timeout=60), 0), Event(EventKind.NEW, flow(2, timeout=600), 0)],
                    0.0)
    deliver(a, b, 0.0)
    for t in range(1, 200):  # A is gone: B hears nothing more
        b.handle_timer(float(t))
        for _ in range(4):
            b.handle_timer(float(t))
        if t == 85:
            assert len(b.peers[1].external) == 2  # 60 + 30: not yet (a pass every 5 s)
    assert flow(1).key not in b.peers[1].external and flow(2).key in b.peers[1].external
    assert b.stats["flows_expired"] == 1


def test_a_commit_writes_each_flow_as_the_snapshot_had_it_while_the_cache_moves_on() -> None:
    """The commit's worker thread makes the records from a snapshot taken when the commit began.
    A cached flow was an object updated in place, so a flow updated meanwhile was written with
    its new message and the time its old one came, or half of each; a tuple cannot change."""
    a, b = pair(expiry_margin=30.0)
    a.kernel_events([Event(EventKind.NEW, flow(1, timeout=120), 0)], 0.0)
    deliver(a, b, 0.0)
    records = b.commit_records(now=50.0)  # the snapshot; records are made as they are consumed
    a.kernel_events([Event(EventKind.UPDATE, flow(1, mark=7, timeout=60), 0)], 40.0)
    deliver(a, b, 40.0)
    assert wire.flow_entry(flow(1).key, b.peers[1].external[flow(1).key][0]).attrs == flow(1, mark=7, timeout=60).attrs
    (record,) = list(records)
    assert codec.timeout_of(record.attrs) == 100  # 120 + 30 - 50: the first message, from when it came (0 s)
    assert flow(1, mark=7, timeout=60).attrs != record.attrs  # not the update


def test_a_commit_gives_each_flow_what_is_left_of_it() -> None:
    a, b = pair(expiry_margin=30.0)
    a.kernel_events([Event(EventKind.NEW, flow(1, timeout=120), 0), Event(EventKind.NEW, flow(2, timeout=10), 0)],
                    0.0)
    deliver(a, b, 0.0)
    records = {r.key: r for r in b.commit_records(now=50.0)}
    assert codec.timeout_of(records[flow(1).key].attrs) == 100  # 120 + 30 - 50
    assert codec.timeout_of(records[flow(2).key].attrs) == 1  # past it: 1 s (the next expiry pass drops it)
    # the request the codec writes from the record (its fast path) says the same
    for r, seconds in ((records[flow(1).key], 100), (records[flow(2).key], 1)):
        written = request.new_request(r, 1)
        assert codec.timeout_of(written, 20) == seconds
        assert written == request.new_request(codec.Entry(r.key, r.family, r.attrs), 1)
    raw = {e.key: e for e in b.external_caches.entries()}  # as they came
    assert codec.timeout_of(raw[flow(1).key].attrs) == 120


def test_inject_mode_writes_the_refreshed_timeout_into_the_peers_kernel() -> None:
    a, b = pair(apply_mode="inject")
    a.kernel_events([Event(EventKind.NEW, flow(1, timeout=30), 0)], 0.0)
    deliver(a, b, 0.0)
    assert [codec.timeout_of(op.entry.attrs) for op in b.kernel_ops() if op.entry is not None] == [30]
    a.kernel_refresh(dump(flow(1, timeout=30)), 20.0, within=20.0)
    deliver(a, b, 20.0)
    ops = b.kernel_ops()
    assert [(op.kind, codec.timeout_of(op.entry.attrs)) for op in ops if op.entry is not None] == [("commit", 30)]


def test_without_a_margin_nothing_expires() -> None:
    a, b = pair(expiry_margin=0.0)
    a.kernel_events([Event(EventKind.NEW, flow(1, timeout=1), 0)], 0.0)
    deliver(a, b, 0.0)
    for t in range(1, 100):
        b.handle_timer(float(t))
    assert flow(1).key in b.peers[1].external
    assert codec.timeout_of(next(iter(b.commit_records(now=99.0))).attrs) == 1  # as it came


def test_sweeps_refresh_in_time_whatever_they_take() -> None:
    """Found by review: the horizon came from the last sweep's duration while the wait came from
    this one's (times 20), so a slow sweep (a big table) let a live flow's copy run out before
    the next sweep refreshed it (inject mode: in the peer's kernel, which has no margin). A fake
    clock drives Engine.kernel_refresh with the daemon's sweep_timing and sweeps of random
    duration, 50 ms to 3 s: the peer's copy of a flow traffic keeps alive never runs out. Also
    found by review: 3 s sweeps waited 60 s (twenty times their duration), and 30 s UDP flows ran
    out on every peer; the wait is now capped by the shortest timeout."""
    import random

    from ctbridge.daemon.refresh import sweep_timing
    rng = random.Random(7)
    a, b = pair(expiry_margin=30.0)
    t = 0.0
    a.kernel_events([Event(EventKind.NEW, flow(1, timeout=30), 0)], t)
    deliver(a, b, t)
    wait = 2.5
    recent = [0.0]  # the daemon's REFRESH_HISTORY
    lapses = 0
    for _ in range(300):
        start = t + wait
        dumped = rng.choice([0.05, 0.05, 0.5, 1.5, 3.0])  # the dump, then as long again for the engine
        t = start + dumped
        until = runs_out(b.peers[1].external[flow(1).key])  # what B's kernel would hold
        lapses += until < start  # ran out before this sweep read the table
        wait, within = sweep_timing(2.5, 30.0, dumped, max(recent[-8:]))
        a.kernel_refresh(dump(flow(1, timeout=30)), t, within)
        deliver(a, b, t)
        deliver(b, a, t)  # the acknowledgements
        t += dumped
        recent.append(2 * dumped)
        b.handle_timer(t)
    assert lapses == 0 and flow(1).key in b.peers[1].external and b.stats["flows_expired"] == 0


def test_best_effort_survives_one_lost_refresh() -> None:
    """Found by review: best-effort mode resends nothing, and the next refresh came only once
    the new deadline neared: one lost refresh cost the flow on the peer for about its timeout.
    Flows are now refreshed twice per timeout there."""
    a, b = pair(expiry_margin=30.0, reliable=False)
    a.kernel_events([Event(EventKind.NEW, flow(1, timeout=120), 0)], 0.0)
    deliver(a, b, 0.0)
    lost = 0
    for t in range(5, 400, 5):
        if a.kernel_refresh(dump(flow(1, timeout=120)), float(t), within=16.0):
            if lost == 0:
                a.datagrams_to_send(float(t))  # the first refresh is lost
                lost += 1
        deliver(a, b, float(t))
        for _ in range(4):
            b.handle_timer(float(t))
        assert flow(1).key in b.peers[1].external, t
    assert lost == 1 and a.stats["flows_refreshed"] >= 5


def test_a_timeout_near_the_top_of_its_u32_does_not_stop_a_commit() -> None:
    """Found by review: a peer's CTA_TIMEOUT near 2^32 plus the margin overflowed the fast
    path's pack and the whole MASTER commit failed; the general path clamped."""
    entry = flow(1, timeout=0xFFFFFFF0)
    msg = wire.flow_msg(1, entry)
    record = codec.Record(entry.key, entry.family, msg, wire.FLOW_HEADER, 3600.0)
    assert codec.timeout_of(request.new_request(record, 1), 20) == 0xFFFFFFFF
    assert codec.timeout_of(record.attrs) == 0xFFFFFFFF


def test_a_sweep_whose_table_was_read_again_meanwhile_changes_nothing() -> None:
    """Found by review: a resync (after an overrun: events were lost) that ran while a sweep's dump
    was being read was then undone by the sweep's older dump, for the flows it refreshed: a flow
    the resync saw closing went out again as established. The daemon now marks the sweep's set
    of flows changed meanwhile with EVERYTHING, and the sweep changes nothing."""
    from ctbridge.sync.engine import EVERYTHING
    a, _b = pair()
    a.kernel_events([Event(EventKind.NEW, flow(1, timeout=30), 0)], 0.0)
    older = dump(flow(1, timeout=30))  # the sweep's dump, read first
    a.kernel_resync([flow(1, mark=5, timeout=10)], 20.0)  # then the resync: the flow changed
    now = a.internal[flow(1).key]
    assert a.kernel_refresh(older, 25.0, within=20.0, newer={EVERYTHING}) == 0
    assert a.internal[flow(1).key] == now


def test_a_sweep_object_skips_unread_only_what_kernel_refresh_would_skip() -> None:
    """A Sweep (the daemon's refresh loop: one per dump) skips the messages of flows that cannot
    need a refresh without reading them; every chunk must refresh exactly what kernel_refresh
    refreshes without it: short and long timeouts, a flow the cache lacks, one changed by an
    event meanwhile (``newer``), a message of a layout the plans do not follow, and chunks whose
    horizon moves past what the sweep looked at first."""
    from ctbridge.sync.engine import Sweep
    timeouts = [30, 432000, 60, 25, 120, 3600]
    flows = [flow(i, timeout=timeouts[i % len(timeouts)]) for i in range(60)]
    odd = flow(99, timeout=30)
    odd = Entry(odd.key, odd.family, odd.attrs + codec.attr(ct.CTA_MARK, bytes(4)))  # a mark twice: no plan
    engines = [pair()[0] for _ in range(2)]
    for e in engines:
        e.kernel_events([Event(EventKind.NEW, f, 0) for f in [*flows[:55], odd]], 0.0)
        e.datagrams_to_send(0.0)
    sweep = Sweep()
    newer = {flows[3].key}
    for t, within in ((5.0, 8.0), (9.0, 8.0), (30.0, 8.0), (31.0, 20.0), (75.0, 20.0)):
        chunk = dump(*(flow(i, timeout=timeouts[i % len(timeouts)]) for i in range(60)), odd)
        plain = engines[0].kernel_refresh(chunk, t, within, newer=newer)
        swept = engines[1].kernel_refresh(chunk, t, within, newer=newer, sweep=sweep)
        assert plain == swept
        assert engines[0].internal == engines[1].internal
        assert engines[0].internal_cache.pending_keys() == engines[1].internal_cache.pending_keys()
    assert engines[0].stats["flows_refreshed"] > 10
    # a new table (a dump read whole) is looked at again, within the horizon looked at before
    for e in engines:
        e.kernel_resync([flow(200, timeout=10)], 76.0)  # told: runs out at 86
    assert sweep.until >= 97.0
    plain = engines[0].kernel_refresh(dump(flow(200, timeout=30)), 77.0, 20.0)
    assert plain == engines[1].kernel_refresh(dump(flow(200, timeout=30)), 77.0, 20.0, sweep=sweep) == 1


def test_a_sweep_that_could_refresh_nothing_is_left_out_and_no_copy_runs_out() -> None:
    """refresh_loop leaves out a sweep's dump when no flow's peers' copy runs out before the
    horizon a dump now would have (daemon.refresh.needless). A fake clock drives sweeps of random
    duration as test_sweeps_refresh_in_time_whatever_they_take does, over a flow of 2 minutes and
    one of an hour, both kept alive by traffic: most sweeps are left out, the others dump, and
    neither peer's copy ever runs out (it would in B's kernel, which has no margin)."""
    import random

    from ctbridge.daemon.refresh import needless, sweep_timing
    rng = random.Random(11)
    a, b = pair(expiry_margin=30.0)
    t = 0.0
    timeouts = {1: 120, 2: 3600}
    a.kernel_events([Event(EventKind.NEW, flow(i, timeout=s), 0) for i, s in timeouts.items()], t)
    deliver(a, b, t)
    wait, recent, lapses, skipped, swept = 2.5, [0.0], 0, 0, 0
    dumped, dumped_flows = 0.0, 0
    for _ in range(1500):
        t += wait
        lapses += sum(runs_out(b.peers[1].external[flow(i).key]) < t for i in timeouts)
        if dumped_flows:
            skip = needless(a.refresh_due, len(a.internal), t, 2.5, 30.0, dumped, dumped_flows, max(recent[-8:]))
            if skip is not None:
                wait = skip
                skipped += 1
                continue
        dumped = rng.choice([0.05, 0.05, 0.5, 1.5, 3.0])  # the dump, then as long again for the engine
        dumped_flows = len(timeouts)
        start, t = t, t + dumped
        wait, within = sweep_timing(2.5, 30.0, dumped, max(recent[-8:]))
        a.kernel_refresh(dump(*(flow(i, timeout=s) for i, s in timeouts.items())), t, within)
        deliver(a, b, t)
        deliver(b, a, t)  # the acknowledgements
        t += dumped
        recent.append(t - start)
        swept += 1
        b.handle_timer(t)
    assert lapses == 0 and b.stats["flows_expired"] == 0
    assert skipped > 1000 and swept > 100 and a.stats["flows_refreshed"] > 100


def test_the_soonest_runout_is_found_in_chunks_as_min_finds_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The refresh loop looks for the soonest run-out in chunks (a million at once held the loop):
    the same answer as min() over the whole table, wherever the soonest sits; none is infinity."""
    import asyncio
    import random

    from ctbridge.daemon import refresh
    monkeypatch.setattr(refresh, "RUNOUT_CHUNK", 7)
    rng = random.Random(5)
    for n in (1, 6, 7, 8, 50, 701):
        values = [rng.uniform(10, 1000) for _ in range(n)]
        assert asyncio.run(refresh.soonest(values)) == min(values)
    assert asyncio.run(refresh.soonest([])) == float("inf")
    a, _b = pair()
    a.kernel_events([Event(EventKind.NEW, flow(1, timeout=30), 0), Event(EventKind.NEW, flow(2, timeout=90), 0)], 0.0)
    assert asyncio.run(refresh.soonest(a.runouts())) == 30.0


def test_an_offloaded_flows_day_long_timeout_reaches_its_peers_by_the_sweep() -> None:
    """A flowtable offloads a flow: the kernel sets the OFFLOAD bit and a timeout of a day, and
    refreshes it without events (docs/kernel.md, "Offloaded flows"). Its peers' copies came with
    the 120 s of its last event; the next sweep finds the day and sends it before those copies
    run out, so a peer keeps the flow as long as the master's kernel does."""
    from tests.support import builders
    a, b = pair()
    short = flow(1, timeout=120)
    a.kernel_events([Event(EventKind.NEW, short, 0)], 0.0)
    deliver(a, b, 0.0)
    assert runs_out(b.peers[1].external[short.key]) == 120.0
    status = ct.IPS_CONFIRMED | ct.IPS_SEEN_REPLY | ct.IPS_ASSURED | ct.IPS_OFFLOAD
    attrs = codec.attr_map(short.attrs)
    offloaded = builders.build_entry(ct.AF_INET, attrs[ct.CTA_TUPLE_ORIG], attrs[ct.CTA_TUPLE_REPLY],
                                     status=status, timeout=86400, tcp_state=3)
    assert a.kernel_refresh(dump(offloaded), 105.0, within=20.0) == 1
    deliver(a, b, 105.0)
    assert runs_out(b.peers[1].external[short.key]) == 105.0 + 86400
    assert timeout_at_b(b, short.key) == 86400

"""This node's table as it replicates it (the internal cache): what its kernel's events, dumps
and refresh sweeps say, encoded once per change as the FLOW (or EXPECT) message that goes out,
and the keys waiting to go out (``pending``, coalesced: a flow changed twice before sending goes
out once, with its state at sending time).

Refresh sweeps: the kernel reports no event when a packet restarts a flow's countdown, so the
daemon dumps the table now and then and kernel_refresh() queues again the flows whose timeout
traffic pushed past what peers were told (``told``: when that runs out); peers expire their
copy otherwise (ctbridge.sync.external). A Sweep lets it skip unread the messages of flows that
cannot need a refresh; refresh_due() tells the daemon when a dump would find none.

kernel_messages() and kernel_refresh() are measured hot loops (bench/engine_churn.py,
bench/engine.py, bench/sync.py): one dict operation per flow, no call per event of a known
layout but the FLOW's encoding.

Imports: ctbridge.conntrack (abi, codec, expectation), ctbridge.sync (wire, intake, peer, shared,
holdback, rebuild, sweep, carried).
"""

from __future__ import annotations

import logging
import struct
from collections import OrderedDict
from collections.abc import Container, Sequence
from typing import Any

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec, expectation
from ctbridge.conntrack.codec import Entry, Event, EventKind
from ctbridge.sync import carried, wire
from ctbridge.sync import filter as flt
from ctbridge.sync.holdback import Holdback
from ctbridge.sync.intake import HEAD, KEYED, Fast, Intake
from ctbridge.sync.peer import MARK
from ctbridge.sync.rebuild import Rebuild
from ctbridge.sync.shared import Part, Shared
from ctbridge.sync.sweep import Sweep

log = logging.getLogger("ctbridge.sync.engine")  # the engine's one logger, whichever part speaks

# in kernel_refresh's ``newer``: the whole table was read again while the dump ran (a resync after
# an overrun), so every flow is newer than the dump (no key is empty)
EVERYTHING = b""
_BE32 = struct.Struct(">I")  # CTA_TIMEOUT's seconds, network order
_ZERO_SYNPROXY = codec._ZERO_SYNPROXY  # an all-zero CTA_SYNPROXY: not replicated (codec.strip_local)
_SYNPROXY_LEN = len(_ZERO_SYNPROXY)
REFRESH_SLACK = 1.0  # seconds: timeouts are whole seconds, so a deadline moved less is no refresh


class InternalCache(Part):
    """This node's flows and expectations (``table``: key -> message), when peers' copies run
    out (``told``), and what waits to go out (``pending``)."""

    def __init__(self, shared: Shared) -> None:
        super().__init__(shared)
        config = self.config
        # key -> the flow's FLOW message (version + attributes), encoded once per change so that
        # sending, resending and bulk transfers only join bytes
        self.table: dict[bytes, bytes] = {}
        # key -> when the timeout it went out with runs out (the engine's clock): peers expire
        # their copy then (plus their margin) unless kernel_refresh() sends it again first
        self._told: dict[bytes, float] = {}
        # the keys of this node's expectations among them (kept in ``table``, they travel as
        # flows do; kernel_resync's dump of flows leaves them be)
        self._expectations: set[bytes] = set()
        # ... and when each runs out (the engine's clock): they go out with what is left of their
        # timeout, so a peer that first hears of one in a bulk does not count it from the start
        self._expect_until: dict[bytes, float] = {}
        # Best-effort mode resends nothing: one lost refresh would cost the flow on every peer
        # until its next. So peers are taken to hold half the timeout, and each flow is sent
        # again twice per timeout: one loss is survived.
        self._told_share = 1.0 if config.reliable else 0.5
        self._version = 0  # this node's flow version counter (every change and deletion takes one)
        # Flow keys waiting to go out, in order, each once (coalescing). An OrderedDict, not a dict:
        # taking keys from the front of a plain dict is linear in the keys deleted before them
        # (CPython leaves a dummy slot per deletion until the next resize), which makes sending a
        # large backlog quadratic (bench/sync.py).
        self.pending: OrderedDict[bytes, None] = OrderedDict()
        self.intake = Intake()
        # young flows (sync.delay) and updates held to be coalesced (sync.coalesce)
        self.hold = Holdback()
        # with ct labels in the no-sync selection: the flows it refused (an update carries no
        # labels, so the flow's earlier event has to be remembered; _no_sync)
        self.unsynced: set[bytes] = set()
        self.carried_seen: set[int] = set(carried.FIRST_SEEN)  # the CARRIED attributes events have had
        # while a Rebuild runs: the flows events and refresh sweeps changed meanwhile, which keep
        # what the cache holds for them over what the dump said
        self.rebuilding: set[bytes] | None = None
        # counts the rebuilds that ended: ``told`` moved under a Sweep's feet (one looks again)
        self.rebuilds = 0

    def expectation_count(self) -> int:
        return len(self._expectations)

    def kernel_events(self, events: list[Event], now: float) -> None:
        self.hold.generation += 1  # (a batch: updates held by earlier ones are coalesced with these)
        accepts = self.config.filter.accepts
        flow_msg = wire.flow_msg
        strip = codec.strip_local
        version = self._version
        for ev in events:
            entry = ev.entry
            key = entry.key
            try:
                if ev.kind is EventKind.DESTROY:
                    self.unsynced.discard(key)
                    self._drop(key)
                    continue
                if self._no_sync(key, entry.attrs) or not accepts(entry):
                    self._drop(key)
                    continue
                # what an update left out, read before strip() takes an all-zero synproxy away
                missing = carried.missing(entry.attrs, key, self.carried_seen, ev.kind is EventKind.NEW)
                entry = strip(entry)
                entry = codec.Entry(key, entry.family, self._carry(key, entry.attrs, missing))
                msg = flow_msg(version + 1, entry)
            except codec.CodecError as exc:  # attributes that do not parse: counted, dropped
                self._malformed(exc)
                continue
            version += 1
            self._store(key, msg, now + codec.timeout_of(msg, wire.FLOW_HEADER) * self._told_share, now)
        self._version = version
        if self.rebuilding is not None:
            self.rebuilding.update(ev.entry.key for ev in events)

    def kernel_expectations(self, events: list[Event], now: float) -> None:
        """Expectation events of this kernel (ctbridge.conntrack.expectation): replicated as
        flows are, under keys of their own; no refresh (traffic does not restart an
        expectation's timer), and the kernel reports each one's end (used, timed out, or gone
        with its master)."""
        internal = self.table
        keys = self._expectations
        until = self._expect_until
        accepts = self.config.filter.accepts_expectation
        for ev in events:
            key = ev.entry.key
            try:
                if ev.kind is EventKind.DESTROY or not accepts(ev.entry):
                    if internal.pop(key, None) is not None:
                        keys.discard(key)
                        until.pop(key, None)
                        self.pending[key] = None
                    continue
                msg = wire.expect_msg(self._version + 1, ev.entry)
            except (codec.CodecError, ValueError) as exc:
                self._malformed(exc)
                continue
            self._version += 1
            internal[key] = msg
            keys.add(key)
            until[key] = now + expectation.timeout_of(ev.entry.attrs)
            self.pending[key] = None

    def kernel_expect_resync(self, entries: list[Entry], now: float, announce: bool = True,
                             newer: Container[bytes] = frozenset()) -> None:
        """Replace this node's expectations with a dump of them; what changed is sent (unless
        ``announce`` is False). ``newer``: expectations whose events came while the dump ran
        (what the cache holds for them, or their absence, is newer than the dump), as for
        kernel_resync."""
        internal = self.table
        old = self._expectations
        until = self._expect_until
        new: set[bytes] = {key for key in old if key in newer}
        accepts = self.config.filter.accepts_expectation
        for entry in entries:
            key = entry.key
            if key in newer:
                continue
            try:
                if not accepts(entry):
                    continue
                until[key] = now + expectation.timeout_of(entry.attrs)
                prev = internal.get(key)
                if prev is not None and key in old and codec.same_but_timeout(prev[wire.FLOW_HEADER:], entry.attrs,
                                                                              ct.CTA_EXPECT_TIMEOUT):
                    new.add(key)
                    continue
                msg = wire.expect_msg(self._version + 1, entry)
            except (codec.CodecError, ValueError) as exc:
                self._malformed(exc)
                continue
            self._version += 1
            internal[key] = msg
            new.add(key)
            if announce:
                self.pending[key] = None
        for key in old - new:
            if key in newer:
                continue
            internal.pop(key, None)
            until.pop(key, None)
            if announce:
                self.pending[key] = None
        self._expectations = new

    def _malformed(self, exc: Exception) -> None:
        self.stats["kernel_malformed"] += 1
        if self.stats["kernel_malformed"] == 1:  # once: the counter tells how often
            log.warning("a kernel event message that cannot be read was dropped: %s", exc)

    def _store(self, key: bytes, msg: bytes, told_until: float, now: float) -> None:
        """A flow's new state (``msg``; peers' copy would run out at ``told_until``): into the
        table and out, or held back (ctbridge.sync.holdback). kernel_messages does the same
        inline."""
        config = self.config
        table = self.table
        known = key in table
        if not known and config.delays:
            delay = config.delay_by_protocol.get(carried.protocol(key), config.delay)
            if delay > 0:
                self.hold.hold_young(key, msg, told_until, delay, now)
                return
        table[key] = msg
        self._told[key] = told_until
        if known and config.coalesce > 0 and key not in self.pending:
            if self.hold.hold_update(key, now, config.coalesce):
                self.stats["updates_coalesced"] += 1
        else:
            self.pending[key] = None

    def _no_sync(self, key: bytes, buf: bytes, start: int = 0) -> bool:
        """Whether the no-sync selection refuses the flow of ``key`` whose event (or message: its
        attributes from ``start``) this is (filter.refused_now). Raises CodecError."""
        return flt.refused_now(self.config.filter.no_sync, self.unsynced, key, buf, start)

    def _carry(self, key: bytes, attrs: bytes, missing: frozenset[int]) -> bytes:
        """``attrs`` with what the update left out (ctbridge.sync.carried), from the flow's message
        in the table, or its young one."""
        if not missing:
            return attrs
        prev = self.table.get(key)
        if prev is None and key in self.hold.young:
            prev = self.hold.young[key][0]
        return carried.carry(prev, attrs, missing)

    def _drop(self, key: bytes) -> None:
        """A flow ended (or the filter refuses it now): a DELETE goes out at once, unless peers
        never heard of it."""
        if self.table.pop(key, None) is not None:
            self._told.pop(key, None)
            self.pending[key] = None
            self.hold.held.pop(key, None)
        elif self.hold.young.pop(key, None) is not None:
            self.stats["flows_ended_young"] += 1

    def release(self, now: float) -> None:
        """Held updates whose window ran out, and young flows that came of age, go out."""
        grown = self.hold.release(now, self.pending)
        for key, msg, told_until in grown:
            self._version += 1
            self.table[key] = wire.restamp(msg, self._version)
            self._told[key] = told_until
            self.pending[key] = None
        self.stats["flows_came_of_age"] += len(grown)
        if grown and self.rebuilding is not None:  # newer than what a dump under way read
            self.rebuilding.update(key for key, _msg, _told in grown)

    def deadline(self) -> float:
        """When something held back is due (inf: nothing is)."""
        return self.hold.deadline()

    def kernel_messages(self, buffers: Sequence[bytes], now: float, skip_portid: int = -1) -> list[bytes]:
        """kernel_events() for the event socket's receive buffers as they are (one message each,
        as the kernel sends events), read by ctbridge.sync.intake's plans where it knows the
        layout; the keys of the flows they changed (our own echo, ``skip_portid``, left out).

        A hot loop (bench/engine_churn.py): a message of a known layout is read here, inline,
        with one struct read to find its plan and one to check it, slices for the key, the
        filter's addresses and the attributes, and one dict operation per table; no object
        and no call per event but the FLOW's encoding (and the filter's, unless it only
        ignores addresses). Through Intake.decode, a Fast and accepts_facts per event it took
        4.3-4.8 µs an event under churn, inline 2.5 (2026-12-07, docs/performance.md)."""
        # hot loop: one function, no call per event (measured, see the docstring)
        intake = self.intake
        plans_get = intake.plans.get
        head_of = HEAD.unpack_from
        internal = self.table
        told = self._told
        share = self._told_share
        pending = self.pending
        flow_filter = self.config.filter
        accepts = flow_filter.accepts_facts
        ignore = flow_filter.ignore_only()
        no_sync = flow_filter.no_sync  # (most of its flows stopped in the kernel: conntrack.eventfilter)
        unsynced = self.unsynced
        carried_seen, protoinfo = self.carried_seen, carried.PROTOINFO
        missing: frozenset[int] = frozenset()
        missing_by: dict[int, tuple[Any, frozenset[int]]] = {}
        hosts, prefixes_of = ignore if ignore is not None else (frozenset[bytes](), {})
        flow_raw = wire.flow_raw
        seconds = _BE32.unpack_from
        keys: list[bytes] = []
        append = keys.append
        version = self._version
        config = self.config
        hold = self.hold
        held, young = hold.held, hold.young
        coalesce = config.coalesce
        delays = config.delays
        holding = coalesce > 0 or delays
        delay_get = config.delay_by_protocol.get
        default_delay = config.delay
        coalesced = ended_young = 0
        hold.generation += 1
        generation = hold.generation
        fast = 0
        last = None
        for buf in buffers:
            n = len(buf)
            plan = None
            if n >= KEYED:
                head, pid, first = head_of(buf)
                plan = plans_get((head, first))
                if plan is not None and plan is not last:
                    # events of a batch mostly share a few layouts: the plan's fields are read
                    # into locals once per change of layout, not one attribute at a time per event
                    last = plan
                    (heads, expect, mlen, keyhead, orig, family, destroy, new, _key, zone_at, proto_at, src_at,
                     reply_at, state_at, tcp, keep, synproxy, keep_no_synproxy, orig_len, timeout_at, has) = plan
                    # what this layout's updates leave out (a new flow's event has nothing to take)
                    cached = missing_by.get(id(plan))
                    if cached is None or cached[0] is not plan:  # (an id is reused once a plan is gone)
                        if not has <= carried_seen:  # an attribute seen first: every layout looks again
                            carried_seen |= has
                            missing_by.clear()
                        left_out = frozenset(carried_seen) - has - (frozenset() if tcp else protoinfo)
                        cached = missing_by[id(plan)] = (plan, frozenset() if new else left_out)
                    missing = cached[1]
            if (plan is None or mlen != n or heads(buf) != expect
                    or (buf[proto_at] == ct.IPPROTO_TCP) != tcp):
                # a layout not learnt yet, one the fast path does not follow, or not one message
                self._version = version
                seen = len(carried_seen)
                self._other(buf, now, skip_portid, keys)
                version = self._version
                if len(carried_seen) != seen:  # an attribute seen first: every layout looks again
                    missing_by.clear()
                    last = None
                continue
            if pid == skip_portid:
                continue
            fast += 1
            if zone_at < 0:
                zone = 0
                key = keyhead + buf[orig]
            else:
                zone = (buf[zone_at] << 8) | buf[zone_at + 1]
                key = keyhead[:1] + buf[zone_at:zone_at + 2] + buf[orig]
            append(key)
            if not destroy:
                if ignore is not None:
                    src = buf[src_at]
                    reply = buf[reply_at]
                    prefixes = prefixes_of.get(family)
                    accepted = not (src in hosts or reply in hosts
                                    or (prefixes and (src.startswith(prefixes) or reply.startswith(prefixes))))
                else:
                    accepted = accepts(family, (buf[proto_at], buf[src_at], buf[reply_at],
                                                buf[state_at] if state_at >= 0 else None))
                if accepted:
                    if synproxy >= 0 and buf[synproxy:synproxy + _SYNPROXY_LEN] == _ZERO_SYNPROXY:
                        attrs = b"".join(keep_no_synproxy(buf))
                    else:
                        attrs = b"".join(keep(buf))
                    if missing and (key in internal or key in young):  # what the update left out: carried
                        attrs = self._carry(key, attrs, missing)
                    accepted = no_sync is None or not self._no_sync(key, attrs)
                if accepted:
                    version += 1
                    msg = flow_raw(version, family, zone, orig_len, attrs)
                    until = now + (seconds(buf, timeout_at)[0] if timeout_at >= 0 else 0) * share
                    if holding:  # ctbridge.sync.holdback, as _store does
                        if key in internal:
                            internal[key] = msg
                            told[key] = until
                            if coalesce and key not in pending:
                                before = held.get(key)
                                if before is None:
                                    if not held:
                                        hold.held_until = now + coalesce
                                elif before != generation:
                                    coalesced += 1
                                held[key] = generation
                            else:
                                pending[key] = None
                            continue
                        if delays:
                            delay = delay_get(buf[proto_at], default_delay)
                            if delay > 0:
                                hold.hold_young(key, msg, until, delay, now)
                                continue
                    internal[key] = msg
                    told[key] = until
                    pending[key] = None
                    continue
            if unsynced and destroy:
                unsynced.discard(key)
            if internal.pop(key, None) is not None:
                told.pop(key, None)
                pending[key] = None
                if held:
                    held.pop(key, None)
            elif young and young.pop(key, None) is not None:
                ended_young += 1
        self._version = version
        self.stats["updates_coalesced"] += coalesced
        self.stats["flows_ended_young"] += ended_young
        intake.fast += fast
        if self.rebuilding is not None:
            self.rebuilding.update(keys)
        return keys

    def _other(self, buf: bytes, now: float, skip_portid: int, keys: list[bytes]) -> None:
        """One buffer kernel_messages() found no plan for: read by Intake.decode (which learns
        the layout's plan) or the general path, in order with the rest."""
        fast = self.intake.decode(buf, skip_portid)
        if fast is None:
            return
        if type(fast) is not Fast:
            try:
                events = codec.decode_events(buf, skip_portid)
            except codec.CodecError as exc:  # counted and dropped: a message we cannot read
                self._malformed(exc)
                return
            self.kernel_events(events, now)
            keys.extend(e.entry.key for e in events)
            return
        key = fast.key
        keys.append(key)
        if fast.destroy:
            self.unsynced.discard(key)
        if fast.destroy or not self.config.filter.accepts_facts(key[0], fast.facts) or self._no_sync(key, fast.attrs):
            self._drop(key)
            return
        self._version += 1
        missing = carried.missing(buf, key, self.carried_seen, fast.new, 20)  # (the message's own attributes)
        attrs = self._carry(key, fast.attrs, missing)
        self._store(key, wire.flow_raw(self._version, key[0], fast.zone, fast.orig_len, attrs),
                    now + fast.timeout * self._told_share, now)

    def kernel_resync(self, entries: list[Entry], now: float, announce: bool = True,
                      newer: set[bytes] | frozenset[bytes] = frozenset()) -> None:
        """Replace the internal cache with a dump at once (Rebuild, fed the whole dump)."""
        rebuild = self.rebuild(now, announce)
        rebuild.feed(entries, newer)
        rebuild.finish(newer)

    def rebuild(self, now: float, announce: bool = True) -> Rebuild:
        """Replace the internal cache with a dump, in chunks (Rebuild); changes since the last
        view are sent, unless ``announce`` is False (at start: peers hear our HELLO and ask for a
        bulk transfer anyway)."""
        return Rebuild(self, now, announce)

    def kernel_refresh(self, messages: Sequence[bytes], now: float, within: float,
                       newer: Container[bytes] = frozenset(), sweep: Sweep | None = None) -> int:
        """Send again the flows whose timeouts traffic refreshed: the kernel reports no event
        when a packet restarts a flow's countdown (a UDP stream, an ICMP echo, an established
        TCP connection), so peers would expire their copy, or an injected one would expire in
        their kernel, while the flow lives on here.

        ``messages``: this kernel's table from a dump, one netlink message each, read as events
        are (ctbridge.sync.intake). A flow goes out again when what peers were told runs out
        within ``within`` seconds (the caller: until its next sweep has surely run) and this
        kernel keeps it longer. So a flow is sent about once per its timeout, never once per
        sweep, and a TCP connection established for days almost never. ``newer``: flows whose
        events came while the dump ran (their cache entry is newer than the dump). The number of
        flows refreshed; flows the cache lacks are left to their events (never brought back).

        ``sweep``: the same Sweep for every chunk of one dump, made after the dump began, with
        ``newer`` naming every flow events changed since (the daemon's refresh loop): then a
        message whose original tuple is none of the flows that can need a refresh is skipped
        unread (Sweep.candidates)."""
        if EVERYTHING in newer:
            return 0
        told = self._told
        internal = self.table
        pending = self.pending
        horizon = now + within
        version = self._version
        refreshed = 0
        no_sync = self.config.filter.no_sync is not None
        if sweep is not None:
            messages = sweep.candidates(messages, told, horizon, within, self.rebuilds)
        for buf in messages:
            seen = self._brief(buf)
            if seen is None:
                continue
            key, seconds, plan, fast, entry = seen
            runs_out = told.get(key)
            if runs_out is None or runs_out >= horizon or now + seconds <= runs_out + REFRESH_SLACK or key in newer:
                continue
            if entry is not None:
                msg = wire.flow_msg(version + 1, entry)
            else:
                if fast is None:
                    fast = self.intake.read(plan, buf)
                msg = wire.flow_raw(version + 1, key[0], fast.zone, fast.orig_len, fast.attrs)
            if no_sync and self._no_sync(key, msg, wire.FLOW_HEADER):
                # marked no-sync since it went out (the event that said so stopped in the kernel:
                # conntrack.eventfilter): its peers' copy goes now
                self._drop(key)
                continue
            version += 1
            internal[key] = msg
            told[key] = now + seconds * self._told_share
            pending[key] = None
            refreshed += 1
            if self.rebuilding is not None:
                self.rebuilding.add(key)
        self._version = version
        self.stats["refresh_sweeps"] += 1
        self.stats["flows_refreshed"] += refreshed
        return refreshed

    def runouts(self) -> list[float]:
        """When the peers' copy of each flow runs out (a copy: refresh_due in chunks, the daemon's
        refresh loop: daemon.refresh.soonest)."""
        return list(self._told.values())

    def refresh_due(self, until: float) -> bool:
        """Whether the peers' copy of some flow runs out before ``until`` (a refresh sweep
        reading the table now can refresh something): one pass over ``told``, in C."""
        return min(self._told.values(), default=until) < until

    def _brief(self, buf: bytes) -> tuple[bytes, int, Any, Fast | None, Entry | None] | None:
        """A dump message's key and seconds left (with its plan, or what reading it gave: a Fast or
        an Entry); None for a message that holds no flow to refresh."""
        intake = self.intake
        # the key and the seconds left, by a plan learnt before: most flows end at the check
        seen = intake.brief(buf)
        if seen is not None:
            key, seconds, plan = seen
            return key, seconds, plan, None, None
        # a layout seen first here, or one the fast path does not follow
        fast = intake.decode(buf, -1)
        if fast is None:
            return None
        if isinstance(fast, Fast):
            if fast.destroy:  # a deletion is no state to refresh
                return None
            return fast.key, fast.timeout, None, fast, None
        try:
            events = codec.decode_events(buf)
            if len(events) != 1:
                return None
            entry = codec.strip_local(events[0].entry)
        except codec.CodecError as exc:
            self._malformed(exc)
            return None
        return entry.key, codec.timeout_of(entry.attrs), None, None, entry

    def entries(self) -> list[Entry]:
        """This node's flows as it replicates them (its expectations: internal_expectations)."""
        return [wire.flow_entry(key, msg) for key, msg in self.messages()]

    def expectations(self) -> list[Entry]:
        """This node's expectations as it replicates them."""
        internal = self.table
        return [wire.flow_entry(key, internal[key]) for key in self._expectations]

    def messages(self) -> list[tuple[bytes, bytes]]:
        """(key, FLOW message) of this node's flows: a snapshot that copies no flow (a listing)."""
        if self._expectations:
            return [(key, msg) for key, msg in self.table.items() if key[0] < MARK]
        return list(self.table.items())

    def flush(self) -> None:
        """Forget this node's flows and expectations (they come back with the next dumps);
        nothing is sent."""
        self.table.clear()
        self._told.clear()
        self._expectations.clear()
        self._expect_until.clear()
        self.hold.clear()
        self.unsynced.clear()

    def pending_keys(self) -> list[bytes]:
        """The flows waiting to go out (changed or deleted since they last went), oldest first."""
        return list(self.pending)

    def drop_pending(self) -> None:
        """Forget what waits to go out: for a bulk transfer that will carry every flow anyway (a
        benchmark of the bulk path, a test that looks at one change)."""
        self.pending.clear()

    def fresh(self, key: bytes, msg: bytes, now: float) -> bytes:
        """An expectation's EXPECT as it goes out: with what is left of its timeout."""
        until = self._expect_until.get(key)
        if until is None:
            return msg
        return expectation.with_timeout(msg, wire.FLOW_HEADER, max(0, int(until - now + 0.5)))

    def message(self, key: bytes, now: float) -> bytes:
        cur = self.table.get(key)
        if cur is not None:
            return cur if key[0] < MARK else self.fresh(key, cur, now)
        self._version += 1
        return wire.delete_msg(self._version, key)


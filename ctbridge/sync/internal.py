"""This node's table as it replicates it (the internal cache): what its kernel's events, dumps
and refresh sweeps say, encoded once per change as the FLOW (or EXPECT) message that goes out,
and the keys waiting to go out (``pending``, coalesced: a flow changed twice before sending goes
out once, with its state at sending time).

Refresh sweeps: the kernel reports no event when a packet restarts a flow's countdown, so the
daemon dumps the table now and then and kernel_refresh() queues again the flows whose timeout
traffic pushed past what peers were told (``told``: when that runs out); peers expire their
copy otherwise (ctbridge.sync.external).

kernel_messages() and kernel_refresh() are measured hot loops (bench/engine.py, bench/sync.py):
one dict operation per flow, no call per flow beyond the intake's decoder.

Imports: ctbridge.conntrack (abi, codec, expectation), ctbridge.sync (wire, intake, peer, shared).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Container, Sequence

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec, expectation
from ctbridge.conntrack.codec import Entry, Event, EventKind
from ctbridge.sync import wire
from ctbridge.sync.intake import Fast, Intake
from ctbridge.sync.peer import MARK
from ctbridge.sync.shared import Part, Shared

log = logging.getLogger("ctbridge.sync.engine")  # the engine's one logger, whichever part speaks

# in kernel_refresh's ``newer``: the whole table was read again while the dump ran (a resync after
# an overrun), so every flow is newer than the dump (no key is empty)
EVERYTHING = b""
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

    def expectation_count(self) -> int:
        return len(self._expectations)

    def kernel_events(self, events: list[Event], now: float) -> None:
        internal = self.table
        told = self._told
        pending = self.pending
        accepts = self.config.filter.accepts
        flow_msg = wire.flow_msg
        strip = codec.strip_local
        version = self._version
        for ev in events:
            entry = ev.entry
            key = entry.key
            try:
                if ev.kind is EventKind.DESTROY or not accepts(entry):
                    if internal.pop(key, None) is not None:
                        told.pop(key, None)
                        pending[key] = None
                    continue
                msg = flow_msg(version + 1, strip(entry))
            except codec.CodecError as exc:  # attributes that do not parse: counted, dropped
                self._malformed(exc)
                continue
            version += 1
            internal[key] = msg
            told[key] = now + codec.timeout_of(msg, wire.FLOW_HEADER) * self._told_share
            pending[key] = None
        self._version = version

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

    def kernel_messages(self, buffers: Sequence[bytes], now: float, skip_portid: int = -1) -> list[bytes]:
        """kernel_events() for the event socket's receive buffers as they are (one message each,
        as the kernel sends events), read by ctbridge.sync.intake where it knows the layout; the
        keys of the flows they changed (our own echo, ``skip_portid``, left out)."""
        intake = self.intake
        decode = intake.decode
        internal = self.table
        told = self._told
        share = self._told_share
        pending = self.pending
        accepts = self.config.filter.accepts_facts
        flow_raw = wire.flow_raw
        keys: list[bytes] = []
        version = self._version
        for buf in buffers:
            fast = decode(buf, skip_portid)
            if fast is None:
                continue
            if type(fast) is not Fast:  # the general path, in order with the rest
                self._version = version
                try:
                    events = codec.decode_events(buf, skip_portid)
                except codec.CodecError as exc:  # counted and dropped: a message we cannot read
                    self._malformed(exc)
                    continue
                self.kernel_events(events, now)
                keys.extend(e.entry.key for e in events)
                version = self._version
                continue
            key = fast.key
            keys.append(key)
            if fast.destroy or not accepts(key[0], fast.facts):
                if internal.pop(key, None) is not None:
                    told.pop(key, None)
                    pending[key] = None
                continue
            version += 1
            internal[key] = flow_raw(version, key[0], fast.zone, fast.orig_len, fast.attrs)
            told[key] = now + fast.timeout * share
            pending[key] = None
        self._version = version
        return keys

    def kernel_resync(self, entries: list[Entry], now: float, announce: bool = True,
                      newer: set[bytes] | frozenset[bytes] = frozenset()) -> None:
        """Replace the internal cache with a dump; changes since the last view are sent, unless
        ``announce`` is False (at start: peers hear our HELLO and ask for a bulk transfer anyway).

        ``newer``: flows whose events were applied while the dump ran. What the cache holds for
        them (or their absence) is at least as recent as the dump, which may have read them before
        the event: they keep it."""
        accepts = self.config.filter.accepts
        old = self.table
        old_told = self._told
        new: dict[bytes, bytes] = {}
        told: dict[bytes, float] = {}
        for key in newer:
            if key in old:
                new[key] = old[key]
                told[key] = old_told.get(key, now)
        for entry in entries:
            if entry.key in newer or not accepts(entry):
                continue
            entry = codec.strip_local(entry)
            prev = old.get(entry.key)
            if prev is not None and codec.same_but_timeout(prev[wire.FLOW_HEADER:], entry.attrs):
                # only the countdown moved: no need to send the flow again (after an overrun the
                # dump would otherwise re-announce the whole table; kernel_refresh() sends what
                # traffic kept alive longer than peers were told)
                new[entry.key] = prev
                told[entry.key] = old_told.get(entry.key, now)
            else:
                self._version += 1
                new[entry.key] = wire.flow_msg(self._version, entry)
                told[entry.key] = now + codec.timeout_of(entry.attrs) * self._told_share
                if announce:
                    self.pending[entry.key] = None
        # a flow dump holds no expectations (kernel_expect_resync's): kept, after every flow, so a
        # bulk carries each master before its expectations
        for key in self._expectations:
            new[key] = old[key]
        if announce:
            for key in old.keys() - new.keys():
                self.pending[key] = None
        self.table = new
        self._told = told

    def kernel_refresh(self, messages: Sequence[bytes], now: float, within: float,
                       newer: Container[bytes] = frozenset()) -> int:
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
        flows refreshed; flows the cache lacks are left to their events (never brought back)."""
        if EVERYTHING in newer:
            return 0
        told = self._told
        internal = self.table
        pending = self.pending
        intake = self.intake
        horizon = now + within
        version = self._version
        refreshed = 0
        for buf in messages:
            # the key and the seconds left, by a plan learnt before: most flows end at the check
            seen = intake.brief(buf)
            entry: Entry | None = None
            fast: Fast | object | None = None
            if seen is not None:
                key, seconds, plan = seen
            else:  # a layout seen first here, or one the fast path does not follow
                fast = intake.decode(buf, -1)
                if fast is None:
                    continue
                if isinstance(fast, Fast):
                    if fast.destroy:  # a deletion is no state to refresh
                        continue
                    key, seconds = fast.key, fast.timeout
                else:
                    try:
                        events = codec.decode_events(buf)
                        if len(events) != 1:
                            continue
                        entry = codec.strip_local(events[0].entry)
                    except codec.CodecError as exc:
                        self._malformed(exc)
                        continue
                    key, seconds = entry.key, codec.timeout_of(entry.attrs)
            runs_out = told.get(key)
            if runs_out is None or runs_out >= horizon or now + seconds <= runs_out + REFRESH_SLACK or key in newer:
                continue
            if entry is not None:
                msg = wire.flow_msg(version + 1, entry)
            else:
                if fast is None:
                    fast = intake.read(plan, buf)
                assert isinstance(fast, Fast)
                msg = wire.flow_raw(version + 1, key[0], fast.zone, fast.orig_len, fast.attrs)
            version += 1
            internal[key] = msg
            told[key] = now + seconds * self._told_share
            pending[key] = None
            refreshed += 1
        self._version = version
        self.stats["refresh_sweeps"] += 1
        self.stats["flows_refreshed"] += refreshed
        return refreshed

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

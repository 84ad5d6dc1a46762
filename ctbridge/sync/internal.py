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

Imports: ctbridge.conntrack (abi, codec, expectation), ctbridge.sync (wire, intake, peer, shared).
"""

from __future__ import annotations

import logging
import struct
from collections import OrderedDict
from collections.abc import Container, Iterable, Sequence
from typing import Any

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec, expectation
from ctbridge.conntrack.codec import Entry, Event, EventKind
from ctbridge.sync import wire
from ctbridge.sync.intake import HEAD, KEYED, Fast, Intake
from ctbridge.sync.peer import MARK
from ctbridge.sync.shared import Part, Shared

log = logging.getLogger("ctbridge.sync.engine")  # the engine's one logger, whichever part speaks

# in kernel_refresh's ``newer``: the whole table was read again while the dump ran (a resync after
# an overrun), so every flow is newer than the dump (no key is empty)
EVERYTHING = b""
_BE32 = struct.Struct(">I")  # CTA_TIMEOUT's seconds, network order
_NLA = struct.Struct("=HH")  # struct nlattr, include/uapi/linux/netlink.h
_TYPE_MASK = 0x3FFF  # NLA_TYPE_MASK, include/uapi/linux/netlink.h
_FIRST_ATTR = 20  # a conntrack message's attributes follow its nlmsghdr (16) and nfgenmsg (4)
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
        # while a Rebuild runs: the flows events and refresh sweeps changed meanwhile, which keep
        # what the cache holds for them over what the dump said
        self.rebuilding: set[bytes] | None = None
        # counts the rebuilds that ended: ``told`` moved under a Sweep's feet (one looks again)
        self.rebuilds = 0

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
        hosts, prefixes_of = ignore if ignore is not None else (frozenset[bytes](), {})
        flow_raw = wire.flow_raw
        seconds = _BE32.unpack_from
        keys: list[bytes] = []
        append = keys.append
        version = self._version
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
                    (heads, expect, mlen, keyhead, orig, family, destroy, _new, _key, zone_at, proto_at, src_at,
                     reply_at, state_at, tcp, keep, synproxy, keep_no_synproxy, orig_len, timeout_at) = plan
            if (plan is None or mlen != n or heads(buf) != expect
                    or (buf[proto_at] == ct.IPPROTO_TCP) != tcp):
                # a layout not learnt yet, one the fast path does not follow, or not one message
                self._version = version
                self._other(buf, now, skip_portid, keys)
                version = self._version
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
                    version += 1
                    internal[key] = flow_raw(version, family, zone, orig_len, attrs)
                    told[key] = now + (seconds(buf, timeout_at)[0] if timeout_at >= 0 else 0) * share
                    pending[key] = None
                    continue
            if internal.pop(key, None) is not None:
                told.pop(key, None)
                pending[key] = None
        self._version = version
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
        if fast.destroy or not self.config.filter.accepts_facts(key[0], fast.facts):
            if self.table.pop(key, None) is not None:
                self._told.pop(key, None)
                self.pending[key] = None
            return
        self._version += 1
        self.table[key] = wire.flow_raw(self._version, key[0], fast.zone, fast.orig_len, fast.attrs)
        self._told[key] = now + fast.timeout * self._told_share
        self.pending[key] = None

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


class Rebuild:
    """The internal cache brought up to a dump, fed in chunks so that a table of a million flows
    never holds the event loop (at once, 1M flows took 3.6-4.8 s of one core), in place: events go
    on being applied to the cache meanwhile, and each flow the dump shows changed is written and
    marked to be sent as its chunk is read (the sender reads the cache as it is, so what goes out
    is always what it holds). Then the flows the dump lacks are dropped, in chunks too
    (``leftovers``, ``drop_unseen``), and ``close`` ends it.

    In place rather than a new cache swapped in at the end: the swap had to copy back every flow
    events changed meanwhile (a 1M load's overrun: most of them) and find the flows gone as a set
    difference of two 1M-key dicts, 0.39-0.45 s of the loop at once (a probe on finish,
    docs/performance.md), and building the new dicts resized them on the loop.

    ``newer`` (given to each call, growing): flows whose events were applied since the dump
    began. What the cache holds for them (or their absence) is at least as recent as the dump,
    which may have read them before the event: they keep it. So do the flows events or a refresh
    sweep change while the rebuild runs (``InternalCache.rebuilding``): a sweep between two
    chunks had its newer version overwritten by the dump's older one (found by review)."""

    __slots__ = ("_announce", "_cache", "_now", "_seen")

    def __init__(self, cache: InternalCache, now: float, announce: bool) -> None:
        cache.rebuilding = set()  # (one Rebuild at a time: the daemon's KernelReader.rebuilding)
        self._cache = cache
        self._now = now
        self._announce = announce
        self._seen: set[bytes] = set()  # the flows the dump holds: the others are gone

    def feed(self, entries: Sequence[Entry], newer: Container[bytes] = frozenset()) -> None:
        cache = self._cache
        accepts = cache.config.filter.accepts
        table, told, pending = cache.table, cache._told, cache.pending
        changed: Container[bytes] = cache.rebuilding if cache.rebuilding is not None else frozenset()
        seen, now, share, announce = self._seen, self._now, cache._told_share, self._announce
        for entry in entries:
            key = entry.key
            if key in newer or key in changed or not accepts(entry):
                continue
            seen.add(key)
            entry = codec.strip_local(entry)
            prev = table.get(key)
            if prev is not None and codec.same_but_timeout(prev[wire.FLOW_HEADER:], entry.attrs):
                # only the countdown moved: no need to send the flow again (after an overrun the
                # dump would otherwise re-announce the whole table; kernel_refresh() sends what
                # traffic kept alive longer than peers were told)
                if key not in told:
                    told[key] = now
                continue
            cache._version += 1
            table[key] = wire.flow_msg(cache._version, entry)
            told[key] = now + codec.timeout_of(entry.attrs) * share
            if announce:
                pending[key] = None

    def leftovers(self) -> list[bytes]:
        """After the last chunk: the keys to look at for flows the dump lacks (drop_unseen)."""
        return list(self._cache.table)

    def drop_unseen(self, keys: Iterable[bytes], newer: Container[bytes] = frozenset()) -> None:
        """Of ``keys``, drop the flows the dump lacked, unless events or a sweep changed them
        meanwhile (a flow created after the dump began is not gone). A flow dump holds no
        expectations (kernel_expect_resync's): they stay."""
        cache = self._cache
        table, told, pending, seen = cache.table, cache._told, cache.pending, self._seen
        changed: Container[bytes] = cache.rebuilding if cache.rebuilding is not None else frozenset()
        expectations = cache._expectations
        for key in keys:
            if key in seen or key in newer or key in changed or key in expectations:
                continue
            if table.pop(key, None) is not None:
                told.pop(key, None)
                if self._announce:
                    pending[key] = None

    def close(self) -> None:
        cache = self._cache
        cache.rebuilding = None
        cache.rebuilds += 1
        self._seen = set()
        # a flow dump holds no expectations (kernel_expect_resync's): moved after every flow the
        # dump may have added, so that a bulk carries each master before its expectations
        table = cache.table
        for key in cache._expectations:
            if key in table:
                table[key] = table.pop(key)

    def finish(self, newer: Container[bytes] = frozenset()) -> None:
        """The rest at once: every flow the dump lacked dropped, and the rebuild closed."""
        self.drop_unseen(self.leftovers(), newer)
        self.close()


class Sweep:
    """One refresh sweep's shortcut (InternalCache.kernel_refresh): the original tuples of the
    flows whose peers' copies run out before ``until``, found once per sweep (one pass over
    ``told``, about 0.1 µs a flow) rather than by reading every message of the dump (2 µs).

    Exact, given kernel_refresh's rules: a flow it leaves out runs out at ``until`` or later,
    beyond every chunk's horizon, so kernel_refresh would skip it too, unless ``told`` moved since
    the look; it moves by events (then the flow is in ``newer``, skipped anyway), by a refresh
    (of a candidate) or a dump read whole (a Rebuild, or EVERYTHING in ``newer``). Looked
    again when a chunk's horizon passes ``until``, ``told`` is another dict or a rebuild ended
    (``generation``: InternalCache.rebuilds)."""

    __slots__ = ("_generation", "_origs", "_told", "until")

    def __init__(self) -> None:
        self.until = float("-inf")
        self._told: dict[bytes, float] | None = None
        self._generation = -1
        self._origs: set[bytes] = set()

    def candidates(self, messages: Sequence[bytes], told: dict[bytes, float], horizon: float,
                   within: float, generation: int = 0) -> list[bytes]:
        """The messages that may hold a flow to refresh: those whose first attribute is a
        CTA_TUPLE_ORIG naming a flow that runs out before ``until`` (a key's bytes after its
        family and zone are that attribute's payload: codec.make_key), and any other."""
        if horizon > self.until or told is not self._told or generation != self._generation:
            self.until = horizon + within  # good for the chunks of the next ``within`` seconds
            self._told = told
            self._generation = generation
            until = self.until
            self._origs = {key[3:] for key, runs_out in told.items() if runs_out < until}
        origs = self._origs
        head = _NLA.unpack_from
        out = []
        for buf in messages:
            if len(buf) >= _FIRST_ATTR + 4:
                alen, atype = head(buf, _FIRST_ATTR)
                if atype & _TYPE_MASK == ct.CTA_TUPLE_ORIG and buf[_FIRST_ATTR + 4:_FIRST_ATTR + alen] not in origs:
                    continue
            out.append(buf)
        return out

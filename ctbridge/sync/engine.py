"""The replication engine: a pure state machine (no sockets, no clock, no asyncio, no pyroute2).

Inputs, each with an explicit ``now`` (seconds, any monotonic origin):
    kernel_events(events, now)          this node's kernel reported changes
    kernel_resync(entries, now)         this node's whole table, from a dump (start, overrun)
    receive_datagram(data, now, wall)   a datagram from the sync link
    request_resync(now) / bulk_send(now) / set_role(role)   commands
    handle_timer(now)                   the deadline from get_timer() has passed
Outputs:
    datagrams_to_send(now)   [(bytes, destination)]: destination None = every peer, else a node id
    kernel_ops()             writes the kernel should do (apply mode "inject")
    get_timer()              when handle_timer() wants to run next (None: no deadline)

The shape follows aioquic's QuicConnection: the adapter moves bytes and re-arms one timer. Tests
drive engines with a fake clock over lossy in-memory links (tests/unit/test_engine.py).

Replication, in short: every change of this node's internal cache (its kernel's flows, filtered)
bumps a per-node version counter and queues the flow key; queued keys coalesce, so several updates
of a flow waiting to go out are sent once, with the state current at sending time. Each datagram
takes the next sequence number of this node's stream. Receivers apply messages in any order —
a flow's version decides which state is newer — acknowledge contiguous ranges, and ask again
(NACK) for gaps; a resend carries the current state of the flows the lost datagram named. What a
receiver learns from a peer is kept per peer (the external caches); a bulk transfer replaces one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict, deque
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec, expectation
from ctbridge.conntrack.codec import Entry, Event, EventKind
from ctbridge.sync import digest, wire
from ctbridge.sync.filter import FlowFilter
from ctbridge.sync.intake import Fast, Intake
from ctbridge.sync.sequence import SEQ_MAX, ReceiveWindow, ResendQueue

log = logging.getLogger(__name__)


# Control messages a resend must carry again: losing them would leave a bulk transfer unfinished
# or a gap open for good. Acknowledgements, ALIVE and HELLO are not worth it.
NACK_RANGES = 32  # gaps one NACK round asks for (8 bytes each on the wire)
EPOCH_AHEAD = 86400.0  # seconds a peer's epoch (its boot time) may lie ahead of our clock (with max_age)
RECEIVE_LIMIT = 9216  # bytes: no datagram longer is read (a jumbo frame; a peer's own limit may exceed ours)
RECLAIMED_KEPT = 1024  # node ids whose slots were given back, remembered with their replay floor
# a new epoch begins this far before the sealing counter runs out: resends between two new
# sequence numbers take counters too, never 2^24 of them
SEAL_WRAP = wire.SEAL_COUNTER_MAX - (1 << 24)
NONCE_LIFETIME = 1.0  # seconds an answer to a challenge is taken after the challenge went out: an
# answer held back longer (by an attacker who dropped it, and the peer's later life) proves nothing,
# so what a held-back answer can make a node take is a life that ran at most this long ago
NONCES_KEPT = 32  # challenges per peer whose answers are still taken (one per CHALLENGE_RETRY)
SERVED_EPOCHS = 8  # epochs of a peer not proven yet whose bulk request we served (once each)
CHALLENGE_RETRY = 0.1  # seconds: challenge a peer again whose answer (ECHO) has not come; 16 bytes
# each, and only while that peer is heard, so retrying often costs nothing and makes a lost echo
# cost 0.1 s instead of a bulk retry of 3 s
# in kernel_refresh's ``newer``: the whole table was read again while the dump ran (a resync after
# an overrun), so every flow is newer than the dump (no key is empty)
EVERYTHING = b""
_MARK = expectation.EXPECTATION  # a key whose first byte has it is an expectation's
REFRESH_SLACK = 1.0  # seconds: timeouts are whole seconds, so a deadline moved less is no refresh
EXPIRY_CHUNK = 8192  # flows looked at per timer call of an expiry pass (about 10 ms: the loop goes on)
_MUST_ARRIVE = frozenset({wire.MsgType.BULK_BEGIN, wire.MsgType.BULK_END, wire.MsgType.GAP, wire.MsgType.RESYNC})


class Role(Enum):
    MASTER = "MASTER"
    BACKUP = "BACKUP"
    FAULT = "FAULT"


@dataclass(frozen=True)
class EngineConfig:
    node_id: int
    reliable: bool = True  # False: best-effort, no acknowledgements or resends
    apply_mode: str = "commit"  # "inject": write peers' flows into this kernel as they arrive
    max_datagram: int = 1452  # bytes: IPv6 minimum path MTU 1500 - 40 (IPv6) - 8 (UDP)
    ack_every: int = 32  # acknowledge after this many data datagrams ...
    ack_delay: float = 0.01  # ... or this long after the first unacknowledged one
    nack_retry: float = 0.03  # ask again for a gap still open after this long (the sender resends a
    # datagram at most once per RTO, so asking often costs a few bytes, never a flood)
    alive_interval: float = 1.0  # send something at least this often
    peer_timeout: float = 5.0  # a peer silent this long stops holding back the resend queue
    resend_limit: int = 16384  # datagrams kept for resending
    rx_limit: int = 8192  # datagrams held beyond a gap before the gap is given up on
    tombstone_ttl: float = 60.0  # how long a deletion outranks late updates of the same flow
    resync_retry: float = 3.0  # ask again for a bulk transfer that has not completed
    max_age: float = 0.0  # reject datagrams whose sender time is older than this (0: off)
    burst: int = 256  # datagrams per datagrams_to_send() call
    # Flow control (docs/protocol.md, "Loss recovery and flow control"; after RFC 9002 and RFC 6298):
    initial_window: int = 128  # data datagrams in flight before the first acknowledgement
    min_window: int = 128  # never below (random loss on a LAN is no congestion to back off from; a
    # receiver socket buffer of 4 MiB holds 2,800 datagrams)
    max_window: int = 8192  # datagrams; at most half the resend queue
    initial_rtt: float = 0.02  # seconds, until the first sample: a dedicated sync link is a LAN (RFC 9002
    # 6.2.2 suggests 333 ms for the Internet)
    min_resend_interval: float = 0.01  # a datagram is resent at most once per RTO, kept within these
    max_resend_interval: float = 0.5
    max_peers: int = 16  # datagrams from further node ids are dropped (each peer costs state and ACK room)
    filter: FlowFilter = field(default_factory=FlowFilter)
    # Receive-side policy and caps (docs/protocol.md, "Threat model"): flows a peer sends that this
    # node's own filter, or the accept list for that peer, refuses are counted and never stored
    peer_filters: Mapping[int, FlowFilter] = field(default_factory=dict)  # node id -> what it may send
    max_entries: int = 0  # flows kept per peer (the daemon: nf_conntrack_max); 0: no cap
    max_tombstones: int = 65536  # deletions remembered per peer; beyond, the oldest is forgotten (counted)
    # Expiry (docs/protocol.md, "Timeouts"): a peer's flow is dropped this long after the timeout
    # it last came with ran out; the peer refreshes what its traffic keeps alive (kernel_refresh).
    # 0: never (a dead peer's flows stay until a bulk or a flush)
    expiry_margin: float = 30.0
    # the helpers' expectations (sync.expectations): sent and taken only when on; a peer's are
    # refused (refused.policy) when off, so a node that does not use them writes none
    expectations: bool = False


class KernelOp(NamedTuple):
    """A write for the kernel adapter: commit these entries, or delete these keys."""

    kind: str  # "commit" | "delete"
    entry: Entry | None
    key: bytes


class _Bulk:
    __slots__ = ("begun", "bulk_id", "keys", "pos", "sent", "target")

    def __init__(self, target: int, bulk_id: int) -> None:
        self.target = target
        self.bulk_id = bulk_id
        self.keys: list[bytes] = []
        self.pos = 0
        self.sent = 0
        self.begun = False


class _Diff:
    """A comparison of a peer's table with our copy of it under way (`ctbridge diff`)."""

    __slots__ = ("asked", "counts", "differ", "keys", "last", "node", "parts", "result", "started", "sums",
                 "truncated")

    def __init__(self, node: int, now: float) -> None:
        self.node = node
        self.started = now
        self.sums: dict[int, digest.Bucket] = {}  # the peer's, by bucket
        self.asked: frozenset[int] = frozenset()  # the buckets whose keys we asked for
        self.keys: dict[bytes, int] = {}  # the peer's keys of those buckets, with their state hash
        self.counts: dict[str, int] = {}  # flows on each side ("theirs", "ours")
        self.differ = 0  # buckets that differ
        self.parts: set[int] = set()  # the indices of the DIGEST_KEYS messages received
        self.last = -1  # the index of the answer's last message, once it came
        self.truncated = False
        self.result: dict[str, Any] | None = None


DIFF_KEPT = 16  # comparisons remembered (the oldest is forgotten)
DIFF_LIFETIME = 30.0  # seconds a comparison takes answers (`ctbridge diff` waits 10)
DIFF_BUCKETS_ASKED = 32  # buckets whose keys one comparison asks for at most
DIGEST_INTERVAL = 1.0  # seconds: a peer's questions (each costs a pass over our table) answered at most this often


class ExternalFlow:
    """One flow a peer told us about: its FLOW message, the sequence number of the peer's last
    datagram that mentioned it (bulks drop flows not mentioned since BULK_BEGIN; 0: from a
    previous life of the peer), and when that version came (its CTA_TIMEOUT counts from then:
    expiry). ``seq`` and ``heard`` are the datagram's, one object shared by every flow it
    carried; the version is read from the message, so a cached flow costs its message, its key
    and this object (bench/failover.py: memory per cached flow)."""

    __slots__ = ("heard", "message", "seq")

    def __init__(self, message: bytes, seq: int, heard: float = 0.0) -> None:
        self.message = message
        self.seq = seq
        self.heard = heard

    @property
    def version(self) -> int:
        """The peer's counter for this state; -1 for a flow of the peer's previous life, which
        anything of its new life outranks."""
        return wire.flow_version(self.message) if self.seq else -1

    def runs_out(self) -> float:
        """When the peer's timeout for it, as it last came, ran out (the engine's clock)."""
        return self.heard + seconds_of(self.message)


_EXPECT = int(wire.MsgType.EXPECT)


def seconds_of(msg: bytes) -> int:
    """The timeout a FLOW or EXPECT message came with (their attributes number it differently)."""
    if msg[0] == _EXPECT:
        return expectation.timeout_of(msg, wire.FLOW_HEADER)
    return codec.timeout_of(msg, wire.FLOW_HEADER)


class EpochChanged(NamedTuple):
    """This node's sequence numbers ran out and a new epoch began: the adapter must keep it (the
    next start must begin above it)."""

    epoch: int


class PeerRestarted(NamedTuple):
    node: int
    old_epoch: int
    new_epoch: int


class PeerSilent(NamedTuple):
    node: int
    seconds: float  # since it was last heard


class BulkCompleted(NamedTuple):
    node: int
    flows: int  # what its external cache holds now
    stale_removed: int
    complete: bool  # False: datagrams of the bulk were lost (best effort), stale flows were kept


class CompletenessChanged(NamedTuple):
    complete: bool  # Engine.complete(): every live peer's external cache is whole


class LimitReached(NamedTuple):
    """A cap was hit for the first time since the last bulk from ``node`` (the adapter logs it
    once): ``what`` is "flows" (max_entries) or "tombstones" (max_tombstones)."""

    node: int
    what: str
    limit: int


class LinkReport(NamedTuple):
    """Redundant sync links: ``node`` says it hears this node on these links (bit k: link k)."""

    node: int
    links: int


EngineEvent = (PeerRestarted | PeerSilent | BulkCompleted | CompletenessChanged | LinkReport | EpochChanged
               | LimitReached)


class Peer:
    """What this node knows about one other node."""

    def __init__(self, node: int, now: float) -> None:
        self.node = node
        self.epoch = -1
        self.rx: ReceiveWindow | None = None
        self.external: dict[bytes, ExternalFlow] = {}
        # key -> (version, until when it outranks late updates, sequence number of the DELETE)
        self.tombstones: dict[bytes, tuple[int, float, int]] = {}
        # flows it sent that our policy refused: key -> (version, sequence number), so a bulk counts
        # them as mentioned; bounded with the external cache by max_entries
        self.refused: dict[bytes, tuple[int, int]] = {}
        self.refused_total = 0
        self.capped = 0  # flows refused by the cap since its last bulk began
        self.limits: set[str] = set()  # caps hit since its last bulk began that make its copy incomplete
        self.warned: set[str] = set()  # caps said (LimitReached) since then
        # Freshness: its current epoch is accepted only once it answered our challenge (ECHO of
        # our nonce in that epoch); until then nothing it sends is applied
        self.proven = False
        self.challenge_at: float | None = None
        # The challenges whose answers we take: nonce -> when it went out. Each is drawn anew,
        # taken within NONCE_LIFETIME, and forgotten when a session starts: a captured answer,
        # or one an attacker held back while the peer restarted, proves nothing later.
        self.nonces: OrderedDict[int, float] = OrderedDict()
        self.candidate_at = float("-inf")  # when a datagram of an unproven epoch was last refused
        self.served: deque[int] = deque(maxlen=SERVED_EPOCHS)  # unproven epochs whose bulk request we served
        self.ack_queued: bytes | None = None  # our last ACK to it put in the control queue alone
        self.gap_upto = 0  # the highest of our numbers a GAP to it named (this epoch of ours) ...
        self.gap_at = float("-inf")  # ... and when
        self.rejected_at = float("-inf")  # when an authentic datagram of it was last refused
        # its authentic datagrams (or messages) refused, by the counter's reason (per-peer metrics)
        self.rejected: dict[str, int] = {"replay": 0, "unproven": 0, "bounds": 0}
        self.acked = 0  # highest of our sequence numbers this peer acknowledged (our epoch)
        self.ack_heard = 0  # ... as its own acknowledgements said (``acked`` also starts at what a new
        # peer cannot have seen): a NACK below it is stale
        # What its latest NACKs say beyond the acknowledgement (selective acknowledgement, as
        # RFC 6675 counts the pipe): it has datagrams up to sack_high, but for these ranges
        self.sack_high = 0
        self.missing: list[tuple[int, int]] = []
        self.missing_count = 0
        # as a receiver: the last NACK round queued, how far it named the gaps, and whether all
        self.nack_round: bytes | None = None
        self.round_high = 0
        self.round_full = True
        self.acked_at = now  # when that last moved
        self.ack_sent = 0  # highest of its sequence numbers we acknowledged
        self.unacked = 0  # data datagrams received since our last acknowledgement
        self.ack_due: float | None = None
        self.nack_at = -1.0
        self.nacked: tuple[int, int] | None = None
        self.last_heard = now
        self.alive = False  # True from its first accepted datagram until peer_timeout of silence
        self.bulk_begin: tuple[int, int] | None = None  # (bulk id, sequence number of BULK_BEGIN)
        # (bulk id, end seq, begin seq, flows it says it sent) awaiting contiguity
        self.bulk_end: tuple[int, int, int, int] | None = None
        self.synced = False  # a bulk transfer completed and no data was lost since
        self.bulk_dirty = False  # best-effort: datagrams of the current bulk were lost
        self.given_up = 0  # the highest of its sequence numbers it said (GAP) it cannot resend
        self.resync_at: float | None = None  # when we last asked it for a bulk transfer
        self.restarts = 0
        self.bulks = 0
        self.heartbeats: dict[int, int] = {}  # link -> number of the last heartbeat taken over it


def _new_stats() -> dict[str, int]:
    return {k: 0 for k in (
        "rx_datagrams", "rx_bytes", "tx_datagrams", "tx_bytes", "flows_sent", "deletes_sent", "flows_received",
        "deletes_received", "stale_ignored", "resent_datagrams", "nacks_sent", "nacks_received", "gaps_sent",
        "gaps_given_up", "bulks_sent", "bulks_received", "resyncs_requested", "resend_overflows",
        "rejected_auth", "rejected_replay", "rejected_malformed", "rejected_peers", "rejected_oversize",
        "peers_reclaimed", "rejected_bounds", "rejected_unproven", "own_datagrams", "challenges_sent",
        "echoes_sent", "sessions_proven", "flows_refused_policy", "flows_refused_cap", "tombstones_dropped",
        "bulk_count_mismatches", "flows_expired", "refresh_sweeps", "flows_refreshed",
        "oversized_flows", "losses", "window_reductions", "resends_skipped", "window_full", "probes",
        "resent_bytes", "kernel_malformed", "heartbeats_sent", "heartbeats_received", "heartbeats_ignored",
        "path_changes", "digests_refused")}


class Engine:
    def __init__(self, config: EngineConfig, auth: wire.Auth, epoch: int, now: float,
                 clock_offset: float = 0.0, first_seq: int = 1, nonce: int | None = None) -> None:
        """``first_seq``: this epoch's first sequence number (1; a test of the wrap starts near
        the end of the space). ``nonce``: this life's challenge (the daemon draws 64 random bits;
        it need not be secret, only never used by an earlier life: by default the epoch)."""
        self.config = config
        self.auth = auth
        self.node_id = config.node_id
        self.epoch = epoch
        self.nonce = (epoch if nonce is None else nonce) & 0xFFFFFFFFFFFFFFFF
        self._nonces = 0  # nonces drawn from it since, one per session a peer started (Peer.nonce)
        self._sealed = 0  # sealing counter of this epoch (encryption)
        self._own_id = self.node_id.to_bytes(4, "big")  # as the header carries it
        self._resync_all_at = float("-inf")  # when we last asked every peer for a bulk
        self._broadcast = (-1, float("-inf"))  # (nonce, when) of our last challenge to every peer
        self.clock_offset = clock_offset  # wall clock minus ``now``, for the time in each header
        self.role = Role.BACKUP
        # key -> the flow's FLOW message (version + attributes), encoded once per change so that
        # sending, resending and bulk transfers only join bytes
        self.internal: dict[bytes, bytes] = {}
        # key -> when the timeout it went out with runs out (the engine's clock): peers expire
        # their copy then (plus their margin) unless kernel_refresh() sends it again first
        self._told: dict[bytes, float] = {}
        # the keys of this node's expectations among them (kept in ``internal``, they travel as
        # flows do; kernel_resync's dump of flows leaves them be)
        self._expectations: set[bytes] = set()
        # ... and when each runs out (the engine's clock): they go out with what is left of their
        # timeout, so a peer that first hears of one in a bulk does not count it from the start
        self._expect_until: dict[bytes, float] = {}
        self._diffs: OrderedDict[int, _Diff] = OrderedDict()  # request -> comparison (diff_start)
        self._diff_request = 0
        self._digest_at: dict[tuple[int, bool], float] = {}  # (peer, for keys) -> when we last answered
        # Best-effort mode resends nothing: one lost refresh would cost the flow on every peer
        # until its next. So peers are taken to hold half the timeout, and each flow is sent
        # again twice per timeout: one loss is survived.
        self._told_share = 1.0 if config.reliable else 0.5
        self.peers: dict[int, Peer] = {}
        self.stats = _new_stats()
        self._version = 0
        self._seq = first_seq
        # Flow keys waiting to go out, in order, each once (coalescing). An OrderedDict, not a dict:
        # taking keys from the front of a plain dict is linear in the keys deleted before them
        # (CPython leaves a dummy slot per deletion until the next resize), which made sending a
        # 100,000-flow backlog quadratic: 6.5 of 15 s in next(iter(...)) in bench/sync.py.
        self._pending: OrderedDict[bytes, None] = OrderedDict()
        self._control: list[bytes] = [wire.alive_msg()]  # datagram 1 goes out at once, with HELLO
        self._bulks: deque[_Bulk] = deque()
        self._bulk_id = 0
        self._resends: OrderedDict[tuple[int, int | None], None] = OrderedDict()  # (seq, destination) to resend
        self._resend = ResendQueue(config.resend_limit)
        self._overflow_seen = 0
        self._overflow_bulk = False
        self._overflow_bulk_at = now
        self._kernel_ops: list[KernelOp] = []
        self._events: list[EngineEvent] = []
        # flow control: congestion window (datagrams), RTT estimate, send and resend times
        self.window = float(config.initial_window)
        self._ssthresh = float("inf")
        self._recovery_upto = 0  # losses of datagrams up to this one were answered already
        self.srtt: float | None = None
        self.rttvar = config.initial_rtt / 2
        # seq -> when first sent (data datagrams still kept), in sequence order: released from the front
        self._sent_at: OrderedDict[int, float] = OrderedDict()
        self._resent_at: dict[tuple[int, int], float] = {}  # (seq, peer node; 0: all) -> when last resent
        self._last_input = now  # the newest ``now`` the engine was given
        self._probe_from = now  # when acknowledgements last moved the window (or the last probe)
        self._probes = 0  # probes since then: each waits twice as long as the one before
        self._complete = self.complete()
        self._last_send = now - config.alive_interval  # so the HELLO goes out at once
        self._next_sweep = now + config.tombstone_ttl
        self._expiry_at = now + self._expiry_pass()
        self._expiry_work: list[tuple[Peer, list[bytes]]] = []  # an expiry pass under way
        # Redundant sync links (the adapter's link choice may believe these): the node id of the
        # last datagram received if it was authentic and new (accepted data, or a heartbeat with
        # a higher number than any before over its link), else None; and for a heartbeat, the
        # link it says it was sent over
        self.last_sender: int | None = None
        self.last_link: int | None = None
        self._heartbeat = 0  # number of the last heartbeat round sent
        self.intake = Intake()
        self._reclaimed: OrderedDict[int, tuple[int, int]] = OrderedDict()  # node -> (epoch, highest seq)

    # --- this node's kernel ----------------------------------------------------------------------

    def _queue(self, key: bytes) -> None:
        self._pending[key] = None

    def kernel_events(self, events: list[Event], now: float) -> None:
        internal = self.internal
        told = self._told
        pending = self._pending
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
        internal = self.internal
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
                        self._pending[key] = None
                    continue
                msg = wire.expect_msg(self._version + 1, ev.entry)
            except (codec.CodecError, ValueError) as exc:
                self._malformed(exc)
                continue
            self._version += 1
            internal[key] = msg
            keys.add(key)
            until[key] = now + expectation.timeout_of(ev.entry.attrs)
            self._pending[key] = None

    def kernel_expect_resync(self, entries: list[Entry], now: float, announce: bool = True,
                             newer: Container[bytes] = frozenset()) -> None:
        """Replace this node's expectations with a dump of them; what changed is sent (unless
        ``announce`` is False). ``newer``: expectations whose events came while the dump ran
        (what the cache holds for them, or their absence, is newer than the dump), as for
        kernel_resync."""
        internal = self.internal
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
                self._queue(key)
        for key in old - new:
            if key in newer:
                continue
            internal.pop(key, None)
            until.pop(key, None)
            if announce:
                self._queue(key)
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
        internal = self.internal
        told = self._told
        share = self._told_share
        pending = self._pending
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
        old = self.internal
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
                    self._queue(entry.key)
        # a flow dump holds no expectations (kernel_expect_resync's): kept, after every flow, so a
        # bulk carries each master before its expectations
        for key in self._expectations:
            new[key] = old[key]
        if announce:
            for key in old.keys() - new.keys():
                self._queue(key)
        self.internal = new
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
        internal = self.internal
        pending = self._pending
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

    # --- commands ---------------------------------------------------------------------------------

    def set_role(self, role: Role) -> None:
        """MASTER and BACKUP behave alike here; FAULT stops advertising this node's flows (they stay
        queued, coalesced, and go out when the role changes; a bulk a peer asks for waits too) but
        keeps receiving and acknowledging. A peer's copy of this node's flows is never emptied by
        a FAULT: a faulty former master's flows are exactly what its successor commits."""
        self.role = role

    def request_resync(self, now: float, node: int = 0) -> None:
        """Ask ``node`` (0: every peer) to send its whole internal cache. The challenge goes with
        it: a peer that does not know our epoch yet proves itself in the datagram its bulk begins in."""
        peer = self.peers.get(node) if node else None
        if peer is not None:
            nonce = self._issue_nonce(peer, now)
        else:
            nonce = self._draw_nonce()
            if node == 0:
                self._resync_all_at = now
                self._broadcast = (nonce, now)
        self._control.append(wire.challenge_msg(node, nonce) + wire.resync_msg(node))
        self.stats["challenges_sent"] += 1
        self.stats["resyncs_requested"] += 1
        for peer in self.peers.values():
            if node in (0, peer.node):
                peer.resync_at = now

    def bulk_send(self, now: float, target: int = 0) -> None:
        """Stream the whole internal cache to ``target`` (0: every peer)."""
        for bulk in self._bulks:
            if not bulk.begun:
                if bulk.target != target:
                    bulk.target = 0
                return
        self._bulk_id = (self._bulk_id + 1) & SEQ_MAX
        self._bulks.append(_Bulk(target, self._bulk_id))

    def internal_entries(self) -> list[Entry]:
        """This node's flows as it replicates them (its expectations: internal_expectations)."""
        return [wire.flow_entry(key, msg) for key, msg in self.internal_messages()]

    def external_entries(self) -> list[Entry]:
        """Every flow learnt from peers. A flow two peers know is taken from the one that was
        heard from first most recently (peers are kept in the order they appeared)."""
        return [wire.flow_entry(key, msg) for key, msg in self.external_messages()]

    def expectation_counts(self) -> tuple[int, int]:
        """(this node's expectations, those learnt from peers): the rest of each cache is flows."""
        return len(self._expectations), sum(1 for p in self.peers.values() for k in p.external if k[0] & _MARK)

    def internal_expectations(self) -> list[Entry]:
        """This node's expectations as it replicates them."""
        internal = self.internal
        return [wire.flow_entry(key, internal[key]) for key in self._expectations]

    def external_expectations(self, now: float) -> list[tuple[Entry, int]]:
        """Every expectation learnt from peers, with what is left of its timeout (whole
        seconds, at least 1), for a commit after the flows: merged as external_entries."""
        cap = expectation.TIMEOUT_MAX
        return [(wire.flow_entry(key, cur.message), max(1, min(cap, int(cur.runs_out() - now + 0.5))))
                for key, cur in self._merged().items() if key[0] & _MARK]

    def commit_records(self, now: float) -> list[codec.Record]:
        """external_entries() for a commit, each flow with what is left of its timeout: until
        the peer's timeout, as it last came, runs out plus the expiry margin (at least 1 s: a
        flow past it is gone from the cache at the next expiry pass). Records point into the
        cached messages: nothing is copied until the codec writes the request."""
        margin = self.config.expiry_margin
        header = wire.FLOW_HEADER
        record = codec.Record
        flows = self._merged()
        if margin <= 0:
            return [record(key, cur.message[1], cur.message, header, 0.0) for key, cur in flows.items()
                    if key[0] < _MARK]
        base = margin - now
        return [record(key, cur.message[1], cur.message, header, cur.heard + base) for key, cur in flows.items()
                if key[0] < _MARK]

    def internal_messages(self) -> list[tuple[bytes, bytes]]:
        """(key, FLOW message) of this node's flows: a snapshot that copies no flow (a listing)."""
        if self._expectations:
            return [(key, msg) for key, msg in self.internal.items() if key[0] < _MARK]
        return list(self.internal.items())

    def external_messages(self) -> list[tuple[bytes, bytes]]:
        """(key, FLOW message) of every flow learnt from peers, merged as external_entries does."""
        return [(key, cur.message) for key, cur in self._merged().items() if key[0] < _MARK]

    def _merged(self) -> Mapping[bytes, ExternalFlow]:
        """Every peer's copy in one mapping: a flow two peers know is the later peer's (peers are
        kept in the order they appeared). One peer's copy as it is, without a copy."""
        copies = [p.external for p in self.peers.values() if p.external]
        if len(copies) == 1:
            return copies[0]
        merged: dict[bytes, ExternalFlow] = {}
        for external in copies:
            merged.update(external)
        return merged

    def flush_external(self) -> None:
        for peer in self.peers.values():
            peer.external.clear()
            peer.tombstones.clear()
            peer.refused.clear()

    def kernel_ops(self) -> list[KernelOp]:
        ops, self._kernel_ops = self._kernel_ops, []
        return ops

    def events(self) -> list[EngineEvent]:
        """What happened since the last call (peers restarting or going silent, bulks completing,
        the external caches becoming complete or not), oldest first."""
        complete = self.complete()
        if complete != self._complete:
            self._complete = complete
            self._events.append(CompletenessChanged(complete))
        out, self._events = self._events, []
        return out

    def flush_internal(self) -> None:
        """Forget this node's flows and expectations (they come back with the next dumps);
        nothing is sent."""
        self.internal.clear()
        self._told.clear()
        self._expectations.clear()
        self._expect_until.clear()

    def reconfigure(self, auth: wire.Auth | None = None, flow_filter: FlowFilter | None = None,
                    peer_filters: Mapping[int, FlowFilter] | None = None) -> None:
        """New keys or filters (a reload): the next datagram and the next flow use them, and what
        peers sent before that the new filters refuse leaves their copies (refused, as if it came
        now; in inject mode deleted from this kernel), so a commit never writes it."""
        if auth is not None:
            self.auth = auth
        if flow_filter is None and peer_filters is None:
            return
        self.config = dataclasses.replace(self.config, filter=flow_filter or self.config.filter,
                                          peer_filters=self.config.peer_filters if peer_filters is None
                                          else peer_filters)
        inject = self.config.apply_mode == "inject"
        for peer in self.peers.values():
            for key, cur in list(peer.external.items()):
                if self._allowed(peer, key, cur.message):
                    continue
                del peer.external[key]
                peer.refused[key] = (cur.version, cur.seq)
                self.stats["flows_refused_policy"] += 1
                if inject and not self._held_by_another(peer, key):
                    self._kernel_ops.append(KernelOp("delete", None, key))

    def queue_sizes(self) -> dict[str, int]:
        """Flows waiting to go out, datagrams kept for resending, bulk transfers under way."""
        return {"pending": len(self._pending), "resend": len(self._resend), "bulk": len(self._bulks)}

    def pending_keys(self) -> list[bytes]:
        """The flows waiting to go out (changed or deleted since they last went), oldest first."""
        return list(self._pending)

    def drop_pending(self) -> None:
        """Forget what waits to go out: for a bulk transfer that will carry every flow anyway (a
        benchmark of the bulk path, a test that looks at one change)."""
        self._pending.clear()

    def external_keys(self) -> set[bytes]:
        """Every flow key some peer told us about."""
        return {k for p in self.peers.values() for k in p.external}

    def complete(self) -> bool:
        """Every peer that is heard has a whole external cache: a bulk arrived in a session it proved
        live, and nothing was lost or refused since. A peer whose authentic datagrams are being
        refused (replays, an unanswered challenge, numbers out of bounds) counts as heard: it is
        never "silent, so complete"."""
        recent = self._last_input - self.config.peer_timeout
        return all(p.synced and p.proven and not p.limits and p.candidate_at <= recent
                   and (p.rx is None or p.rx.missing() is None)
                   for p in self.peers.values() if p.alive or p.rejected_at > recent)

    # --- receiving --------------------------------------------------------------------------------

    def receive_datagram(self, data: bytes, now: float, wall: float | None = None) -> int | None:
        """Take one datagram; the sending peer's node id if it was accepted, else None."""
        stats = self.stats
        stats["rx_datagrams"] += 1
        self.last_sender = self.last_link = None
        self._last_input = max(self._last_input, now)
        stats["rx_bytes"] += len(data)
        if len(data) > RECEIVE_LIMIT:
            # checked before the MAC, so a flood of 64 KB datagrams costs no hashing; not this
            # node's own send limit, which another node's MTU or link family may exceed
            stats["rejected_oversize"] += 1
            return None
        if data[8:12] == self._own_id and len(data) >= wire.HEADER_LEN:
            # multicast loops our own datagrams back, and with pairwise keys none carries a MAC
            # for us: not an authentication failure (nothing in it is used either way)
            stats["own_datagrams"] += 1
            return None
        try:
            header, flows, messages = wire.decode_split(data, self.auth, self.node_id)
        except wire.WireError as exc:
            stats["rejected_" + exc.reason] += 1
            log.debug("dropped a datagram: %s", exc)
            return None
        if header.node == self.node_id:
            stats["own_datagrams"] += 1  # multicast loops our own datagrams back
            return None
        cfg = self.config
        if cfg.max_age and wall is not None and abs(wall * 1000 - header.time_ms) > cfg.max_age * 1000:
            stats["rejected_replay"] += 1
            return None
        if cfg.max_age and wall is not None and header.epoch > (wall + EPOCH_AHEAD) * 1e9:
            # epochs are boot times in ns (config.host.next_epoch): one far in the future is forged
            # or from a clock that is off by days, and would lock that node's real epoch out
            stats["rejected_bounds"] += 1
            return None
        if header.seq == wire.HEARTBEAT_SEQ:
            return self._heartbeat_received(header, flows, messages)
        peer = self.peers.get(header.node)
        if peer is None:
            floor = self._reclaimed.get(header.node)
            if floor is not None and header.epoch == floor[0] and header.seq <= floor[1]:
                # (an older epoch is a candidate like any other: a restart with the clock behind)
                stats["rejected_replay"] += 1  # its slot was given back, not its replay protection
                return None
            if len(self.peers) >= cfg.max_peers:
                stats["rejected_peers"] += 1
                return None
            self._reclaimed.pop(header.node, None)
            peer = self.peers[header.node] = Peer(header.node, now)
            peer.acked = self._seq - 1  # it never saw what went before: nothing of it to wait for
        if header.epoch != peer.epoch:
            # Another epoch than its session's. An older one while the session runs is a replay;
            # one older than a silent session's may be a restart with the clock behind (its state
            # lost); a newer one a restart. Any of them is taken only when it answers our
            # challenge: until then the session, if any, goes on.
            if header.epoch < peer.epoch and peer.alive:
                stats["rejected_replay"] += 1
                peer.rejected["replay"] += 1
                peer.rejected_at = now
                return None
            if not self._answered(peer, messages, now):
                self._candidate(peer, header, messages, now)
                return None
            self._start_session(peer, header, messages, now)
        rx = peer.rx
        assert rx is not None
        if not rx.accept(header.seq):
            peer.rejected_at = now
            stats["rejected_replay"] += 1
            peer.rejected["replay"] += 1
            if cfg.reliable and header.seq < rx.expected and peer.ack_due is None:
                # the sender resends what we have: our acknowledgement was lost, say it again
                # (once per ack_delay, however many copies come; never a NACK)
                peer.ack_sent = min(peer.ack_sent, rx.expected - 2)
                peer.ack_due = now + cfg.ack_delay
            return None
        peer.last_heard = now
        peer.alive = True
        self.last_sender = peer.node
        data_seen = self._apply(peer, header, flows, messages, now)
        if not cfg.reliable:
            if rx.give_up_before(header.seq - 64):
                peer.synced = False
                if peer.bulk_begin is not None or peer.bulk_end is not None:
                    peer.bulk_dirty = True
        elif data_seen:
            peer.unacked += 1
            # at once when this datagram filled a hole: the sender's window waits for it
            if peer.unacked >= cfg.ack_every or header.seq < rx.highest:
                self._queue_ack(peer, rx)
            elif peer.ack_due is None:
                peer.ack_due = now + cfg.ack_delay
        if cfg.reliable:
            if len(rx.above) > rx.limit:
                # Too much is missing to wait for: give up on every gap at once (a bulk transfer
                # replaces what they held) and ask for that bulk once, not once per datagram.
                rx.give_up_before(rx.highest + 1)
                stats["gaps_given_up"] += 1
                peer.synced = False
                peer.given_up = max(peer.given_up, rx.highest)  # as for a GAP: no bulk before proves anything
                if peer.resync_at is None:
                    self._ask_for_bulk(peer, now)
            gap = rx.missing()
            if gap is not None and (gap != peer.nacked or rx.new_gap or now >= peer.nack_at + cfg.nack_retry):
                self._nack(peer, gap, now)
        if peer.bulk_end is not None:
            self._finish_bulk(peer)
        return peer.node

    def _candidate(self, peer: Peer, header: wire.Header, messages: list[wire.Message], now: float) -> None:
        """A datagram of another epoch than the peer's session, not answering our challenge: a
        restart (or first contact) not proven yet, or a replay. Nothing of it is applied, and the
        session, if there is one, goes on; only its own challenges and bulk requests are taken (so
        that the two nodes prove themselves to each other in one round trip). The first such
        datagram brings our challenge and a bulk request (the answer then comes in the datagram
        its bulk begins in); the challenge alone is repeated while more come."""
        self._take_requests(peer, header, messages, now)
        self.stats["rejected_unproven"] += 1
        peer.rejected["unproven"] += 1
        peer.rejected_at = now
        if header.epoch > peer.epoch:
            # a newer life heard and not proven: the copy of the old one is not what the peer
            # has. (Not an older one: replays of a dead master's older life would keep the
            # survivor incomplete, and keepalived would never let it take over.)
            peer.candidate_at = now
        if peer.challenge_at is None:
            self._challenge(peer, now)
            if not peer.alive and now >= self._resync_all_at + self.config.resync_retry:
                # (not while its session runs: a replayed datagram of another life of it would
                # have the live peer send us its table each time. A peer that has our request to
                # everyone would send a second bulk. Those are asked when they answer.)
                self._control.append(wire.resync_msg(peer.node))
                self.stats["resyncs_requested"] += 1
        elif now >= peer.challenge_at + CHALLENGE_RETRY:
            self._challenge(peer, now)

    def _start_session(self, peer: Peer, header: wire.Header, messages: list[wire.Message], now: float) -> None:
        """The peer answered our challenge in this datagram: its epoch is live now, and its session
        starts here (what it sent before is not applied: the bulk replaces it)."""
        self._new_incarnation(peer, header, now)
        peer.proven = True
        peer.challenge_at = None
        peer.nonces.clear()  # each answer proves one epoch: none of them is taken again
        peer.candidate_at = float("-inf")
        peer.rx = ReceiveWindow(header.seq, self.config.rx_limit)
        peer.given_up = 0
        peer.ack_sent = header.seq - 1
        self.stats["sessions_proven"] += 1
        me = self.node_id
        peer.resync_at = now  # asked with the challenge; retried until the bulk completes
        if not any(type(m) is wire.BulkBegin and m.node in (0, me) for m in messages):
            # the bulk it sent for our request began before its answer (ours was lost), or it
            # knew us already: ask now, not after resync_retry
            self._control.append(wire.resync_msg(peer.node))
            self.stats["resyncs_requested"] += 1

    def _answered(self, peer: Peer, messages: list[wire.Message], now: float) -> bool:
        """The datagram answers a challenge of ours to that peer (or to everyone) that went out
        within NONCE_LIFETIME: the peer runs this epoch now, not only at some time since."""
        me = self.node_id
        oldest = now - NONCE_LIFETIME
        for m in messages:
            if type(m) is wire.Echo and m.node == me:
                sent = peer.nonces.get(m.nonce)
                if sent is None and m.nonce == self._broadcast[0] and not peer.proven:
                    sent = self._broadcast[1]  # our challenge to everyone (a peer's first session only)
                if sent is not None and sent >= oldest:
                    return True
        return False

    def _draw_nonce(self) -> int:
        """A nonce never used before in this life: distinct for every count below 2^64 (an odd
        multiplier), from a random start the adapter gave."""
        self._nonces += 1
        return (self.nonce + 0x9E3779B97F4A7C15 * self._nonces) & 0xFFFFFFFFFFFFFFFF

    def _take_requests(self, peer: Peer, header: wire.Header, messages: list[wire.Message], now: float) -> None:
        """What a peer not proven yet may still ask: that we prove ourselves, and our flows —
        the flows once per epoch of it: a replayed request would otherwise have us stream the
        whole table again and again (to a peer that may not even be there). A real peer whose
        bulk began before it took our answer asks again once its session with us starts."""
        me = self.node_id
        for msg in messages:
            if type(msg) is wire.Challenge and msg.node in (0, me):
                self._echo(peer, msg.nonce)
            elif type(msg) is wire.Resync and msg.node in (0, me):
                if header.epoch not in peer.served:
                    peer.served.append(header.epoch)
                    self.bulk_send(now, peer.node)

    def _issue_nonce(self, peer: Peer, now: float) -> int:
        """A new nonce for a challenge to ``peer``, whose answer is taken for NONCE_LIFETIME."""
        nonce = self._draw_nonce()
        peer.nonces[nonce] = now
        if len(peer.nonces) > NONCES_KEPT:
            peer.nonces.popitem(last=False)
        return nonce

    def _challenge(self, peer: Peer, now: float) -> None:
        self._control.append(wire.challenge_msg(peer.node, self._issue_nonce(peer, now)))
        self.stats["challenges_sent"] += 1
        peer.challenge_at = now

    def _echo(self, peer: Peer, nonce: int) -> None:
        """Answer a challenge, once per datagram however often it was asked (a challenge that
        was already answered is asked again only when the answer was lost)."""
        m = wire.echo_msg(peer.node, nonce)
        if m not in self._control:
            self._control.append(m)
            self.stats["echoes_sent"] += 1

    def _new_incarnation(self, peer: Peer, header: wire.Header, now: float) -> None:
        if peer.epoch >= 0:
            peer.restarts += 1
            self._events.append(PeerRestarted(peer.node, peer.epoch, header.epoch))
        peer.epoch = header.epoch
        peer.ack_sent = header.seq - 1
        peer.round_high, peer.round_full = 0, True
        peer.unacked = 0
        peer.ack_due = None
        peer.nacked = None
        peer.bulk_begin = peer.bulk_end = None
        peer.synced = False
        peer.acked = self._seq - 1  # its new life never saw what went before
        peer.ack_heard = peer.sack_high = peer.missing_count = 0
        peer.missing = []
        peer.heartbeats = {}  # its heartbeat numbers start again too
        peer.acked_at = now
        # Its versions and sequence numbers start again from scratch: what we hold from its
        # previous life must not outrank (version) or outlive (bulk mark) what it sends now.
        for cur in peer.external.values():
            cur.seq = 0  # version -1: outranked by anything it sends now
        peer.tombstones.clear()
        peer.refused.clear()
        # What it had before is unknown now: the bulk asked for with our challenge replaces it.

    def _queue_ack(self, peer: Peer, rx: ReceiveWindow) -> None:
        """An acknowledgement to go out, replacing one of the same peer still queued (80 late
        datagrams filling holes in one step queued 80 ACKs; the newest says all of them)."""
        self._unqueue(peer.ack_queued)
        peer.ack_queued = self._ack(peer, rx)
        self._control.append(peer.ack_queued)

    def _unqueue(self, entry: bytes | None) -> None:
        """Take a control entry (this very object) out of the queue, if it still waits there."""
        if entry is not None:
            for i, m in enumerate(self._control):
                if m is entry:
                    del self._control[i]
                    return

    def _ack(self, peer: Peer, rx: ReceiveWindow) -> bytes:
        """An ACK of everything received in order from ``peer``, noted as sent; with a gap open,
        also how far beyond it we have everything but the gaps our last NACK round named (not
        while a newer round waits to go out: the sender would count its gaps as arrived)."""
        peer.ack_sent = rx.expected - 1
        peer.unacked = 0
        peer.ack_due = None
        highest = 0
        if rx.above:
            # Every gap that opens brings a new round at once, so what arrived since the last round
            # is contiguous: up to the newest if that round named every gap, else up to where its
            # naming stopped.
            highest = rx.highest if peer.round_full else peer.round_high
        return wire.ack_msg(peer.node, peer.epoch, rx.expected - 1, highest)

    @staticmethod
    def _sack(rx: ReceiveWindow) -> tuple[int, list[tuple[int, int]]]:
        """(highest, gaps): the gaps one NACK round names (up to NACK_RANGES, each at most 4096
        long) and how far they cover what is missing: up to the newest received, or to just
        before the first gap left unnamed (the sender counts everything else as arrived)."""
        gaps = rx.gaps(NACK_RANGES + 1)
        highest = gaps[NACK_RANGES][0] - 1 if len(gaps) > NACK_RANGES else rx.highest
        named = []
        for first, last in gaps[:NACK_RANGES]:
            if last > first + 4095:  # only so much per NACK: the naming stops here
                named.append((first, first + 4095))
                return first + 4095, named
            named.append((first, last))
        return highest, named

    def _ask_for_bulk(self, peer: Peer, now: float) -> None:
        """RESYNC to ``peer``: its bulk transfer replaces what we hold of it (retried until it
        comes); with a challenge while its epoch has not answered one."""
        if not peer.proven:
            self._challenge(peer, now)
        self._control.append(wire.resync_msg(peer.node))
        self.stats["resyncs_requested"] += 1
        peer.resync_at = now

    def _nack(self, peer: Peer, gap: tuple[int, int], now: float) -> None:
        """Ask for every gap at once (up to NACK_RANGES, lowest first): with loss spread over a
        window, asking for the first gap only took one round trip per gap."""
        rx = peer.rx
        assert rx is not None
        highest, gaps = self._sack(rx)
        # One round is one control entry: its NACKs and the ACK that says how far they cover what is
        # missing travel in one datagram (at most 32 x 24 + 24 bytes), so the sender never takes
        # part of a round for all of it; a round still queued is replaced by the newer one.
        self._unqueue(peer.nack_round)
        self.stats["nacks_sent"] += len(gaps)
        peer.round_high = highest
        peer.round_full = highest == rx.highest
        peer.nack_round = b"".join([wire.nack_msg(peer.node, peer.epoch, first, last) for first, last in gaps]
                                   + [wire.ack_msg(peer.node, peer.epoch, rx.expected - 1, highest)])
        self._control.append(peer.nack_round)
        peer.nacked = gap
        peer.nack_at = now

    def _apply(self, peer: Peer, header: wire.Header, flows: list[wire.FlowTuple], messages: list[wire.Message],
               now: float) -> bool:
        """Apply a datagram's messages; True if it carried replicated data."""
        data_seen = bool(flows)
        external = peer.external
        tombstones = peer.tombstones
        seq = header.seq
        cfg = self.config
        inject = cfg.apply_mode == "inject"
        stats = self.stats
        me = self.node_id
        stale = 0
        for version, key, fmsg in flows:
            cur = external.get(key)
            if cur is None:
                if tombstones and key in tombstones and tombstones[key][0] >= version:
                    stale += 1
                    continue
                if not self._admit(peer, version, key, fmsg, seq):
                    continue
                external[key] = ExternalFlow(fmsg, seq, now)
            elif version > cur.version:
                if fmsg[0] == _EXPECT and not self._allowed(peer, key, fmsg):
                    # an expectation's master and mask are not in its key: every version is
                    # checked, or an accepted one could be turned into a pinhole the filter refuses
                    del external[key]
                    peer.refused[key] = (version, seq)
                    peer.refused_total += 1
                    stats["flows_refused_policy"] += 1
                    if inject and not self._held_by_another(peer, key):
                        self._kernel_ops.append(KernelOp("delete", None, key))
                    continue
                cur.message = fmsg
                cur.heard = now
                if seq > cur.seq:
                    cur.seq = seq
            else:
                if seq > cur.seq:
                    cur.seq = seq
                stale += 1
                continue
            if inject:
                self._kernel_ops.append(KernelOp("commit", wire.flow_entry(key, fmsg), key))
        nacked: list[tuple[int, int]] | None = None
        sack_high = 0
        for msg in messages:
            if type(msg) is wire.Delete:
                data_seen = True
                stats["deletes_received"] += 1
                key = msg.key
                cur = external.get(key)
                if cur is not None and cur.version >= msg.version:
                    stale += 1
                    continue
                if peer.refused:
                    peer.refused.pop(key, None)  # never taken; its tombstone below counts it for a bulk
                if len(tombstones) >= cfg.max_tombstones and key not in tombstones:
                    # the oldest deletion is forgotten: a late update of that flow, older than the
                    # deletion, could bring it back until the next bulk (counted, logged once)
                    del tombstones[next(iter(tombstones))]
                    stats["tombstones_dropped"] += 1
                    self._limit(peer, "tombstones", cfg.max_tombstones, whole=True)
                old = tombstones.get(key)
                # the highest number that mentioned it: a deletion resent under an older number
                # must not make a bulk that carried the flow look short
                tombstones[key] = (msg.version, now + cfg.tombstone_ttl, seq if old is None else max(seq, old[2]))
                if cur is not None:
                    del external[key]
                    if inject and not self._held_by_another(peer, key):
                        self._kernel_ops.append(KernelOp("delete", None, key))
            elif type(msg) is wire.Ack:
                if msg.node == me and msg.epoch == self.epoch:
                    if msg.upto > peer.acked:
                        self._on_acked(peer, min(msg.upto, self._seq - 1), now)
                    if msg.highest > sack_high:
                        sack_high = msg.highest
            elif type(msg) is wire.Nack:
                if msg.node == me and msg.epoch == self.epoch:
                    if nacked is None:
                        nacked = []
                    nacked.append((msg.first, msg.last))
                    self.stats["nacks_received"] += 1
                    if msg.first > peer.acked:
                        self._on_loss(msg.first)
                    self._resend_range(peer, msg.first, msg.last, now)
            elif type(msg) is wire.Gap:
                if msg.node != me or msg.epoch != peer.epoch or peer.rx is None:
                    pass  # another's, or of a previous epoch: nothing to do
                elif msg.last >= seq or msg.first > msg.last:
                    # a sender gives up only on numbers it used before this datagram's: a GAP up to
                    # 2^32-1 made every later datagram of that peer a "replay"
                    stats["rejected_bounds"] += 1
                    peer.rejected["bounds"] += 1
                elif peer.rx.fill(msg.first, msg.last):
                    # what those datagrams carried is lost: incomplete until the bulk that follows
                    peer.synced = False
                    # a bulk that began before this gap's end proves nothing: a deletion lost in
                    # the gap leaves a flow the bulk mentioned before it looking current (a GAP
                    # naming only numbers that did arrive, a stale one, changes nothing)
                    peer.given_up = max(peer.given_up, msg.last)
                    if peer.resync_at is None:
                        peer.resync_at = now
            elif type(msg) is wire.Resync:
                if msg.node in (0, me):
                    self.bulk_send(now, peer.node)
            elif type(msg) is wire.Challenge:
                if msg.node in (0, me):
                    self._echo(peer, msg.nonce)
            elif type(msg) is wire.DigestAsk:
                if msg.node == me:
                    self._answer_digest(peer, msg, now)
            elif type(msg) is wire.Digest or type(msg) is wire.DigestKeys:
                if msg.node == me:
                    self._digest_received(peer, msg, now)
            elif type(msg) is wire.BulkBegin:
                data_seen = True
                if msg.node in (0, me):
                    peer.bulk_begin = (msg.bulk_id, seq)
                    peer.bulk_dirty = False
                    peer.warned.clear()  # a cap this bulk hits is said again
                    peer.capped = 0
            elif type(msg) is wire.BulkEnd:
                data_seen = True
                if msg.node in (0, me) and peer.bulk_begin is not None and peer.bulk_begin[0] == msg.bulk_id:
                    peer.bulk_end = (msg.bulk_id, seq, peer.bulk_begin[1], msg.flows)
                    peer.bulk_begin = None
        if nacked is not None or sack_high:
            self._sacked(peer, nacked or [], sack_high, now)
        stats["flows_received"] += len(flows)
        stats["stale_ignored"] += stale
        return data_seen

    def _admit(self, peer: Peer, version: int, key: bytes, fmsg: bytes, seq: int) -> bool:
        """A flow new to this peer's cache: taken only if our own filter, the accept list for that
        peer and the cap allow it; refused ones are remembered by key (a bulk counts them)."""
        cfg = self.config
        refused = peer.refused
        if cfg.max_entries and len(peer.external) + len(refused) >= cfg.max_entries and key not in refused:
            self.stats["flows_refused_cap"] += 1
            peer.capped += 1  # a bulk counts it as mentioned (it is not kept, not even by key)
            self._limit(peer, "flows", cfg.max_entries)
            return False
        if self._allowed(peer, key, fmsg):
            if refused:
                refused.pop(key, None)
            return True
        refused[key] = (version, seq)
        peer.refused_total += 1
        self.stats["flows_refused_policy"] += 1
        return False

    def _held_by_another(self, peer: Peer, key: bytes) -> bool:
        """Inject mode: whether a peer other than ``peer`` still tells us of this flow. This
        kernel holds one entry per flow, whoever told us of it: one peer's word that it is gone
        (a faulty node's empty bulk, a former master's expiry) does not take it from another's."""
        return len(self.peers) > 1 and any(key in p.external for p in self.peers.values()
                                           if p is not peer and p.alive)  # a dead peer's copy is stale

    def _allowed(self, peer: Peer, key: bytes, fmsg: bytes) -> bool:
        """What our own filter and the accept list for that peer say of a flow (or expectation)."""
        cfg = self.config
        if fmsg[0] == _EXPECT and not cfg.expectations:
            return False
        peer_filter = cfg.peer_filters.get(peer.node)
        family = fmsg[1]
        try:
            return (cfg.filter.accepts_message(key, family, fmsg, wire.FLOW_HEADER)
                    and (peer_filter is None or peer_filter.accepts_message(key, family, fmsg, wire.FLOW_HEADER)))
        except codec.CodecError:
            return False  # attributes our filter cannot read are not written into our kernel either

    def _limit(self, peer: Peer, what: str, limit: int, whole: bool = False) -> None:
        """A cap was hit, said once per bulk. Unless ``whole``, the peer's cache is no longer a
        whole copy: incomplete until a bulk completes without hitting it. (Forgetting the oldest
        deletion keeps the copy whole: a late update older than a deletion arrives within a
        round trip or a resend, long before a busy node's oldest tombstone.)"""
        if what not in peer.warned:
            peer.warned.add(what)
            self._events.append(LimitReached(peer.node, what, limit))
        if not whole:
            peer.limits.add(what)

    def _finish_bulk(self, peer: Peer) -> None:
        """Once every datagram up to BULK_END has arrived, the peer's cache is what the bulk said."""
        if peer.bulk_end is None or peer.rx is None:
            return
        _bulk_id, end_seq, begin_seq, flows_sent = peer.bulk_end
        if self.config.reliable and peer.rx.expected <= end_seq:
            return
        gap = peer.rx.missing()
        if peer.bulk_dirty or peer.given_up >= begin_seq or (gap is not None and gap[0] <= end_seq):
            # datagrams of this bulk were lost (best-effort), or given up (a GAP), so "not
            # mentioned" does not mean "gone", nor "mentioned" "still there": keep what we have
            # rather than delete flows the peer still has, and ask again
            self._events.append(BulkCompleted(peer.node, len(peer.external), 0, complete=False))
            peer.bulk_end = None
            peer.bulk_dirty = False
            return
        # Every flow the bulk carried was mentioned since BULK_BEGIN: it is in the cache, or was
        # deleted or refused since. Fewer than BULK_END says means something of it was lost or
        # is not what the peer sent: keep what we have and ask again.
        mentioned = (sum(1 for v in peer.external.values() if v.seq >= begin_seq)
                     + sum(1 for t in peer.tombstones.values() if t[2] >= begin_seq)
                     + sum(1 for r in peer.refused.values() if r[1] >= begin_seq) + peer.capped)
        if mentioned < flows_sent:
            self.stats["bulk_count_mismatches"] += 1
            log.warning("bulk from node %08x said %d flows, %d arrived: asking again in %.0f s", peer.node,
                        flows_sent, mentioned, self.config.resync_retry)
            self._events.append(BulkCompleted(peer.node, len(peer.external), 0, complete=False))
            peer.bulk_end = None
            peer.synced = False
            peer.resync_at = self._last_input  # asked again after resync_retry, never in a loop
            return
        stale = [k for k, v in peer.external.items() if v.seq < begin_seq]
        for key in [k for k, v in peer.refused.items() if v[1] < begin_seq]:
            del peer.refused[key]
        inject = self.config.apply_mode == "inject"
        for key in stale:
            del peer.external[key]
            if inject and not self._held_by_another(peer, key):
                self._kernel_ops.append(KernelOp("delete", None, key))
        peer.bulk_end = None
        peer.synced = True
        peer.resync_at = None
        if not peer.capped:
            peer.limits.discard("flows")  # a whole copy within the cap: caps hit before no longer matter
        peer.bulks += 1
        self.stats["bulks_received"] += 1
        self._events.append(BulkCompleted(peer.node, len(peer.external), len(stale), complete=True))

    # --- comparing a peer's table with our copy (ctbridge diff) ---------------------------------

    def diff_start(self, node: int, now: float) -> int:
        """Ask ``node`` for its table's sums (ctbridge.sync.digest); the request's number, for
        diff_result()."""
        self._diff_request = (self._diff_request + 1) & SEQ_MAX
        request = self._diff_request
        self._diffs[request] = _Diff(node, now)
        while len(self._diffs) > DIFF_KEPT:
            self._diffs.popitem(last=False)
        self._control.append(wire.digest_ask_msg(node, request))
        return request

    def diff_retry(self, request: int) -> None:
        """Ask again what a comparison waits for (nothing of it is resent: an answer was lost, or
        the peer answered another question for its sums less than DIGEST_INTERVAL before)."""
        d = self._diffs.get(request)
        if d is None or d.result is not None:
            return
        if d.asked:
            d.keys.clear()
            d.parts.clear()
            d.last = -1
            self._control.append(wire.digest_ask_msg(d.node, request, d.asked))
        else:
            d.sums.clear()
            self._control.append(wire.digest_ask_msg(d.node, request))

    def diff_result(self, request: int) -> dict[str, Any] | None:
        """The comparison, once the answers came: "equal", "theirs" and "ours" (flows in each),
        and the keys "missing" (the peer has them, our copy not), "extra" (ours only), "stale"
        (in another state), "refused" (missing because our filters refuse them), "truncated"."""
        d = self._diffs.get(request)
        return d.result if d is not None else None

    def _answer_digest(self, peer: Peer, msg: wire.DigestAsk, now: float) -> None:
        kind = (peer.node, bool(msg.buckets))  # a question for the sums, and one for keys, each a second
        if now < self._digest_at.get(kind, float("-inf")) + DIGEST_INTERVAL:
            self.stats["digests_refused"] += 1
            return  # asked again too soon: each answer is a pass over the whole table
        self._digest_at[kind] = now
        items = self.internal.items()
        if not msg.buckets:
            self._control.extend(wire.digest_msgs(peer.node, msg.request, digest.summary(items)))
            return
        # whole buckets only, in order, as many as DIGEST_KEYS_MAX keys allow: the asker compares
        # the buckets it got, and knows the others were left out
        listed = digest.listing(items, set(msg.buckets))
        keys: list[tuple[int, bytes]] = []
        cut = False
        for b in sorted(listed):
            if keys and len(keys) + len(listed[b]) > wire.DIGEST_KEYS_MAX:
                cut = True
                break
            keys.extend(listed[b][:wire.DIGEST_KEYS_MAX])
        self._control.extend(wire.digest_keys_msgs(peer.node, msg.request, keys, cut))

    def _digest_received(self, peer: Peer, msg: wire.Digest | wire.DigestKeys, now: float) -> None:
        d = self._diffs.get(msg.request)
        if d is None or d.node != peer.node or d.result is not None or now > d.started + DIFF_LIFETIME:
            return
        ours = ((k, cur.message) for k, cur in peer.external.items())  # our copy, read once when needed
        if type(msg) is wire.Digest:
            if d.asked:
                return  # the sums are in: a later DIGEST changes nothing
            for i, (flows, xor) in enumerate(msg.sums):
                d.sums[msg.first + i] = digest.Bucket(flows, xor)
            if len(d.sums) < digest.BUCKETS:
                return
            theirs = [d.sums[b] for b in range(digest.BUCKETS)]
            mine = digest.summary(ours)
            differ = digest.differing(theirs, mine)
            d.counts = {"theirs": sum(b.flows for b in theirs), "ours": sum(b.flows for b in mine)}
            if not differ:
                d.result = {"equal": True, **d.counts, "missing": [], "extra": [], "stale": [], "refused": [],
                            "truncated": False}
                return
            d.differ = len(differ)
            d.asked = frozenset(differ[:DIFF_BUCKETS_ASKED])
            self._control.append(wire.digest_ask_msg(peer.node, msg.request, d.asked))
            return
        assert type(msg) is wire.DigestKeys
        if not d.asked or msg.part in d.parts:
            return
        d.parts.add(msg.part)
        asked = d.asked
        for h, key in msg.keys:  # only keys of the buckets asked, as many as an answer may hold
            if len(d.keys) < wire.DIGEST_KEYS_MAX and digest.bucket_of(key) in asked:
                d.keys[key] = h
        if msg.last:
            d.last = msg.part
            d.truncated = msg.truncated
        if d.last < 0 or len(d.parts) < d.last + 1:
            return  # every part of the answer, whatever their order, or none of it counts
        # the buckets the answer covers: those it listed keys of (whole buckets), and those the
        # peer holds nothing in; a bucket left out of a cut-short answer is not compared
        seen = {digest.bucket_of(k) for k in d.keys}
        covered = {b for b in asked if b in seen or d.sums[b].flows == 0}
        mine_keys = {k: h for h, k in (pair for pairs in digest.listing(ours, covered).values() for pair in pairs)}
        theirs_keys = {k: h for k, h in d.keys.items() if digest.bucket_of(k) in covered}
        diff = digest.compare(theirs_keys, mine_keys)
        refused = [k for k in diff.missing if k in peer.refused]
        d.result = {"equal": False, **d.counts, "missing": diff.missing, "extra": diff.extra, "stale": diff.stale,
                    "refused": refused, "truncated": d.truncated or len(covered) < d.differ}

    # --- sending ----------------------------------------------------------------------------------

    def _release(self) -> None:
        upto = self._acked_by_all()
        self._resend.release(upto)
        sent_at = self._sent_at
        while sent_at and next(iter(sent_at)) <= upto:
            sent_at.popitem(last=False)
        if self._resent_at:
            for key in [k for k in self._resent_at if k[0] <= upto]:
                del self._resent_at[key]

    def _acked_by_all(self) -> int:
        live = [p.acked for p in self.peers.values() if p.alive and p.epoch >= 0]
        return min(live) if live else self._seq - 1

    @property
    def sent_upto(self) -> int:
        """The newest sequence number this epoch's datagrams have used."""
        return self._seq - 1

    def in_flight(self) -> int:
        """Datagrams sent that a peer keeping up has not received as far as we know (what the
        window limits): those after the newest it reported having, and the holes it reported
        below (its NACKs name every gap, so what lies between them arrived: RFC 6675's pipe).
        Counting from the cumulative acknowledgement instead let one lost datagram whose resend
        was lost too hold the whole window: 100,000 flows under 20% loss took 16 s.
        A peer whose acknowledgements stopped while others' went on (it cannot hear us, or it is
        gone and not yet timed out) does not hold the others back: it catches up through NACK,
        GAP and a bulk transfer, as it would after an outage. Best effort: nothing is
        acknowledged, nothing is held back."""
        if not self.config.reliable:
            return 0
        last = self._seq - 1
        limit = self._lag_limit()
        keeping_up = [p for p in self.peers.values()
                      if p.alive and p.epoch >= 0 and self._last_input - p.acked_at < limit]
        if not keeping_up:
            return last - self._acked_by_all()
        if len(keeping_up) > 1:
            # Nor does one that acknowledges, but half a window behind another: a member that
            # trickled acknowledgements (one datagram per 50 ms) held every peer's stream to its
            # pace, the window always full of what it had not acknowledged. Progress counts what a
            # peer reported having beyond a gap too, so a lossy but honest peer is not left out.
            best = max(max(p.acked, p.sack_high) for p in keeping_up)
            slack = max(int(self.window), self.config.initial_window) // 2
            keeping_up = [p for p in keeping_up if max(p.acked, p.sack_high) >= best - slack]
        pipe = max(last - max(p.acked, p.sack_high) + p.missing_count for p in keeping_up)
        # However little is in flight, never run further past an unfilled hole than the receiver
        # holds beyond one (rx_limit: then it gives up and asks for a bulk) or we keep for resending
        cfg = self.config
        if last - min(p.acked for p in keeping_up) >= min(cfg.rx_limit, cfg.resend_limit) - cfg.burst:
            return max(pipe, int(self.window))
        return pipe

    def _sacked(self, peer: Peer, ranges: list[tuple[int, int]], highest: int, now: float) -> None:
        """A datagram of ``peer`` NACKed these ranges (one whole round, or none) and said it has
        everything else up to ``highest`` (a peer that does not say: up to the last range's end).
        Whatever a datagram claims, the count stays within what was sent and 4096 per range."""
        last = self._seq - 1
        if not highest and ranges:
            highest = max(b for _a, b in ranges) + 1
        high = min(last, highest)
        if high > peer.sack_high:
            peer.sack_high = high
            peer.acked_at = now  # it keeps up: what it has moves on, if not its first hole
        if ranges:
            top = max(peer.sack_high, peer.acked)
            peer.missing = sorted((a, min(b, a + 4095, top)) for a, b in ranges if a <= top)
            self._count_missing(peer)

    @staticmethod
    def _count_missing(peer: Peer) -> None:
        floor = peer.acked
        top = max(peer.sack_high, peer.acked)
        count = 0
        for a, b in peer.missing:
            a = max(a, floor + 1)
            b = min(b, top)
            if b >= a:
                count += b - a + 1
                floor = b
        peer.missing_count = count

    def _window_base(self) -> int:
        """The highest datagram every peer that keeps up has acknowledged (see in_flight)."""
        keeping_up = [p.acked for p in self.peers.values()
                      if p.alive and p.epoch >= 0 and self._last_input - p.acked_at < self._lag_limit()]
        return min(keeping_up) if keeping_up else self._acked_by_all()

    def _lag_limit(self) -> float:
        """How long a peer's acknowledgements may stand still before it stops counting for the
        window: a few probe timeouts, at least ack_delay and twice the resend interval's floor."""
        return max(4 * self.config.ack_delay, 8 * self.rto())

    def rto(self) -> float:
        """How long before a datagram may be resent again (RFC 6298: SRTT + 4 RTTVAR)."""
        srtt = self.srtt if self.srtt is not None else self.config.initial_rtt
        cfg = self.config
        return min(cfg.max_resend_interval, max(cfg.min_resend_interval, srtt + 4 * self.rttvar))

    def _probe_due(self) -> float:
        """When to probe (RFC 9002 6.2: PTO = SRTT + 4 RTTVAR, doubled per probe unanswered, here
        kept below alive_interval)."""
        return self._probe_from + min(self.config.alive_interval, 2.0 * self.rto() * float(1 << min(self._probes, 16)))

    def _on_acked(self, peer: Peer, upto: int, now: float) -> None:
        """An acknowledgement moved ``peer`` to ``upto``: an RTT sample (never from a resent
        datagram, Karn's rule), and the window grows by what all peers acknowledged."""
        before = self._window_base()
        sent = self._sent_at.get(upto)
        # Karn's rule, for cumulative acknowledgements: no sample when the acknowledgement also
        # covers a resent datagram (it waited for the resend, not for the round trip)
        low = max(peer.acked, before)
        clean = not any(low < seq <= upto for seq, _node in self._resent_at)
        if sent is not None and clean:
            sample = now - sent
            if self.srtt is None:
                self.srtt, self.rttvar = sample, sample / 2
            else:
                self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - sample)
                self.srtt = 0.875 * self.srtt + 0.125 * sample
        peer.acked = upto
        peer.ack_heard = upto
        if peer.missing:
            peer.missing = [(a, b) for a, b in peer.missing if b > upto]
            self._count_missing(peer)
        peer.acked_at = now
        newly = self._window_base() - before
        if newly > 0:
            self._probe_from = now
            self._probes = 0
            cfg = self.config
            if self.window < self._ssthresh:
                self.window += newly  # slow start: doubles per round trip
            else:
                self.window += newly / self.window  # congestion avoidance: one more per round trip
            self.window = min(self.window, float(cfg.max_window))
        self._release()

    def _on_loss(self, first: int) -> None:
        """A peer reports datagrams from ``first`` on as lost: halve the window, once per round
        of losses (those sent before the last reduction are part of it)."""
        self.stats["losses"] += 1
        if first <= self._recovery_upto:
            return
        self._ssthresh = max(float(self.config.min_window), self.window / 2)
        self.window = self._ssthresh
        self._recovery_upto = self._seq - 1
        self.stats["window_reductions"] += 1

    def _resend_range(self, peer: Peer, first: int, last: int, now: float) -> None:
        """Answer a NACK. A datagram is resent at most once per RTO, however many NACKs name it
        (a NACK that names thousands of datagrams resent a moment ago costs nothing)."""
        last = min(last, first + 4095, self._seq - 1)
        # What the peer acknowledged it has: a NACK for it is stale (it was queued before the hole
        # filled, and left with the acknowledgement that says so). Without this, each such NACK
        # was answered with a GAP and a bulk transfer of the whole table.
        first = max(first, peer.ack_heard + 1)
        oldest = self._resend.oldest()
        if oldest is None or oldest > last:
            oldest = self._seq  # nothing of the range is kept
        lost_end = min(last, oldest - 1)
        if first <= lost_end and (lost_end > peer.gap_upto or now >= peer.gap_at + self.rto()):
            # Gone from the resend queue: tell the peer to stop waiting for all of it at once,
            # and rebuild its cache with one bulk transfer (bulk_send merges repeated requests).
            # Once per RTO for what a GAP already covered: 50 datagrams of 40 NACKs each queued
            # 2,000 identical GAPs.
            self._control.append(wire.gap_msg(peer.node, self.epoch, first, lost_end))
            self.stats["gaps_sent"] += 1
            peer.gap_upto = max(peer.gap_upto, lost_end)
            peer.gap_at = now
            self.bulk_send(0.0, peer.node)
        interval = self.rto()
        resent_at = self._resent_at
        for seq in range(max(first, oldest), last + 1):
            if seq <= peer.acked or self._resend.get(seq) is None:
                continue
            at = resent_at.get((seq, peer.node))
            if at is not None and now - at < interval:
                self.stats["resends_skipped"] += 1
                continue
            resent_at[(seq, peer.node)] = now
            self._resends[(seq, peer.node)] = None

    def _overflowed(self, now: float) -> None:
        """The resend queue overflowed: peers that had not acknowledged what was dropped get
        everything again (one bulk transfer, started once no other is under way) instead of
        silently missing it."""
        self._overflow_seen = self._resend.dropped_upto
        self.stats["resend_overflows"] += 1
        if any(p.alive and p.acked < self._overflow_seen for p in self.peers.values()):
            self._overflow_bulk = True

    def _overflow_bulk_can_start(self) -> bool:
        return not self._bulks or not self._bulks[0].begun

    def _seal_counter(self) -> int:
        """The next sealing counter of this epoch (the AEAD's nonce is epoch and counter: never
        twice, resends included). _next_seq starts a new epoch well before it runs out."""
        self._sealed += 1
        return self._sealed

    def _next_seq(self) -> int:
        seq = self._seq
        if seq >= SEQ_MAX or self._sealed >= SEAL_WRAP:
            # Sequence space exhausted: start a new epoch, which peers treat as a restart.
            self.epoch += 1
            self._events.append(EpochChanged(self.epoch))
            self._seq = 1
            self._sealed = 0
            self._resend = ResendQueue(self.config.resend_limit)
            self._resends.clear()
            self._overflow_seen = 0
            self._sent_at.clear()
            self._resent_at.clear()
            self._recovery_upto = 0
            self._probes = 0
            for peer in self.peers.values():
                peer.acked = peer.ack_heard = peer.sack_high = peer.missing_count = peer.gap_upto = 0
                peer.missing = []
            seq = 1
        self._seq = seq + 1
        return seq

    def _fresh(self, key: bytes, msg: bytes, now: float) -> bytes:
        """An expectation's EXPECT as it goes out: with what is left of its timeout."""
        until = self._expect_until.get(key)
        if until is None:
            return msg
        return expectation.with_timeout(msg, wire.FLOW_HEADER, max(0, int(until - now + 0.5)))

    def _message(self, key: bytes, now: float) -> bytes:
        cur = self.internal.get(key)
        if cur is not None:
            return cur if key[0] < _MARK else self._fresh(key, cur, now)
        self._version += 1
        return wire.delete_msg(self._version, key)

    def _finish(self, msgs: list[bytes], keys: list[bytes], now: float, seq: int | None = None) -> bytes:
        acks = []
        if seq is None:  # acknowledgements ride along, but not on a resend meant for one peer
            for peer in self.peers.values():
                rx = peer.rx
                if rx is not None and rx.expected - 1 > peer.ack_sent and self.config.reliable:
                    acks.append(self._ack(peer, rx))
            seq = self._next_seq()
            if seq == 1:
                msgs.insert(0, wire.hello_msg())  # the first datagram of every epoch says so
            if self.config.reliable:
                # flows are kept as keys; only datagrams with more messages than flows hold any
                # control message worth keeping (checked by type, not on every datagram)
                controls = b"".join(m for m in msgs if m[0] in _MUST_ARRIVE) if len(msgs) > len(keys) else b""
                self._resend.add(seq, (tuple(keys), controls))
                if keys or controls:
                    self._sent_at[seq] = now
                if self._resend.dropped_upto > self._overflow_seen:
                    self._overflowed(now)
        header = wire.Header(self.node_id, self.epoch, seq, int((now + self.clock_offset) * 1000))
        data = wire.datagram(header, b"".join(acks + msgs), self.auth, self._seal_counter())
        self.stats["tx_datagrams"] += 1
        self.stats["tx_bytes"] += len(data)
        self._last_send = now
        return data

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, int | None]]:
        out: list[tuple[bytes, int | None]] = []
        cfg = self.config
        room = cfg.max_datagram - wire.HEADER_LEN - self.auth.overhead - 24 * sum(
            1 for p in self.peers.values() if p.rx is not None) - 4  # acknowledgements (24 with highest); HELLO
        self._last_input = max(self._last_input, now)
        if self._overflow_bulk and self._overflow_bulk_can_start() and now >= self._overflow_bulk_at:
            # at most one such bulk per resync_retry: while a link is down, every datagram
            # overflows the queue, and bulks back to back would only flood it (a queued bulk
            # that has not begun becomes one to every peer)
            self._overflow_bulk = False
            self._overflow_bulk_at = now + cfg.resync_retry
            self.bulk_send(now, 0)
        while len(out) < cfg.burst and self._resends:
            seq, dest = next(iter(self._resends))
            del self._resends[(seq, dest)]
            out.append((self._resend_one(seq, room, now), dest))
        stats = self.stats
        # each datagram below takes a new number: the window's room, counted down as they go
        room_left = self.window - self.in_flight()
        while len(out) < cfg.burst:
            msgs: list[bytes] = []
            keys: list[bytes] = []
            size = 0
            control = self._control
            while control and size + len(control[0]) <= room:
                m = control.pop(0)
                msgs.append(m)
                size += len(m)
            # New flows only while the window has room: acknowledgements, NACKs and resends
            # always go (the peer needs them to let the window move).
            open_ = room_left > 0
            if not open_ and (self._pending or self._bulks):
                stats["window_full"] += 1
            pending = self._pending
            if pending and self.role is not Role.FAULT and open_:
                take = pending.popitem
                internal_get = self.internal.get
                flows = 0
                while pending:
                    key = take(last=False)[0]
                    cur = internal_get(key)
                    if cur is None:
                        m = self._message(key, now)  # deleted: a DELETE with a version of its own
                    else:
                        m = cur if key[0] < _MARK else self._fresh(key, cur, now)
                        flows += 1
                    if size + len(m) > room:
                        if m[0] != wire.MsgType.DELETE:
                            flows -= 1
                        if not msgs:  # a single flow larger than a datagram: cannot be sent at all
                            stats["oversized_flows"] += 1
                            continue
                        pending[key] = None  # back to the front: the next datagram starts with it
                        pending.move_to_end(key, last=False)
                        break
                    msgs.append(m)
                    keys.append(key)
                    size += len(m)
                stats["flows_sent"] += flows
                stats["deletes_sent"] += len(keys) - flows
            if self.role is not Role.FAULT and open_:
                size = self._fill_bulk(msgs, keys, size, room, now)
            if not msgs:
                break
            out.append((self._finish(msgs, keys, now), None))
            room_left -= 1
        return out

    def _fill_bulk(self, msgs: list[bytes], keys: list[bytes], size: int, room: int, now: float) -> int:
        while self._bulks:
            bulk = self._bulks[0]
            if not bulk.begun:
                m = wire.bulk_begin_msg(bulk.target, bulk.bulk_id)
                if size + len(m) > room:
                    return size
                msgs.append(m)
                size += len(m)
                bulk.begun = True
                bulk.keys = list(self.internal)
                self.stats["bulks_sent"] += 1
            internal = self.internal
            bkeys = bulk.keys
            pos = bulk.pos
            n = len(bkeys)
            sent = 0
            while pos < n:
                key = bkeys[pos]
                fm = internal.get(key)
                if fm is None:  # deleted since the bulk began: the delete went out by itself
                    pos += 1
                    continue
                if key[0] >= _MARK:
                    fm = self._fresh(key, fm, now)
                if len(fm) > room:  # larger than any datagram: cannot be sent (counted), go on
                    self.stats["oversized_flows"] += 1
                    pos += 1
                    continue
                if size + len(fm) > room:
                    break
                msgs.append(fm)
                keys.append(key)
                size += len(fm)
                pos += 1
                sent += 1
            bulk.pos = pos
            bulk.sent += sent
            self.stats["flows_sent"] += sent
            if pos < n:
                return size
            m = wire.bulk_end_msg(bulk.target, bulk.bulk_id, bulk.sent)
            if size + len(m) > room:
                return size
            msgs.append(m)
            size += len(m)
            self._bulks.popleft()
        return size

    def _resend_one(self, seq: int, room: int, now: float) -> bytes:
        """Datagram ``seq`` again, carrying the current state of the flows it named."""
        kept = self._resend.get(seq)
        keys, controls = kept if kept is not None else ((), b"")
        msgs: list[bytes] = [controls] if controls else []
        fitted: list[bytes] = []
        size = len(controls)
        for key in keys:
            m = self._message(key, now)
            if size + len(m) > room:
                self._queue(key)  # grew since: goes out in a new datagram
                continue
            msgs.append(m)
            fitted.append(key)
            size += len(m)
        if not msgs:
            msgs.append(wire.alive_msg())
        self.stats["resent_datagrams"] += 1
        data = self._finish(msgs, fitted, now, seq=seq)
        self.stats["resent_bytes"] += len(data)
        return data

    # --- redundant sync links -------------------------------------------------------------------

    def heartbeats(self, now: float, hearing: dict[int, int], links: int) -> list[bytes]:
        """One heartbeat datagram per sync link, for the adapter to send over link k: HEARTBEAT
        with the link's index, this round's number, and on which links this node hears each peer
        (``hearing``: node -> bits). Sequence number 0: outside the data stream, so a heartbeat
        that overtakes data queued on a slower link opens no gap. Padded to a full datagram."""
        self._heartbeat += 1
        reports = sorted(hearing.items())[:64]
        header = wire.Header(self.node_id, self.epoch, wire.HEARTBEAT_SEQ, int((now + self.clock_offset) * 1000))
        size = self.config.max_datagram - wire.HEADER_LEN - self.auth.overhead
        out = [wire.datagram(header, wire.heartbeat_msg(k, self._heartbeat, reports, size), self.auth,
                             self._seal_counter()) for k in range(links)]
        self.stats["heartbeats_sent"] += len(out)
        self.stats["tx_datagrams"] += len(out)
        self.stats["tx_bytes"] += sum(len(d) for d in out)
        return out

    def _heartbeat_received(self, header: wire.Header, flows: list[wire.FlowTuple],
                            messages: list[wire.Message]) -> int | None:
        """A heartbeat: fresh if its number is higher than any before from that peer over that
        link (a replay, however recent, proves nothing about a link), from the peer's current
        epoch (a restarted peer is learnt from its data first)."""
        stats = self.stats
        if flows or len(messages) != 1 or type(messages[0]) is not wire.Heartbeat:
            stats["rejected_malformed"] += 1
            return None
        hb = messages[0]
        peer = self.peers.get(header.node)
        if peer is None or header.epoch != peer.epoch or not peer.proven:
            stats["heartbeats_ignored"] += 1
            return None
        if hb.counter <= peer.heartbeats.get(hb.link, 0):
            stats["rejected_replay"] += 1
            peer.rejected["replay"] += 1
            return None
        peer.heartbeats[hb.link] = hb.counter
        stats["heartbeats_received"] += 1
        self.last_sender, self.last_link = peer.node, hb.link
        for node, links in hb.reports:
            if node == self.node_id:
                self._events.append(LinkReport(peer.node, links))
        return peer.node

    def path_changed(self, now: float, node: int) -> None:
        """The adapter moved the traffic to ``node`` to another link (or back): what was in flight
        on the old one may be lost. Probe at once, acknowledge and ask for gaps again over the
        new one, and start the round-trip estimate afresh (RFC 9002 9.4: a new path has its own
        RTT; one estimate serves every peer)."""
        self.stats["path_changes"] += 1
        self.srtt = None
        self.rttvar = self.config.initial_rtt / 2
        self._probes = 0
        self._probe_from = now - 2.0 * self.config.alive_interval  # a probe is due now, if data waits
        peer = self.peers.get(node)
        if peer is not None and peer.rx is not None and self.config.reliable:
            peer.ack_sent = min(peer.ack_sent, peer.rx.expected - 2)  # the next datagram acknowledges
            peer.nack_at = -1.0
            if peer.ack_due is None:
                peer.ack_due = now

    # --- time ---------------------------------------------------------------------------------------

    def _challenging(self, peer: Peer) -> bool:
        """Still worth challenging: not proven, and heard within a peer timeout (a node that went
        away is not asked forever)."""
        return not peer.proven and self._last_input < peer.rejected_at + self.config.peer_timeout

    def get_timer(self) -> float | None:
        window_open = self.in_flight() < self.window
        flows_waiting = (self._pending or self._bulks) and self.role is not Role.FAULT
        if self._control or (flows_waiting and window_open) or self._resends:
            return float("-inf")  # output is waiting: call datagrams_to_send() now
        deadlines = [self._last_send + self.config.alive_interval, self._next_sweep]
        if self.config.expiry_margin > 0:
            # an expiry pass under way takes its next chunk as soon as the adapter can call
            deadlines.append(self._last_input if self._expiry_work else self._expiry_at)
        if self._sent_at:
            deadlines.append(self._probe_due())  # probe: acknowledgements stopped
        if self._overflow_bulk and self._overflow_bulk_can_start():
            deadlines.append(self._overflow_bulk_at)
        for peer in self.peers.values():
            if peer.ack_due is not None:
                deadlines.append(peer.ack_due)
            if peer.nacked is not None and peer.rx is not None and peer.rx.missing() is not None:
                deadlines.append(peer.nack_at + self.config.nack_retry)
            if peer.resync_at is not None:
                deadlines.append(peer.resync_at + self.config.resync_retry)
            if peer.challenge_at is not None and self._challenging(peer):
                deadlines.append(peer.challenge_at + CHALLENGE_RETRY)
            if peer.alive:
                deadlines.append(peer.last_heard + self.config.peer_timeout)
        return min(deadlines)

    def _expiry_pass(self) -> float:
        """Seconds between expiry passes: a flow is dropped at most this late (half the margin,
        at most 30 s). A pass costs about 0.5 us per cached flow (1,000,000 flows: 0.5 s of CPU
        every 15 s), in chunks of EXPIRY_CHUNK."""
        return min(30.0, max(0.05, self.config.expiry_margin / 2))

    def _expire(self, now: float) -> None:
        """One chunk of an expiry pass (EXPIRY_CHUNK flows): drop the flows of peers whose timeout,
        as it last came, ran out more than the margin ago. A pass starts when the last ended and
        its interval passed; it works on the keys as they were at its start."""
        if not self._expiry_work:
            self._expiry_at = now + self._expiry_pass()
            self._expiry_work = [(p, list(p.external)) for p in self.peers.values() if p.external]
        limit = now - self.config.expiry_margin
        budget = EXPIRY_CHUNK
        expired = 0
        timeout_of = codec.timeout_of
        expect_timeout = expectation.timeout_of
        header = wire.FLOW_HEADER
        work = self._expiry_work
        while work and budget > 0:
            peer, keys = work[-1]
            external = peer.external
            take = min(budget, len(keys))
            budget -= take
            for key in keys[len(keys) - take:]:
                cur = external.get(key)
                # heard within the margin: not expired whatever its timeout (most of a busy table)
                if cur is not None and cur.heard < limit and \
                        cur.heard + (timeout_of(cur.message, header) if cur.message[0] != _EXPECT
                                     else expect_timeout(cur.message, header)) < limit:
                    del external[key]
                    expired += 1
            del keys[len(keys) - take:]
            if not keys:
                work.pop()
        if expired:
            if self.stats["flows_expired"] == 0:
                log.info("flows of peers expired: the peer stopped refreshing them (sync.expiry_margin)")
            self.stats["flows_expired"] += expired

    def handle_timer(self, now: float) -> None:
        cfg = self.config
        self._last_input = max(self._last_input, now)
        for peer in self.peers.values():
            rx = peer.rx
            if peer.ack_due is not None and now >= peer.ack_due and rx is not None:
                if rx.expected - 1 > peer.ack_sent:
                    self._queue_ack(peer, rx)
                peer.unacked = 0
                peer.ack_due = None
            if rx is not None and cfg.reliable:
                gap = rx.missing()
                if gap is not None and now >= peer.nack_at + cfg.nack_retry:
                    self._nack(peer, gap, now)
            if peer.resync_at is not None and now >= peer.resync_at + cfg.resync_retry:
                self._ask_for_bulk(peer, now)
            if peer.challenge_at is not None and now >= peer.challenge_at + CHALLENGE_RETRY:
                if self._challenging(peer):
                    self._challenge(peer, now)
                else:
                    peer.challenge_at = None  # it went quiet: its next datagram challenges it again
            if peer.alive and now >= peer.last_heard + cfg.peer_timeout:
                peer.alive = False
                self._events.append(PeerSilent(peer.node, now - peer.last_heard))
                self._release()
        # A slot of a node silent for long and holding no flow is given back: 16 forged (or
        # renamed) node ids heard once used to hold every slot, and a real new node was refused.
        # One with flows stays: they are what a MASTER commit needs of a node that died.
        quiet_since = now - 4 * cfg.peer_timeout
        for node in [n for n, p in self.peers.items()
                     if not p.alive and not p.external and max(p.last_heard, p.rejected_at) <= quiet_since]:
            p = self.peers.pop(node)
            self._reclaimed[node] = (p.epoch, p.rx.highest if p.rx is not None else 0)
            if len(self._reclaimed) > RECLAIMED_KEPT:
                self._reclaimed.popitem(last=False)
            self.stats["peers_reclaimed"] += 1
        self._release()  # also lets go of what nobody is left to acknowledge
        if self._sent_at and now >= self._probe_due():
            # Data is unacknowledged and nothing was acknowledged for a probe timeout: the last
            # datagrams, or the acknowledgements, were lost (a receiver cannot NACK a loss at the
            # tail: nothing came after it). Probe with the newest datagram not acknowledged: a
            # receiver that lacks earlier ones now sees the gap and NACKs all of it at once (a
            # probe with the oldest recovered one datagram per probe), one that has it answers
            # the duplicate with an acknowledgement (RFC 9002 6.2).
            newest = next(reversed(self._sent_at))
            self._resends[(newest, None)] = None
            self._resent_at[(newest, 0)] = now
            self.stats["probes"] += 1
            self._probes += 1
            self._probe_from = now
        if now >= self._last_send + cfg.alive_interval and not self._control:
            self._control.append(wire.alive_msg())
        if cfg.expiry_margin > 0 and (self._expiry_work or now >= self._expiry_at):
            self._expire(now)
        if now >= self._next_sweep:
            self._next_sweep = now + cfg.tombstone_ttl / 2
            for peer in self.peers.values():
                if peer.tombstones:
                    peer.tombstones = {k: v for k, v in peer.tombstones.items() if v[1] > now}

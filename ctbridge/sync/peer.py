"""What this node knows about each other node (Peer) and one flow a peer told it of
(ExternalFlow): plain records, read and written by the engine's parts (session, receiver,
recovery, external caches). No behaviour beyond reading a flow's message.

Imports: ctbridge.conntrack (codec, expectation), ctbridge.sync.wire and .sequence.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from ctbridge.conntrack import codec, expectation
from ctbridge.sync import wire
from ctbridge.sync.sequence import ReceiveWindow

SERVED_EPOCHS = 8  # epochs of a peer not proven yet whose bulk request we served (once each)
EXPECT = int(wire.MsgType.EXPECT)  # an EXPECT message's first byte (a FLOW's is FLOW)
MARK = expectation.EXPECTATION  # a key whose first byte has it is an expectation's


NEVER = float("-inf")  # Peer.candidate_at while no newer life of the peer waits to be proven

# One flow a peer told us about, a plain tuple (message, seq, heard): its FLOW message, the
# sequence number of the peer's last datagram that mentioned it as stored (bulks drop flows not
# mentioned since BULK_BEGIN), and when that version came (its CTA_TIMEOUT counts from then:
# expiry). The version is read from the message, so a cached flow costs its message, its key
# and this tuple (bench/failover.py: memory per cached flow).
#
# A tuple, not an object: CPython's cyclic collector stops tracking a tuple of bytes and numbers
# at the first collection it survives, while it walks every instance of a class in each full
# collection. With a million flows cached as objects, every full collection held the loop for
# 0.09-0.17 s (a standby taking a 1M-flow load: five such stalls; bench/scale.py); with tuples
# a full collection takes about 1.5 ms (docs/performance.md, "A million flows").
ExternalFlow = tuple[bytes, int, float]

# Stored sequence numbers carry the peer's life above its 32-bit numbers (wire: a datagram's
# sequence number, sequence.SEQ_MAX): Peer.life is the current life's base, stored = life + seq.
# A flow stored below it is of a previous life: outranked by any version the new life sends,
# and older than any BULK_BEGIN of it. A restart raises the base, which touches no flow.
LIFE = 1 << 32


def version_of(cur: ExternalFlow, life: int) -> int:
    """The peer's counter for this state; -1 for a flow of the peer's previous life (stored
    below ``life``), which anything of its new life outranks."""
    return wire.flow_version(cur[0]) if cur[1] >= life else -1


def runs_out(cur: ExternalFlow) -> float:
    """When the peer's timeout for it, as it last came, ran out (the engine's clock)."""
    return cur[2] + seconds_of(cur[0])


def seconds_of(msg: bytes) -> int:
    """The timeout a FLOW or EXPECT message came with (their attributes number it differently)."""
    if msg[0] == EXPECT:
        return expectation.timeout_of(msg, wire.FLOW_HEADER)
    return codec.timeout_of(msg, wire.FLOW_HEADER)


class Peer:
    """What this node knows about one other node."""

    def __init__(self, node: int, now: float) -> None:
        self.node = node
        self.epoch = -1
        self.rx: ReceiveWindow | None = None
        self.external: dict[bytes, ExternalFlow] = {}
        self.life = LIFE  # the base of this life's stored sequence numbers (LIFE)
        self.expectations = 0  # of ``external``, how many are expectations (keys with MARK)
        # key -> (version, until when it outranks late updates, sequence number of the DELETE),
        # oldest first. An OrderedDict: at the cap the oldest goes with each new deletion, and a
        # plain dict finds its first entry by scanning past the slots of those deleted before it
        # (16 µs a deletion at 65,536 tombstones: bench/profile.py, docs/performance.md)
        self.tombstones: OrderedDict[bytes, tuple[int, float, int]] = OrderedDict()
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
        self.candidate_at = NEVER  # when a datagram of an unproven newer epoch was last refused
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
        self.flows_at = now  # when a datagram of it last carried flows: a bulk under way progresses
        self.restarts = 0
        self.bulks = 0
        self.heartbeats: dict[int, int] = {}  # link -> number of the last heartbeat taken over it
        # the highest protocol version its current epoch was heard to speak (docs/protocol.md,
        # "Versions"): 2 until it announces more in a datagram this node takes, or sends one of
        # a higher version; back to 2 whenever another epoch of it shows up (it may have been
        # downgraded)
        self.speaks = wire.BASE_VERSION

"""Sessions: how a peer's epoch (its boot) is proved live before anything it sends is applied.

Rules (each enforced below; tests/unit/test_sessions.py and test_attacker.py try to break them):

1. A peer is known by node id. Its *session* is one epoch of it: the datagrams of that epoch
   are applied, numbered by its stream (replays refused by the receive window).
2. A datagram of another epoch than the session's is a *candidate*: nothing of it is applied.
   An older epoch while the session is alive is a replay (refused). Any other is taken only when
   the same datagram answers (ECHO) one of our challenges to that peer, or our challenge to
   everyone for a peer's first session, sent at most NONCE_LIFETIME ago: the peer runs that
   epoch *now*, not only at some time since. Each nonce is drawn anew (never twice in our
   life), and all are forgotten when a session starts: a captured or held-back answer proves
   nothing later.
3. The first candidate datagram brings our challenge (and, if the peer is silent, a bulk
   request); the challenge alone is repeated every CHALLENGE_RETRY while candidates come and the
   peer was heard within peer_timeout.
4. What a candidate may still ask: that we answer its challenge (ECHO, once per datagram) and,
   once per epoch of it (at most SERVED_EPOCHS remembered), our table (a bulk transfer). So the
   two nodes prove themselves to each other in one round trip, and a replayed request cannot
   have us stream the table again and again.
5. A session starts with the datagram that answers: the peer's previous life is outranked (its
   flows keep their state but version -1, tombstones and refusals go), its numbers start again,
   and the bulk asked with the challenge replaces what we hold (asked again at once if the bulk
   it sent began before its answer). A newer candidate heard but not proven makes our copy of
   the peer incomplete (Engine.complete()); an older one does not.
6. Slots: at most max_peers node ids are kept. A slot of a node silent for 4 peer timeouts and
   holding no flow is given back, with its replay floor (epoch, highest number) remembered for
   RECLAIMED_KEPT nodes: a replay of it is still refused.
7. The protocol version a peer speaks (Peer.speaks, docs/protocol.md "Versions") belongs to its
   session: a candidate sets it back to 2 at once (another life may be an older release, and must
   read our challenge), and a session starts at 2; only its session's datagrams raise it (the
   engine reads their announcements and header).

Imports: ctbridge.sync (wire, sequence, events, peer, shared).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from ctbridge.sync import wire
from ctbridge.sync.events import PeerRestarted
from ctbridge.sync.peer import LIFE, NEVER, Peer
from ctbridge.sync.sequence import ReceiveWindow
from ctbridge.sync.shared import Part, Shared

RECLAIMED_KEPT = 1024  # node ids whose slots were given back, remembered with their replay floor
NONCE_LIFETIME = 1.0  # seconds an answer to a challenge is taken after the challenge went out: an
# answer held back longer (by an attacker who dropped it, and the peer's later life) proves nothing,
# so what a held-back answer can make a node take is a life that ran at most this long ago
NONCES_KEPT = 32  # challenges per peer whose answers are still taken (one per CHALLENGE_RETRY)
CHALLENGE_RETRY = 0.1  # seconds: challenge a peer again whose answer (ECHO) has not come; 16 bytes
# each, and only while that peer is heard, so retrying often costs nothing and makes a lost echo
# cost 0.1 s instead of a bulk retry of 3 s


class Sessions(Part):
    """Challenges, answers and epochs of every peer; bulk requests (RESYNC) sent and taken."""

    def __init__(self, shared: Shared, nonce: int, bulk_send: Callable[[float, int], None]) -> None:
        super().__init__(shared)
        self.bulk_send = bulk_send  # stream our table to a node (0: every peer)
        self.nonce = nonce & 0xFFFFFFFFFFFFFFFF  # this life's challenge start
        self._nonces = 0  # nonces drawn from it since (_draw_nonce)
        self._resync_all_at = float("-inf")  # when we last asked every peer for a bulk
        self._broadcast = (-1, float("-inf"))  # (nonce, when) of our last challenge to every peer
        self._reclaimed: OrderedDict[int, tuple[int, int]] = OrderedDict()  # node -> (epoch, highest seq)

    def admit(self, header: wire.Header, now: float) -> Peer | None:
        """A node not among the peers: a slot for it (None, counted, if its replay floor refuses
        the datagram or every slot is taken)."""
        stats = self.stats
        floor = self._reclaimed.get(header.node)
        if floor is not None and header.epoch == floor[0] and header.seq <= floor[1]:
            # (an older epoch is a candidate like any other: a restart with the clock behind)
            stats["rejected_replay"] += 1  # its slot was given back, not its replay protection
            return None
        if len(self.peers) >= self.config.max_peers:
            stats["rejected_peers"] += 1
            return None
        self._reclaimed.pop(header.node, None)
        peer = self.peers[header.node] = Peer(header.node, now)
        peer.acked = self.stream.seq - 1  # it never saw what went before: nothing of it to wait for
        return peer

    def take_epoch(self, peer: Peer, header: wire.Header, messages: list[wire.Message], now: float) -> bool:
        """A datagram of another epoch than ``peer``'s session (rules 2-5): True if its session
        starts with it (the datagram is then applied), False if it is refused."""
        # An older one while the session runs is a replay; one older than a silent session's may
        # be a restart with the clock behind (its state lost); a newer one a restart.
        if header.epoch < peer.epoch and peer.alive:
            self.stats["rejected_replay"] += 1
            peer.rejected["replay"] += 1
            peer.rejected_at = now
            return False
        if not self._answered(peer, messages, now):
            self._candidate(peer, header, messages, now)
            return False
        self._start_session(peer, header, messages, now)
        return True

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
        self.send_resync(node, wire.challenge_msg(node, nonce, self.config.announce))
        self.stats["challenges_sent"] += 1
        for peer in self.peers.values():
            if node in (0, peer.node):
                peer.resync_at = now

    def send_resync(self, node: int, challenge: bytes = b"") -> None:
        """A RESYNC to ``node`` (after ``challenge``, in one control entry), counted."""
        self.control.append(challenge + wire.resync_msg(node))
        self.stats["resyncs_requested"] += 1

    def on_challenge(self, peer: Peer, msg: wire.Challenge, seq: int, now: float) -> bool:
        if msg.node in (0, self.node_id):
            self._echo(peer, msg.nonce)
        return False

    def on_resync(self, peer: Peer, msg: wire.Resync, seq: int, now: float) -> bool:
        if msg.node in (0, self.node_id):
            self.bulk_send(now, peer.node)
        return False

    def on_timer(self, peer: Peer, now: float) -> None:
        """Retries due for ``peer``: the bulk request, the challenge (rule 3)."""
        retry = self.config.resync_retry
        if peer.resync_at is not None and now >= peer.resync_at + retry:
            if self._bulk_arriving(peer) and now < peer.flows_at + retry:
                # its bulk is arriving, only slower than resync_retry (a large table, a slow
                # link): asking again would have it send the whole table once more after this
                # one. Wait while flows keep coming; ask when they stop or the bulk is spoilt.
                peer.resync_at = now
            else:
                self.ask_for_bulk(peer, now)
        if peer.challenge_at is not None and now >= peer.challenge_at + CHALLENGE_RETRY:
            if self.challenging(peer):
                self._challenge(peer, now)
            else:
                peer.challenge_at = None  # it went quiet: its next datagram challenges it again

    def _bulk_arriving(self, peer: Peer) -> bool:
        """A bulk of the peer's has begun (or ended, its last datagrams awaited) and nothing of it
        is lost for good yet: not spoilt (best-effort loss) nor given up (a GAP or a window
        that overflowed, past its BULK_BEGIN)."""
        if peer.bulk_begin is not None:
            begin = peer.bulk_begin[1]
        elif peer.bulk_end is not None:
            begin = peer.bulk_end[2]
        else:
            return False
        if peer.bulk_dirty or peer.given_up >= begin:
            return False
        # best-effort: a datagram of the bulk that is missing now is never resent, so the bulk
        # is spoilt already (a review found a lost BULK_END waited on for a minute while the
        # peer's ordinary flows kept coming, until the hole was 64 datagrams old)
        gap = peer.rx.missing() if peer.rx is not None and not self.config.reliable else None
        return gap is None or gap[1] < begin

    def deadline(self) -> float:
        out = float("inf")
        retry = self.config.resync_retry
        for peer in self.peers.values():
            if peer.resync_at is not None:
                out = min(out, peer.resync_at + retry)
            if peer.challenge_at is not None and self.challenging(peer):
                out = min(out, peer.challenge_at + CHALLENGE_RETRY)
        return out

    def reclaim(self, now: float) -> None:
        """Rule 6: slots of nodes silent for long and holding no flow are given back (forged or
        renamed node ids heard once would otherwise hold every slot). One with flows stays: they
        are what a MASTER commit needs of a node that died."""
        quiet_since = now - 4 * self.config.peer_timeout
        for node in [n for n, p in self.peers.items()
                     if not p.alive and not p.external and max(p.last_heard, p.rejected_at) <= quiet_since]:
            p = self.peers.pop(node)
            self._reclaimed[node] = (p.epoch, p.rx.highest if p.rx is not None else 0)
            if len(self._reclaimed) > RECLAIMED_KEPT:
                self._reclaimed.popitem(last=False)
            self.stats["peers_reclaimed"] += 1

    def _candidate(self, peer: Peer, header: wire.Header, messages: list[wire.Message], now: float) -> None:
        """A datagram of another epoch than the peer's session, not answering our challenge: a
        restart (or first contact) not proven yet, or a replay. Nothing of it is applied, and the
        session, if there is one, goes on; only its own challenges and bulk requests are taken (so
        that the two nodes prove themselves to each other in one round trip). The first such
        datagram brings our challenge and a bulk request (the answer then comes in the datagram
        its bulk begins in); the challenge alone is repeated while more come."""
        self._take_requests(peer, header, messages, now)
        # another life of it may speak another version (a downgrade): until one proves itself
        # and says, speak the version every life of it reads
        peer.speaks = wire.BASE_VERSION
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
                self.send_resync(peer.node)
        elif now >= peer.challenge_at + CHALLENGE_RETRY:
            self._challenge(peer, now)

    def _start_session(self, peer: Peer, header: wire.Header, messages: list[wire.Message], now: float) -> None:
        """The peer answered our challenge in this datagram: its epoch is live now, and its session
        starts here (what it sent before is not applied: the bulk replaces it)."""
        self._new_incarnation(peer, header, now)
        peer.proven = True
        peer.challenge_at = None
        peer.nonces.clear()  # each answer proves one epoch: none of them is taken again
        peer.candidate_at = NEVER
        peer.rx = ReceiveWindow(header.seq, self.config.rx_limit)
        peer.given_up = 0
        peer.ack_sent = header.seq - 1
        self.stats["sessions_proven"] += 1
        me = self.node_id
        peer.resync_at = now  # asked with the challenge; retried until the bulk completes
        if not any(type(m) is wire.BulkBegin and m.node in (0, me) for m in messages):
            # the bulk it sent for our request began before its answer (ours was lost), or it
            # knew us already: ask now, not after resync_retry
            self.send_resync(peer.node)

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
        self.control.append(wire.challenge_msg(peer.node, self._issue_nonce(peer, now), self.config.announce))
        self.stats["challenges_sent"] += 1
        peer.challenge_at = now

    def _echo(self, peer: Peer, nonce: int) -> None:
        """Answer a challenge, once per datagram however often it was asked (a challenge that
        was already answered is asked again only when the answer was lost)."""
        m = wire.echo_msg(peer.node, nonce, self.config.announce)
        if m not in self.control:
            self.control.append(m)
            self.stats["echoes_sent"] += 1

    def _new_incarnation(self, peer: Peer, header: wire.Header, now: float) -> None:
        if peer.epoch >= 0:
            peer.restarts += 1
            self.events.append(PeerRestarted(peer.node, peer.epoch, header.epoch))
        peer.epoch = header.epoch
        peer.ack_sent = header.seq - 1
        peer.round_high, peer.round_full = 0, True
        peer.unacked = 0
        peer.ack_due = None
        peer.nacked = None
        peer.bulk_begin = peer.bulk_end = None
        peer.synced = False
        peer.acked = self.stream.seq - 1  # its new life never saw what went before
        peer.ack_heard = peer.sack_high = peer.missing_count = 0
        peer.missing = []
        peer.heartbeats = {}  # its heartbeat numbers start again too
        peer.speaks = wire.BASE_VERSION  # what this life speaks, it says in this datagram or later
        peer.acked_at = now
        # Its versions and sequence numbers start again from scratch: what we hold from its
        # previous life must not outrank (version) or outlive (bulk mark) what it sends now.
        peer.life += LIFE  # what we hold of it is now stored below its life: version -1 (peer.LIFE)
        peer.tombstones.clear()
        peer.refused.clear()
        # What it had before is unknown now: the bulk asked for with our challenge replaces it.

    def ask_for_bulk(self, peer: Peer, now: float) -> None:
        """RESYNC to ``peer``: its bulk transfer replaces what we hold of it (retried until it
        comes); with a challenge while its epoch has not answered one."""
        if not peer.proven:
            self._challenge(peer, now)
        self.send_resync(peer.node)
        peer.resync_at = now

    def challenging(self, peer: Peer) -> bool:
        """Still worth challenging: not proven, and heard within a peer timeout (a node that went
        away is not asked forever)."""
        return not peer.proven and self.clock.latest < peer.rejected_at + self.config.peer_timeout


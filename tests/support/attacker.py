"""An on-path attacker without keys, and the invariants it must not break (tests/unit/test_attacker.py).

The attacker sits on every link of an engine lab. It sees every datagram the engines send, decides
the fate of every copy (deliver, drop, delay, duplicate, hold back an answer to a challenge) and
replays anything it ever saw, to any node, at any time: datagrams of the sender's previous lives,
datagrams a receiver's previous life got, whole captured bulk transfers, an ambush of a node that
just restarted. It reads the messages (a MAC authenticates, it does not hide; the lab does not
encrypt) but holds no key: it can neither forge a datagram nor change one.

``Provenance`` records what each node's internal cache held in each of its lives and checks what
the receivers hold against it; ``Bounds`` keeps the largest queue and cache sizes seen.
"""

from __future__ import annotations

import heapq
import pickle
import random
from dataclasses import dataclass, field
from typing import NamedTuple

from ctbridge.conntrack.codec import Event, EventKind
from ctbridge.sync import wire
from ctbridge.sync.engine import NONCE_LIFETIME, Engine, Peer
from tests.support.enginelab import Lab, flow

LATENCY = 0.001  # seconds, one way, for what the attacker lets through undelayed
# how long before a session's start (as a check after a step sees it) the life it is with may have
# ended: an answer is taken within NONCE_LIFETIME of its challenge, which that life answered while
# it ran; plus one lab step (at most 0.05 s) between the start and the check that sees it
ANSWER_AGE = NONCE_LIFETIME + 0.1


class Seen(NamedTuple):
    """A datagram as the attacker read it off the wire (without checking its MACs)."""

    data: bytes
    src: int  # the node id in its header
    epoch: int
    seq: int
    flows: int  # FLOW messages it carries
    kinds: frozenset[type]  # the classes of its other messages (wire.Resync, wire.BulkBegin, ...)
    resync_for: frozenset[int]  # the node ids its RESYNC messages name (0: everyone)


def peek(data: bytes) -> Seen:
    """Read a datagram's header and messages the way anybody on the link can: no key needed."""
    _magic, _v, _flags, _kid, _count, length, node, epoch, seq, _t = wire.HEADER.unpack_from(data)
    flows, others = wire.decode_body(data, wire.HEADER_LEN, wire.HEADER_LEN + length)
    return Seen(data, node, epoch, seq, len(flows), frozenset(type(m) for m in others),
                frozenset(m.node for m in others if type(m) is wire.Resync))


@dataclass
class Phase:
    """How the attacker treats traffic for a while (drawn at random per phase)."""

    drop: dict[tuple[int, int], float]  # (src, dst) -> probability that a copy is lost
    delay: float  # probability that a copy is held back ...
    delay_max: float  # ... by up to this many seconds (reordering it behind later ones)
    dup: float  # probability that a copy arrives 2-4 times
    replay: float  # bursts of replays of anything ever captured, per second (a rate in fake time,
    # not per step: steps get shorter the more is in flight, which would feed on itself)
    replay_max: int  # datagrams per burst
    hold_answers: float = 0.0  # probability that a copy carrying an ECHO (an answer to a challenge,
    # readable in the clear) is held back 1-5 s: delivered when its sender may have restarted since


def control_len(engine: Engine) -> int:
    """Messages waiting in the engine's control queue (Sender.control)."""
    return len(engine.sender.control)


def drain(engine: Engine, now: float, horizon: float) -> tuple[int, int]:
    """(datagrams, bytes) ``engine`` sends from ``now`` to ``now + horizon`` if nothing arrives,
    running its timers: what an input made it send, measured against a copy that did not get it.
    A datagram to every peer counts once (the lab's links carry it once per peer), and so does a
    number sent again to the same destination: with nothing arriving, nothing is acknowledged and
    the copy probes (sends its newest datagram again), which on a link that carries the
    acknowledgements back it would not."""
    seen: set[tuple[int, int | None]] = set()
    size = 0
    t = now
    for _ in range(200):  # bounded: a timer due again at once would otherwise spin here
        for data, dest in engine.datagrams_to_send(t):
            number = (wire.HEADER.unpack_from(data)[8], dest)
            if number not in seen:
                seen.add(number)
                size += len(data)
        nxt = engine.get_timer()
        if nxt is None or nxt > now + horizon:
            break
        t = max(t, nxt)
        engine.handle_timer(t)
    return len(seen), size


@dataclass
class Amplification:
    """What one injected datagram made its victim send, beyond what the victim sent anyway."""

    victim: int
    resync: bool  # it carried a RESYNC for the victim (which may answer with a bulk transfer)
    # the victim took it: authentic, and new to its session (its first copy came while that session
    # had not begun, and was refused; or it was sent to another node): traffic, however late
    accepted: bool
    injected_bytes: int
    datagrams: int
    bytes: int
    table: int  # bytes of the victim's internal cache (the FLOW messages a bulk of it carries)


class AttackLab(Lab):
    """A pairwise-keyed engine lab whose links all belong to the attacker.

    Every copy of every datagram goes through ``_intercept``: recorded, then dropped, delayed or
    duplicated as the current ``phase`` says. Whether a delivery is the attacker's doing is
    decided when it arrives: the first arrival of a copy that was sent to the receiver's current
    life is traffic (however late); anything else (a second copy, a replay, a datagram sent to a
    previous life of the receiver or to another node) is an *injection*, and for those the
    victim's response is measured (``amplification``) against a copy of the victim that did not
    get it. Every datagram a receiver takes is checked against replay: no life of a receiver
    takes a (sender, epoch, number) twice."""

    def __init__(self, n: int, seed: int, horizon: float = 0.05, **config: object) -> None:
        super().__init__(n, seed=seed, pairwise=True, latency=LATENCY, **config)  # type: ignore[arg-type]
        self.arng = random.Random(seed ^ 0x5EED)  # the attacker's and the scenario's choices
        self.captured: list[Seen] = []
        self._captured_bytes: set[bytes] = set()
        self.bulks: list[list[bytes]] = []  # captured bulk transfers, BULK_BEGIN .. BULK_END of one sender
        self._open_bulks: dict[tuple[int, int], list[bytes]] = {}
        # copies sent: (receiver, its life, datagram); a copy's first arrival is traffic, not injection
        self._tickets: set[tuple[int, int, bytes]] = set()
        self._aorder = 1 << 40  # order numbers of what the attacker schedules (after the lab's own)
        self.phase = Phase({}, 0.0, 0.0, 0.0, 0.0, 0)
        self.attacking = False
        self.horizon = horizon  # seconds of the victim's output counted as its response
        self.injected = 0
        # datagrams reflected to the node that sent them, per (node, life): with pairwise keys no
        # MAC in them is for their sender, so it counts them in rejected_auth (not own_datagrams)
        self.reflected: dict[tuple[int, int], int] = {}
        self.amplification: list[Amplification] = []
        self.arrived: dict[int, int] = {}  # node -> datagrams it received in the last step
        self._accepted: set[tuple[int, int, int, int, int]] = set()  # (receiver, its life, sender, epoch, seq)

    # --- the attacker ------------------------------------------------------------------------------

    def attack(self, on: bool) -> None:
        """Take the links (on), or give them back: perfect links, and what the attacker held back
        or scheduled is thrown away (nothing of it arrives during the quiet period)."""
        self.attacking = on
        self.drop = self._intercept if on else None
        if not on:
            self.in_flight.clear()

    def new_phase(self) -> None:
        rng = self.arng
        nodes = list(self.engines)
        drop: dict[tuple[int, int], float] = {}
        for src in nodes:
            for dst in nodes:
                if src != dst:
                    drop[(src, dst)] = rng.choice((0.0, 0.0, 0.05, 0.3, 0.7, 1.0))
        self.phase = Phase(drop, delay=rng.choice((0.0, 0.1, 0.3)), delay_max=rng.choice((0.02, 0.3, 2.0)),
                           dup=rng.choice((0.0, 0.1, 0.3)), replay=rng.choice((0.0, 5.0, 20.0)),
                           replay_max=rng.choice((1, 4, 12)), hold_answers=rng.choice((0.0, 0.0, 0.5, 1.0)))

    def _schedule(self, at: float, dst: int, data: bytes) -> None:
        self._aorder += 1
        heapq.heappush(self.in_flight, (at, self._aorder, dst, data))

    def _record(self, data: bytes) -> None:
        if data in self._captured_bytes:
            return
        self._captured_bytes.add(data)
        seen = peek(data)
        self.captured.append(seen)
        run_key = (seen.src, seen.epoch)
        if wire.BulkBegin in seen.kinds:
            self._open_bulks[run_key] = []
        run = self._open_bulks.get(run_key)
        if run is not None:
            run.append(data)
            if wire.BulkEnd in seen.kinds:
                self.bulks.append(self._open_bulks.pop(run_key))

    def _intercept(self, src: int, dst: int, data: bytes) -> bool:
        """The lab's drop hook: every copy is the attacker's to deliver (True: the lab drops it)."""
        self._record(data)
        self._tickets.add((dst, self.epochs[dst], data))
        phase, rng = self.phase, self.arng
        if rng.random() < phase.drop.get((src, dst), 0.0):
            return True
        at = self.now + LATENCY
        if rng.random() < phase.delay:
            at += rng.uniform(0.0, phase.delay_max)
        if phase.hold_answers and wire.Echo in peek(data).kinds and rng.random() < phase.hold_answers:
            at += rng.uniform(1.0, 5.0)
        self._schedule(at, dst, data)
        if rng.random() < phase.dup:
            for _ in range(rng.randint(1, 3)):  # the copies come after the original
                self._schedule(at + rng.uniform(0.0, 0.05), dst, data)
        return True

    def replay(self) -> None:
        """A burst of replays: anything ever captured (any sender, any life), to any node,
        including the sender itself (multicast loops its own datagrams back)."""
        rng = self.arng
        nodes = list(self.engines)
        for _ in range(rng.randint(1, max(1, self.phase.replay_max))):
            seen = rng.choice(self.captured)
            self._schedule(self.now + rng.uniform(0.0, 0.1), rng.choice(nodes), seen.data)

    def ambush(self, node: int) -> None:
        """Replays to a node that just restarted, ahead of the real traffic (which takes LATENCY):
        old datagrams of the other nodes (their old lives among them) and a captured bulk. A
        fresh life knows nothing of anyone: the moment finding 1 of issue 13 was about."""
        rng = self.arng
        others = [seen for seen in self.captured if seen.src != node]
        for seen in rng.sample(others, min(len(others), rng.randint(1, 12))):
            self._schedule(self.now + rng.uniform(0.0, LATENCY / 2), node, seen.data)
        runs = [run for run in self.bulks if peek(run[0]).src != node]
        if runs:
            at = self.now
            for data in rng.choice(runs):
                at += rng.uniform(0.0, LATENCY / 8)
                self._schedule(at, node, data)

    def replay_bulk(self) -> None:
        """A captured bulk transfer, BULK_BEGIN to BULK_END in its order, to a node that did not
        send it (possibly a later life of the node it was meant for)."""
        if not self.bulks:
            return
        rng = self.arng
        run = rng.choice(self.bulks)
        src = peek(run[0]).src
        dst = rng.choice([n for n in self.engines if n != src])
        at = self.now + LATENCY
        for data in run:
            at += rng.uniform(0.0, 0.002)
            self._schedule(at, dst, data)

    # --- the lab, with deliveries the attacker looks at ------------------------------------------

    def step(self, max_dt: float = 0.05) -> None:
        """Lab.step, but every arrival goes through ``_deliver`` (injections are measured), and
        the arrivals of the step are counted per node (``arrived``)."""
        self._send_all()
        self.arrived = dict.fromkeys(self.engines, 0)
        deadlines = [t for t in (e.get_timer() for e in self.engines.values()) if t is not None]
        nxt = min([self.now + max_dt, *deadlines] + [d[0] for d in self.in_flight[:1]])
        self.now = max(self.now, nxt)
        while self.in_flight and self.in_flight[0][0] <= self.now:
            _, _, node, data = heapq.heappop(self.in_flight)
            if node in self.engines:
                self.arrived[node] += 1
                self._deliver(node, data)
        for eng in self.engines.values():
            t = eng.get_timer()
            if t is not None and t <= self.now:
                eng.handle_timer(self.now)

    def _deliver(self, dst: int, data: bytes) -> None:
        eng = self.engines[dst]
        life = self.epochs[dst]
        ticket = (dst, life, data)
        if ticket in self._tickets or not self.attacking:
            self._tickets.discard(ticket)
        else:
            self.injected += 1
            if peek(data).src == dst:
                self.reflected[(dst, life)] = self.reflected.get((dst, life), 0) + 1
            self.amplification.append(self._response(dst, eng, data))  # every one (the test's main cost)
        if eng.receive_datagram(data, self.now) is not None:
            # replay protection: a life of a receiver takes each number of a sender's epoch once
            # (a resend keeps its number: the original and its resend are never both applied)
            seen = peek(data)
            number = (dst, life, seen.src, seen.epoch, seen.seq)
            assert number not in self._accepted, f"node {dst} took datagram {seen.seq} of {seen.src} twice"
            self._accepted.add(number)

    def _response(self, dst: int, eng: Engine, data: bytes) -> Amplification:
        """What ``data`` makes ``eng`` send within the horizon, beyond what it sends without it."""
        # two copies of the victim as it is (pickle: a third of deepcopy's time, and like it keeps
        # the objects the engine shares between its queues shared in each copy)
        frozen = pickle.dumps(eng, pickle.HIGHEST_PROTOCOL)
        base, hit = pickle.loads(frozen), pickle.loads(frozen)
        accepted = hit.receive_datagram(data, self.now) is not None
        n0, b0 = drain(base, self.now, self.horizon)
        n1, b1 = drain(hit, self.now, self.horizon)
        seen = peek(data)
        resync = bool(seen.resync_for & {0, dst})
        table = sum(len(m) for m in eng.internal.values())
        return Amplification(dst, resync, accepted, len(data), max(0, n1 - n0), max(0, b1 - b0), table)

    # --- the nodes' kernels ---------------------------------------------------------------------------

    def kernel_batch(self, node: int, universe: int, prov: Provenance, table: dict[int, int]) -> None:
        """1-6 random changes of ``node``'s kernel table (flow id -> mark): new flows, updates
        with another mark, deletions; then what its internal cache holds now is recorded."""
        rng = self.arng
        events = []
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(universe)
            if i in table and rng.random() < 0.35:
                del table[i]
                events.append(Event(EventKind.DESTROY, flow(i, mark=0), 0))
            else:
                kind = EventKind.UPDATE if i in table else EventKind.NEW
                table[i] = rng.randrange(8)
                events.append(Event(kind, flow(i, mark=table[i]), 0))
        self.engines[node].kernel_events(events, self.now)
        prov.record(node)

    def restart(self, node: int, prov: Provenance, table: dict[int, int]) -> None:
        """The node's daemon restarts (a new life, a new epoch) and dumps its kernel, as the
        daemon does at start; sometimes the whole machine rebooted and the table is empty."""
        rng = self.arng
        if rng.random() < 0.3:
            table.clear()
        old = self.engines[node].epoch
        eng = self.start(node)
        eng.kernel_resync([flow(i, mark=m) for i, m in sorted(table.items())], self.now,
                          announce=rng.random() < 0.5)
        prov.started(node, old)
        if self.attacking and rng.random() < 0.5:
            self.ambush(node)


# --- invariants ------------------------------------------------------------------------------------


@dataclass
class _View:
    """What a receiver's life is allowed to hold of one sender (see Provenance.check)."""

    peer: Peer
    epoch: int
    bulks: int
    since: float  # when its last session began (as far as the checks can tell), or the receiver's life
    allowed: set[int] = field(default_factory=set)


class Provenance:
    """Where every flow a receiver holds came from.

    ``record(node)`` after every change of a node's internal cache keeps, per (node, epoch), every
    FLOW message its internal cache held in that life. ``check()`` asserts, for every receiver R
    and every sender S it knows (E = the epoch of S that R is on):

    0. freshness: R starts a session only with a life of S that ran after R's previous session
       with S began (after R's own start, for the first), and at most ANSWER_AGE ago: its answer
       must echo a nonce R drew since, within NONCE_LIFETIME of drawing it. A session with a
       life that ended before, whatever was replayed or held back, fails here.
    1. every flow in R's external cache for S is, byte for byte (version and attributes), a
       state S's internal cache held in one of the lives R is *allowed* to hold: E itself, and,
       only until a bulk transfer of E has completed at R, what R was allowed to hold when it
       moved on to E (so: S's previous life, and further back only while no bulk of those lives
       completed at R either — R keeps a flow it cannot know is gone until a bulk replaces it).
       A brand-new peer slot allows only its epoch: nothing of an unproven life is ever applied.
    2. whenever R's copy of S is ``synced`` (a bulk of E completed and nothing was lost since; what
       ``complete()`` requires of every peer it counts), every flow R holds of S is a state of
       S's life E: nothing from an older life survives a completed bulk.

    It also counts (``older``) flows from a life of S older than S's current and previous ones.
    Rule 1 allows them, and they do happen: mostly R is still on an older session of S (S
    restarted twice and neither new life has proven itself to R yet: its copy may then be
    ``synced``, with the session it has, which is all rule 2 asks), sometimes R is on S's current
    life and holds flows of two sessions back (no bulk of the one between completed at R: not
    synced, or rule 2 would fail).
    """

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.states: dict[tuple[int, int], dict[bytes, set[bytes]]] = {}
        # (node, epoch) -> when that life began and ended (None: it runs)
        self.lives: dict[tuple[int, int], tuple[float, float | None]] = {
            (n, e.epoch): (lab.now, None) for n, e in lab.engines.items()}
        self._views: dict[tuple[int, int, int], _View] = {}
        self.older = 0  # checks that found a flow from before S's previous life (allowed, see above)
        self.synced_checks = 0  # checks of rule 2 (so that a run that never syncs does not pass quietly)

    def started(self, node: int, old_epoch: int) -> None:
        """``node`` was restarted: its life ``old_epoch`` ended now, the engine's runs from now."""
        begun, _ = self.lives[(node, old_epoch)]
        self.lives[(node, old_epoch)] = (begun, self.lab.now)
        self.lives[(node, self.lab.engines[node].epoch)] = (self.lab.now, None)
        self.record(node)

    def record(self, node: int) -> None:
        eng = self.lab.engines[node]
        held = self.states.setdefault((node, eng.epoch), {})
        for key, msg in eng.internal.items():
            held.setdefault(key, set()).add(msg)

    def _lives(self, s: int, key: bytes, msg: bytes) -> list[int]:
        return [e for (node, e), held in self.states.items() if node == s and msg in held.get(key, ())]

    def check(self) -> None:
        lab = self.lab
        for r, eng in lab.engines.items():
            for s, peer in eng.peers.items():
                assert s in lab.engines, f"node {r} holds a peer slot for {s:#x}, which is no member"
                view = self._views.get((r, lab.epochs[r], s))
                if view is None or view.peer is not peer:  # a new slot (or one given back and taken again)
                    view = _View(peer, -1, peer.bulks, self.lives[(r, lab.epochs[r])][0])
                if peer.epoch != view.epoch and peer.epoch >= 0:
                    begun, ended = self.lives.get((s, peer.epoch), (0.0, -1.0))
                    assert ended is None or ended >= max(view.since, lab.now - ANSWER_AGE), (
                        f"node {r} started a session with epoch {peer.epoch} of node {s}, a life that ended "
                        f"at {ended} (began {begun}): before its last session with it began ({view.since}), "
                        f"or more than {ANSWER_AGE} s ago (now {lab.now})")
                    view.since = lab.now
                if view.epoch < 0:
                    view.allowed = {peer.epoch}  # nothing is held of a peer before its first session
                elif peer.epoch != view.epoch:
                    # every life of a lab node has a higher epoch than the one before (none starts
                    # with its clock behind), so a session that goes back was started by a replay
                    assert peer.epoch > view.epoch, f"node {r} went back from epoch {view.epoch} of {s}"
                    # a bulk of the old epoch completed since the last check: only that life is
                    # left of what came before (counted conservatively: the bulk may be of the new one)
                    before = {view.epoch} if peer.bulks > view.bulks else view.allowed
                    view.allowed = {peer.epoch} | before
                elif peer.bulks > view.bulks:
                    view.allowed = {peer.epoch}
                view.epoch, view.bulks = peer.epoch, peer.bulks
                self._views[(r, lab.epochs[r], s)] = view
                current = lab.engines[s].epoch
                for key, cur in peer.external.items():
                    allowed = [e for e in view.allowed if cur[0] in self.states.get((s, e), {}).get(key, ())]
                    assert allowed, (f"node {r} holds a flow of node {s} that no allowed life of it had "
                                     f"(allowed {sorted(view.allowed)}, lives that had it: "
                                     f"{self._lives(s, key, cur[0])}, S is in {current})")
                    if max(allowed) < current - 1:
                        self.older += 1
                    if peer.synced:
                        assert peer.epoch in allowed, (f"node {r}, synced with epoch {peer.epoch} of node {s}, "
                                                       f"holds a flow of its lives {allowed} only")
                if peer.synced:
                    self.synced_checks += 1


@dataclass
class Bounds:
    """The largest sizes seen, checked after every step against the bounds:

    - per peer, len(external) + len(tombstones) + len(refused) <= 2 * universe: every flow id is
      in the external cache or the tombstones (both when a FLOW came after the deletion), none is
      refused (no policy here);
    - ReceiveWindow.above <= rx_limit, the resend queue <= resend_limit (the engine's own caps);
    - the control queue <= ``control_limit`` + ``per_arrival`` * the datagrams the node received
      in the step (every send empties it; in between, an arrival may queue an ACK, or an answer
      and a challenge), the bulk queue <= ``bulk_limit``;
    - peer slots <= n - 1: a datagram that creates one must pass a MAC, and nobody else holds keys."""

    universe: int  # flow ids a node can have: what any per-peer store can be about
    control_limit: int
    per_arrival: int
    bulk_limit: int
    entries: int = 0  # the largest seen of each
    above: int = 0
    resend: int = 0
    control: int = 0
    bulks: int = 0
    peers: int = 0
    control_over: int = 0  # the largest control queue less per_arrival per arrival

    def check(self, lab: AttackLab) -> None:
        n = len(lab.engines)
        for r, eng in lab.engines.items():
            cfg = eng.config
            sizes = eng.sender.queue_sizes()
            control = control_len(eng)
            control_bound = self.control_limit + self.per_arrival * lab.arrived.get(r, 0)
            self.resend = max(self.resend, sizes["resend"])
            self.bulks = max(self.bulks, sizes["bulk"])
            self.control = max(self.control, control)
            self.control_over = max(self.control_over, control - self.per_arrival * lab.arrived.get(r, 0))
            self.peers = max(self.peers, len(eng.peers))
            assert len(eng.peers) <= n - 1, f"node {r} has {len(eng.peers)} peer slots in a {n}-node cluster"
            assert sizes["resend"] <= cfg.resend_limit
            assert control <= control_bound, (f"node {r}: {control} control messages queued, "
                                              f"after {lab.arrived.get(r, 0)} arrivals")
            assert sizes["bulk"] <= self.bulk_limit, f"node {r}: {sizes['bulk']} bulk transfers queued"
            for peer in eng.peers.values():
                entries = len(peer.external) + len(peer.tombstones) + len(peer.refused)
                self.entries = max(self.entries, entries)
                assert entries <= 2 * self.universe, f"node {r}: {entries} entries for peer {peer.node}"
                if peer.rx is not None:
                    self.above = max(self.above, len(peer.rx.above))
                    assert len(peer.rx.above) <= peer.rx.limit

    def merge(self, other: Bounds) -> None:
        for name in ("entries", "above", "resend", "control", "bulks", "peers", "control_over"):
            setattr(self, name, max(getattr(self, name), getattr(other, name)))

"""The active-active defer: a flow's first packet on this node waits, briefly, until the flow a
peer replicated is in this kernel (docs/failover.md, "Active-active").

With routing asymmetric (a connection's SYN leaves through one firewall, its SYN-ACK comes back
through the other), the second firewall's kernel has no entry for the flow when the SYN-ACK
arrives unless the first one's replication won the race; a strict ruleset drops it, or a loose
one tracks it anew with another NAT binding. The ruleset hands such packets to a netfilter
queue in the raw table, before conntrack looks them up (priority -300, an iptables NFQUEUE rule
with --queue-bypass); this module answers each:

- at once, when its flow is already in the kernel (a GET by the packet's own tuple, which the
  kernel matches against either direction), when the packet names no flow it can look up, when
  no peer is live (nothing is coming), or when DeferPolicy.max_held are waiting;
- otherwise it waits until the flow is in the kernel (looked up again every ``poll`` seconds) or
  ``wait`` seconds have passed, and then passes anyway: the ruleset decides as it would have.

Every verdict sends the packet round the raw table again (NF_REPEAT, see DONE): it goes on to
conntrack, which finds the entry the injection wrote. Nothing here drops a packet. What waited,
how long and why it went on is counted (``DeferPolicy.stats``, the daemon's stats "defer"
section).

The packets queued: every TCP SYN-ACK; TCP packets of flows not yet seen past a reply (the
origin's half); with apply.defer_udp_ports, UDP packets to this node at a peer's NAT ports.

DeferPolicy is the pure part (tests/unit/test_defer.py drives it with a fake clock); DeferQueue
is the adapter: the queue socket (conntrack/nfqueue.py) and a table of its own on the loop.
Imports the conntrack layer; service starts it when apply.defer_queue is set.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import nfqueue
from ctbridge.conntrack.codec import CodecError, attr_map
from ctbridge.conntrack.table import KernelError, KernelTable

log = logging.getLogger("ctbridge")

COMMENT = "ctbridge defer: SYN-ACKs wait for their replicated flow"
RULE_TIMEOUT = 10.0  # seconds an iptables command may take (-w waits for the xtables lock)
# seconds between two lookups of the flows waited for, besides the one after each batch of peers'
# flows is written (KernelWriter.after_inject): a flow may come another way (written by hand, or
# made by this kernel's own packets)
POLL = 0.005
# packets waiting at once; past that, a packet passes at once (counted). Well below the kernel's
# queue length, so that the kernel's fail-open is not what lets a flood through uncounted
MAX_HELD = 1024  # at defer_wait 0.1 s, a flood of about 10,000 packets a second of flows that never come
LOOKUPS_PER_TURN = 64  # held packets looked up again per turn, the oldest first (26 us each)
LOOKUP_CHUNK = 64  # flows looked up per request batch: 64 answers fit the 1 MiB receive buffer
SAMPLES = 4096  # the waits kept for the percentiles (the most recent)


# The mark the daemon's nftables table sets, before conntrack, on TCP packets (no SYN, no RST) of
# flows it has not yet seen past a reply: the origin's half of an asymmetric connection (its
# entry never sees the SYN-ACK) waits until the reply's state has been replicated here
MARK = 0x10000000
# The mark a verdict adds: the packet goes back to the start of the raw table's chain (NF_REPEAT),
# so the rules after the defer's (an operator's NOTRACK, CT --zone, CT --helper) still apply to it,
# and the defer's rules skip it. An ACCEPT would have ended the chain there (found by review: an
# operator's NOTRACK after the defer's rule stopped applying to SYN-ACKs). Both bits are taken off
# after conntrack.
DONE = 0x20000000
SEEN_TIMEOUT = 120  # seconds a flow stays known to the table without being seen again
NFT_TABLE = "ctbridge_defer"


def rules(queue: int) -> list[list[str]]:
    """The queue rules (after the chain's name), first in the raw table's PREROUTING chain, before
    conntrack, passed on when nobody is bound to the queue (--queue-bypass): every SYN-ACK (a
    connection's first packet in the other direction, the one asymmetric routing brings to the
    node that did not see the SYN), and every packet the nftables table marked; never a packet a
    verdict already sent round again (DONE)."""
    target = ["-m", "mark", "!", "--mark", f"{DONE:#x}/{DONE:#x}", "-j", "NFQUEUE", "--queue-num", str(queue),
              "--queue-bypass"]
    return [["-p", "tcp", "--tcp-flags", "SYN,ACK", "SYN,ACK", "-m", "comment", "--comment", COMMENT, *target],
            ["-m", "mark", "--mark", f"{MARK:#x}/{MARK:#x}", "-m", "comment", "--comment",
             COMMENT + " (a flow not yet seen past its reply)", *target]]


def nft_script(udp_ports: str = "", sync_port: int = 0) -> str:
    """The table that picks the packets to hold: after conntrack, the flows past a reply (both
    directions' tuples, NAT or not) are remembered; before it, TCP packets of other flows are
    marked, and with ``udp_ports`` (apply.defer_udp_ports: the peers' source NAT ports) UDP
    packets of other flows addressed to this node at those ports: replies to a peer's NATed
    flows, which a first packet of a new flow cannot be told from otherwise (both of the defer's
    bits are taken off again after conntrack)."""
    keep = f"{0xFFFFFFFF & ~(MARK | DONE):#x}"
    mark = f"meta mark set meta mark | {MARK:#x}"
    learn, pick = [], []
    for fam, ip, name in (("ipv4", "ip", "seen4"), ("ipv6", "ip6", "seen6")):
        for way in ("original", "reply"):
            tuple_ = f"{{ ct {way} {ip} saddr . ct {way} {ip} daddr . ct {way} proto-src . ct {way} proto-dst }}"
            learn.append(f"meta nfproto {fam} meta l4proto tcp ct status seen-reply add @{name} {tuple_}")
            # a UDP flow only needs its entry here: one-way flows (syslog, tunnels) are never held
            learn.append(f"meta nfproto {fam} meta l4proto udp ct state established,new add @{name} {tuple_}")
        pick.append(f"meta nfproto {fam} tcp flags & (syn | rst) == 0 {ip} saddr . {ip} daddr . tcp sport . tcp dport "
                    f"!= @{name} {mark}")
        if udp_ports:
            skip = f"udp dport != {sync_port} " if sync_port else ""  # the sync link's own datagrams
            pick.append(f"meta nfproto {fam} udp dport {{ {udp_ports.replace(' ', '')} }} {skip}fib daddr type local "
                        f"{ip} saddr . {ip} daddr . udp sport . udp dport != @{name} {mark}")
    sets = "".join(f"    set seen{v} {{\n        type {kind} . {kind} . inet_service . inet_service\n"
                   f"        flags timeout\n        timeout {SEEN_TIMEOUT}s\n        size 1048576\n    }}\n"
                   for v, kind in ((4, "ipv4_addr"), (6, "ipv6_addr")))
    body = "".join(f"        {line}\n" for line in learn)
    marks = "".join(f"        {line}\n" for line in pick)
    return (f"table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\ntable inet {NFT_TABLE} {{\n{sets}"
            f"    chain learn {{\n        type filter hook prerouting priority -150; policy accept;\n"
            f"        meta mark & {MARK | DONE:#x} != 0 meta mark set meta mark & {keep}\n{body}    }}\n"
            f"    chain pick {{\n        type filter hook prerouting priority -310; policy accept;\n"
            f"{marks}    }}\n}}\n")


def _iptables(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([tool, "-w", "5", "-t", "raw", *args], capture_output=True, text=True,
                          timeout=RULE_TIMEOUT, check=False)
    if done.returncode not in (0, 1):  # 1: -C found no such rule
        raise KernelError(f"{tool} {' '.join(args[:2])} (the defer's rules) failed: {done.stderr.strip()}")
    return done


def _nft(script: str) -> None:
    done = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=RULE_TIMEOUT,
                          check=False)
    if done.returncode != 0:
        raise KernelError(f"nft: the defer's table: {done.stderr.strip()}")


def _remove_ours(tool: str) -> None:
    """Every rule of the raw PREROUTING chain that carries the defer's comment, whatever its queue
    (a rule an earlier life left with another queue number would pass every packet unheld)."""
    listed = _iptables(tool, "-S", "PREROUTING").stdout.splitlines()
    for line in listed:
        if COMMENT in line and line.startswith("-A PREROUTING "):
            _iptables(tool, "-D", *shlex.split(line)[1:])


def install_rules(queue: int, udp_ports: str = "", sync_port: int = 0) -> None:
    """The nftables table and the queue rules for IPv4 and IPv6, first in the chain; whatever an
    earlier life left is taken away first. Both tools are looked for before anything is added."""
    for tool in ("iptables", "ip6tables"):
        if shutil.which(tool) is None:
            raise KernelError(f"apply.defer_queue needs {tool} (package iptables): the NFQUEUE target is "
                              "reached through it, this kernel has no nftables queue statement")
    _nft(nft_script(udp_ports, sync_port))
    for tool in ("iptables", "ip6tables"):
        _remove_ours(tool)
        for rule in reversed(rules(queue)):  # each inserted first: they end up in this order
            _iptables(tool, "-I", "PREROUTING", "1", *rule)


def remove_rules() -> None:
    """The queue rules and the table gone (a clean stop); a failure is logged: with --queue-bypass
    a rule left behind passes every packet."""
    try:
        for tool in ("iptables", "ip6tables"):
            if shutil.which(tool) is not None:
                _remove_ours(tool)
        _nft(f"table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n")
    except (OSError, subprocess.SubprocessError, KernelError) as exc:
        log.warning("defer: removing the queue rules: %s", exc)


def _fields(tuple_payload: bytes) -> tuple[dict[int, bytes], dict[int, bytes]]:
    top = attr_map(tuple_payload)
    return attr_map(top.get(ct.CTA_TUPLE_IP, b"")), attr_map(top.get(ct.CTA_TUPLE_PROTO, b""))


def may_pass(key: bytes, attrs: bytes | None) -> bool:
    """Whether a packet whose own tuple is ``key`` can go on, given its entry now (``attrs``, as
    KernelTable.lookup gives it; None: no entry). A packet of the reply direction needs the
    entry to exist (the SYN-ACK reaching the node that did not see the SYN); one of the original
    direction also needs the entry to have seen a reply (the origin's ACK after a SYN-ACK only
    the other node saw: until the reply's state is replicated here, this kernel finds it
    INVALID). A UDP packet of either direction needs the entry only."""
    if attrs is None:
        return False
    top = attr_map(attrs)
    orig = top.get(ct.CTA_TUPLE_ORIG)
    own = _fields(key[3:])
    if orig is None or _fields(orig) != own:
        return True
    if own[1].get(ct.CTA_PROTO_NUM) == bytes((ct.IPPROTO_UDP,)):  # an entry is all UDP needs: only
        return True  # a peer's flow's first reply waits, never a one-way flow's every datagram
    status = top.get(ct.CTA_STATUS, b"")
    return len(status) == 4 and bool(int.from_bytes(status, "big") & ct.IPS_SEEN_REPLY)


class DeferPolicy:
    """Which held packets go on, and when. ``held``: packet id -> (flow key, deadline, arrival)."""

    def __init__(self, wait: float, max_held: int = MAX_HELD) -> None:
        self.wait = wait
        self.max_held = max_held
        self.held: dict[int, tuple[bytes, float, float]] = {}
        self.stats = {"packets": 0, "held": 0, "passed_present": 0, "passed_unkeyed": 0, "passed_no_peer": 0,
                      "passed_full": 0, "released_found": 0, "released_timeout": 0, "released_stop": 0}
        self._waits: list[float] = []  # seconds each released packet waited, the most recent SAMPLES

    def arrive(self, packet_id: int, key: bytes | None, passes: bool, ready: bool, now: float) -> bool:
        """A packet came (``passes``: may_pass says its entry lets it on); True: it goes on now
        (else it is held)."""
        stats = self.stats
        stats["packets"] += 1
        if key is None:
            stats["passed_unkeyed"] += 1
        elif passes:
            stats["passed_present"] += 1
        elif not ready:
            stats["passed_no_peer"] += 1
        elif len(self.held) >= self.max_held:
            stats["passed_full"] += 1
        else:
            stats["held"] += 1
            self.held[packet_id] = (key, now + self.wait, now)
            return False
        return True

    def waiting(self) -> list[tuple[int, bytes]]:
        return [(pid, key) for pid, (key, _deadline, _since) in self.held.items()]

    def found(self, packet_ids: list[int], now: float) -> list[int]:
        """Their flows are in the kernel now: released (those still held)."""
        return self._release([p for p in packet_ids if p in self.held], now, "released_found")

    def expire(self, now: float) -> list[int]:
        """The packets whose wait is over: released, to pass as they would have without a defer."""
        return self._release([p for p, (_k, deadline, _s) in self.held.items() if deadline <= now], now,
                             "released_timeout")

    def release_all(self, now: float) -> list[int]:
        """Every held packet (the daemon stops, or no peer is left to wait for)."""
        return self._release(list(self.held), now, "released_stop")

    def deadline(self) -> float | None:
        return min((d for _k, d, _s in self.held.values()), default=None)

    def _release(self, packet_ids: list[int], now: float, why: str) -> list[int]:
        for pid in packet_ids:
            _key, _deadline, since = self.held.pop(pid)
            self._waits.append(now - since)
        if len(self._waits) > SAMPLES:
            del self._waits[:len(self._waits) - SAMPLES]
        self.stats[why] += len(packet_ids)
        return packet_ids

    def latency(self) -> dict[str, float]:
        """How long released packets waited (seconds): p50, p99 and the longest, of the recent ones."""
        if not self._waits:
            return {"p50": 0.0, "p99": 0.0, "max": 0.0}
        ordered = sorted(self._waits)
        last = len(ordered) - 1
        return {"p50": round(ordered[min(last, int(0.5 * len(ordered)))], 6),
                "p99": round(ordered[min(last, int(0.99 * len(ordered)))], 6), "max": round(ordered[-1], 6)}


class DeferQueue:
    """The policy on a real queue: packets read as the loop sees the socket readable, verdicts
    sent at once or when the flow is found or the wait ends. ``ready()``: whether some peer is
    live (the engine's view), so that waiting can end in the flow arriving. Live is enough: a
    peer whose bulk has not all arrived yet still sends each new flow as its kernel makes it
    (found in the lab: waiting only for complete peers let the SYN-ACKs of every connection
    opened in the seconds after a peer's restart through unheld, and the strict ruleset dropped
    them, 851 packets in one restart).

    Every verdict sends the packet round the raw table's chain again (NF_REPEAT) with DONE added
    to its mark, so the rules after the defer's still apply to it."""

    def __init__(self, queue: int, wait: float, loop: asyncio.AbstractEventLoop, ready: Callable[[], bool],
                 udp_ports: str = "", sync_port: int = 0) -> None:
        self.policy = DeferPolicy(wait)
        self.loop = loop
        self.ready = ready
        self.queue = queue
        self.socket = nfqueue.QueueSocket(queue)  # bound before the rules: no packet waits for nobody
        self.table = KernelTable(rcvbuf=1 << 20)
        self.errors = 0  # lookups, reads or verdicts that failed (the packet passes: counted, never held)
        self._marks: dict[int, int] = {}  # held packet id -> its mark, given back with DONE added
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        install_rules(queue, udp_ports, sync_port)
        loop.add_reader(self.socket.fileno(), self._readable)

    def _failed(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        if self.errors == 1:  # once: the counter tells how often
            log.warning("defer: %s failed: %s (packets pass unheld)", what, exc)

    def _read(self) -> list[nfqueue.Queued]:
        """The packets queued now ([] also when reading failed: counted)."""
        try:
            return self.socket.read()
        except (OSError, CodecError) as exc:
            self._failed("reading the netfilter queue", exc)
            return []

    def _readable(self) -> None:
        packets = self._read()
        if not packets:
            return
        decided: set[int] = set()
        try:
            now = self.loop.time()
            keys = [nfqueue.packet_key(p.payload) for p in packets]
            found = iter(self._may_pass([k for k in keys if k is not None]))
            ready = self.ready()
            for packet, key in zip(packets, keys, strict=True):
                here = next(found) if key is not None else False
                if self.policy.arrive(packet.packet_id, key, here, ready, now):
                    self._pass(packet.packet_id, packet.mark)
                else:
                    self._marks[packet.packet_id] = packet.mark
                decided.add(packet.packet_id)
        except Exception as exc:  # whatever went wrong, no packet read may stay in the queue
            self._failed("deciding on queued packets", exc)
            for packet in packets:
                if packet.packet_id not in decided:
                    self._pass(packet.packet_id, packet.mark)
        self._schedule()

    def _may_pass(self, keys: list[bytes]) -> list[bool]:
        if not keys:
            return []
        try:
            # in chunks: each answer that finds an entry carries it (a page of receive buffer each)
            out: list[bool] = []
            for at in range(0, len(keys), LOOKUP_CHUNK):
                chunk = keys[at:at + LOOKUP_CHUNK]
                out += [may_pass(k, a) for k, a in zip(chunk, self.table.lookup(chunk), strict=True)]
            return out
        except (OSError, KernelError, CodecError) as exc:
            self._failed("looking flows up", exc)
            return [True] * len(keys)  # as if found: passes at once

    def _pass(self, packet_id: int, mark: int) -> None:
        try:
            self.socket.verdict(packet_id, nfqueue.NF_REPEAT, mark | DONE)
        except OSError as exc:  # the kernel keeps it until the queue is unbound (at close)
            self._failed(f"the verdict on packet {packet_id}", exc)

    def _release(self, packet_ids: list[int]) -> None:
        for pid in packet_ids:
            self._pass(pid, self._marks.pop(pid, 0))

    def _schedule(self) -> None:
        """The next look: in POLL, or at the earliest deadline if sooner. A timer already set for
        sooner is kept (re-arming it on every packet starved it: found by review, a held packet
        waited 2 s under a stream of SYN-ACKs)."""
        deadline = self.policy.deadline()
        if deadline is None:
            return
        at = min(self.loop.time() + POLL, deadline)
        if self._timer is not None and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = self.loop.call_at(at, self._tick), at

    def written(self) -> None:
        """A batch of peers' flows was written into this kernel: the held packets' flows looked up now."""
        if self.policy.held:
            self._tick()

    def _tick(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, float("inf")
        now = self.loop.time()
        if not self.ready():
            self._release(self.policy.release_all(now))
            return
        # the oldest first, a bounded number per turn: a flood of SYN-ACKs for flows that never
        # come must not turn into a flood of lookups on the loop (they pass at their deadline)
        waiting = self.policy.waiting()[:LOOKUPS_PER_TURN]
        if waiting:
            passes = self._may_pass([key for _pid, key in waiting])
            self._release(self.policy.found([pid for (pid, _k), ok in zip(waiting, passes, strict=True) if ok], now))
        self._release(self.policy.expire(now))
        self._schedule()

    def stats(self) -> dict[str, Any]:
        return {**self.policy.stats, "waiting": len(self.policy.held), "errors": self.errors,
                "overruns": self.socket.overruns, "wait_seconds": self.policy.latency()}

    def close(self) -> None:
        """A clean stop: the rules first (nothing new is queued), then what is queued read and
        passed, the held packets passed, and only then the queue unbound: the kernel drops what
        is still queued when its queue is unbound (found by review). A crash loses those."""
        if self._timer is not None:
            self._timer.cancel()
        self.loop.remove_reader(self.socket.fileno())
        remove_rules()
        for _ in range(100):  # bounded: nothing new comes once the rules are gone
            packets = self._read()
            if not packets:
                break
            for packet in packets:
                self._pass(packet.packet_id, packet.mark)
        self._release(self.policy.release_all(self.loop.time()))
        self.socket.close()
        self.table.close()

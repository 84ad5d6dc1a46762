"""Sustained churn in this network namespace's conntrack table: established TCP flows created at a
steady rate and each deleted a fixed time after it was created, written by ctbridge's own batched
CT_NEW and CT_DELETE (ctbridge.conntrack.table.KernelTable), as a busy NAT gateway's table churns.

    ip netns exec NS python -m tests.support.churn load S
    ip netns exec NS python -m tests.support.churn churn --rate R --seconds D --first S [--life 2]

``load`` writes S standing flows (indices 0..S-1) at once. ``churn`` then creates R flows per
second for D seconds, in batches every 10 ms (each batch brings the count created up to R times
the seconds elapsed), with indices from S on, so no churned flow shares a tuple with a standing
one or with another churned one; every flow is deleted ``--life`` seconds after its batch was
created. Flows whose deletion would fall after the D seconds stay in the table: when the
generator stops, the table holds the S standing flows and the last ``life`` seconds' flows.

Each prints one JSON object: what it did (``created``, ``deleted``), the CLOCK_MONOTONIC times
(the same in every network namespace) at which its first kernel write began and its last ended
(``start``, ``end``), how far behind the schedule the generator fell at worst (``max_lag``,
seconds: the wait of the oldest flow not yet created) and its own CPU seconds (``cpu``: user and
system). A generator that falls behind makes up in larger batches, and its last batch, at D
seconds, brings the count created to R times D. A write or deletion the kernel refuses, or a
deletion of a flow no longer there, ends the run with a message on stderr and exit status 1: the
numbers of a run that did not do what it says are worthless. Bounded: at most ``MAX_SECONDS`` of
churn and ``MAX_RATE`` flows per second.

The flows are those of tests.support.builders.tcp_flows (198.51.100.x:port -> 203.0.113.y:443),
built here from a template per address pair, because building each one field by field costs
about 11 µs, a tenth of a second of the generator's time per second at 10,000 flows/s.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterable
from typing import Any

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack.codec import Entry, make_key
from ctbridge.conntrack.table import CommitResult, KernelTable
from tests.support import ROOT, builders

TICK = 0.010  # seconds between batches
MAX_SECONDS = 600.0
MAX_RATE = 200_000
PORTS = 60_000  # tcp_flows: source ports 1024..61023 per address pair
HOSTS = 250 * 250  # address pairs
_SENTINEL = 0xA5C3  # a port whose bytes appear nowhere else in an entry of this layout


class Flows:
    """tcp_flows(n)[i] for any i, without building each field by field: per address pair one
    entry is built with a sentinel source port, and each flow patches its port in twice (the
    original tuple's source port and the reply tuple's destination port)."""

    def __init__(self, timeout: int = 3600) -> None:
        self.timeout = timeout
        self._templates: dict[int, tuple[bytes, bytes, bytes]] = {}

    def _template(self, host: int) -> tuple[bytes, bytes, bytes]:
        src = bytes((198, 51, 100, 1 + host % 250))
        dst = bytes((203, 0, 113, 1 + host // 250 % 250))
        port = _SENTINEL.to_bytes(2, "big")
        orig = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_TCP, src, dst, _SENTINEL, 443)
        reply = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_TCP, dst, src, 443, _SENTINEL)
        status = ct.IPS_CONFIRMED | ct.IPS_SEEN_REPLY | ct.IPS_ASSURED
        entry = builders.build_entry(ct.AF_INET, orig, reply, status=status, timeout=self.timeout, tcp_state=3)
        at = [i for i in range(len(entry.attrs) - 1) if entry.attrs[i:i + 2] == port]
        if len(at) != 2:
            raise AssertionError("the sentinel port is not unique in the flow template")
        a = entry.attrs
        t = (a[:at[0]], a[at[0] + 2:at[1]], a[at[1] + 2:])
        self._templates[host] = t
        return t

    def entry(self, i: int) -> Entry:
        host, port = divmod(i, PORTS)
        if host >= HOSTS:
            raise ValueError(f"flow index {i} is beyond the {HOSTS * PORTS} distinct flows")
        t = self._templates.get(host) or self._template(host)
        p = (1024 + port).to_bytes(2, "big")
        attrs = t[0] + p + t[1] + p + t[2]
        # the key is the family, the zone and the original tuple's payload (codec.make_key); the
        # original tuple is the first attribute, its payload right after its 4-byte header
        olen = int.from_bytes(attrs[0:2], sys.byteorder)
        return Entry(make_key(ct.AF_INET, 0, attrs[4:olen]), ct.AF_INET, attrs)

    def entries(self, first: int, n: int) -> list[Entry]:
        return [self.entry(i) for i in range(first, first + n)]


# --- driving the generator and checking a copy against a table, from outside the namespace ----------------------


class ChurnError(Exception):
    """The generator failed; the message is its own, one line."""


def generate(ns: str, *args: str, timeout: float) -> dict[str, Any]:
    """Run the generator (``load N`` or ``churn ...``) in namespace ``ns``; what it printed."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        res = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "tests.support.churn", *args],
                             capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ChurnError(f"the churn generator ({' '.join(args[:1])}) ran past {timeout:.0f} s") from exc
    if res.returncode != 0:
        lines = (res.stderr or res.stdout).strip().splitlines()
        raise ChurnError(lines[-1] if lines else f"the churn generator exited with status {res.returncode}")
    out: dict[str, Any] = json.loads(res.stdout)
    return out


FlowId = tuple[str, str, str, str, int, int, int]  # family, protocol, src, dst, sport, dport, zone


def view_id(v: dict[str, Any]) -> FlowId:
    """The original tuple and zone of an entry view (`ctbridge dump/kernel dump --json`)."""
    return (v["family"], v["proto"], v["src"], v["dst"], v.get("sport", 0), v.get("dport", 0), v.get("zone", 0))


def line_id(line: str) -> FlowId | None:
    """The same for a line of `conntrack -L` or of `conntrackd -e`/`-i` (the first src=, dst=,
    sport=, dport= are the original direction's); None for a line that lists no flow."""
    words = line.split()
    fields: dict[str, str] = {}
    proto = ""
    for i, w in enumerate(words):
        if w in ("tcp", "udp", "icmp", "icmpv6", "sctp", "dccp", "udplite", "gre") and not proto and i < 3:
            proto = w
        k, eq, val = w.partition("=")
        if eq and k not in fields:
            fields[k] = val
    if "src" not in fields:
        return None
    family = "ipv6" if ":" in fields["src"] else "ipv4"
    return (family, proto, fields["src"], fields["dst"], int(fields.get("sport", 0)), int(fields.get("dport", 0)),
            int(fields.get("zone", 0)))


def difference(table: Iterable[FlowId], copy: Iterable[FlowId]) -> tuple[int, int, int]:
    """(missing, stale, flows): flows of ``table`` the copy lacks, flows the copy holds that the
    table does not, and how many flows the table holds."""
    want, have = set(table), set(copy)
    return len(want - have), len(have - want), len(want)


def _fail(msg: str) -> int:
    print(f"churn: {msg}", file=sys.stderr)
    return 1


def _refused(res: CommitResult, n: int, what: str) -> str:
    if res.failed:
        err = res.failed[0].errno
        return f"the kernel refused {len(res.failed)} of {n} {what}: {os.strerror(err)} (errno {err}) on the first"
    return f"{n - res.created} of {n} {what} were in the table already (left over from an earlier run?)"


def _cpu() -> dict[str, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"user": round(r.ru_utime, 3), "sys": round(r.ru_stime, 3)}


def load(n: int) -> int:
    flows = Flows().entries(0, n)
    with KernelTable() as table:
        start = time.monotonic()
        res = table.commit(flows)
        end = time.monotonic()
    if res.failed or res.created != n:
        return _fail(_refused(res, n, "standing flows"))
    print(json.dumps({"created": n, "deleted": 0, "start": start, "end": end, "cpu": _cpu()}))
    return 0


LIVES = 10  # with --life-max: the lives between --life and it, each flow given one by its index


def life_of(i: int, life: float, life_max: float) -> float:
    """Flow ``i``'s life: ``life``, or with a larger ``life_max`` one of LIVES lives evenly spread
    between the two, spread over the flows by their index (the golden ratio's fractions)."""
    if life_max <= life:
        return life
    bucket = int((i * 0.6180339887) % 1 * LIVES)
    return life + (life_max - life) * (bucket + 0.5) / LIVES


def churn(rate: int, seconds: float, first: int, life: float, life_max: float = 0.0) -> int:
    """The churn loop: at each tick, create what the schedule asks for, delete what has lived
    its life. Runs ``seconds`` plus one batch's write (which completes the count)."""
    flows = Flows()
    lives: dict[float, collections.deque[tuple[float, list[bytes]]]] = {}
    created = deleted = batches = 0
    max_lag = 0.0
    nxt = first
    with KernelTable() as table:
        start = time.monotonic()
        stop = start + seconds
        tick = start
        total = int(rate * seconds)
        while True:
            now = time.monotonic()
            max_lag = max(max_lag, now - start - created / rate)  # how late the oldest flow not yet made is
            due = min(int(rate * (now - start)) + 1, total)
            if due > created:
                batch = flows.entries(nxt, due - created)
                res = table.commit(batch)
                if res.failed or res.created != len(batch):
                    return _fail(_refused(res, len(batch), "new flows"))
                by_life: dict[float, list[bytes]] = {}
                for i, e in enumerate(batch, nxt):
                    by_life.setdefault(life_of(i, life, life_max), []).append(e.key)
                for span, keys in by_life.items():
                    lives.setdefault(span, collections.deque()).append((now, keys))
                nxt += len(batch)
                created += len(batch)
                batches += 1
            old: list[bytes] = []
            for span, alive in lives.items():
                while alive and alive[0][0] + span <= now:
                    old += alive.popleft()[1]
            if old:
                kr = table.delete(old)
                if kr.failed or kr.missing:
                    return _fail(f"deleting {len(old)} flows: {kr.missing} were gone already, {len(kr.failed)} "
                                 f"refused (first errno {kr.failed[0].errno if kr.failed else '-'})")
                deleted += kr.done
            if now >= stop:  # this last batch brought the count to the rate times the seconds
                break
            tick += TICK
            pause = tick - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            else:  # behind the schedule: the next batch is larger, it does not come sooner
                tick = time.monotonic()
        end = time.monotonic()
    print(json.dumps({"created": created, "deleted": deleted, "start": start, "end": end, "batches": batches,
                      "max_lag": round(max_lag, 4), "left": created - deleted, "rate": rate,
                      "seconds": seconds, "cpu": _cpu()}))
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tests.support.churn", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    ld = sub.add_parser("load", help="write S standing flows at once")
    ld.add_argument("n", type=int)
    ch = sub.add_parser("churn", help="create and delete flows at a steady rate")
    ch.add_argument("--rate", type=int, required=True, help="flows created per second")
    ch.add_argument("--seconds", type=float, required=True, help="how long to create flows")
    ch.add_argument("--first", type=int, default=0, help="index of the first flow (after the standing ones)")
    ch.add_argument("--life", type=float, default=2.0, help="seconds from a flow's creation to its deletion")
    ch.add_argument("--life-max", type=float, default=0.0,
                    help="lives spread from --life to this (web-like traffic: 0.2 to 2); 0: every flow --life")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.what == "load":
        if not 0 < args.n <= HOSTS * PORTS:
            return _fail(f"{args.n} standing flows: between 1 and {HOSTS * PORTS}")
        return load(args.n)
    if not 0 < args.rate <= MAX_RATE or not 0 < args.seconds <= MAX_SECONDS or args.life < 0:
        return _fail(f"rate 1..{MAX_RATE}, seconds up to {MAX_SECONDS:.0f}, life not negative")
    if args.first < 0 or args.first + int(args.rate * args.seconds) > HOSTS * PORTS:
        return _fail("the flows would run past the distinct tuples tcp_flows has")
    return churn(args.rate, args.seconds, args.first, args.life, args.life_max)


if __name__ == "__main__":
    sys.exit(main())

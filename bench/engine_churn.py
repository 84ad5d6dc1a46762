"""Engine benchmark under sustained churn: CPU per flow change of the engine alone, stage by
stage, on the path the daemons take (raw kernel event buffers, refresh sweeps over dump messages).

    python bench/engine_churn.py [--flows 100000] [--standing 50000] [--batch 200] [--repeat 5]

Two engines in one process (no sockets, a fake clock). A's kernel "sends" the event messages a
kernel sends when flows are created and destroyed (ctnetlink's layout: tuples, id, status,
timeout, TCP protoinfo, an all-zero synproxy, mark), ``--batch`` new flows per 10 ms (200: 20,000
flows/s, as bench/profile.py --churn 20000) over ``--standing`` flows, each destroyed 2 s after
it was created, and A's table is swept every 5 s (its dump as refresh_loop hands it over, in
chunks of 8192). Timed apart, per flow change: A reading events (kernel_messages), A packing
datagrams, B taking them, A taking B's acknowledgements, A's refresh sweeps. B's copy is
checked against A's table at the end. The daemons' own costs (system calls, the event loop)
are bench/profile.py's.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec
from ctbridge.sync import wire
from ctbridge.sync.engine import Engine, EngineConfig, Sweep
from ctbridge.sync.filter import LOOPBACK, FlowFilter
from tests.support import builders

TICK = 0.010  # seconds per batch, as tests/support/churn.py
LIFE = 2.0  # seconds each churned flow lives
SWEEP_EVERY = 5.0  # seconds between refresh sweeps
REFRESH_CHUNK = 8192  # as ctbridge.daemon.refresh
NEW_FLAGS = ct.NLM_F_CREATE | ct.NLM_F_EXCL
_ID = codec.attr(ct.CTA_ID, (12345).to_bytes(4, "big"))
_SYNPROXY = codec.attr(ct.CTA_SYNPROXY, codec.attr(1, bytes(4)) + codec.attr(2, bytes(4)) + codec.attr(3, bytes(4)),
                       nested=True)


def kernel_attrs(entry: codec.Entry, destroy: bool = False) -> bytes:
    """``entry``'s attributes in the order ctnetlink puts them in an event or a dump message."""
    parts = {t: entry.attrs[s - 4:s - 4 + codec.align(e - s + 4)] for t, s, e in codec.iter_attrs(entry.attrs)}
    out = parts[ct.CTA_TUPLE_ORIG] + parts[ct.CTA_TUPLE_REPLY] + _ID + parts[ct.CTA_STATUS] + parts[ct.CTA_TIMEOUT]
    if destroy:
        return out + parts[ct.CTA_MARK]
    return out + parts[ct.CTA_PROTOINFO] + _SYNPROXY + parts[ct.CTA_MARK]


def message(entry: codec.Entry, kind: str) -> bytes:
    if kind == "new":
        return codec.message(ct.MSG_CT_NEW, NEW_FLAGS, 0, entry.family, kernel_attrs(entry))
    if kind == "destroy":
        return codec.message(ct.MSG_CT_DELETE, 0, 0, entry.family, kernel_attrs(entry, destroy=True))
    return codec.message(ct.MSG_CT_NEW, ct.NLM_F_MULTI, 7, entry.family, kernel_attrs(entry))  # a dump's


class Load:
    """The kernel's messages of the run, made once: the standing flows' events, the churned
    flows' events (new, destroy), and every flow's dump message."""

    def __init__(self, standing: int, flows: int) -> None:
        entries = builders.tcp_flows(standing + flows)
        self.standing = [message(e, "new") for e in entries[:standing]]
        self.new = [message(e, "new") for e in entries[standing:]]
        self.gone = [message(e, "destroy") for e in entries[standing:]]
        self.dump = {e.key: message(e, "dump") for e in entries}


def run_once(load: Load, batch: int) -> dict[str, float]:
    auth = wire.Auth([bytes(range(32))])
    # the daemon's settings: each peer's copy capped at the kernel's table size (nf_conntrack_max,
    # 262,144 on a machine of 8 GiB); the filter: loopback and the sync addresses
    sync = (ipaddress.ip_network("192.0.2.1/32"), ipaddress.ip_network("192.0.2.2/32"))
    flow_filter = FlowFilter(ignore=(*LOOPBACK, *sync))
    a = Engine(EngineConfig(node_id=1, filter=flow_filter, max_entries=262_144), auth, epoch=1, now=0.0)
    b = Engine(EngineConfig(node_id=2, filter=flow_filter, max_entries=262_144), auth, epoch=1, now=0.0)
    now = 0.0
    timed: dict[str, float] = defaultdict(float)
    clock = time.process_time  # CPU time: the machine may be shared (other processes add wall time, not CPU)

    def exchange(stage: bool) -> None:
        start = clock()
        out = a.datagrams_to_send(now)
        t1 = clock()
        for data, _dest in out:
            b.receive_datagram(data, now)
        t2 = clock()
        back = b.datagrams_to_send(now)
        t3 = clock()
        for data, _dest in back:
            a.receive_datagram(data, now)
        t4 = clock()
        if stage:
            timed["A: datagrams_to_send"] += t1 - start
            timed["B: receive_datagram"] += t2 - t1
            timed["B: datagrams_to_send (acks)"] += t3 - t2
            timed["A: receive_datagram (acks)"] += t4 - t3
        a.handle_timer(now)
        b.handle_timer(now)

    for _ in range(3):  # each answers the other's challenge
        exchange(False)
    a.kernel_messages(load.standing, now)
    while a.internal_cache.pending:
        exchange(False)
    new, gone, dump = load.new, load.gone, load.dump
    life = round(LIFE / TICK)
    sweep_at = SWEEP_EVERY
    changes = 0
    gc.collect()
    gc.disable()
    try:
        for i in range(len(new) // batch + life):
            now += TICK
            buffers = new[i * batch:(i + 1) * batch] + (gone[(i - life) * batch:(i - life + 1) * batch]
                                                       if i >= life else [])
            changes += len(buffers)
            start = clock()
            a.kernel_messages(buffers, now)
            timed["A: kernel_messages"] += clock() - start
            exchange(True)
            if now >= sweep_at:
                sweep_at += SWEEP_EVERY
                messages = [dump[k] for k in a.internal]
                start = clock()
                sweep = Sweep()  # as refresh_loop: one per dump, for all its chunks
                for at in range(0, len(messages), REFRESH_CHUNK):
                    a.kernel_refresh(messages[at:at + REFRESH_CHUNK], now, 30.0, newer=set(), sweep=sweep)
                timed["A: kernel_refresh (sweeps)"] += clock() - start
                timed["sweeps"] += 1
                timed["swept"] += len(messages)
        for _ in range(20):
            now += TICK
            exchange(True)
    finally:
        gc.enable()
    held = {k: f[0][wire.FLOW_HEADER:] for k, f in b.peers[1].external.items()}
    mine = {k: m[wire.FLOW_HEADER:] for k, m in a.internal.items()}
    assert held == mine, (len(held), len(mine))
    timed["changes"] = changes
    return timed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=100_000, help="flows created (and destroyed) by the churn")
    ap.add_argument("--standing", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=200, help="flows created per 10 ms")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    load = Load(args.standing, args.flows)
    runs = [run_once(load, args.batch) for _ in range(args.repeat)]
    stages = [k for k in runs[0] if k.startswith(("A:", "B:"))]
    best = {k: min(r[k] for r in runs) for k in stages}
    changes = runs[0]["changes"]
    print(f"\nengine under churn: {args.flows:,} flows created and destroyed ({changes:,.0f} flow changes) in "
          f"batches of {args.batch} per 10 ms over {args.standing:,} standing flows; {runs[0]['sweeps']:.0f} sweeps "
          f"of {runs[0]['swept'] / max(1, runs[0]['sweeps']):,.0f} flows; best of {args.repeat}")
    print(f"{'stage':<36}{'seconds':>9}{'µs per flow change':>20}")
    for k in stages:
        print(f"{k:<36}{best[k]:>9.3f}{best[k] / changes * 1e6:>20.2f}")
    for side in ("A", "B"):
        total = sum(v for k, v in best.items() if k.startswith(side))
        print(f"{side + ' in all':<36}{total:>9.3f}{total / changes * 1e6:>20.2f}")
    total = sum(best.values())
    print(f"{'both':<36}{total:>9.3f}{total / changes * 1e6:>20.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

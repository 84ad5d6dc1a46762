"""Engine benchmark: flows per second through encode -> authenticate -> verify -> decode -> external
cache, on one core, and bytes per flow on the wire.

    python bench/engine.py [--flows N] [--repeat R] [--auth blake2b|hmac-sha256|none] [--conntrackd]
                           [--protocol 2|3|both]

Two engines in one process (no sockets): A's internal cache holds N established TCP flows laid out
as the kernel dumps them; A streams them (a bulk transfer, as after a failover or restart) and every
datagram is handed to B. Timed separately: A's side (encode, coalescing, sign) and B's side
(verify, decode, version check, external cache). With --conntrackd, conntrackd's own bulk sync
(FTFW over UDP between two namespaces, A's cache -> B's external cache) is measured in the same
run for comparison; it includes the kernel's UDP path, which this bench does not. ``--protocol
both`` runs the engines at version 2 (FLOW as the kernel's attributes) and at version 3 (compact
FLOWs), interleaved, and prints both with the bytes and flows per datagram. Times are this
process's CPU seconds (it runs on one thread), so a busy machine lengthens them less than the
wall clock's.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec
from ctbridge.conntrack.codec import Entry, Event, EventKind
from ctbridge.sync import wire
from ctbridge.sync.engine import Engine, EngineConfig
from tests.support import builders

# What a real dump adds to a TCP entry besides tuples, status, timeout, protoinfo and mark.
_KERNEL_EXTRA = (codec.attr(ct.CTA_USE, (1).to_bytes(4, "big")) + codec.attr(ct.CTA_ID, (12345).to_bytes(4, "big"))
                 + codec.attr(ct.CTA_SYNPROXY, codec.attr(1, bytes(4)) + codec.attr(2, bytes(4))
                              + codec.attr(3, bytes(4)), nested=True))


def kernel_like_flows(n: int) -> list[Entry]:
    return [Entry(e.key, e.family, e.attrs + _KERNEL_EXTRA) for e in builders.tcp_flows(n)]


def run_once(flows: list[Entry], algorithm: str, encrypt: str = "off",
             protocol: int = wire.VERSION) -> dict[str, float]:
    key = bytes(range(32))
    if encrypt != "off":  # pairwise keys, as rendered, and every member's sealing key
        from tests.support.enginelab import pairwise_auth
        auth_a, auth_b = (pairwise_auth(n, [1, 2], encrypt=encrypt) for n in (1, 2))
    else:
        auth_a = auth_b = wire.Auth([key] if algorithm != "none" else [], algorithm)
    a = Engine(EngineConfig(node_id=1, burst=1 << 30, max_version=protocol), auth_a, epoch=1, now=0.0)
    b = Engine(EngineConfig(node_id=2, max_version=protocol), auth_b, epoch=1, now=0.0)
    for _ in range(3):  # each answers the other's challenge: B applies A's datagrams from then on
        for src, dst in ((a, b), (b, a)):
            for data, _dest in src.datagrams_to_send(0.0):
                dst.receive_datagram(data, 0.0)
    # A then streams as to a peer it has not heard: without a flow-control window, which would
    # only count datagrams here (bench/sync.py measures flow control, between daemons); in the
    # version it learnt B speaks
    speaks = a.peers.pop(2).speaks
    a.sender.datagram_version = lambda dest=None: min(protocol, speaks)  # type: ignore[method-assign]
    start = time.process_time()
    a.kernel_events([Event(EventKind.NEW, e, 0) for e in flows], 0.0)
    ingest = time.process_time() - start
    a.internal_cache.drop_pending()  # measure the bulk path below, not the event path twice
    a.bulk_send(0.0, 0)
    gc.disable()
    try:
        start = time.process_time()
        out = []
        for _ in range(len(flows)):  # each call sends a window's worth (128 datagrams)
            chunk = a.datagrams_to_send(0.0)
            if not chunk:
                break
            out += chunk
        send = time.process_time() - start
        start = time.process_time()
        for data, _dest in out:
            b.receive_datagram(data, 0.0)
        recv = time.process_time() - start
    finally:
        gc.enable()
    peer = b.peers[1]
    assert len(peer.external) == len(flows), (len(peer.external), len(flows))
    assert b.stats["rejected_auth"] == b.stats["rejected_malformed"] == 0
    wire_bytes = sum(len(d) for d, _ in out)
    return {"ingest": ingest, "send": send, "recv": recv, "bytes": wire_bytes, "datagrams": len(out)}


def compare_sealing(flows: list[Entry], repeat: int) -> int:
    """The MAC-only path beside both ciphers, runs interleaved so that the machine's noise falls
    on all three alike."""
    modes = ["off", "aes-256-gcm", "chacha20-poly1305"]
    best: dict[str, dict[str, float]] = {}
    for _ in range(repeat):
        for mode in modes:
            r = run_once(flows, "blake2b", mode)
            if mode not in best or r["send"] + r["recv"] < best[mode]["send"] + best[mode]["recv"]:
                best[mode] = r
    n = len(flows)
    base = best["off"]["send"] + best["off"]["recv"]
    print(f"\nsealing, {n:,} TCP flows, pairwise blake2b MACs, one core, best of {repeat}")
    print(f"{'payload':<20}{'send s':>9}{'recv s':>9}{'flows/s':>12}{'bytes/flow':>12}{'vs MAC only':>13}")
    for mode in modes:
        r = best[mode]
        total = r["send"] + r["recv"]
        label = "MAC only" if mode == "off" else mode
        print(f"{label:<20}{r['send']:>9.3f}{r['recv']:>9.3f}{n / total:>12,.0f}{r['bytes'] / n:>12.1f}"
              f"{total / base:>12.2f}x")
    return 0


def compare_versions(flows: list[Entry], repeat: int) -> int:
    """Versions 2 and 3 side by side, runs interleaved (the machine's noise falls on both alike)."""
    best: dict[int, dict[str, float]] = {}
    for _ in range(repeat):
        for protocol in (2, 3):
            r = run_once(flows, "blake2b", protocol=protocol)
            if protocol not in best or r["send"] + r["recv"] < best[protocol]["send"] + best[protocol]["recv"]:
                best[protocol] = r
    n = len(flows)
    print(f"\nprotocol versions, {n:,} established TCP flows of IPv4 (a bulk), blake2b MACs, one core, best of "
          f"{repeat}")
    print(f"{'version':<10}{'A us/flow':>10}{'B us/flow':>10}{'both':>8}{'datagrams':>11}{'flows/dgram':>12}"
          f"{'bytes/flow':>11}")
    for protocol in (2, 3):
        r = best[protocol]
        print(f"{protocol:<10}{r['send'] * 1e6 / n:>10.2f}{r['recv'] * 1e6 / n:>10.2f}"
              f"{(r['send'] + r['recv']) * 1e6 / n:>8.2f}{r['datagrams']:>11,}{n / r['datagrams']:>12.1f}"
              f"{r['bytes'] / n:>11.1f}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--auth", default="blake2b", choices=["blake2b", "hmac-sha256", "none"])
    ap.add_argument("--encrypt", default="off", choices=["off", "aes-256-gcm", "chacha20-poly1305", "all"],
                    help="seal the payload too (pairwise blake2b keys); all: MAC only and both ciphers, side by side")
    ap.add_argument("--conntrackd", action="store_true", help="also measure conntrackd's bulk sync")
    ap.add_argument("--protocol", default="3", choices=["2", "3", "both"],
                    help="the protocol version the engines speak; both: 2 and 3 side by side")
    args = ap.parse_args()
    flows = kernel_like_flows(args.flows)
    n = args.flows
    if args.encrypt == "all":
        return compare_sealing(flows, args.repeat)
    if args.protocol == "both":
        return compare_versions(flows, args.repeat)
    runs = [run_once(flows, args.auth, args.encrypt, int(args.protocol)) for _ in range(args.repeat)]
    best = min(runs, key=lambda r: r["send"] + r["recv"])
    total = best["send"] + best["recv"]
    print(f"\nengine, {n:,} TCP flows ({len(flows[0].attrs)} bytes of attributes each), auth {args.auth}, "
          f"one core, best of {args.repeat}")
    print(f"{'stage':<52}{'seconds':>9}{'flows/s':>12}")
    ingest = "kernel events -> internal cache (filters, versions)"
    print(f"{ingest:<52}{best['ingest']:>9.3f}{n / best['ingest']:>12,.0f}")
    print(f"{'A: internal cache -> datagrams (encode, sign)':<52}{best['send']:>9.3f}{n / best['send']:>12,.0f}")
    print(f"{'B: datagrams -> external cache (verify, decode)':<52}{best['recv']:>9.3f}{n / best['recv']:>12,.0f}")
    goal = n / total >= 200_000
    print(f"{'encode -> authenticate -> verify -> decode -> cache':<52}{total:>9.3f}{n / total:>12,.0f}"
          f"  goal >= 200,000/s {'met' if goal else 'MISSED'}")
    print(f"wire: {best['datagrams']:,} datagrams, {best['bytes'] / n:.1f} bytes per flow "
          f"({best['bytes'] / best['datagrams']:.0f} bytes per datagram)")
    if args.conntrackd:
        from bench.conntrackd_harness import measure_conntrackd
        res = measure_conntrackd(n, log=lambda *a: None)
        if res.get("ok"):
            rate = res["entries"] / res["sync_seconds"]
            print(f"conntrackd bulk sync (C, FTFW/UDP over veth, same run): {res['sync_seconds']:.3f} s, "
                  f"{rate:,.0f} flows/s; ctbridge engine is {n / total / rate:.2f}x")
        else:
            print(f"conntrackd bulk sync: not measured: {res.get('error')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

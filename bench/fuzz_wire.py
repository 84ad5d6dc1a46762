"""Fuzz the sync decoder: damaged datagrams must be dropped and counted, never raise.

    python bench/fuzz_wire.py [--count 1000000] [--seed S]

Starts from the golden vectors of every message type. Each input gets 1-6 random edits (byte
flips, truncation, insertion). Half are re-signed with the right key after the damage, so the
damage passes the MAC and reaches the message parser, as from a cluster member with a bug (a
fifth of those are damaged once more after signing, which the MAC must catch); the other half go
through unauthenticated. Every input is given to the decoder and to an engine.
Anything but wire.WireError from the decoder, or any exception from the engine, is a failure.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ctbridge.sync import wire
from ctbridge.sync.engine import Engine, EngineConfig

VECTORS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "wire_vectors.json"
KEY = bytes(range(32))


def fuzz(n: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    samples = [bytes.fromhex(h) for h in json.loads(VECTORS.read_text()).values()]
    signed = wire.Auth([KEY], "blake2b")
    unsigned = wire.Auth([], "none")
    engines = {a: Engine(EngineConfig(node_id=0x01020304), a, epoch=1, now=0.0) for a in (signed, unsigned)}
    counts = {"inputs": 0, "decoded": 0}
    for i in range(n):
        data = bytearray(rng.choice(samples)[:-wire.MAC_ENTRY_LEN])
        for _ in range(rng.randint(1, 6)):
            op = rng.random()
            if op < 0.6 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif op < 0.8 and data:
                del data[rng.randrange(len(data)):]
            else:
                data[rng.randrange(len(data) + 1):0] = rng.randbytes(rng.randint(1, 12))
        if rng.random() < 0.5 and len(data) >= wire.HEADER_LEN:
            data[3] |= wire.FLAG_MAC
            data[4] = signed.sign_id
            data[5] = 1  # one MAC, for every holder of the group key
            data[6:8] = (len(data) - wire.HEADER_LEN).to_bytes(2, "big")
            data += signed.sign(bytes(data))
            if rng.random() < 0.2:  # damaged on the way, after signing: the MAC must catch it
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            auth = signed
        else:
            if len(data) > 5:
                data[3] &= ~wire.FLAG_MAC & 0xFF
                data[5] = 0
            auth = unsigned
        blob = bytes(data)
        counts["inputs"] += 1
        try:
            wire.decode(blob, auth)
            counts["decoded"] += 1
        except wire.WireError:
            pass
        engines[auth].receive_datagram(blob, float(i))
        engines[auth].datagrams_to_send(float(i))
    for eng in engines.values():
        for k in ("rejected_auth", "rejected_replay", "rejected_malformed"):
            counts[k] = counts.get(k, 0) + eng.stats[k]
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    start = time.perf_counter()
    counts = fuzz(args.count, args.seed)
    took = time.perf_counter() - start
    print(f"{counts['inputs']:,} damaged datagrams in {took:.0f} s, 0 exceptions; "
          f"{counts['decoded']:,} still decoded, rejected: auth {counts['rejected_auth']:,}, "
          f"malformed {counts['rejected_malformed']:,}, replay {counts['rejected_replay']:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

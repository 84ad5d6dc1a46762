"""A captured sync stream replayed to a node that restarted while its sender was silent.

Two daemons in namespaces; B injects what it accepts into its kernel at once and keeps the
priority interlock's track file. Every datagram A sends to B's sync port is captured with a packet
socket in B's namespace, through a bulk transfer of A's flows. Then A stops, B restarts and the
capture is replayed to B from A's own address and port, round after round: a restarted node
accepts a peer's epoch only once the peer answered its CHALLENGE with an ECHO of its new random
nonce (docs/protocol.md), which no capture holds. So nothing enters B's external cache or its
kernel (the conntrack CLI is the witness), the refusals are counted, and the interlock reads
incomplete while the replays arrive. The real A, started again, gets everything through."""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ctbridge.config import host
from ctbridge.config import settings as config_mod
from ctbridge.conntrack.table import KernelTable
from ctbridge.conntrack.view import entry_view
from ctbridge.lab import netns
from ctbridge.lab.process import wait_for
from ctbridge.sync import wire
from tests.support import builders, witness
from tests.support.daemonlab import Node, cluster

pytestmark = pytest.mark.root

PORT = 3780  # sync.port's default, which the lab's configs keep
PEER_TIMEOUT = 2.0  # sync.peer_timeout of both nodes: B's start-up grace of the interlock is this long
TRACK_INTERVAL = 0.5  # ctbridge.daemon.interlock.TRACK_INTERVAL: how often the track file is brought up to date
INCOMPLETE = "-254"  # keepalived.incomplete_value's default
BATCH = 150  # flows written with one netlink commit after B's start: the second bulk spans many datagrams
CLI_FLOWS = [  # made before B starts: they reach B in the bulk B asks for at its start
    "-p tcp -s 198.51.100.20 -d 203.0.113.80 --sport 40000 --dport 443 -r 203.0.113.80 -q 192.0.2.200 "
    "--reply-port-src 443 --reply-port-dst 61000 --state ESTABLISHED -u SEEN_REPLY,ASSURED -t 3600 -m 17",
    "-p tcp -s 198.51.100.21 -d 203.0.113.1 --sport 50000 --dport 80 --state ESTABLISHED "
    "-u SEEN_REPLY,ASSURED -t 3600",
    "-p udp -s 198.51.100.22 -d 203.0.113.53 --sport 33333 --dport 53 -t 600 --zone 4",
    "-p udp -s 203.0.113.30 -d 198.51.100.30 --sport 5000 --dport 5001 -u SEEN_REPLY -t 600",
]

ETH_P_IP = 0x0800
SOL_PACKET = getattr(socket, "SOL_PACKET", 263)
PACKET_STATISTICS = 6  # include/uapi/linux/if_packet.h: struct tpacket_stats {tp_packets, tp_drops}
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


class Capture:
    """A packet socket on ``ifname`` in namespace ``ns``: the UDP payloads of every IPv4 packet
    from ``src`` to ``dst``:``port`` that crosses the interface, in the order they crossed it."""

    def __init__(self, ns: str, ifname: str, src: str, dst: str, port: int) -> None:
        self.want = (socket.inet_aton(src), socket.inet_aton(dst), port)
        self.payloads: list[bytes] = []
        self.fragments = 0
        self.drops = 0
        with netns.inside(ns):
            # protocol 0 at creation: nothing is queued before the bind picks the interface
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
                self.sock.bind((ifname, ETH_P_IP))
            except BaseException:
                self.sock.close()
                raise
        self.sock.setblocking(False)

    def drain(self) -> None:
        """Take what the socket holds now."""
        src, dst, port = self.want
        while True:
            try:
                pkt = self.sock.recv(65535)
            except BlockingIOError:
                break
            if len(pkt) < 28 or pkt[0] >> 4 != 4 or pkt[9] != socket.IPPROTO_UDP:
                continue
            if pkt[12:16] != src or pkt[16:20] != dst:
                continue
            ihl = (pkt[0] & 0x0F) * 4
            if struct.unpack_from("!H", pkt, 6)[0] & 0x3FFF:  # more fragments, or an offset
                self.fragments += 1
                continue
            _sport, dport, length = struct.unpack_from("!HHH", pkt, ihl)
            if dport == port:
                self.payloads.append(bytes(pkt[ihl + 8:ihl + length]))
        _packets, drops = struct.unpack("II", self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        self.drops += drops  # reading the statistics resets them

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def capturing(ns: str, ifname: str, src: str, dst: str, port: int) -> Iterator[Capture]:
    cap = Capture(ns, ifname, src, dst, port)
    try:
        yield cap
    finally:
        cap.close()


@contextlib.contextmanager
def udp_socket(ns: str, address: str, port: int) -> Iterator[socket.socket]:
    """A plain UDP socket in ``ns`` bound to ``address``:``port``."""
    with netns.inside(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind((address, port))
        except BaseException:
            s.close()
            raise
    try:
        s.setblocking(False)
        yield s
    finally:
        s.close()


def ids_in_kernel(node: Node, ids: set[tuple[Any, ...]]) -> set[tuple[Any, ...]]:
    """Which of ``ids`` the node's kernel holds, as the conntrack CLI lists it."""
    return {witness.flow_id(v) for v in witness.listing(node.ns)} & ids


def track(path: Any) -> str:
    try:
        return str(path.read_text().strip())
    except FileNotFoundError:
        return ""


def decode_capture(payloads: list[bytes], auth: wire.Auth, me: int) -> dict[str, Any]:
    """What the captured stream holds: every datagram authenticated and decoded as B would."""
    out: dict[str, Any] = {"epochs": set(), "seqs": [], "flows": 0, "keys": set(), "bulk_begins": [],
                           "bulk_ends": [], "types": set()}
    for data in payloads:
        header, messages = wire.decode(data, auth, me)
        out["epochs"].add(header.epoch)
        out["seqs"].append(header.seq)
        for msg in messages:
            out["types"].add(type(msg).__name__)
            if type(msg) is wire.Flow:
                out["flows"] += 1
                out["keys"].add(witness.flow_id(entry_view(msg.entry)))
            elif type(msg) is wire.BulkBegin and msg.node in (0, me):
                out["bulk_begins"].append(msg.bulk_id)
            elif type(msg) is wire.BulkEnd and msg.node in (0, me):
                out["bulk_ends"].append((msg.bulk_id, msg.flows))
    return out


def test_replayed_capture_plants_nothing_in_a_restarted_node() -> None:
    with cluster(2, sync={"peer_timeout": PEER_TIMEOUT}) as c:
        a, b = c.nodes
        track_file = c.dir / "track"
        b.write_config(sync={"peer_timeout": PEER_TIMEOUT}, apply={"mode": "inject"},
                       keepalived={"track_file": str(track_file)})
        b_id = config_mod.node_id(b.name)
        auth = host.auth(config_mod.load(str(b.config)))
        total = len(CLI_FLOWS) + BATCH

        # --- a real session, captured: B's start-up bulk, live changes, and a second bulk -------
        with capturing(b.ns, "sync0", a.address, b.address, PORT) as cap:
            a.start()
            for args in CLI_FLOWS:
                a.run("conntrack", "-I", *args.split())
            b.start()  # asks A for a bulk: the CLI flows
            wait_for("B to learn A's first flows", lambda: len(b.external()) == len(CLI_FLOWS))
            with netns.inside(a.ns):
                table = KernelTable()
            with table:
                assert table.commit(builders.tcp_flows(BATCH)).failed == []
            wait_for("B to learn every flow of A", lambda: len(b.external()) == total)
            b.request("resync")  # `ctbridge resync`: a bulk of all of them

            def whole_bulk_taken() -> bool:
                cap.drain()
                ends = {bulk_id: n for bulk_id, n in decode_capture(cap.payloads, auth, b_id)["bulk_ends"]}
                return total in ends.values() and b.request("stats")["sync"]["bulks_received"] >= len(ends)
            wait_for("a bulk of every flow, taken by B", whole_bulk_taken)
            theirs = {witness.flow_id(v): v for v in witness.listing(a.ns)}
            a_ids = set(theirs)
            assert len(a_ids) == total
            # inject mode works, so the kernel check below can fail
            wait_for("A's flows in B's kernel", lambda: ids_in_kernel(b, a_ids) == a_ids)
            wait_for("track file 0 once complete", lambda: track(track_file) == "0")
            assert a.stop() == 0  # A falls silent: nothing more of its stream can come
            cap.drain()
        captured = list(cap.payloads)
        seen = decode_capture(captured, auth, b_id)
        assert cap.drops == 0 and cap.fragments == 0
        assert len(seen["epochs"]) == 1  # one life of A
        # every number from its HELLO (1) on, a resend or probe keeping its number
        assert set(seen["seqs"]) == set(range(1, max(seen["seqs"]) + 1))
        assert seen["keys"] == a_ids  # every flow of A travels in it, and nothing else
        assert len(seen["bulk_begins"]) >= 2 and (seen["bulk_begins"][-1], total) in seen["bulk_ends"]
        assert (seen["bulk_begins"][0], len(CLI_FLOWS)) in seen["bulk_ends"]
        assert seen["flows"] >= 2 * total  # each flow live or in the first bulk, and in the second
        assert {"Hello", "Resync", "Challenge", "Echo"} <= seen["types"]

        # --- the same B, which remembers A's epoch: every datagram is a replay ------------------
        # B's kernel emptied (its external cache keeps A's flows): a datagram taken now would count
        # in flows_received even where its versions are stale
        b.run("conntrack", "-F")
        assert ids_in_kernel(b, a_ids) == set()
        before = b.request("stats")
        with udp_socket(a.ns, a.address, PORT) as replayer:
            for data in captured:
                replayer.sendto(data, (b.address, PORT))
            wait_for("the replays to be counted", lambda: b.request("stats")["sync"]["rx_datagrams"]
                     >= before["sync"]["rx_datagrams"] + len(captured))
        stats = b.request("stats")
        assert stats["rejected"]["replay"] - before["rejected"]["replay"] == len(captured)
        assert stats["sync"]["flows_received"] == before["sync"]["flows_received"]
        assert ids_in_kernel(b, a_ids) == set()

        # --- B restarts with a clean kernel while A is silent ------------------------------------
        b.stop()
        assert ids_in_kernel(b, a_ids) == set()
        track_file.unlink()  # what the restarted B writes, not what the first life left
        started = time.monotonic()
        b.start()
        wait_for("the restarted B's track file", lambda: track(track_file))

        # --- the capture replayed from A's address and port, round after round -------------------
        rounds = after_grace = 0
        with udp_socket(a.ns, a.address, PORT) as replayer:
            deadline = started + 20
            while after_grace < 3 and time.monotonic() < deadline:
                for data in captured:
                    replayer.sendto(data, (b.address, PORT))
                rounds += 1
                time.sleep(TRACK_INTERVAL)
                with contextlib.suppress(BlockingIOError):
                    while replayer.recv(65535):  # what B says back (challenges, its own bulk) goes unanswered
                        pass
                stats = b.request("stats")
                assert stats["external"]["entries"] == 0 and not stats["external"]["complete"], stats["peers"]
                assert stats["sync"]["flows_received"] == 0 and stats["sync"]["sessions_proven"] == 0
                assert track(track_file) == INCOMPLETE, f"round {rounds}"
                assert ids_in_kernel(b, a_ids) == set(), f"round {rounds}"
                # the interlock holds a node back for peer_timeout after its start anyway, until it
                # hears a peer: only the rounds after that show that the replays keep it incomplete
                if time.monotonic() - started > PEER_TIMEOUT + 2 * TRACK_INTERVAL:
                    after_grace += 1
            assert after_grace == 3, f"{rounds} rounds"
            stats = b.request("stats")
        assert b.proc is not None and b.proc.poll() is None  # nothing crashed
        rejected = stats["rejected"]
        assert rejected["unproven"] + rejected["replay"] >= rounds * len(captured)
        assert rejected["unproven"] > 0 and rejected["auth"] == 0 and rejected["malformed"] == 0
        assert stats["sync"]["challenges_sent"] > 0
        [peer] = stats["peers"]
        assert peer["node"] == f"{config_mod.node_id(a.name):08x}" and not peer["proven"] and peer["entries"] == 0
        assert b.external() == []
        assert ids_in_kernel(b, a_ids) == set()
        assert "Traceback" not in b.log.read_text()

        # --- control: the real A, started again, proves itself and gets everything through -------
        a.start()
        wait_for("A's flows in B's external cache",
                 lambda: {witness.flow_id(v) for v in b.external()} == a_ids)
        wait_for("A's flows in B's kernel", lambda: ids_in_kernel(b, a_ids) == a_ids)
        wait_for("track file 0 once complete", lambda: track(track_file) == "0")
        stats = b.request("stats")
        assert stats["external"]["complete"] and stats["sync"]["sessions_proven"] >= 1
        assert [p["proven"] and p["synced"] for p in stats["peers"]] == [True]
        for v in witness.listing(b.ns):
            other = theirs.get(witness.flow_id(v))
            if other is not None:
                for k in ("reply_src", "reply_dst", "reply_sport", "reply_dport", "mark", "zone", "state"):
                    assert v.get(k) == other.get(k), (k, v, other)

        # --- and replayed once more while the real A runs (from another port: A holds its own) ---
        before = b.request("stats")["rejected"]["replay"]
        with udp_socket(a.ns, a.address, 0) as replayer:
            for data in captured:
                replayer.sendto(data, (b.address, PORT))
            wait_for("the replays to be refused", lambda: b.request("stats")["rejected"]["replay"]
                     >= before + len(captured))
        for _ in range(3):  # the interlock does not move: one track interval after another
            stats = b.request("stats")
            assert stats["external"]["complete"] and [p["proven"] for p in stats["peers"]] == [True]
            assert track(track_file) == "0" and {witness.flow_id(v) for v in b.external()} == a_ids
            time.sleep(TRACK_INTERVAL)
        assert ids_in_kernel(b, a_ids) == a_ids

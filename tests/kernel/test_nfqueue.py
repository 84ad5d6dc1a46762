"""The netfilter queue adapter (conntrack/nfqueue.py) against the real kernel: a firewall that
sees only the server's half of a TCP connection (routing is asymmetric on purpose: the client's
packets go straight to the server, the server's come back through the firewall) drops the
SYN-ACK under a strict ruleset, because it has no entry for the flow. Held in the queue until the
flow is written into its table (as a peer's replication would), the SYN-ACK passes and the
connection lives. Three fresh namespaces, documentation addresses only."""

from __future__ import annotations

import contextlib
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from ctbridge.conntrack import nfqueue
from ctbridge.conntrack.table import KernelTable
from ctbridge.lab import netns
from tests.conftest import unavailable
from tests.support.activeactive import STRICT, counter_in

pytestmark = pytest.mark.root

QUEUE = 7
CLIENT, SERVER, PORT = "192.0.2.1", "198.51.100.1", 5001
SERVE = (f"import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
         f"s.bind(('{SERVER}', {PORT})); s.listen(); c, _ = s.accept(); c.sendall(c.recv(100)); c.close()")
CONNECT = (f"import socket; s = socket.create_connection(('{SERVER}', {PORT}), timeout=3, "
           f"source_address=('{CLIENT}', 0)); s.sendall(b'hello'); print(s.recv(100).decode())")


@contextlib.contextmanager
def asymmetric() -> Iterator[tuple[str, str, str]]:
    """(client, firewall, server): client -> server over a direct link (203.0.113.0/30), server ->
    client through the firewall (192.0.2.0/24, 198.51.100.0/24), the strict ruleset on the firewall
    and an NFQUEUE rule for SYN-ACKs in its raw table, before conntrack (iptables-nft)."""
    if shutil.which("iptables") is None:
        unavailable("iptables (the NFQUEUE target: this kernel has no nftables queue statement)")
    with netns.namespace("cl") as cl, netns.namespace("fw") as fw, netns.namespace("sv") as sv:
        for a, an, b, bn in ((cl, "c-f", fw, "f-c"), (sv, "s-f", fw, "f-s"), (cl, "c-s", sv, "s-c")):
            subprocess.run(["ip", "link", "add", an, "netns", a, "type", "veth", "peer", "name", bn, "netns", b],
                           check=True, timeout=10)
        for ns, dev, addr in ((cl, "c-f", f"{CLIENT}/24"), (fw, "f-c", "192.0.2.254/24"), (sv, "s-f", f"{SERVER}/24"),
                              (fw, "f-s", "198.51.100.254/24"), (cl, "c-s", "203.0.113.1/30"),
                              (sv, "s-c", "203.0.113.2/30")):
            netns.run(ns, "ip", "addr", "add", addr, "dev", dev)
            netns.run(ns, "ip", "link", "set", dev, "up")
        netns.run(cl, "ip", "route", "add", "198.51.100.0/24", "via", "203.0.113.2")
        netns.run(sv, "ip", "route", "add", "192.0.2.0/24", "via", "198.51.100.254")
        for ns in (cl, fw, sv):
            netns.run(ns, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0")
        netns.run(fw, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        netns.run(fw, "nft", "-f", "-", input=STRICT)
        netns.run(fw, "iptables", "-t", "raw", "-A", "PREROUTING", "-i", "f-s", "-p", "tcp", "--tcp-flags",
                  "SYN,ACK", "SYN,ACK", "-j", "NFQUEUE", "--queue-num", str(QUEUE), "--queue-bypass")
        yield cl, fw, sv


def strict_drops(fw: str) -> int:
    return counter_in(fw, "strict-policy drops")


def connect(cl: str, sv: str) -> subprocess.Popen[str]:
    server = subprocess.Popen(["ip", "netns", "exec", sv, sys.executable, "-c", SERVE], text=True)
    time.sleep(0.3)  # listening (a refused connection would show as a failure below, not a hang)
    client = subprocess.Popen(["ip", "netns", "exec", cl, sys.executable, "-c", CONNECT], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    client.server = server  # type: ignore[attr-defined]
    return client


def finish(client: subprocess.Popen[str]) -> tuple[int, str]:
    out, _err = client.communicate(timeout=10)
    server: subprocess.Popen[str] = client.server  # type: ignore[attr-defined]
    server.kill()
    server.wait(timeout=5)
    return client.returncode, out.strip()


def test_a_held_synack_passes_once_its_flow_is_in_the_table() -> None:
    with asymmetric() as (cl, fw, sv):
        with netns.inside(fw):
            queue = nfqueue.QueueSocket(QUEUE)
            table = KernelTable()
        with contextlib.closing(queue), table:
            client = connect(cl, sv)
            held: list[nfqueue.Queued] = []
            for _ in range(50):  # bounded: 5 s
                if select.select([queue], [], [], 0.1)[0]:
                    held = queue.read()
                    if held:
                        break
            assert len(held) == 1, "the SYN-ACK was not queued"
            key = nfqueue.packet_key(held[0].payload)
            assert key is not None
            # the firewall has no entry: as it stands, the strict ruleset would drop the packet
            assert table.present([key]) == [False]
            # what a peer's replication writes: the client's direction, SYN sent, reply seen
            sport = int.from_bytes(held[0].payload[22:24], "big")  # the SYN-ACK's destination port
            netns.run(fw, "conntrack", "-I", "-p", "tcp", "-s", CLIENT, "-d", SERVER, "--sport", str(sport),
                      "--dport", str(PORT), "--state", "SYN_SENT", "-u", "SEEN_REPLY", "-t", "120")
            assert table.present([key]) == [True]  # found by the reply direction's tuple
            queue.verdict(held[0].packet_id)
            code, out = finish(client)
        assert (code, out) == (0, "hello")
        assert strict_drops(fw) == 0


def test_without_a_listener_the_synack_passes_the_queue_and_the_strict_ruleset_drops_it() -> None:
    """The control: nothing bound to the queue (--queue-bypass lets the packet on), no entry
    written, so the strict ruleset drops the SYN-ACK and its retransmissions."""
    with asymmetric() as (cl, fw, sv):
        code, _out = finish(connect(cl, sv))
        assert code != 0
        assert strict_drops(fw) >= 1


def test_packet_keys_name_ipv4_and_ipv6_tcp_and_udp_and_nothing_else() -> None:
    """packet_key against the kernel's own lookup: a UDP entry made with the CLI is found by the
    key of its reply packet (IPv6 too); other protocols and truncated packets give no key."""
    import ipaddress
    import struct

    def ipv4(proto: int, src: str, dst: str, sport: int, dport: int) -> bytes:
        head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, proto, 0,
                           ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
        return head + struct.pack("!HHHH", sport, dport, 8, 0)

    def ipv6(proto: int, src: str, dst: str, sport: int, dport: int) -> bytes:
        head = struct.pack("!IHBB16s16s", 6 << 28, 8, proto, 64, ipaddress.ip_address(src).packed,
                           ipaddress.ip_address(dst).packed)
        return head + struct.pack("!HHHH", sport, dport, 8, 0)

    with netns.namespace("q") as ns:
        netns.run(ns, "conntrack", "-I", "-p", "udp", "-s", "192.0.2.5", "-d", "198.51.100.53", "--sport", "40000",
                  "--dport", "53", "-t", "60")
        netns.run(ns, "conntrack", "-I", "-p", "udp", "-s", "2001:db8::5", "-d", "2001:db8:1::53", "--sport",
                  "40001", "--dport", "53", "-t", "60")
        with netns.inside(ns):
            table = KernelTable()
        with table:
            keys = [nfqueue.packet_key(p) for p in (
                ipv4(17, "198.51.100.53", "192.0.2.5", 53, 40000),  # the reply
                ipv4(17, "192.0.2.5", "198.51.100.53", 40000, 53),  # the original direction
                ipv6(17, "2001:db8:1::53", "2001:db8::5", 53, 40001),
                ipv4(17, "198.51.100.53", "192.0.2.5", 53, 40002))]  # another flow
            assert None not in keys
            assert table.present([k for k in keys if k is not None]) == [True, True, True, False]
    assert nfqueue.packet_key(ipv4(1, "192.0.2.1", "192.0.2.2", 0, 0)) is None  # ICMP
    assert nfqueue.packet_key(ipv4(6, "192.0.2.1", "192.0.2.2", 1, 2)[:22]) is None  # no ports
    assert nfqueue.packet_key(b"\x45" + bytes(10)) is None

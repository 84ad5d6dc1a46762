"""The sync links' sockets: one UDP socket per link ([sync]'s own and [[sync.links]]), and the
routing of the engine's datagrams onto them. Which link carries a peer's traffic is decided by
ctbridge.sync.links.LinkSelector (pure); this adapter feeds it what arrived where and sends the
heartbeats it needs. With one link nothing of that runs: every datagram goes out on it.

Datagrams go only to configured addresses: the i-th peer of each link is one node (docs/config.md),
learnt from the address its authentic datagrams come from.

Datagrams move in batches (daemon.mmsg): ``send`` queues one for its link, ``flush`` hands each
link's queue to the kernel with one sendmmsg, and a link whose send buffer is full keeps the rest
queued until its socket is writable again; a wake-up of a socket reads up to RECV_BATCH datagrams
with one recvmmsg, then the engine's output is made once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

from ctbridge.config import host
from ctbridge.config.settings import Config, SyncLink
from ctbridge.daemon import control, mmsg, udpstat
from ctbridge.sync.engine import RECEIVE_LIMIT
from ctbridge.sync.links import LinkSelector, Switch

log = logging.getLogger("ctbridge")

UDP_RCVBUF = 8 << 20  # a bulk transfer arrives faster than the loop may read it
UDP_SNDBUF = 4 << 20  # a window of datagrams leaves in one burst
# From include/uapi/asm-generic/socket.h: set a buffer beyond net.core.[rw]mem_max (CAP_NET_ADMIN,
# which the daemon has); without the capability the plain options give what the sysctl allows
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
# Datagrams read per wake-up of a socket (one recvmmsg) before the engine's output is made: one
# loop iteration per datagram (asyncio's datagram transport) cost more than the datagram itself
# during a burst
RECV_BATCH = 64
# Datagrams per sendmmsg: a turn's output (Options.burst) in one call or a few
SEND_BATCH = 64
# Bytes read per datagram: one past the engine's limit, so that a longer datagram arrives cut to
# RECEIVE_LIMIT + 1 bytes and the engine refuses it as oversize (it never reads a longer one)
RECV_SIZE = RECEIVE_LIMIT + 1
# Datagrams kept per link while its send buffer is full: as many as the engine may have in flight
# (sync.options.Options.max_window), so that only a link that stays blocked drops what comes next
# (counted in send_errors; the reliable layer resends it)
SEND_QUEUE = 8192


def _buffer(sock: socket.socket, force: int, plain: int, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, plain, size)


def mark_priority(sock: socket.socket, v6: bool, dscp: int, priority: int) -> None:
    """The sync datagrams' DSCP (RFC 2474: the upper six bits of the IPv4 TOS byte, of the IPv6
    traffic class; 0: the kernel's default) and then their SO_PRIORITY (socket(7)): setting
    IP_TOS also sets the socket's priority from the TOS, so the explicit one comes after it."""
    if dscp:
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, dscp << 2)
        else:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, dscp << 2)
    if priority:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, priority)


def sync_socket(link: SyncLink, port: int, dscp: int = 0, priority: int = 0) -> socket.socket:
    """A bound, non-blocking UDP socket for one sync link (multicast: joined to its group), its
    datagrams marked with ``dscp`` and ``priority`` (sync.dscp, sync.priority)."""
    local = link.local
    v6 = ":" in local
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        _buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, UDP_RCVBUF)
        _buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, UDP_SNDBUF)
        mark_priority(sock, v6, dscp, priority)
        if link.group:
            group = link.group
            ifindex = socket.if_nametoindex(link.interface)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((group, port))
            if v6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
                                socket.inet_pton(socket.AF_INET6, group) + struct.pack("@I", ifindex))
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
            else:
                mreqn = socket.inet_aton(group) + socket.inet_aton(local) + struct.pack("@i", ifindex)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        else:
            sock.bind(host.socket_address(local, port))
    except OSError as exc:
        sock.close()
        raise control.ControlError(f"cannot open the sync socket on {local} port {port}: "
                                   f"{exc.strerror or exc} (is another ctbridge running?)") from None
    sock.setblocking(False)
    return sock


def _ip(text: str) -> str:
    return str(ipaddress.ip_address(text.split("%")[0]))


class SyncLinks:
    def __init__(self, cfg: Config, bind: bool = True) -> None:
        """``bind``: open the sockets (with apply.backend = "conntrackd" the port is conntrackd's)."""
        self.links = cfg.sync_links()
        self.port = cfg.sync.port
        self.multicast = cfg.multicast
        self.selector = LinkSelector(len(self.links), cfg.sync.link_timeout)
        self.socks: list[socket.socket] = []
        try:
            for link in self.links if bind else ():
                self.socks.append(sync_socket(link, self.port, cfg.sync.dscp, cfg.sync.priority))
        except control.ControlError:
            self.close()
            raise
        batched = mmsg.MMSG  # False: this libc lacks sendmmsg or recvmmsg, the plain calls do
        self.outboxes = [mmsg.Outbox(sock, SEND_BATCH, batched) for sock in self.socks]
        self.inboxes = [mmsg.Inbox(sock, RECV_BATCH, RECV_SIZE, batched) for sock in self.socks]
        self.queues: list[list[tuple[bytes, mmsg.Address]]] = [[] for _ in self.socks]
        self.blocked: set[int] = set()  # links whose datagrams wait for the socket to be writable
        self.loop: asyncio.AbstractEventLoop | None = None
        self.send_errors = 0  # datagrams the kernel refused (a link down) or left when the queue was full
        self.send_waits = 0  # times a link's send buffer was full and its datagrams waited
        # (link, peer address) -> the peer's index in sync.peers; index -> node id and back
        self.index = {(k, _ip(a)): i for k, link in enumerate(self.links) for i, a in enumerate(link.peers)}
        self.node_of: dict[int, int] = {}
        self.index_of: dict[int, int] = {}
        self.learnt_on: dict[int, int] = {}  # index -> the link its node was learnt over
        self.address_of: dict[tuple[int, int], str] = {}  # (node, link) -> its configured address there
        self.switches = 0
        self.mismatches = 0  # heartbeats over another link than they name, peers in another order
        self._warned: set[tuple[Any, ...]] = set()

    @property
    def redundant(self) -> bool:
        return len(self.links) > 1

    def open(self, loop: asyncio.AbstractEventLoop, receive: Callable[[bytes, tuple[Any, int], int], None],
             after: Callable[[], None]) -> None:
        """Serve the sockets: ``receive`` each datagram (with its source and link), then ``after``
        once per batch of up to RECV_BATCH, when the engine's answers go out."""
        self.loop = loop
        for k, sock in enumerate(self.socks):
            loop.add_reader(sock.fileno(), self._readable, self.inboxes[k], k, receive, after)

    @staticmethod
    def _readable(inbox: mmsg.Inbox, link: int, receive: Callable[[bytes, tuple[Any, int], int], None],
                  after: Callable[[], None]) -> None:
        try:
            datagrams = inbox.receive()
        except (BlockingIOError, InterruptedError):
            datagrams = []
        except OSError as exc:  # an ICMP error reported on the socket: nothing to read
            log.debug("sync socket of link %d: %s", link, exc)
            datagrams = []
        for data, addr in datagrams:
            receive(data, addr, link)
        after()

    def close(self) -> None:
        for k, s in enumerate(self.socks):
            if self.loop is not None:
                self.loop.remove_reader(s.fileno())
                if k in self.blocked:
                    self.loop.remove_writer(s.fileno())
            s.close()
        self.blocked.clear()
        self.loop = None

    def _mismatch(self, key: tuple[Any, ...], message: str, *args: Any) -> None:
        self.mismatches += 1
        if key not in self._warned:  # once each: a misconfiguration, not an event
            self._warned.add(key)
            log.warning(message, *args)

    def heard(self, node: int, addr: tuple[Any, int], link: int, now: float, named: int | None = None) -> None:
        """An authentic, fresh datagram of ``node`` came over ``link`` from ``addr``; ``named``: the
        link a heartbeat says it was sent over (the same on both nodes, or their links are listed
        in different orders)."""
        if named is not None and named != link:
            self._mismatch(("link", node, link), "sync link %d: a heartbeat of peer %08x that it sent over its "
                           "link %d: list the sync links in the same order on every node", link, node, named)
            return
        if not self.multicast:
            i = self.index.get((link, addr[0]))  # the kernel writes addresses as str(ip_address) does
            if i is None:
                return  # not a configured address: nothing is ever sent there
            old = self.node_of.get(i)
            if old != node:
                if old is not None and self.learnt_on.get(i) != link:
                    self._mismatch(("order", node, link), "sync link %d: peer %08x speaks from %s, the address of "
                                   "another peer on link %d: list the peers in the same order on every link",
                                   link, node, addr[0], self.learnt_on[i])
                    return
                if old is not None:  # a node renamed at the same address: the old one is gone
                    self.index_of.pop(old, None)
                    self.selector.forget(old)
                self.node_of[i] = node
                self.index_of[node] = i
                self.learnt_on[i] = link
            self.address_of[(node, link)] = addr[0]
        self.selector.heard(node, link, now)

    def forget(self, node: int) -> None:
        """``node`` went silent: multicast stops counting it for the groups it is sent to."""
        if self.multicast:
            self.selector.forget(node)

    def address(self, node: int) -> str:
        """Where ``node``'s traffic goes now ("" while unknown)."""
        i = self.index_of.get(node)
        if i is None:
            return self.links[0].group if self.multicast else ""
        k = self.selector.active(node) or 0
        return self.address_of.get((node, k), self.links[k].peers[i])

    def _send(self, link: int, data: bytes, address: str) -> None:
        queue = self.queues[link]
        if len(queue) >= SEND_QUEUE:  # blocked for long: lost like a datagram on the wire, resent
            self.send_errors += 1
            return
        queue.append((data, (address, self.port)))

    def flush(self) -> None:
        """Hand every link's queued datagrams to the kernel (one sendmmsg per link and batch)."""
        for k, queue in enumerate(self.queues):
            if queue and k not in self.blocked:
                self._drain(k)

    def _drain(self, link: int) -> None:
        queue = self.queues[link]
        send = self.outboxes[link].send
        while queue:
            try:
                n = send(queue)
            except BlockingIOError:  # the send buffer is full: the rest waits for room
                if link not in self.blocked and self.loop is not None:
                    self.blocked.add(link)
                    self.send_waits += 1
                    self.loop.add_writer(self.socks[link].fileno(), self._writable, link)
                    return
                n = 1  # no loop to wait in: lost like a datagram on the wire
                self.send_errors += 1
            except OSError as exc:  # lost like a datagram on the wire: the reliable layer resends it
                self.send_errors += 1
                log.debug("sync link %d: sending to %s: %s", link, queue[0][1][0], exc)
                n = 1
            del queue[:n]

    def _writable(self, link: int) -> None:
        assert self.loop is not None
        self.blocked.discard(link)
        self.loop.remove_writer(self.socks[link].fileno())
        self._drain(link)

    def send(self, data: bytes, dest: int | None) -> None:
        """One datagram of the engine queued (``flush`` sends it): to node ``dest``, or (None) to
        every peer, each over its active link. A peer not heard yet gets it over every link (it
        drops the copies)."""
        if not self.socks:
            return  # not bound (the conntrackd backend): nothing of ours goes over the sync link
        if self.multicast:
            # one group per link: every link some peer is on now (the groups' members drop copies)
            links = {p.active for p in self.selector.peers.values()} if self.redundant else set()
            for k in sorted(links or {0}):
                self._send(k, data, self.links[k].group)
            return
        peers = self.links[0].peers
        targets = [self.index_of[dest]] if dest is not None and dest in self.index_of else range(len(peers))
        for i in targets:
            node = self.node_of.get(i)
            via = self.selector.active(node) if node is not None and self.redundant else None
            if node is not None and via is not None:
                self._send(via, data, self.address_of.get((node, via), self.links[via].peers[i]))
            else:
                for k in range(len(self.links)):
                    self._send(k, data, self.links[k].peers[i])

    def send_heartbeats(self, datagrams: list[bytes]) -> None:
        """Heartbeat k over link k, to every peer (its group)."""
        if not self.socks:
            return
        for k, (link, data) in enumerate(zip(self.links, datagrams, strict=True)):
            for address in ([link.group] if self.multicast else link.peers):
                self._send(k, data, address)
        self.flush()

    def update(self, now: float) -> list[Switch]:
        switches = self.selector.update(now)
        for s in switches:
            self.switches += 1
            log.warning("sync link: traffic to peer %08x moved from link %d (%s) to link %d (%s)", s.node, s.old,
                        self.links[s.old].local, s.new, self.links[s.new].local)
        return switches

    def stats(self, now: float) -> list[dict[str, Any]]:
        out = []
        for k, link in enumerate(self.links):
            peers = {}
            for node, p in self.selector.peers.items():
                at = p.heard[k]
                peers[f"{node:08x}"] = {"up": self.selector.usable(node, k, now), "active": p.active == k,
                                        "last_heard": round(now - at, 3) if at is not None else None}
            out.append({"local": link.local, "peers": list(link.peers) if not link.group else [link.group],
                        "socket": udpstat.socket_stats(self.socks[k]) if k < len(self.socks) else {},
                        "nodes": peers})
        return out

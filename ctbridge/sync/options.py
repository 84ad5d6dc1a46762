"""The engine's settings (EngineConfig): one frozen value, replaced whole by Engine.reconfigure.
ctbridge.config turns a cluster's configuration into it; tests build it directly.

Imports: ctbridge.sync.filter and ctbridge.sync.header (the protocol's versions).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ctbridge.sync.filter import FlowFilter
from ctbridge.sync.header import BASE_VERSION, VERSION


@dataclass(frozen=True)
class EngineConfig:
    node_id: int
    reliable: bool = True  # False: best-effort, no acknowledgements or resends
    apply_mode: str = "commit"  # "inject": write peers' flows into this kernel as they arrive
    max_datagram: int = 1452  # bytes: IPv6 minimum path MTU 1500 - 40 (IPv6) - 8 (UDP)
    ack_every: int = 32  # acknowledge after this many data datagrams ...
    ack_delay: float = 0.01  # ... or this long after the first unacknowledged one
    nack_retry: float = 0.03  # ask again for a gap still open after this long (the sender resends a
    # datagram at most once per RTO, so asking often costs a few bytes, never a flood)
    alive_interval: float = 1.0  # send something at least this often
    peer_timeout: float = 5.0  # a peer silent this long stops holding back the resend queue
    resend_limit: int = 16384  # datagrams kept for resending
    rx_limit: int = 8192  # datagrams held beyond a gap before the gap is given up on
    tombstone_ttl: float = 60.0  # how long a deletion outranks late updates of the same flow
    resync_retry: float = 3.0  # ask again for a bulk transfer that has not completed
    max_age: float = 0.0  # reject datagrams whose sender time is older than this (0: off)
    # datagrams per datagrams_to_send() call: the loop runs between two calls. A full datagram
    # of a bulk is some 55 flows at 3-5 us each, so 64 hold the loop 10-20 ms (256 held a new
    # master's loop 0.10-0.13 s while it sent its 1M-flow table: bench/scale.py, asyncio's debug
    # mode); the sync socket's sendmmsg takes as many at once (daemon/synclink.py, SEND_BATCH)
    burst: int = 64
    # Flow control (docs/protocol.md, "Loss recovery and flow control"; after RFC 9002 and RFC 6298):
    initial_window: int = 128  # data datagrams in flight before the first acknowledgement
    min_window: int = 128  # never below (random loss on a LAN is no congestion to back off from; a
    # receiver socket buffer of 4 MiB holds 2,800 datagrams)
    max_window: int = 8192  # datagrams; at most half the resend queue
    initial_rtt: float = 0.02  # seconds, until the first sample: a dedicated sync link is a LAN (RFC 9002
    # 6.2.2 suggests 333 ms for the Internet)
    min_resend_interval: float = 0.01  # a datagram is resent at most once per RTO, kept within these
    max_resend_interval: float = 0.5
    max_peers: int = 16  # datagrams from further node ids are dropped (each peer costs state and ACK room)
    filter: FlowFilter = field(default_factory=FlowFilter)
    # Receive-side policy and caps (docs/protocol.md, "Threat model"): flows a peer sends that this
    # node's own filter, or the accept list for that peer, refuses are counted and never stored
    peer_filters: Mapping[int, FlowFilter] = field(default_factory=dict)  # node id -> what it may send
    max_entries: int = 0  # flows kept per peer (the daemon: nf_conntrack_max); 0: no cap
    max_tombstones: int = 65536  # deletions remembered per peer; beyond, the oldest is forgotten (counted)
    # Expiry (docs/protocol.md, "Timeouts"): a peer's flow is dropped this long after the timeout
    # it last came with ran out; the peer refreshes what its traffic keeps alive (kernel_refresh).
    # 0: never (a dead peer's flows stay until a bulk or a flush)
    expiry_margin: float = 30.0
    # the helpers' expectations (sync.expectations): sent and taken only when on; a peer's are
    # refused (refused.policy) when off, so a node that does not use them writes none
    expectations: bool = False
    # the highest protocol version this node speaks and announces (docs/protocol.md, "Versions"):
    # 3; 2 makes it speak as the release of 2026-12-01 does (tests of a mixed cluster)
    max_version: int = VERSION
    # What is held back before it goes out (ctbridge.sync.holdback): a new flow until it has lived
    # ``delay`` seconds (per protocol number: ``delay_by_protocol``; 0: at once), an update of a
    # flow peers have for at most ``coalesce`` seconds (0: at once)
    delay: float = 0.0
    delay_by_protocol: Mapping[int, float] = field(default_factory=dict)
    coalesce: float = 0.0

    @property
    def delays(self) -> bool:
        """Whether some protocol's new flows wait before they are replicated."""
        return self.delay > 0 or any(d > 0 for d in self.delay_by_protocol.values())

    @property
    def announce(self) -> int:
        """The aux byte of this node's HELLO, ALIVE, ACK, CHALLENGE and ECHO: the highest version
        it speaks, or 0 for version 2 (as that release sends them)."""
        return self.max_version if self.max_version > BASE_VERSION else 0

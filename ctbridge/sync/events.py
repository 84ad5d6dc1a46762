"""What the engine hands out: its role, the kernel writes it asks for, the events it reports and
what one received datagram proved (Heard). Plain values (NamedTuples, one Enum), after aioquic's
quic/events.py.

Imports: ctbridge.conntrack.codec (Entry) only.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

from ctbridge.conntrack.codec import Entry


class Role(Enum):
    MASTER = "MASTER"
    BACKUP = "BACKUP"
    FAULT = "FAULT"


class KernelOp(NamedTuple):
    """A write for the kernel adapter: commit these entries, or delete these keys."""

    kind: str  # "commit" | "delete"
    entry: Entry | None
    key: bytes


class Heard(NamedTuple):
    """An authentic, new datagram was taken from ``node`` (Engine.receive_datagram): accepted
    data, or a heartbeat numbered higher than any before over its link. The adapter's choice of
    sync link may believe it. ``link``: for a heartbeat, the link it says it was sent over
    (None for data)."""

    node: int
    link: int | None


class PeerReport(NamedTuple):
    """One peer as the daemon's status shows it (Engine.peer_reports)."""

    node: int
    epoch: int  # of its session (-1: none yet)
    alive: bool  # heard within peer_timeout
    synced: bool  # a bulk completed and nothing was lost since
    proven: bool  # its session answered our challenge
    refused: int  # flows of it our filters refuse now (by key)
    limits: list[str]  # caps hit since its last bulk that make its copy incomplete
    entries: int  # flows in its copy
    last_heard: float  # seconds since it was last heard
    restarts: int
    bulks: int
    refused_total: int  # flows of it our filters refused, ever
    rejected: dict[str, int]  # its authentic datagrams refused, by reason
    gap: tuple[int, int] | None  # the first gap open in its stream
    protocol: int = 2  # the version this node speaks with it: the lower of both nodes' highest


class EpochChanged(NamedTuple):
    """This node's sequence numbers ran out and a new epoch began: the adapter must keep it (the
    next start must begin above it)."""

    epoch: int


class PeerRestarted(NamedTuple):
    node: int
    old_epoch: int
    new_epoch: int


class PeerSilent(NamedTuple):
    node: int
    seconds: float  # since it was last heard


class BulkCompleted(NamedTuple):
    node: int
    flows: int  # what its external cache holds now
    stale_removed: int
    complete: bool  # False: datagrams of the bulk were lost (best effort), stale flows were kept


class CompletenessChanged(NamedTuple):
    complete: bool  # Engine.complete(): every live peer's external cache is whole


class LimitReached(NamedTuple):
    """A cap was hit for the first time since the last bulk from ``node`` (the adapter logs it
    once): ``what`` is "flows" (max_entries) or "tombstones" (max_tombstones)."""

    node: int
    what: str
    limit: int


class LinkReport(NamedTuple):
    """Redundant sync links: ``node`` says it hears this node on these links (bit k: link k)."""

    node: int
    links: int


EngineEvent = (PeerRestarted | PeerSilent | BulkCompleted | CompletenessChanged | LinkReport | EpochChanged
               | LimitReached)

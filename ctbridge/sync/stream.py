"""This node's datagram stream: who sends it (node id, boot epoch), its sequence numbers, the
sealing counter, the header with the wall clock, and the keys it is authenticated with.

Every datagram a node sends takes the next number of its stream (ctbridge.sync.sequence says
how receivers use them); a heartbeat takes none (wire.HEARTBEAT_SEQ). When the numbers, or the
sealing counter, are about to run out, a new epoch begins: peers treat it as a restart, and the
engine's ``on_new_epoch`` callback resets what counted in the old one.

Imports: ctbridge.sync.wire and .sequence.
"""

from __future__ import annotations

from collections.abc import Callable

from ctbridge.sync import wire
from ctbridge.sync.sequence import SEQ_MAX

# a new epoch begins this far before the sealing counter runs out: resends between two new
# sequence numbers take counters too, never 2^24 of them
SEAL_WRAP = wire.SEAL_COUNTER_MAX - (1 << 24)


class Stream:
    __slots__ = ("auth", "clock_offset", "epoch", "node_id", "on_new_epoch", "sealed", "seq")

    def __init__(self, node_id: int, epoch: int, auth: wire.Auth, clock_offset: float, first_seq: int,
                 on_new_epoch: Callable[[], None]) -> None:
        self.node_id = node_id
        self.epoch = epoch
        self.auth = auth
        self.clock_offset = clock_offset  # wall clock minus ``now``, for the time in each header
        self.seq = first_seq  # the next sequence number
        self.sealed = 0  # sealing counter of this epoch (encryption)
        self.on_new_epoch = on_new_epoch

    @property
    def sent_upto(self) -> int:
        """The newest sequence number this epoch's datagrams have used."""
        return self.seq - 1

    def next_seq(self) -> int:
        seq = self.seq
        if seq >= SEQ_MAX or self.sealed >= SEAL_WRAP:
            # Sequence space exhausted: start a new epoch, which peers treat as a restart.
            self.epoch += 1
            self.sealed = 0
            self.seq = 1
            self.on_new_epoch()
            seq = 1
        self.seq = seq + 1
        return seq

    def header(self, seq: int, now: float, version: int = wire.BASE_VERSION) -> wire.Header:
        """The header of datagram ``seq`` of protocol ``version`` sent at ``now``, with the wall
        clock (a receiver's max_age)."""
        return wire.Header(self.node_id, self.epoch, seq, int((now + self.clock_offset) * 1000), version=version)

    def seal(self, header: wire.Header, payload: bytes) -> bytes:
        """The datagram, authenticated, with the next sealing counter of this epoch (the AEAD's
        nonce is epoch and counter: never twice, resends included). next_seq() starts a new epoch
        well before the counter runs out."""
        self.sealed += 1
        return wire.datagram(header, payload, self.auth, self.sealed)

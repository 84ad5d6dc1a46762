"""The netfilter queue's messages (conntrack/nfqueue.py) without a kernel: what a bind and a
verdict say, packets read back from a buffer laid out as the kernel sends them, and a truncated
buffer refused with a clear error rather than misread."""

from __future__ import annotations

import struct

import pytest

from ctbridge.conntrack import nfqueue
from ctbridge.conntrack.codec import CodecError, attr


def packet_message(packet_id: int, hook: int, payload: bytes, seq: int = 0) -> bytes:
    body = struct.pack("!BBH", 0, 0, 7) + attr(nfqueue.NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, hook))
    body += attr(nfqueue.NFQA_PAYLOAD, payload)
    return struct.pack("=IHHII", 16 + len(body), nfqueue.MSG_PACKET, 0, seq, 0) + body


def test_a_bind_asks_for_the_queue_the_copy_range_and_fail_open() -> None:
    bind, params, flags = nfqueue.bind_requests(7, 100)
    for i, req in enumerate((bind, params, flags)):
        length, mtype, nlflags, seq, _pid = struct.unpack_from("=IHHII", req)
        assert (length, mtype, seq) == (len(req), nfqueue.MSG_CONFIG, 100 + i)
        assert nlflags & 0x5 == 0x5  # NLM_F_REQUEST | NLM_F_ACK: every step is acknowledged
        assert struct.unpack_from("!H", req, 18)[0] == 7  # nfgenmsg.res_id: the queue, big endian
    assert bind[20:28] == attr(nfqueue.NFQA_CFG_CMD, bytes((nfqueue.NFQNL_CFG_CMD_BIND, 0, 0, 0)))
    assert struct.pack("!IB", nfqueue.COPY_RANGE, nfqueue.NFQNL_COPY_PACKET) in params
    assert struct.pack("!I", nfqueue.NFQA_CFG_F_FAIL_OPEN) in flags


def test_a_verdict_names_the_packet_and_accepts_it() -> None:
    req = nfqueue.verdict_request(7, 0xDEADBEEF)
    assert struct.unpack_from("=H", req, 4)[0] == nfqueue.MSG_VERDICT
    assert req.endswith(struct.pack("!II", nfqueue.NF_ACCEPT, 0xDEADBEEF))


def test_packets_and_acknowledgements_are_read_from_one_buffer() -> None:
    ack = struct.pack("=IHHIIi", 36, 2, 0, 9, 0, 0) + bytes(16)
    busy = struct.pack("=IHHIIi", 36, 2, 0, 10, 0, -16) + bytes(16)  # EBUSY
    buf = packet_message(1, 0, b"\x45" + bytes(39)) + ack + packet_message(2, 0, b"x" * 3) + busy
    packets, errors = nfqueue.decode_packets(buf)
    assert [(p.packet_id, p.hook, len(p.payload)) for p in packets] == [(1, 0, 40), (2, 0, 3)]
    assert errors == [0, 16]


@pytest.mark.parametrize("length", [8, 200])
def test_a_message_whose_length_does_not_fit_the_buffer_is_refused(length: int) -> None:
    """Shorter than its own header, or longer than what was received."""
    buf = packet_message(1, 0, b"\x45" + bytes(39))
    with pytest.raises(CodecError):
        nfqueue.decode_packets(struct.pack("=I", length) + buf[4:])


def test_a_packet_without_its_header_attribute_is_refused() -> None:
    body = struct.pack("!BBH", 0, 0, 7) + attr(nfqueue.NFQA_PAYLOAD, b"abc")
    with pytest.raises(CodecError):
        nfqueue.decode_packets(struct.pack("=IHHII", 16 + len(body), nfqueue.MSG_PACKET, 0, 0, 0) + body)

"""The kernel's update events leave out what they did not change (ctbridge.sync.carried): a
rule that sets a mark on a later packet of an established TCP connection makes an event without
the TCP state. Read from a real connection in a fresh namespace, the flow ctbridge would send
keeps its state and takes the mark; the event itself lacks the state (else this test shows
nothing)."""

from __future__ import annotations

import sys
import time

import pytest

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec
from ctbridge.conntrack.eventsocket import EventSocket
from ctbridge.conntrack.view import entry_view
from ctbridge.lab import netns
from ctbridge.sync import wire
from ctbridge.sync.engine import Engine, EngineConfig
from ctbridge.sync.filter import FlowFilter
from tests.support.enginelab import KEY

pytestmark = pytest.mark.root

# a mark on the connection's first large packet, long after its handshake
MARK_RULES = """
table inet lab_mark {
  chain out {
    type filter hook output priority 0;
    meta length > 300 ct mark set 7
  }
}
"""
CONNECTION = """
import socket, time
s = socket.socket(); s.bind(("127.0.0.1", 8080)); s.listen()
c = socket.create_connection(("127.0.0.1", 8080)); a, _ = s.accept()
time.sleep(0.2); c.send(b"x" * 500); a.recv(1000); time.sleep(0.2)
"""


def test_a_mark_set_by_a_later_packet_keeps_the_flows_tcp_state(ns: str) -> None:
    netns.run(ns, "ip", "link", "set", "lo", "up")
    netns.run(ns, "nft", "-f", "-", input=MARK_RULES)
    with netns.inside(ns):
        sock = EventSocket()
    with sock:
        sock.raw = True
        netns.run(ns, sys.executable, "-c", CONNECTION)
        buffers: list[bytes] = []
        for _ in range(50):  # bounded: the events of one connection
            buffers += sock.read(limit=100).buffers
            if any(codec.decode_events(b)[0].kind is codec.EventKind.DESTROY for b in buffers) or len(buffers) > 6:
                break
            time.sleep(0.1)
    events = [codec.decode_events(b)[0] for b in buffers]
    mark_only = [e for e in events if ct.CTA_PROTOINFO not in codec.attr_map(e.entry.attrs)
                 and entry_view(e.entry).get("mark") == 7]
    assert mark_only, "the kernel sent no mark-only update: nothing to show here"
    # (the connection is on loopback, which the default filter leaves out)
    engine = Engine(EngineConfig(node_id=1, filter=FlowFilter(ignore=())), wire.Auth([KEY]), epoch=1, now=0.0)
    upto = buffers[:events.index(mark_only[0]) + 1]
    engine.kernel_messages(upto, 1.0)
    (key,) = [k for k in engine.internal if k == mark_only[0].entry.key]
    v = entry_view(wire.flow_entry(key, engine.internal[key]))
    assert v["mark"] == 7 and v["tcp_state"] == "ESTABLISHED", v

"""The sync protocol, pure. Modules, by what they hold:

- engine: the front (Engine): owns the parts below, dispatches a datagram's messages through a
  table, combines their deadlines. events: what it hands out (Role, KernelOp, Heard, events).
  options: EngineConfig. stats: the counters. peer: Peer, ExternalFlow. shared: what the parts
  share (Shared) and their base (Part).
- internal: this node's table (kernel events, refresh sweeps, what waits to go out); rebuild:
  it brought up to a dump, in chunks; sweep: a refresh sweep's shortcut; holdback: young
  flows (sync.delay) and coalesced updates (sync.coalesce); carried: what an update event
  leaves out, kept from the flow's earlier events.
- external: the peers' copies (admission, filters, caps, tombstones, bulk completion, commit
  records, expiry).
- session: proving a peer's epoch (challenges, answers, slots); opens with its rules.
- receiver: ACKs, NACK rounds and GAPs for the peers' streams.
- recovery: loss recovery and flow control (RTT, window, resends, probes); opens with its rules.
- sender: packing datagrams, bulk transfers, resends. stream: numbers, epochs, sealing, header.
- heartbeat: redundant sync links' heartbeats; links: the choice among them.
- diff: `ctbridge diff` (digest: the sums by bucket).
- wire: datagrams framed and checked (the header, the MAC or seal, then the body), and every
  wire name in one namespace; header: the datagram header, WireError; msgtypes: the message
  types and their registry; flows: FLOW, EXPECT, DELETE, their compact forms (version 3) and
  decode_body; compact: the compact layouts (squeeze, expand); messages: every other
  message, its encoder and decoder side by side; auth: keys, MACs, sealing.
- sequence: receive windows, the resend queue; filter: the flow filter and the no-sync
  selection; intake: the kernel event fast path.

No I/O, no clock, no asyncio: every input carries its ``now`` (a test fails on an import of
socket, asyncio, pyroute2, os, subprocess, random, threading or time here). It imports only
ctbridge.conntrack's codecs (flows, expectations) and constants; the daemon, the tests and the
benches import it.
"""

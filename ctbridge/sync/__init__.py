"""The sync protocol, pure: the engine (caches, peers, retransmission, flow control), sequence
windows, the wire format and its authentication, the flow filter, the event fast path (intake),
the sums by bucket that compare two copies of a table (digest) and the choice among redundant
sync links (links).

No I/O, no clock, no asyncio: every input carries its ``now`` (a test fails on an import of
socket, asyncio, pyroute2, os, subprocess, random, threading or time here). It imports only
ctbridge.conntrack's codecs (flows, expectations) and constants; the daemon, the tests and the benches import it.
"""

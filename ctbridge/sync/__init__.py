"""The sync protocol, pure: the engine (caches, peers, retransmission), sequence windows, the
wire format and its authentication, and the flow filter.

No I/O, no clock, no asyncio: every input carries its ``now`` (a test fails on an import of
socket, asyncio, pyroute2, os, subprocess, random, threading or time here). It imports only
ctbridge.conntrack's codec and constants; the daemon, the tests and the benches import it.
"""

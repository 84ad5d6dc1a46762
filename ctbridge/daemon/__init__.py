"""The running node: the daemon around the pure engine, and keepalived's side of it.

- service: ``Daemon``, which builds the parts below, starts them (one path for both backends)
  and stops them; ``main`` for `ctbridge run`.
- datapath: datagrams between the sync links and the engine, its events, timer and heartbeats.
- synclink: one UDP socket per sync link, and which link carries which peer's datagrams.
- mmsg: sendmmsg and recvmmsg on those sockets, many datagrams per system call.
- udpstat: the sync sockets' kernel figures (drops, queue sizes) from /proc/net/udp.
- kernelio: this kernel's table read (events, dumps) and written (commit, inject, expectations).
- refresh: the sweeps for flows whose timeouts traffic restarted, and when they run.
- transitions: keepalived's transitions carried out step by step, the role kept across restarts,
  the notify FIFO read.
- failover: the pure policy: which steps a transition takes, and the interlock's verdict.
- keepalived: notify arguments, notify_fifo lines, the track and role files.
- interlock: the track file that keeps an incomplete node from winning an election.
- gate: the commit gate (an nftables table) and its keeper.
- conntrackd: the conntrackd backend: failover's steps as conntrackd commands.
- handlers: the answers to control requests, dispatched through a table.
- control: the control socket's protocol, server and client, and its command table.
- stats: the figures `ctbridge stats` answers and the metrics render.
- metrics: the Prometheus endpoint, its text format and the commit histogram.
- looplag: the event loop's lag (a probe every 0.1 s), its histogram and longest stall.
- journal: log priorities journald reads from stderr.

The top of the runtime: it imports every layer below; only the CLI and the lab import it (the
CLI's clients use control alone, which imports nothing of ctbridge; the lab also reads
conntrackd's cache_sizes).
"""

"""What a node is told: its configuration file (settings), the host facts it is checked against
(host), sync keys (keyfile), the cluster description (cluster) and the files rendered from it
(render, with the templates found by resources); the configuration as the sync engine takes
it (replication); the sync delay, coalescing and no-sync keys (selection).

It imports ctbridge.conntrack and ctbridge.sync for their constants (and, in replication, the
engine's settings and filter types); the daemon, the CLI and the
lab import it.
"""

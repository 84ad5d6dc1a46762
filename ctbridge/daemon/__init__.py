"""The running node: the service that wires kernel, engine and sync sockets together (service;
synclink: one socket per sync link, and what goes over which),
the keepalived side (keepalived: notify FIFO and track files), the commit gate (gate), the control
socket (control) and the metrics endpoint (metrics).

The top of the runtime: it imports every layer below; only the CLI and the lab import it (the
CLI's clients use control alone, which imports nothing of ctbridge).
"""

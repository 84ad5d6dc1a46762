"""The HA lab: client, two firewalls with keepalived, nftables and a replicator, and a server, in
network namespaces. Used by `make demo`, the end-to-end tests and bench/lab.py."""

from ctbridge.lab.network import Firewall, Lab, Options, lab, wait_for

__all__ = ["Firewall", "Lab", "Options", "lab", "wait_for"]

"""The HA lab: client, two firewalls with keepalived, nftables and a replicator, and a server, in
network namespaces. Used by `make demo`, the end-to-end tests and bench/lab.py."""

from ctbridge.lab.firewall import Firewall
from ctbridge.lab.network import Lab, lab
from ctbridge.lab.process import wait_for
from ctbridge.lab.topology import Options

__all__ = ["Firewall", "Lab", "Options", "lab", "wait_for"]

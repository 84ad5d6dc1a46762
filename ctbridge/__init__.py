"""ctbridge: conntrack state replication for high-availability Linux firewalls."""

__version__ = "0.3.0"

"""This host's conntrack table against its hash: what `ctbridge check` warns about before a large
table makes every lookup, and ctbridge's commit, slow.

The kernel keeps its connections in a hash of nf_conntrack_buckets chains and, unless told
otherwise, allows as many entries as there are buckets (proc_sys_net_netfilter(5) and the
kernel's nf_conntrack-sysctl documentation: "nf_conntrack_max ... default: nf_conntrack_buckets
value"). Operators of large tables raise nf_conntrack_max and often leave the hash at its default
(at most 262,144 buckets): a table of 1M flows then averages four entries per chain, and every
packet's lookup, every insert of a commit, walks them. Pure but for reading the two sysctls.
"""

from __future__ import annotations

from pathlib import Path

MAX_PATH = Path("/proc/sys/net/netfilter/nf_conntrack_max")
BUCKETS_PATH = Path("/proc/sys/net/netfilter/nf_conntrack_buckets")
# Entries per bucket, at a full table, beyond which check warns: the kernel's own default is 1,
# and 2 leaves room for operators who size the hash for the usual table rather than the limit.
LOAD_MAX = 2


def _read(path: Path) -> int:
    try:
        return max(0, int(path.read_text().strip()))
    except (OSError, ValueError):  # no nf_conntrack module loaded, or not Linux
        return 0


def read_sizes() -> tuple[int, int]:
    """(nf_conntrack_max, nf_conntrack_buckets) of this host; 0 for what cannot be read."""
    return _read(MAX_PATH), _read(BUCKETS_PATH)


def hash_warning(limit: int, buckets: int) -> str | None:
    """One line for a table of ``limit`` flows in a hash of ``buckets`` when it is more than
    LOAD_MAX flows per bucket, with the settings that size it; None when it is fine or unknown."""
    if limit <= 0 or buckets <= 0 or limit <= LOAD_MAX * buckets:
        return None
    return (f"nf_conntrack_max is {limit:,} but the conntrack hash has {buckets:,} buckets ({limit / buckets:.1f} "
            "flows per bucket at a full table): every packet's lookup and ctbridge's commit slow down as the "
            f"table fills; set net.netfilter.nf_conntrack_buckets = {limit} (sysctl, in the host's namespace; "
            f"at boot: 'options nf_conntrack hashsize={limit}' in /etc/modprobe.d/)")


def host_warning() -> str | None:
    """hash_warning for this host's sysctls."""
    return hash_warning(*read_sizes())

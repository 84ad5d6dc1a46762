"""The lab's plan: its addresses (documentation ranges only), ports, the firewalls' nftables
rulesets, and Options, what a test or bench asks of a lab (ctbridge.lab.network builds it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ctbridge.config import resources

ROOT = Path(__file__).resolve().parent.parent.parent
HOOK = resources.hook_path()
LAN = "192.0.2"
WAN = "203.0.113"
CLIENT = f"{LAN}.100"
SERVER = f"{WAN}.100"
LAN_VIP = f"{LAN}.1"
WAN_VIP = f"{WAN}.1"

# IPv6 (Options.ipv6): the same plan in 2001:db8::/32, NAT66 to the WAN VIP
LAN6 = "2001:db8:1::"
WAN6 = "2001:db8:2::"
CLIENT6 = f"{LAN6}100"
SERVER6 = f"{WAN6}100"
LAN_VIP6 = f"{LAN6}1"
WAN_VIP6 = f"{WAN6}1"
SYNC_PORT = 3780
SYNC_GROUP = "239.255.37.80"  # Options.multicast: as examples/three-nodes-multicast.toml

# The firewall's own ruleset: what an operator of a stateful NAT firewall would run.
FIREWALL_RULES = f"""
table inet lab
delete table inet lab
table inet lab {{
    counter dropped {{ }}
    counter dropped_input {{ }}
    counter dropped_input6 {{ }}

    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan0" oifname "wan0" tcp flags & (fin | syn | rst | ack) == syn ct state new accept
        iifname "lan0" oifname "wan0" meta l4proto udp ct state new accept
        counter name "dropped" drop
    }}

    chain input {{
        type filter hook input priority filter; policy accept;
        ct state established,related accept
        iifname "wan0" ip protocol != vrrp counter name "dropped_input" drop
        iifname "wan0" meta nfproto ipv6 meta l4proto != {{ icmpv6, vrrp }} counter name "dropped_input6" drop
    }}

    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan0" ip saddr {LAN}.0/24 snat ip to {WAN_VIP} fully-random
        oifname "wan0" ip6 saddr {LAN6}/64 snat ip6 to {WAN_VIP6} fully-random
    }}
}}
"""

NAT_PORTS = "1024-65535"  # Options.active_active: shared out between the firewalls

# Options.active_active: the source NAT from the firewall's own share of the ports (the rendered
# ctbridge-nat.nft's define), in place of the lab ruleset's
ACTIVE_ACTIVE_NAT = f"""
include "{{nat_file}}"
flush chain inet lab postrouting
table inet lab {{{{
    chain postrouting {{{{
        oifname "wan0" ip saddr {LAN}.0/24 meta l4proto {{{{ tcp, udp }}}} \\
            snat ip to {WAN_VIP}:$CTBRIDGE_NAT_PORTS fully-random
        oifname "wan0" ip saddr {LAN}.0/24 snat ip to {WAN_VIP}
    }}}}
}}}}
"""

# Options.zones: the LAN's flows in conntrack zone 1 in their original direction, as an operator
# separating overlapping networks does; the firewalls' own flows on the LAN (keepalived's unicast
# VRRP) are zoned too
ZONE_RULES = """
table inet lab_zones {
    chain prerouting {
        type filter hook prerouting priority raw; policy accept;
        iifname "lan0" ct original zone set 1
    }
    chain output {
        type filter hook output priority raw; policy accept;
        oifname "lan0" ct original zone set 1
    }
}
"""

# Options.no_sync: the ruleset marks the client's UDP flows not worth replicating (ct mark bit
# 0x100), as an operator leaves out DNS lookups; the cluster description's [replication] names the
# bit (NO_SYNC_MARK), and each firewall's event socket filters their events in the kernel
NO_SYNC_MARK = "0x100/0x100"
DELAY_QUEUE = 7  # Options.wan_delay: the server's netfilter queue (ctbridge.lab.delayline)
NO_SYNC_RULES = """
table inet lab_nosync {
    chain forward {
        type filter hook forward priority mangle; policy accept;
        meta l4proto udp ct mark set ct mark or 0x100
    }
}
"""

# Options.ftp: the FTP helper on the control connections (nf_conntrack_ftp, `ct helper`), and the
# passive data ports open only to what the helper expects (RELATED): how an operator lets FTP
# through a strict firewall. A table of its own, before the lab's forward chain.
FTP_PORTS = (30000, 30099)

FTP_RULES = f"""
table inet lab_ftp
delete table inet lab_ftp
table inet lab_ftp {{{{
    ct helper ftp-standard {{{{ type "ftp" protocol tcp; }}}}
    counter refused {{{{ }}}}

    chain prerouting {{{{
        type filter hook prerouting priority filter; policy accept;
        iifname "lan0" tcp dport 21 ct helper set "ftp-standard"
    }}}}

    chain forward {{{{
        type filter hook forward priority filter - 1; policy accept;
        iifname "lan0" tcp dport {FTP_PORTS[0]}-{FTP_PORTS[1]} ct state new counter name "refused" drop
    }}}}
}}}}
"""
FTP_FILE = 256 << 10  # bytes of the file the FTP tests retrieve

# 'numgen random' drops: this kernel has no netem. A table of its own, added and removed by lossy().
LOSS_RULES = """
table inet lab_loss {{
    chain input {{
        type filter hook input priority raw; policy accept;
        iifname "sync0" udp dport {port} numgen random mod 100 < {percent} counter drop
    }}
}}
"""


@dataclass
class Options:
    apply_mode: str = "commit"
    notify: str = "fifo"  # keepalived -> ctbridge through notify_fifo (ordered), or "hook"
    tcp: int = 200
    udp: int = 20
    event_buffer: int = 0  # bytes for the firewalls' kernel event socket (0: ctbridge's default)
    advert_int: float = 1.0
    verbose: bool = False
    gate: bool = True  # commit mode: ctbridge's commit gate (the control experiment turns it off)
    sync: tuple[str, ...] = ()  # lines added to each ctbridge.toml's [sync] section ("key = value")
    apply: tuple[str, ...] = ()  # ... and to its [apply] section
    ipv6: bool = False  # IPv6 too: VIPs of their own (VRRP 3), NAT66, every other flow over IPv6
    ctbridge: tuple[str, ...] = ()  # the command that runs ctbridge (default: this tree's, with this Python);
    # ("/usr/bin/ctbridge",): the installed package's, with Debian's Python and its libraries
    ftp: bool = False  # an FTP server behind the pair, the FTP helper on the firewalls (FTP_RULES)
    firewalls: int = 2  # how many firewalls (three: the three-node example's cluster)
    multicast: bool = False  # sync and VRRP adverts over multicast (SYNC_GROUP), the sync link a bridge
    backend: str = "ctbridge"  # "conntrackd": each firewall's ctbridge drives a conntrackd (apply.backend)
    # both firewalls forward (examples/two-nodes-active-active.toml): fw1 is the LAN instance's
    # master, fw2 the WAN's, so the server's replies (to the WAN VIP) come back through fw2; each
    # firewall source-NATs to the WAN VIP from its own share of NAT_PORTS (ctbridge-nat.nft)
    active_active: bool = False
    defer: bool = True  # active_active: the defer on (the control experiment turns it off)
    new: float = 0.0  # new TCP connections a second the client opens besides its long-lived flows
    zones: bool = False  # the LAN's flows in conntrack zone 1 (`ct original zone set`, ZONE_RULES)
    own_flows: bool = False  # the cluster description's own_flows: the firewalls' own flows replicated too
    no_sync: bool = False  # the client's UDP flows marked no-sync by the ruleset (NO_SYNC_RULES)
    wan_delay: float = 0.0  # seconds the server's TCP packets are held, as a WAN's round trip (lab.delayline)

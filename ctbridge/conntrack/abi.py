"""Numbers of the ctnetlink protocol, as the kernel defines them.

Every value here is part of the kernel's user-space ABI; the header each group comes from is named
above it so a reader can check it against the running kernel's uapi headers.
"""

from __future__ import annotations

# From include/uapi/linux/netlink.h
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_DROP_MEMBERSHIP = 2
NETLINK_NO_ENOBUFS = 5
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLM_F_REQUEST = 0x001
NLM_F_MULTI = 0x002
NLM_F_ACK = 0x004
NLM_F_ECHO = 0x008
NLM_F_DUMP_INTR = 0x010
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_EXCL = 0x200  # for NEW requests; the same bit means MATCH on GET
NLM_F_CREATE = 0x400
NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF
NLMSG_HDRLEN = 16
NLA_HDRLEN = 4

# From include/uapi/linux/netfilter/nfnetlink.h
NFNL_SUBSYS_CTNETLINK = 1
NFNETLINK_V0 = 0
NFNLGRP_CONNTRACK_NEW = 1
NFNLGRP_CONNTRACK_UPDATE = 2
NFNLGRP_CONNTRACK_DESTROY = 3
NFGENMSG_LEN = 4

# From include/uapi/linux/netfilter/nfnetlink_conntrack.h: enum cntl_msg_types
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
IPCTNL_MSG_CT_GET_STATS = 5

# The nlmsg_type of a ctnetlink message is (subsystem << 8) | message.
MSG_CT_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
MSG_CT_GET = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
MSG_CT_DELETE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
MSG_CT_GET_STATS = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET_STATS

# Expectations: a helper (FTP, SIP) that reads a control connection tells the kernel which
# connection comes next, and that one is RELATED. From include/uapi/linux/netfilter/nfnetlink.h
# (subsystem, groups) and nfnetlink_conntrack.h (enum cntl_msg_exp_types, enum ctattr_expect,
# enum ctattr_expect_nat); the flags from include/uapi/linux/netfilter/nf_conntrack_common.h.
NFNL_SUBSYS_CTNETLINK_EXP = 2
NFNLGRP_CONNTRACK_EXP_NEW = 4
NFNLGRP_CONNTRACK_EXP_UPDATE = 5
NFNLGRP_CONNTRACK_EXP_DESTROY = 6
IPCTNL_MSG_EXP_NEW = 0
IPCTNL_MSG_EXP_GET = 1
IPCTNL_MSG_EXP_DELETE = 2
MSG_EXP_NEW = (NFNL_SUBSYS_CTNETLINK_EXP << 8) | IPCTNL_MSG_EXP_NEW
MSG_EXP_GET = (NFNL_SUBSYS_CTNETLINK_EXP << 8) | IPCTNL_MSG_EXP_GET
MSG_EXP_DELETE = (NFNL_SUBSYS_CTNETLINK_EXP << 8) | IPCTNL_MSG_EXP_DELETE
CTA_EXPECT_MASTER = 1
CTA_EXPECT_TUPLE = 2
CTA_EXPECT_MASK = 3
CTA_EXPECT_TIMEOUT = 4
CTA_EXPECT_ID = 5
CTA_EXPECT_HELP_NAME = 6
CTA_EXPECT_ZONE = 7
CTA_EXPECT_FLAGS = 8
CTA_EXPECT_CLASS = 9
CTA_EXPECT_NAT = 10
CTA_EXPECT_FN = 11
CTA_EXPECT_NAT_DIR = 1
CTA_EXPECT_NAT_TUPLE = 2
NF_CT_EXPECT_PERMANENT = 0x1
NF_CT_EXPECT_INACTIVE = 0x2
NF_CT_EXPECT_USERSPACE = 0x4

# enum ctattr_type
CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_STATUS = 3
CTA_PROTOINFO = 4
CTA_HELP = 5
CTA_NAT_SRC = 6
CTA_TIMEOUT = 7
CTA_MARK = 8
CTA_COUNTERS_ORIG = 9
CTA_COUNTERS_REPLY = 10
CTA_USE = 11
CTA_ID = 12
CTA_NAT_DST = 13
CTA_TUPLE_MASTER = 14
CTA_SEQ_ADJ_ORIG = 15
CTA_SEQ_ADJ_REPLY = 16
CTA_SECMARK = 17
CTA_ZONE = 18
CTA_SECCTX = 19
CTA_TIMESTAMP = 20
CTA_MARK_MASK = 21
CTA_LABELS = 22
CTA_LABELS_MASK = 23
CTA_SYNPROXY = 24
CTA_FILTER = 25
CTA_STATUS_MASK = 26
CTA_TIMESTAMP_EVENT = 27

# enum ctattr_tuple
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_TUPLE_ZONE = 3

# enum ctattr_ip
CTA_IP_V4_SRC = 1
CTA_IP_V4_DST = 2
CTA_IP_V6_SRC = 3
CTA_IP_V6_DST = 4

# enum ctattr_l4proto
CTA_PROTO_NUM = 1
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3
CTA_PROTO_ICMP_ID = 4
CTA_PROTO_ICMP_TYPE = 5
CTA_PROTO_ICMP_CODE = 6
CTA_PROTO_ICMPV6_ID = 7
CTA_PROTO_ICMPV6_TYPE = 8
CTA_PROTO_ICMPV6_CODE = 9

# enum ctattr_protoinfo
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_DCCP = 2
CTA_PROTOINFO_SCTP = 3

# enum ctattr_protoinfo_tcp
CTA_PROTOINFO_TCP_STATE = 1
CTA_PROTOINFO_TCP_WSCALE_ORIGINAL = 2
CTA_PROTOINFO_TCP_WSCALE_REPLY = 3
CTA_PROTOINFO_TCP_FLAGS_ORIGINAL = 4
CTA_PROTOINFO_TCP_FLAGS_REPLY = 5

# enum ctattr_protoinfo_dccp / ctattr_protoinfo_sctp
CTA_PROTOINFO_DCCP_STATE = 1
CTA_PROTOINFO_SCTP_STATE = 1

# enum ctattr_counters
CTA_COUNTERS_PACKETS = 1
CTA_COUNTERS_BYTES = 2

# enum ctattr_help
CTA_HELP_NAME = 1

# enum ctattr_nat / ctattr_protonat
CTA_NAT_V4_MINIP = 1
CTA_NAT_V4_MAXIP = 2
CTA_NAT_PROTO = 3
CTA_NAT_V6_MINIP = 4
CTA_NAT_V6_MAXIP = 5
CTA_PROTONAT_PORT_MIN = 1
CTA_PROTONAT_PORT_MAX = 2

# enum ctattr_stats_global
CTA_STATS_GLOBAL_ENTRIES = 1
CTA_STATS_GLOBAL_MAX_ENTRIES = 2

# From include/uapi/linux/netfilter/nf_conntrack_common.h: enum ip_conntrack_status (bit numbers)
STATUS_BITS = (
    "EXPECTED", "SEEN_REPLY", "ASSURED", "CONFIRMED", "SRC_NAT", "DST_NAT", "SEQ_ADJUST",
    "SRC_NAT_DONE", "DST_NAT_DONE", "DYING", "FIXED_TIMEOUT", "TEMPLATE", "NAT_CLASH", "HELPER",
    "OFFLOAD", "HW_OFFLOAD",
)
IPS_EXPECTED = 1 << 0
IPS_SEEN_REPLY = 1 << 1
IPS_ASSURED = 1 << 2
IPS_CONFIRMED = 1 << 3
IPS_SRC_NAT = 1 << 4
IPS_DST_NAT = 1 << 5
IPS_SEQ_ADJUST = 1 << 6
IPS_SRC_NAT_DONE = 1 << 7
IPS_DST_NAT_DONE = 1 << 8
IPS_DYING = 1 << 9
IPS_TEMPLATE = 1 << 11
IPS_UNTRACKED = 1 << 12
IPS_HELPER = 1 << 13
IPS_OFFLOAD = 1 << 14
IPS_HW_OFFLOAD = 1 << 15
# IPS_UNCHANGEABLE_MASK: the kernel ignores these bits when user space sets a status.
IPS_UNCHANGEABLE_MASK = (
    IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE | IPS_SRC_NAT | IPS_DST_NAT | IPS_EXPECTED | IPS_CONFIRMED
    | IPS_DYING | IPS_SEQ_ADJUST | IPS_TEMPLATE | IPS_UNTRACKED | IPS_OFFLOAD | IPS_HW_OFFLOAD
)

# From include/uapi/linux/netfilter/nf_conntrack_tcp.h: struct nf_ct_tcp_flags bits
IP_CT_TCP_FLAG_WINDOW_SCALE = 0x01
IP_CT_TCP_FLAG_SACK_PERM = 0x02
IP_CT_TCP_FLAG_CLOSE_INIT = 0x04
IP_CT_TCP_FLAG_BE_LIBERAL = 0x08
IP_CT_TCP_FLAG_DATA_UNACKNOWLEDGED = 0x10  # window state: the entry's timeout is then the "unacknowledged" one
IP_CT_TCP_FLAG_MAXACK_SET = 0x20

# From include/uapi/linux/netfilter/nf_conntrack_tcp.h: enum tcp_conntrack
TCP_STATES = (
    "NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK",
    "TIME_WAIT", "CLOSE", "SYN_SENT2",
)
# From include/uapi/linux/netfilter/nf_conntrack_sctp.h: enum sctp_conntrack
SCTP_STATES = (
    "NONE", "CLOSED", "COOKIE_WAIT", "COOKIE_ECHOED", "ESTABLISHED", "SHUTDOWN_SENT",
    "SHUTDOWN_RECD", "SHUTDOWN_ACK_SENT", "HEARTBEAT_SENT",
)
# From include/uapi/linux/netfilter/nf_conntrack_common.h (CT_DCCP_*): enum ct_dccp_states
DCCP_STATES = (
    "NONE", "REQUEST", "RESPOND", "PARTOPEN", "OPEN", "CLOSEREQ", "CLOSING", "TIMEWAIT",
    "IGNORE", "INVALID",
)

# IANA protocol numbers (include/uapi/linux/in.h, in6.h)
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_DCCP = 33
IPPROTO_GRE = 47
IPPROTO_ICMPV6 = 58
IPPROTO_SCTP = 132
IPPROTO_UDPLITE = 136
PROTO_NAMES = {
    IPPROTO_ICMP: "icmp", IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp", IPPROTO_DCCP: "dccp",
    IPPROTO_GRE: "gre", IPPROTO_ICMPV6: "icmpv6", IPPROTO_SCTP: "sctp", IPPROTO_UDPLITE: "udplite",
}
# Protocols whose tuples carry 16-bit ports in CTA_PROTO_SRC_PORT / CTA_PROTO_DST_PORT.
PORT_PROTOS = frozenset({IPPROTO_TCP, IPPROTO_UDP, IPPROTO_DCCP, IPPROTO_SCTP, IPPROTO_UDPLITE})

# From include/linux/socket.h (not imported from the socket module: the engine, which uses these
# numbers, must not import socket at all)
AF_INET = 2
AF_INET6 = 10
FAMILY_NAMES = {AF_INET: "ipv4", AF_INET6: "ipv6"}

"""Entries built from fields, laid out as the kernel dumps them (tests and benchmarks)."""

from __future__ import annotations

import struct

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack.codec import Entry, attr, make_key

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")


def encode_tuple(family: int, proto: int, src: bytes, dst: bytes, sport: int = 0, dport: int = 0,
                 icmp: tuple[int, int, int] | None = None) -> bytes:
    """A tuple payload (CTA_TUPLE_IP + CTA_TUPLE_PROTO) in the kernel's layout.

    ``src``/``dst`` are packed addresses; ``icmp`` is (type, code, id) for ICMP and ICMPv6.
    """
    v6 = family == ct.AF_INET6
    t_src, t_dst = (ct.CTA_IP_V6_SRC, ct.CTA_IP_V6_DST) if v6 else (ct.CTA_IP_V4_SRC, ct.CTA_IP_V4_DST)
    ip = attr(t_src, src) + attr(t_dst, dst)
    body = attr(ct.CTA_PROTO_NUM, bytes((proto,)))
    if icmp is not None:
        t_type, t_code, t_id = (
            (ct.CTA_PROTO_ICMPV6_TYPE, ct.CTA_PROTO_ICMPV6_CODE, ct.CTA_PROTO_ICMPV6_ID) if v6
            else (ct.CTA_PROTO_ICMP_TYPE, ct.CTA_PROTO_ICMP_CODE, ct.CTA_PROTO_ICMP_ID))
        body += attr(t_id, _BE16.pack(icmp[2])) + attr(t_type, bytes((icmp[0],))) + attr(t_code, bytes((icmp[1],)))
    else:
        body += attr(ct.CTA_PROTO_SRC_PORT, _BE16.pack(sport)) + attr(ct.CTA_PROTO_DST_PORT, _BE16.pack(dport))
    return attr(ct.CTA_TUPLE_IP, ip, nested=True) + attr(ct.CTA_TUPLE_PROTO, body, nested=True)


def build_entry(family: int, orig: bytes, reply: bytes, *, status: int = ct.IPS_CONFIRMED,
                timeout: int = 3600, mark: int = 0, zone: int = 0, tcp_state: int | None = None,
                extra: bytes = b"") -> Entry:
    """An entry laid out as the kernel dumps one: tuples, zone, status, timeout, protoinfo, mark."""
    attrs = attr(ct.CTA_TUPLE_ORIG, orig, nested=True) + attr(ct.CTA_TUPLE_REPLY, reply, nested=True)
    if zone:
        attrs += attr(ct.CTA_ZONE, _BE16.pack(zone))
    attrs += attr(ct.CTA_STATUS, _BE32.pack(status)) + attr(ct.CTA_TIMEOUT, _BE32.pack(timeout))
    if tcp_state is not None:
        flags = bytes((ct.IP_CT_TCP_FLAG_SACK_PERM, 0))
        tcp = (attr(ct.CTA_PROTOINFO_TCP_STATE, bytes((tcp_state,)))
               + attr(ct.CTA_PROTOINFO_TCP_WSCALE_ORIGINAL, b"\x07") + attr(ct.CTA_PROTOINFO_TCP_WSCALE_REPLY, b"\x07")
               + attr(ct.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, flags) + attr(ct.CTA_PROTOINFO_TCP_FLAGS_REPLY, flags))
        attrs += attr(ct.CTA_PROTOINFO, attr(ct.CTA_PROTOINFO_TCP, tcp, nested=True), nested=True)
    attrs += attr(ct.CTA_MARK, _BE32.pack(mark)) + extra
    return Entry(make_key(family, zone, orig), family, attrs)


def expectation_attrs(family: int, client: bytes, server: bytes, data_port: int, control_port: int,
                      server_port: int = 21, *, timeout: int = 300, zone: int = 0, helper: str = "ftp",
                      exp_id: int = 0x1234) -> bytes:
    """The attributes of an expectation as the kernel dumps one (ctnetlink_exp_dump_expect): the
    FTP helper's for a passive data connection client -> server:data_port, any source port, of
    the control connection client:control_port -> server:server_port, following its NAT."""
    full = b"\xff" * len(client)
    tup = encode_tuple(family, ct.IPPROTO_TCP, client, server, 0, data_port)
    mask = encode_tuple(family, ct.IPPROTO_TCP, full, full, 0, 0xFFFF)
    master = encode_tuple(family, ct.IPPROTO_TCP, client, server, control_port, server_port)
    zero = bytes(len(client))
    nat = (attr(ct.CTA_EXPECT_NAT_DIR, _BE32.pack(0))
           + attr(ct.CTA_EXPECT_NAT_TUPLE, encode_tuple(family, ct.IPPROTO_TCP, zero, zero, 0, data_port), nested=True))
    attrs = (attr(ct.CTA_EXPECT_TUPLE, tup, nested=True) + attr(ct.CTA_EXPECT_MASK, mask, nested=True)
             + attr(ct.CTA_EXPECT_MASTER, master, nested=True) + attr(ct.CTA_EXPECT_NAT, nat, nested=True))
    if zone:
        attrs += attr(ct.CTA_EXPECT_ZONE, _BE16.pack(zone))
    return (attrs + attr(ct.CTA_EXPECT_TIMEOUT, _BE32.pack(timeout)) + attr(ct.CTA_EXPECT_ID, _BE32.pack(exp_id))
            + attr(ct.CTA_EXPECT_FLAGS, _BE32.pack(0)) + attr(ct.CTA_EXPECT_CLASS, _BE32.pack(0))
            + attr(ct.CTA_EXPECT_HELP_NAME, helper.encode() + b"\0") + attr(ct.CTA_EXPECT_FN, b"nat-follow-master\0"))


def build_expectation(family: int, client: bytes, server: bytes, data_port: int, control_port: int,
                      server_port: int = 21, **kw: object) -> Entry:
    """expectation_attrs() as ctbridge replicates it (ctbridge.conntrack.expectation)."""
    from ctbridge.conntrack import expectation
    buf = expectation_attrs(family, client, server, data_port, control_port, server_port, **kw)  # type: ignore[arg-type]
    return expectation.entry_from_attrs(family, buf, 0, len(buf))


def tcp_flows(n: int, timeout: int = 3600, tcp_state: int = 3) -> list[Entry]:
    """n distinct IPv4 TCP flows 198.51.100.x:port -> 203.0.113.y:443 (test and bench load), by
    default ESTABLISHED (3, include/uapi/linux/netfilter/nf_conntrack_tcp.h)."""
    out = []
    status = ct.IPS_CONFIRMED | ct.IPS_SEEN_REPLY | ct.IPS_ASSURED
    for i in range(n):
        sport = 1024 + i % 60000
        host = i // 60000
        src = bytes((198, 51, 100, 1 + host % 250))
        dst = bytes((203, 0, 113, 1 + host // 250 % 250))
        orig = encode_tuple(ct.AF_INET, ct.IPPROTO_TCP, src, dst, sport, 443)
        reply = encode_tuple(ct.AF_INET, ct.IPPROTO_TCP, dst, src, 443, sport)
        out.append(build_entry(ct.AF_INET, orig, reply, status=status, timeout=timeout, tcp_state=tcp_state))
    return out


def ftp_control_flow(client: bytes, server: bytes) -> Entry:
    """An established FTP control connection (client:40000 -> server:21) with the ftp helper
    attached, as the kernel keeps it (CTA_HELP)."""
    orig = encode_tuple(ct.AF_INET, ct.IPPROTO_TCP, client, server, 40000, 21)
    reply = encode_tuple(ct.AF_INET, ct.IPPROTO_TCP, server, client, 21, 40000)
    e = build_entry(ct.AF_INET, orig, reply, status=ct.IPS_CONFIRMED | ct.IPS_SEEN_REPLY | ct.IPS_ASSURED,
                    timeout=600, tcp_state=3)
    return Entry(e.key, e.family, e.attrs + attr(ct.CTA_HELP, attr(ct.CTA_HELP_NAME, b"ftp\0"), nested=True))

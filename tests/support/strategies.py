"""Hypothesis strategies: random entries in the kernel's layout, as dump messages."""

from __future__ import annotations

import ipaddress

from hypothesis import strategies as st

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec
from ctbridge.conntrack.codec import Entry
from tests.support import builders

PORT_PROTOS = [ct.IPPROTO_TCP, ct.IPPROTO_UDP, ct.IPPROTO_SCTP, ct.IPPROTO_DCCP, ct.IPPROTO_UDPLITE, ct.IPPROTO_GRE]
DOC_V4 = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")]


@st.composite
def entries(draw: st.DrawFn) -> tuple[Entry, dict]:
    """A random entry in the kernel's layout, with the fields it was built from."""
    v6 = draw(st.booleans())
    family = ct.AF_INET6 if v6 else ct.AF_INET

    def addr() -> bytes:
        if v6:
            return ipaddress.IPv6Address(0x20010DB8 << 96 | draw(st.integers(0, 2**64))).packed
        net = draw(st.sampled_from(DOC_V4))
        return net[draw(st.integers(1, 254))].packed

    src, dst, nat = addr(), addr(), addr()
    icmp = draw(st.booleans())
    if icmp:
        proto = ct.IPPROTO_ICMPV6 if v6 else ct.IPPROTO_ICMP
        kind = draw(st.integers(0, 255))
        ident = draw(st.integers(0, 65535))
        orig = builders.encode_tuple(family, proto, src, dst, icmp=(kind, 0, ident))
        reply = builders.encode_tuple(family, proto, dst, nat, icmp=(kind, 0, ident))
        sport = dport = 0
    else:
        proto = draw(st.sampled_from(PORT_PROTOS))
        sport, dport = draw(st.integers(0, 65535)), draw(st.integers(0, 65535))
        orig = builders.encode_tuple(family, proto, src, dst, sport, dport)
        reply = builders.encode_tuple(family, proto, dst, nat, dport, draw(st.integers(0, 65535)))
    status = draw(st.integers(0, 0xFFFF))
    tcp_state = draw(st.integers(0, 9)) if proto == ct.IPPROTO_TCP else None
    # attributes the codec does not know, which must survive untouched
    unknown = b"".join(codec.attr(t, p) for t, p in draw(
        st.lists(st.tuples(st.integers(40, 0x3FFF), st.binary(max_size=24)), max_size=3)))
    fields = {"family": family, "proto": proto, "src": src, "dst": dst, "sport": sport, "dport": dport,
              "status": status, "timeout": draw(st.integers(0, 2**32 - 1)), "mark": draw(st.integers(0, 2**32 - 1)),
              "zone": draw(st.integers(0, 65535)), "tcp_state": tcp_state, "unknown": unknown}
    entry = builders.build_entry(family, orig, reply, status=status, timeout=fields["timeout"], mark=fields["mark"],
                              zone=fields["zone"], tcp_state=tcp_state, extra=unknown)
    return entry, fields


def as_dump_message(entry: Entry, seq: int = 1) -> bytes:
    return codec.message(ct.MSG_CT_NEW, ct.NLM_F_MULTI, seq, entry.family, entry.attrs)

"""A readable, JSON-able view of a conntrack entry, built only when someone asks for it.

The field names are the ones operators know from ``conntrack -L``: ``src``/``dst``/``sport``/
``dport`` for the original direction, ``reply_*`` for the reply direction, ``type``/``code``/``id``
for ICMP. The same object describes kernel dumps and the caches.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack.codec import CodecError, Entry, attr_map, split_key

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")

_ADDR = {
    ct.CTA_IP_V4_SRC: ("src", ipaddress.IPv4Address),
    ct.CTA_IP_V4_DST: ("dst", ipaddress.IPv4Address),
    ct.CTA_IP_V6_SRC: ("src", ipaddress.IPv6Address),
    ct.CTA_IP_V6_DST: ("dst", ipaddress.IPv6Address),
}


def _u(payload: bytes, what: str) -> int:
    if len(payload) == 1:
        return payload[0]
    if len(payload) == 2:
        return int(_BE16.unpack(payload)[0])
    if len(payload) == 4:
        return int(_BE32.unpack(payload)[0])
    if len(payload) == 8:
        return int(_BE64.unpack(payload)[0])
    raise CodecError(f"{what} has an unexpected length of {len(payload)} bytes")


def tuple_view(payload: bytes) -> dict[str, Any]:
    """A tuple (CTA_TUPLE_ORIG/REPLY/MASTER payload) as {src, dst, proto, sport, dport | type, code, id}."""
    out: dict[str, Any] = {}
    top = attr_map(payload)
    for t, v in attr_map(top.get(ct.CTA_TUPLE_IP, b"")).items():
        if t in _ADDR:
            name, cls = _ADDR[t]
            try:
                out[name] = str(cls(v))
            except ValueError as exc:
                raise CodecError(f"address attribute {t} has {len(v)} bytes") from exc
    proto = attr_map(top.get(ct.CTA_TUPLE_PROTO, b""))
    if ct.CTA_PROTO_NUM in proto:
        out["protonum"] = _u(proto[ct.CTA_PROTO_NUM], "CTA_PROTO_NUM")
    for t, name in ((ct.CTA_PROTO_SRC_PORT, "sport"), (ct.CTA_PROTO_DST_PORT, "dport"),
                    (ct.CTA_PROTO_ICMP_TYPE, "type"), (ct.CTA_PROTO_ICMP_CODE, "code"),
                    (ct.CTA_PROTO_ICMP_ID, "id"), (ct.CTA_PROTO_ICMPV6_TYPE, "type"),
                    (ct.CTA_PROTO_ICMPV6_CODE, "code"), (ct.CTA_PROTO_ICMPV6_ID, "id")):
        if t in proto:
            out[name] = _u(proto[t], name)
    if out.get("protonum") == ct.IPPROTO_GRE and "sport" in out:
        # ctnetlink carries GRE keys in the port attributes; conntrack -L calls them keys
        out["srckey"] = out.pop("sport")
        out["dstkey"] = out.pop("dport", None)
    if ct.CTA_TUPLE_ZONE in top:
        out["zone"] = _u(top[ct.CTA_TUPLE_ZONE], "CTA_TUPLE_ZONE")
    return out


def status_names(status: int) -> list[str]:
    return [name for bit, name in enumerate(ct.STATUS_BITS) if status & (1 << bit)]


def _protoinfo(payload: bytes, out: dict[str, Any]) -> None:
    info = attr_map(payload)
    if ct.CTA_PROTOINFO_TCP in info:
        tcp = attr_map(info[ct.CTA_PROTOINFO_TCP])
        if tcp.get(ct.CTA_PROTOINFO_TCP_STATE):
            state = tcp[ct.CTA_PROTOINFO_TCP_STATE][0]
            out["tcp_state"] = ct.TCP_STATES[state] if state < len(ct.TCP_STATES) else str(state)
        for t, name in ((ct.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, "tcp_flags_original"),
                        (ct.CTA_PROTOINFO_TCP_FLAGS_REPLY, "tcp_flags_reply")):
            if tcp.get(t):
                out[name] = tcp[t][0]
    for t, key, names in ((ct.CTA_PROTOINFO_SCTP, "sctp_state", ct.SCTP_STATES),
                          (ct.CTA_PROTOINFO_DCCP, "dccp_state", ct.DCCP_STATES)):
        if t in info:
            inner = attr_map(info[t])
            if inner.get(1):
                state = inner[1][0]
                out[key] = names[state] if state < len(names) else str(state)


def entry_view(entry: Entry) -> dict[str, Any]:
    """The entry as a JSON-able dict (see the module docstring for the field names)."""
    family, zone, _orig = split_key(entry.key)
    attrs = attr_map(entry.attrs)
    out: dict[str, Any] = {"family": ct.FAMILY_NAMES.get(family, str(family))}
    orig = tuple_view(attrs.get(ct.CTA_TUPLE_ORIG, b""))
    protonum = orig.pop("protonum", None)
    if "zone" in orig:  # a directional zone (conntrack -L: zone-orig=N)
        out["zone_orig"] = orig.pop("zone")
    out["proto"] = ct.PROTO_NAMES.get(protonum, str(protonum)) if protonum is not None else None
    out["protonum"] = protonum
    out.update(orig)
    if ct.CTA_TUPLE_REPLY in attrs:
        reply = tuple_view(attrs[ct.CTA_TUPLE_REPLY])
        reply.pop("protonum", None)
        if "zone" in reply:
            out["zone_reply"] = reply.pop("zone")
        out.update({"reply_" + k: v for k, v in reply.items()})
    status = _u(attrs[ct.CTA_STATUS], "CTA_STATUS") if ct.CTA_STATUS in attrs else 0
    out["status"] = status_names(status)
    if ct.CTA_TIMEOUT in attrs:
        out["timeout"] = _u(attrs[ct.CTA_TIMEOUT], "CTA_TIMEOUT")
    out["mark"] = _u(attrs[ct.CTA_MARK], "CTA_MARK") if ct.CTA_MARK in attrs else 0
    out["zone"] = zone
    if ct.CTA_PROTOINFO in attrs:
        _protoinfo(attrs[ct.CTA_PROTOINFO], out)
    if ct.CTA_LABELS in attrs:
        out["labels"] = attrs[ct.CTA_LABELS].hex()
    if ct.CTA_HELP in attrs:
        helper = attr_map(attrs[ct.CTA_HELP]).get(ct.CTA_HELP_NAME, b"")
        out["helper"] = helper.rstrip(b"\x00").decode("ascii", "replace")
    if ct.CTA_TUPLE_MASTER in attrs:
        out["master"] = tuple_view(attrs[ct.CTA_TUPLE_MASTER])
    if ct.CTA_SECMARK in attrs:
        out["secmark"] = _u(attrs[ct.CTA_SECMARK], "CTA_SECMARK")
    for t, direction in ((ct.CTA_COUNTERS_ORIG, "orig"), (ct.CTA_COUNTERS_REPLY, "reply")):
        if t in attrs:
            counters = attr_map(attrs[t])
            if ct.CTA_COUNTERS_PACKETS in counters:
                out[direction + "_packets"] = _u(counters[ct.CTA_COUNTERS_PACKETS], "packets")
            if ct.CTA_COUNTERS_BYTES in counters:
                out[direction + "_bytes"] = _u(counters[ct.CTA_COUNTERS_BYTES], "bytes")
    if ct.CTA_USE in attrs:
        out["use"] = _u(attrs[ct.CTA_USE], "CTA_USE")
    if ct.CTA_ID in attrs:
        out["ct_id"] = _u(attrs[ct.CTA_ID], "CTA_ID")
    return out

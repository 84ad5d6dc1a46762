"""Which flows a node replicates. Pure: decides from an entry's attributes alone.

Addresses match the original source or the reply source, so one rule covers a flow whichever
side opened it: a firewall's own address in `ignore` leaves out every flow that ends on the
firewall itself (its SSH sessions, keepalived's unicast VRRP, ctbridge's own sync traffic).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Container
from dataclasses import dataclass, field

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec
from ctbridge.conntrack.expectation import EXPECTATION

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Never worth replicating: flows of the loopback interface exist on every node by themselves.
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


_LONG = struct.calcsize("@L")  # CTA_LABELS is the kernel's bitmap as unsigned longs, in host order


@dataclass(frozen=True)
class NoSync:
    """Flows the ruleset marks as not worth replicating (filter.no_sync_*): a ct mark
    (``mark & mask == value``), a ct label bit, a conntrack zone, or the original direction's
    destination port (the service) within a range. The ct mark and labels are read from the
    replicated attributes, so one check serves the sender, a receiver (what a peer may send) and
    dumps alike; the daemon also puts it into the event socket's kernel-side filter
    (ctbridge.conntrack.eventfilter), so that most such events never reach the loop."""

    marks: tuple[tuple[int, int], ...] = ()  # (value, mask)
    labels: frozenset[int] = frozenset()  # bit numbers, 0-127
    zones: frozenset[int] = frozenset()
    ports: tuple[tuple[int, int], ...] = ()  # (low, high), inclusive

    def selects(self) -> bool:
        return bool(self.marks or self.labels or self.zones or self.ports)

    def refuses(self, key: bytes, attrs: bytes, start: int = 0) -> bool:
        """Whether the flow of ``key`` with attributes ``attrs[start:]`` is selected not to be
        replicated. Raises CodecError on attributes that do not parse."""
        return self.decide(key, attrs, start) is True

    def decide(self, key: bytes, attrs: bytes, start: int = 0) -> bool | None:
        """refuses(), or None when only the labels could tell and the attributes carry none: the
        kernel puts CTA_LABELS into an event only when they changed (ctnetlink_conntrack_event),
        so an update says nothing of them (the internal cache remembers what the flow's earlier
        events said)."""
        if self.zones and (key[1] << 8) | key[2] in self.zones:
            return True
        if self.ports:
            proto = codec.attr_map(codec.attr_map(key, 3).get(ct.CTA_TUPLE_PROTO, b""))
            raw = proto.get(ct.CTA_PROTO_DST_PORT, b"")
            if len(raw) == 2:
                port = int.from_bytes(raw, "big")
                if any(low <= port <= high for low, high in self.ports):
                    return True
        if self.marks or self.labels:
            top = codec.attr_map(attrs, start)
            raw = top.get(ct.CTA_MARK, b"")
            mark = int.from_bytes(raw, "big") if len(raw) == 4 else 0  # none: mark 0
            if any(mark & mask == value for value, mask in self.marks):
                return True
            raw = top.get(ct.CTA_LABELS, b"")
            if self.labels and ct.CTA_LABELS not in top:
                return None
            if self.labels and raw and len(raw) % _LONG == 0:
                words = struct.unpack(f"@{len(raw) // _LONG}L", raw)
                bits = 8 * _LONG
                if any(b // bits < len(words) and words[b // bits] >> (b % bits) & 1 for b in self.labels):
                    return True
        return False


def refused_now(no_sync: NoSync | None, unsynced: set[bytes], key: bytes, buf: bytes, start: int = 0) -> bool:
    """Whether ``no_sync`` refuses the flow of ``key`` whose event this is (attributes from
    ``start``). With labels selected, a flow it refused stays refused while its events carry no
    labels (NoSync.decide): ``unsynced`` holds those flows, until their end (the caller's)."""
    if no_sync is None:
        return False
    verdict = no_sync.decide(key, buf, start)
    if verdict is None:
        return key in unsynced
    if no_sync.labels:
        if verdict:
            unsynced.add(key)
        else:
            unsynced.discard(key)
    return verdict


@dataclass(frozen=True)
class FlowFilter:
    protocols: frozenset[int] = frozenset()  # empty: every protocol
    accept: tuple[Network, ...] = ()  # non-empty: only flows whose original or reply source is inside
    ignore: tuple[Network, ...] = LOOPBACK  # flows whose original or reply source is inside are left out
    tcp_states: frozenset[int] = frozenset()  # empty: every TCP state
    no_sync: NoSync | None = None  # flows the ruleset selects not to replicate
    _accept: tuple[tuple[int, int, int], ...] = field(init=False, repr=False, compare=False)
    _ignore_hosts: frozenset[bytes] = field(init=False, repr=False, compare=False)
    _ignore_nets: dict[int, tuple[tuple[int, int], ...]] = field(init=False, repr=False, compare=False)
    _ignore_prefixes: dict[int, tuple[bytes, ...]] = field(init=False, repr=False, compare=False)
    _only_ignore: bool = field(init=False, repr=False, compare=False)  # hosts and aligned prefixes only

    def __post_init__(self) -> None:
        # (family, network as int, mask as int) for fast checks on packed addresses
        def prep(nets: tuple[Network, ...]) -> tuple[tuple[int, int, int], ...]:
            return tuple((ct.AF_INET6 if n.version == 6 else ct.AF_INET, int(n.network_address), int(n.netmask))
                         for n in nets)
        object.__setattr__(self, "_accept", prep(self.accept))
        # Single addresses (the sync peers, the firewall's own) are looked up as packed bytes;
        # only real prefixes cost an integer comparison each.
        hosts = frozenset(n.network_address.packed for n in self.ignore if n.num_addresses == 1)
        # Prefixes on a byte boundary (127.0.0.0/8, 2001:db8::/32: most are) are compared as
        # bytes, all of a family in one startswith(); only the others cost integer arithmetic.
        def aligned(n: Network) -> bool:
            return n.num_addresses > 1 and n.prefixlen % 8 == 0
        prefixes = {f: tuple(n.network_address.packed[:n.prefixlen // 8] for n in self.ignore
                             if aligned(n) and (n.version == 6) == (f == ct.AF_INET6))
                    for f in (ct.AF_INET, ct.AF_INET6)}
        object.__setattr__(self, "_ignore_prefixes", prefixes)
        object.__setattr__(self, "_only_ignore", not (self.protocols or self.accept or self.tcp_states or self.no_sync)
                           and all(n.num_addresses == 1 or aligned(n) for n in self.ignore))
        nets = [(fam, net, mask) for (fam, net, mask), n in zip(prep(self.ignore), self.ignore, strict=True)
                if n.num_addresses > 1 and not aligned(n)]
        object.__setattr__(self, "_ignore_hosts", hosts)
        object.__setattr__(self, "_ignore_nets", {f: tuple((net, mask) for fam, net, mask in nets if fam == f)
                                                  for f in (ct.AF_INET, ct.AF_INET6)})

    def accepts(self, entry: codec.Entry) -> bool:
        """Runs once per kernel event: the kernel's tuple layout is read at fixed offsets."""
        facts = _fast_facts(entry.key, entry.attrs, 0)
        if facts is None or (self.tcp_states and facts[0] == ct.IPPROTO_TCP):
            facts = flow_facts(entry)
        return self.accepts_facts(entry.family, facts) and not (
            self.no_sync is not None and self.no_sync.refuses(entry.key, entry.attrs))

    def accepts_message(self, key: bytes, family: int, buf: bytes, start: int) -> bool:
        """accepts() for a flow whose attributes are ``buf[start:]`` (a FLOW message as it came
        from a peer): no Entry, no copy of the attributes, on the fast path."""
        if key[0] & EXPECTATION:
            return self.accepts_expectation(codec.Entry(key, family & ~EXPECTATION, buf[start:]))
        if self._only_ignore:
            # the usual filter on receive (loopback, the sync addresses, an ignore list): two
            # slices and three lookups, for every flow of a bulk
            head = key[3:11]
            alen = 4 if head == _V4_IP else 16 if head == _V6_IP else 0
            r = start + len(key) + 1
            if alen and buf[r + 4:r + 12] == head:
                src, reply_src = key[11:11 + alen], buf[r + 12:r + 12 + alen]
                hosts = self._ignore_hosts
                prefixes = self._ignore_prefixes.get(family, ())
                return not (src in hosts or reply_src in hosts
                            or (prefixes and (src.startswith(prefixes) or reply_src.startswith(prefixes))))
        facts = _fast_facts(key, buf, start)
        if facts is None or (self.tcp_states and facts[0] == ct.IPPROTO_TCP):
            facts = flow_facts(codec.Entry(key, family, buf[start:]))
        return self.accepts_facts(family, facts) and not (
            self.no_sync is not None and self.no_sync.refuses(key, buf, start))

    def ignore_only(self) -> tuple[frozenset[bytes], dict[int, tuple[bytes, ...]]] | None:
        """(single addresses, byte-aligned prefixes by family) when that is all this filter
        checks (the usual one: loopback, the sync addresses, an ignore list), for a hot loop that
        checks them inline: a flow is refused when its original or reply source is one of the
        addresses or starts with one of its family's prefixes. None: call accepts_facts()."""
        return (self._ignore_hosts, self._ignore_prefixes) if self._only_ignore else None

    def refused_among(self, flows: list[tuple[int, bytes, bytes]], start: int, known: Container[bytes]) -> set[int]:
        """The positions in ``flows`` (a datagram's FLOWs as (version, key, message), attributes
        from ``start``) of those this filter refuses (accepts_message, or attributes that do not
        parse), among the flows whose key is not in ``known`` (a peer's copy: only a flow new to
        it is admitted) and are no expectation's. One call per datagram: the usual filter (only
        addresses to ignore) is checked here inline, as accepts_message does."""
        out: set[int] = set()
        hosts = self._ignore_hosts
        prefixes_of = self._ignore_prefixes
        plain = self._only_ignore
        for i, (_version, key, buf) in enumerate(flows):
            if key in known or key[0] & EXPECTATION:
                continue
            family = buf[1]
            if plain:
                head = key[3:11]
                alen = 4 if head == _V4_IP else 16 if head == _V6_IP else 0
                r = start + len(key) + 1
                if alen and buf[r + 4:r + 12] == head:
                    src, reply_src = key[11:11 + alen], buf[r + 12:r + 12 + alen]
                    prefixes = prefixes_of.get(family, ())
                    if (src in hosts or reply_src in hosts
                            or (prefixes and (src.startswith(prefixes) or reply_src.startswith(prefixes)))):
                        out.add(i)
                    continue
            try:
                if not self.accepts_message(key, family, buf, start):
                    out.add(i)
            except codec.CodecError:
                out.add(i)
        return out

    def accepts_expectation(self, entry: codec.Entry) -> bool:
        """An expectation lets a new connection in as RELATED: it is taken when this filter takes
        both that connection (the expectation's tuple, its source and destination) and the
        master flow it belongs to (the master's original tuple). A source the mask leaves open
        (SIP media from anywhere; or a forged mask of 0) is no source inside an accept list: then
        the destination must be. Raises CodecError on attributes that do not parse."""
        attrs = codec.attr_map(entry.attrs)
        try:
            tup, master, mask = (attrs[t] for t in (ct.CTA_EXPECT_TUPLE, ct.CTA_EXPECT_MASTER, ct.CTA_EXPECT_MASK))
        except KeyError:
            raise codec.CodecError("expectation lacks its tuple, mask or master") from None
        proto, src, dst = _tuple_addresses(tup)
        _p, mask_src, _d = _tuple_addresses(mask)
        if mask_src != b"\xff" * len(src):
            src = b""
        if not self.accepts_facts(entry.family, (proto, src, dst, None)):
            return False
        proto, src, dst = _tuple_addresses(master)
        return self.accepts_facts(entry.family, (proto, src, dst, None))

    def accepts_facts(self, family: int, facts: tuple[int, bytes, bytes, int | None]) -> bool:
        """accepts() for the facts flow_facts() gives (ctbridge.sync.intake reads them itself)."""
        proto, src, reply_src, state = facts
        if self.protocols and proto not in self.protocols:
            return False
        if self.tcp_states and proto == ct.IPPROTO_TCP and state is not None and state not in self.tcp_states:
            return False
        if src in self._ignore_hosts or reply_src in self._ignore_hosts:
            return False
        prefixes = self._ignore_prefixes.get(family)
        if prefixes and (src.startswith(prefixes) or reply_src.startswith(prefixes)):
            return False
        nets = self._ignore_nets.get(family, ())
        if nets or self._accept:
            a = int.from_bytes(src, "big")
            b = int.from_bytes(reply_src, "big")
            for net, mask in nets:
                if a & mask == net or b & mask == net:
                    return False
            if self._accept:
                return any(fam == family and (a & mask == net or b & mask == net) for fam, net, mask in self._accept)
        return True


def _tuple_addresses(tuple_payload: bytes) -> tuple[int, bytes, bytes]:
    """(protocol number, source, destination) of a tuple's payload; CodecError if it does not parse."""
    fields = codec.attr_map(tuple_payload)
    addrs = codec.attr_map(fields.get(ct.CTA_TUPLE_IP, b""))
    proto = (codec.attr_map(fields.get(ct.CTA_TUPLE_PROTO, b"")).get(ct.CTA_PROTO_NUM) or b"\x00")[0]
    src = addrs.get(ct.CTA_IP_V4_SRC) or addrs.get(ct.CTA_IP_V6_SRC) or b""
    dst = addrs.get(ct.CTA_IP_V4_DST) or addrs.get(ct.CTA_IP_V6_DST) or b""
    return proto, src, dst


def _source(tuple_payload: bytes) -> bytes:
    ip = codec.attr_map(tuple_payload).get(ct.CTA_TUPLE_IP, b"")
    addrs = codec.attr_map(ip)
    return addrs.get(ct.CTA_IP_V4_SRC) or addrs.get(ct.CTA_IP_V6_SRC) or b""


def flow_facts(entry: codec.Entry) -> tuple[int, bytes, bytes, int | None]:
    """(protocol number, original source, reply source, TCP state or None) of an entry."""
    attrs = codec.attr_map(entry.attrs)
    orig = attrs.get(ct.CTA_TUPLE_ORIG, b"")
    proto_attrs = codec.attr_map(codec.attr_map(orig).get(ct.CTA_TUPLE_PROTO, b""))
    proto = (proto_attrs.get(ct.CTA_PROTO_NUM) or b"\x00")[0]  # an empty attribute reads as 0, no IndexError
    state = None
    if proto == ct.IPPROTO_TCP and ct.CTA_PROTOINFO in attrs:
        tcp = codec.attr_map(codec.attr_map(attrs[ct.CTA_PROTOINFO]).get(ct.CTA_PROTOINFO_TCP, b""))
        if tcp.get(ct.CTA_PROTOINFO_TCP_STATE):
            state = tcp[ct.CTA_PROTOINFO_TCP_STATE][0]
    return proto, _source(orig), _source(attrs.get(ct.CTA_TUPLE_REPLY, b"")), state


_NLA = struct.Struct("=HH")
# The kernel's tuple layout (ctnetlink_dump_tuples): CTA_TUPLE_IP { SRC, DST }, CTA_TUPLE_PROTO
# { CTA_PROTO_NUM, ... }. Header words in host byte order, as the kernel writes them.
_V4_IP = _NLA.pack(20, ct.CTA_TUPLE_IP | ct.NLA_F_NESTED) + _NLA.pack(8, ct.CTA_IP_V4_SRC)
_V6_IP = _NLA.pack(44, ct.CTA_TUPLE_IP | ct.NLA_F_NESTED) + _NLA.pack(20, ct.CTA_IP_V6_SRC)
_NUM = _NLA.pack(5, ct.CTA_PROTO_NUM)


def _fast_facts(key: bytes, attrs: bytes, base: int) -> tuple[int, bytes, bytes, int | None] | None:
    """flow_facts for the kernel's layout without parsing, or None for anything else; the
    attributes are attrs[base:]."""
    head = key[3:11]
    if head == _V4_IP:
        alen, num_at = 4, 24
    elif head == _V6_IP:
        alen, num_at = 16, 48
    else:
        return None
    r = base + len(key) + 1  # the reply tuple's attribute follows CTA_TUPLE_ORIG (4 + the tuple)
    if key[3 + num_at:3 + num_at + 4] != _NUM or attrs[r + 4:r + 12] != head:
        return None
    return key[3 + num_at + 4], key[11:11 + alen], attrs[r + 12:r + 12 + alen], None

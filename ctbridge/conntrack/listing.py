"""Listings of conntrack entries as text lines (`conntrack -L -o extended`'s layout) or JSON objects,
fast enough to list a large table at least as quickly as `conntrack -L` does.

The readable form of an entry is defined once, by ``ctbridge.conntrack.view.entry_view`` and ``format_line``
below; this module produces exactly the same bytes faster. Entries come in a handful of attribute
layouts (IPv4 TCP, IPv6 UDP, with a zone, with counters, ...) that differ only in their values.
For each layout seen, one walk of a sample entry finds where every shown value lies, and a
formatter specialised to that layout is generated: one struct call checks every attribute header
(the layout is the same), one reads every value, one f-string makes the line. The generated
formatter is checked against the general path on its sample before it is used; anything it does
not cover (helpers, labels, master tuples, GRE keys, SCTP/DCCP state, directional zones, duplicate
attributes) goes through the general path, entry by entry.
"""

from __future__ import annotations

import ipaddress
import json
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack.codec import CodecError, Entry, entry_from_attrs, iter_attrs, make_key, split_key, walk_dump
from ctbridge.conntrack.view import entry_view

# --- the general path ------------------------------------------------------------------------------

_TUPLE_WORDS = ("src", "dst", "sport", "dport", "type", "code", "id", "srckey", "dstkey")
_FAMILY_NUMBERS = {"ipv4": ct.AF_INET, "ipv6": ct.AF_INET6}


def format_line(v: dict[str, Any]) -> str:
    """One entry view the way `conntrack -L -o extended` prints it, so the two can be read side by side."""
    def side(prefix: str) -> list[str]:
        words = []
        for k in _TUPLE_WORDS:
            if prefix + k in v:
                value = v[prefix + k]
                words.append(f"{k}={value:#x}" if k in ("srckey", "dstkey") else f"{k}={value}")
        return words
    words = [f"{v['family']:<8} {_FAMILY_NUMBERS.get(v['family'], 0)} {v['proto'] or '?':<8} {v['protonum']}",
             str(v.get("timeout", 0))]
    state = v.get("tcp_state") or v.get("sctp_state") or v.get("dccp_state")
    if state:
        words.append(state)
    words += side("")
    if "SEEN_REPLY" not in v["status"]:
        words.append("[UNREPLIED]")
    words += side("reply_")
    for flag in ("ASSURED", "OFFLOAD", "HW_OFFLOAD"):
        if flag in v["status"]:
            words.append(f"[{flag}]")
    words.append(f"mark={v['mark']}")
    if v.get("secmark"):
        words.append(f"secmark={v['secmark']}")
    if v["zone"]:
        words.append(f"zone={v['zone']}")
    if "zone_orig" in v:
        words.append(f"zone-orig={v['zone_orig']}")
    if "zone_reply" in v:
        words.append(f"zone-reply={v['zone_reply']}")
    if "helper" in v:
        words.append(f"helper={v['helper']}")
    if "use" in v:  # the kernel's reference count; caches do not carry it
        words.append(f"use={v['use']}")
    return " ".join(words)


def _json(view: dict[str, Any]) -> str:
    return json.dumps(view, separators=(",", ":"))


# --- value tables the generated formatters index (each entry computed once, on first use) ----------

class _Table(dict[Any, str]):
    """A dict that computes a missing value with ``make`` and keeps it: a C-speed lookup after."""

    def __init__(self, make: Callable[[Any], str]) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, key: Any) -> str:
        value = self[key] = self.make(key)
        return value


def _status_words(status: int) -> list[str]:
    return [name for bit, name in enumerate(ct.STATUS_BITS) if status & (1 << bit)]


def _flags_text(status: int) -> str:
    return "".join(f" [{flag}]" for flag in ("ASSURED", "OFFLOAD", "HW_OFFLOAD") if flag in _status_words(status))


def _tables() -> dict[str, _Table]:
    return {
        "IP4": _Table(lambda b: str(ipaddress.IPv4Address(b))),
        "IP6": _Table(lambda b: str(ipaddress.IPv6Address(b))),
        "TCPSTATE": _Table(lambda s: ct.TCP_STATES[s] if s < len(ct.TCP_STATES) else str(s)),
        "UNREPLIED": _Table(lambda s: "" if s & ct.IPS_SEEN_REPLY else " [UNREPLIED]"),
        "FLAGS": _Table(_flags_text),
        "STATUS": _Table(lambda s: json.dumps(_status_words(s), separators=(",", ":"))),
        "ZONE": _Table(lambda z: f" zone={z}" if z else ""),
    }


# --- layouts ---------------------------------------------------------------------------------------

_VALUE_FORMATS = {1: "B", 2: "H", 4: "I", 8: "Q"}
# what the view shows of a tuple's protocol part, in the order it shows them (view.tuple_view)
_PROTO_FIELDS = ((ct.CTA_PROTO_SRC_PORT, "sport"), (ct.CTA_PROTO_DST_PORT, "dport"),
                 (ct.CTA_PROTO_ICMP_TYPE, "type"), (ct.CTA_PROTO_ICMP_CODE, "code"), (ct.CTA_PROTO_ICMP_ID, "id"),
                 (ct.CTA_PROTO_ICMPV6_TYPE, "type"), (ct.CTA_PROTO_ICMPV6_CODE, "code"),
                 (ct.CTA_PROTO_ICMPV6_ID, "id"))
_PROTO_SIZES = {ct.CTA_PROTO_NUM: 1, ct.CTA_PROTO_SRC_PORT: 2, ct.CTA_PROTO_DST_PORT: 2, ct.CTA_PROTO_ICMP_ID: 2,
                ct.CTA_PROTO_ICMP_TYPE: 1, ct.CTA_PROTO_ICMP_CODE: 1, ct.CTA_PROTO_ICMPV6_ID: 2,
                ct.CTA_PROTO_ICMPV6_TYPE: 1, ct.CTA_PROTO_ICMPV6_CODE: 1}
_ADDRS = {ct.CTA_IP_V4_SRC: ("src", 4, "IP4"), ct.CTA_IP_V4_DST: ("dst", 4, "IP4"),
          ct.CTA_IP_V6_SRC: ("src", 16, "IP6"), ct.CTA_IP_V6_DST: ("dst", 16, "IP6")}
# top-level attributes the view shows, which a generated formatter does not cover
_GENERAL_ONLY = frozenset({ct.CTA_HELP, ct.CTA_LABELS, ct.CTA_TUPLE_MASTER, ct.CTA_SECMARK})
_TCP_SHOWN = {ct.CTA_PROTOINFO_TCP_STATE: "tcp_state", ct.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL: "tcp_flags_original",
              ct.CTA_PROTOINFO_TCP_FLAGS_REPLY: "tcp_flags_reply"}
_SCALARS = {ct.CTA_STATUS: "status", ct.CTA_TIMEOUT: "timeout", ct.CTA_MARK: "mark", ct.CTA_USE: "use",
            ct.CTA_ID: "ct_id", ct.CTA_ZONE: "zone_attr"}


# top-level attributes the view shows
_SHOWN = frozenset({ct.CTA_TUPLE_ORIG, ct.CTA_TUPLE_REPLY, ct.CTA_PROTOINFO, ct.CTA_COUNTERS_ORIG,
                    ct.CTA_COUNTERS_REPLY, *_SCALARS, *_GENERAL_ONLY})
_COUNTERS = (ct.CTA_COUNTERS_PACKETS, ct.CTA_COUNTERS_BYTES)


class _Unsupported(Exception):
    """The sample's layout is one for the general path."""


class _Learner:
    """One walk over a sample entry: the header words to check, the values to read, and the
    pieces of the text and JSON forms, in the order the view shows them."""

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.heads: list[tuple[int, int]] = []  # (offset, length) of what must match: headers, protocols
        self.values: list[tuple[int, str, str]] = []  # (offset, struct code, variable) of each value read
        self.names: dict[str, str] = {}  # what -> the variable that holds it
        self.order: list[tuple[str, str]] = []  # (prefix, field) of tuple fields, in JSON order
        self.tuple_fields: dict[str, str] = {}  # "src", "reply_sport", ... -> text expression

    def value(self, off: int, size: int, what: str) -> str:
        code = f"{size}s" if size in (4, 16) and what.endswith(("src", "dst")) else _VALUE_FORMATS.get(size)
        if code is None:
            raise _Unsupported(what)
        name = f"v{len(self.values)}"
        self.values.append((off, code, name))
        self.names[what] = name
        return name

    def attrs(self, start: int, end: int, shown: Iterable[int] = ()) -> list[tuple[int, int, int]]:
        """The attributes in buf[start:end], their headers added to the check. One the view shows
        (``shown``) may not appear twice: the view keeps the last, a formatter keeps it simple."""
        found = iter_attrs(self.buf, start, end)
        types = [t for t, _s, _e in found if t in shown]
        if len(set(types)) != len(types):
            raise _Unsupported("an attribute appears twice")
        for _t, s, _e in found:
            self.heads.append((s - 4, 4))
        return found

    def tuple_(self, start: int, end: int, prefix: str) -> None:
        for t, s, e in self.attrs(start, end, (ct.CTA_TUPLE_IP, ct.CTA_TUPLE_PROTO, ct.CTA_TUPLE_ZONE)):
            if t == ct.CTA_TUPLE_IP:
                for a, s2, e2 in self.attrs(s, e, _ADDRS):
                    if a in _ADDRS:
                        field, size, table = _ADDRS[a]
                        if e2 - s2 != size:
                            raise _Unsupported("address length")
                        var = self.value(s2, size, prefix + field)
                        self.order.append((prefix, field))
                        self.tuple_fields[prefix + field] = f"{table}[{var}]"
            elif t == ct.CTA_TUPLE_PROTO:
                found = {a: (s2, e2) for a, s2, e2 in self.attrs(s, e, _PROTO_SIZES)}
                if ct.CTA_PROTO_NUM not in found:
                    raise _Unsupported("no protocol number")
                s2, e2 = found[ct.CTA_PROTO_NUM]
                if e2 - s2 != 1:
                    raise _Unsupported("protocol number length")
                num = self.buf[s2]
                if num == ct.IPPROTO_GRE:
                    raise _Unsupported("GRE keys")
                # the protocol number is part of the layout: checked with the headers
                self.heads.append((s2, 1))
                if not prefix:
                    self.protonum = num
                seen: set[str] = set()
                for a, field in _PROTO_FIELDS:
                    if a in found:
                        s2, e2 = found[a]
                        if e2 - s2 != _PROTO_SIZES[a] or field in seen:
                            raise _Unsupported("protocol field")
                        seen.add(field)
                        var = self.value(s2, e2 - s2, prefix + field)
                        self.order.append((prefix, field))
                        self.tuple_fields[prefix + field] = var
            elif t == ct.CTA_TUPLE_ZONE:
                raise _Unsupported("directional zone")

    def protoinfo(self, start: int, end: int) -> None:
        for p, s, e in self.attrs(start, end, (ct.CTA_PROTOINFO_TCP, ct.CTA_PROTOINFO_SCTP, ct.CTA_PROTOINFO_DCCP)):
            if p in (ct.CTA_PROTOINFO_SCTP, ct.CTA_PROTOINFO_DCCP):
                raise _Unsupported("SCTP/DCCP state")
            if p != ct.CTA_PROTOINFO_TCP:
                continue
            for q, s2, e2 in self.attrs(s, e, _TCP_SHOWN):
                what = _TCP_SHOWN.get(q)
                if what is None or e2 == s2:  # the view shows only attributes with a payload
                    continue
                if what == "tcp_state" and e2 - s2 != 1:
                    raise _Unsupported("TCP state length")
                # the state's byte, or the flags byte of struct nf_ct_tcp_flags {flags, mask}
                self.tcp.append((what, self.value(s2, 1, what)))

    def entry(self) -> None:
        self.protonum = -1
        self.tcp: list[tuple[str, str]] = []
        self.counters: list[tuple[str, str]] = []
        for t, s, e in self.attrs(0, len(self.buf), _SHOWN):
            if t in _GENERAL_ONLY:
                raise _Unsupported(f"attribute {t}")
            if t == ct.CTA_TUPLE_ORIG:
                self.tuple_(s, e, "")
            elif t == ct.CTA_TUPLE_REPLY:
                self.tuple_(s, e, "reply_")
            elif t in _SCALARS:
                self.value(s, e - s, _SCALARS[t])
            elif t == ct.CTA_PROTOINFO:
                self.protoinfo(s, e)
            elif t in (ct.CTA_COUNTERS_ORIG, ct.CTA_COUNTERS_REPLY):
                direction = "orig" if t == ct.CTA_COUNTERS_ORIG else "reply"
                inner = {a: (s2, e2) for a, s2, e2 in self.attrs(s, e, _COUNTERS)}
                for a, what in ((ct.CTA_COUNTERS_PACKETS, "packets"), (ct.CTA_COUNTERS_BYTES, "bytes")):
                    if a in inner:
                        s2, e2 = inner[a]
                        self.counters.append((f"{direction}_{what}", self.value(s2, e2 - s2, f"{direction}_{what}")))
            # every other attribute is not shown: its header is checked, its content skipped
        if self.protonum < 0:
            raise _Unsupported("no original tuple")
        # the view orders TCP info as state, flags original, flags reply
        rank = {"tcp_state": 0, "tcp_flags_original": 1, "tcp_flags_reply": 2}
        self.tcp.sort(key=lambda item: rank[item[0]])


def _struct(fields: Iterable[tuple[int, str]], byteorder: str) -> struct.Struct:
    """One struct that reads the fields at their offsets (in offset order), skipping what lies between."""
    fmt = [byteorder]
    pos = 0
    for off, code in sorted(fields):
        if off < pos:
            raise _Unsupported("overlapping fields")
        fmt.append(f"{off - pos}x{code}" if off > pos else code)
        pos = off + struct.calcsize(byteorder + code)
    return struct.Struct("".join(fmt))


Formatter = Callable[..., "str | None"]  # (buf, off, zone=-1)


def _formatter(family: int, sample: bytes, tables: dict[str, _Table], form: str) -> Formatter:
    """The generated formatter (``form``: text or json) of the sample's attribute layout:
    ``fn(buf, off, zone)`` gives the entry whose attributes start at ``buf[off]`` (zone -1: take
    CTA_ZONE's), or None when the entry is not of this layout after all."""
    lr = _Learner(sample)
    lr.entry()
    # The layout check: every header word (and protocol number) equal to the sample's. All of
    # them at once: the attributes as one integer, masked to those bytes, compared with the
    # sample's (a third faster than unpacking and comparing them one by one).
    mask = 0
    for off, length in lr.heads:
        mask |= ((1 << (8 * length)) - 1) << (8 * off)
    expect = int.from_bytes(sample, "little") & mask
    end = len(sample)
    values = _struct(((off, code) for off, code, _name in lr.values), ">")
    variables = [name for _off, _code, name in sorted(lr.values)]  # the struct's order
    n = lr.names
    fam = ct.FAMILY_NAMES.get(family, str(family))
    proto = ct.PROTO_NAMES.get(lr.protonum, str(lr.protonum))
    status = n.get("status", "0")
    zone = f"({n['zone_attr']} if zone < 0 else zone)" if "zone_attr" in n else "(0 if zone < 0 else zone)"

    # text: format_line's words, each optional one with its leading space
    def side(prefix: str) -> str:
        fields = lr.tuple_fields
        return "".join(f" {k}={{{fields[prefix + k]}}}" for k in _TUPLE_WORDS if prefix + k in fields)
    text = f"{fam:<8} {_FAMILY_NUMBERS.get(fam, 0)} {proto:<8} {lr.protonum} {{{n.get('timeout', '0')}}}"
    if "tcp_state" in n:
        text += f" {{TCPSTATE[{n['tcp_state']}]}}"
    text += side("") + f"{{UNREPLIED[{status}]}}" + side("reply_") + f"{{FLAGS[{status}]}}"
    text += f" mark={{{n.get('mark', '0')}}}{{ZONE[{zone}]}}"
    if "use" in n:
        text += f" use={{{n['use']}}}"

    # JSON: entry_view's keys in entry_view's order
    def jfield(prefix: str, field: str) -> str:
        expr = lr.tuple_fields[prefix + field]
        return f',"{prefix}{field}":' + ('"{' + expr + '}"' if expr.startswith("IP") else "{" + expr + "}")
    js = f'{{{{"family":"{fam}","proto":"{proto}","protonum":{lr.protonum}'
    js += "".join(jfield(p, f) for p, f in lr.order if not p) + "".join(jfield(p, f) for p, f in lr.order if p)
    js += f',"status":{{STATUS[{status}]}}'
    if "timeout" in n:
        js += f',"timeout":{{{n["timeout"]}}}'
    js += f',"mark":{{{n.get("mark", "0")}}},"zone":{{{zone}}}'
    for what, var in lr.tcp:
        js += f',"{what}":' + (f'"{{TCPSTATE[{var}]}}"' if what == "tcp_state" else f"{{{var}}}")
    for what, var in lr.counters:
        js += f',"{what}":{{{var}}}'
    for what in ("use", "ct_id"):
        if what in n:
            js += f',"{what}":{{{n[what]}}}'
    js += "}}"

    unpack = " ".join(f"{v}," for v in variables)
    # the tables and structs are bound as default arguments: locals, the fastest names to read
    names = ("FROM", "MASK", "EXPECT", "VALUES", *tables)
    bound = ", ".join(f"{name}={name}" for name in names)
    source = "\n".join((
        f"def fmt(buf, off, zone=-1, {bound}):",
        f"    if FROM(buf[off:off + {end}], 'little') & MASK != EXPECT: return None",
        f"    {unpack} = VALUES(buf, off)" if variables else "    pass",
        f"    return f{text if form == 'text' else js!r}",
    ))
    namespace: dict[str, Any] = {"FROM": int.from_bytes, "MASK": mask, "EXPECT": expect,
                                 "VALUES": values.unpack_from, **tables}
    exec(compile(source, f"<ctbridge.conntrack.listing {form} layout {fam} {proto}>", "exec"), namespace)
    fmt: Formatter = namespace["fmt"]
    return fmt


# --- the listing -----------------------------------------------------------------------------------

_Shape = tuple[int, tuple[int, ...], int, tuple[bytes, ...]]


def _shape(family: int, sample: bytes) -> _Shape:
    """What a refused sample is remembered by: its family, top-level attribute types and length,
    and the protocol numbers of its tuples. The protocol number is part of a layout (a formatter
    checks it with the headers): the kernel dumps a GRE flow (refused: its keys) in exactly the
    attributes and length of a UDP, UDP-Lite, SCTP or DCCP flow of the family, and without the
    number one GRE flow listed first sent every such flow after it to the general path."""
    found = iter_attrs(sample)
    numbers: list[bytes] = []
    try:
        for t, s, e in found:
            if t == ct.CTA_TUPLE_ORIG or t == ct.CTA_TUPLE_REPLY:
                for a, s2, e2 in iter_attrs(sample, s, e):
                    if a == ct.CTA_TUPLE_PROTO:
                        numbers += (sample[s3:e3] for b, s3, e3 in iter_attrs(sample, s2, e2)
                                    if b == ct.CTA_PROTO_NUM)
    except CodecError:  # a tuple no formatter can read: refused by its top level alone
        numbers = []
    return family, tuple(t for t, _s, _e in found), len(sample), tuple(numbers)


class Listing:
    """Formats entries as text lines or JSON objects, learning layouts as they come.

    ``form`` is "text" or "json". One Listing per listing: its tables of addresses and names grow
    with what it has shown.
    """

    LAYOUTS_MAX = 256  # distinct layouts kept; a table has a handful

    def __init__(self, form: str) -> None:
        if form not in ("text", "json"):
            raise ValueError(f"a listing is text or json, not {form!r}")
        self.form = form
        self.tables = _tables()
        self.layouts: dict[tuple[int, int], list[Formatter]] = {}  # (family, attributes' length) -> formatters
        self.unsupported: set[_Shape] = set()  # shapes (_shape) the general path lists
        self.fast: dict[tuple[int, int], Formatter] = {}

    def _general(self, entry: Entry) -> str:
        view = entry_view(entry)
        return format_line(view) if self.form == "text" else _json(view)

    def one(self, family: int, buf: bytes, start: int, end: int, zone: int = -1, entry: Entry | None = None) -> str:
        """The entry whose attributes are ``buf[start:end]`` in ``zone`` (-1: its CTA_ZONE's);
        ``entry`` (else one made from the bytes) for the general path."""
        for fmt in self.layouts.get((family, end - start), ()):
            out = fmt(buf, start, zone)
            if out is not None:
                return out
        # The general path first: it raises on a malformed entry, and then no formatter is made.
        general = self._general(entry or _entry(family, buf, start, end, zone))
        self._learn_checked(family, buf, start, end, zone, general)
        return general

    def _learn_checked(self, family: int, buf: bytes, start: int, end: int, zone: int, general: str) -> None:
        sample = buf[start:end]
        shape = _shape(family, sample)
        if shape in self.unsupported:
            return
        fmt: Formatter | None = None
        try:
            fmt = _formatter(family, sample, self.tables, self.form)
            out = fmt(buf, start, zone)
        except Exception:  # any failure to generate one means: the general path for this shape
            fmt, out = None, None
        if fmt is None or out != general:
            # the general path's shape, or a formatter that disagrees with the view: remembered,
            # so that it is neither walked nor generated again
            if len(self.unsupported) < self.LAYOUTS_MAX:
                self.unsupported.add(shape)
            return
        if sum(len(v) for v in self.layouts.values()) >= self.LAYOUTS_MAX:
            self.layouts.clear()
            self.fast.clear()
        self.layouts.setdefault((family, len(sample)), []).append(fmt)
        # a kernel message of this layout is the attributes and 20 bytes of headers
        self.fast.setdefault((family, len(sample) + 20), fmt)

    def kernel(self, buf: bytes, seq: int) -> tuple[list[str], bool, int]:
        """One receive buffer of a kernel dump: its entries formatted, whether the dump ended, and
        the errno it ended with (0: none). The zone of a dumped entry is its CTA_ZONE's."""
        made, done, errno, _interrupted = walk_dump(buf, seq, self.one, self.fast)
        return made, done, errno

    def entries(self, entries: Iterable[Entry]) -> Iterator[str]:
        """Cache entries: the zone is the flow key's."""
        one = self.one
        for e in entries:
            key = e.key
            yield one(e.family, e.attrs, 0, len(e.attrs), (key[1] << 8) | key[2], e)


def _entry(family: int, buf: bytes, start: int, end: int, zone: int) -> Entry:
    """An Entry of kernel attributes (zone -1: the key takes CTA_ZONE's, as for any dumped entry)."""
    entry = entry_from_attrs(family, buf, start, end)
    if zone >= 0:
        entry = entry._replace(key=make_key(family, zone, split_key(entry.key)[2]))
    return entry

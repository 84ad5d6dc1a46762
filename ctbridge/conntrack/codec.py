"""ctnetlink codec: conntrack netlink messages to entries and back. Pure functions over bytes.
The CT_NEW requests that write an entry into a kernel are ctbridge.conntrack.request's.

An entry keeps the kernel's attributes verbatim (``Entry.attrs``); only the flow key is extracted
when a message is decoded, because the hot paths (dump, events, commit) need nothing else. A full
interpretation is built only on request (``ctbridge.conntrack.view``). Attributes the codec does not know are
carried byte for byte, so a newer kernel's additions survive replication.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable
from enum import IntEnum
from typing import Any, NamedTuple, TypeVar

from ctbridge.conntrack import abi as ct

T = TypeVar("T")
_NLMSG = struct.Struct("=IHHII")  # struct nlmsghdr: len, type, flags, seq, pid (host order)
_NLA = struct.Struct("=HH")  # struct nlattr: len, type (host order)
_NFGEN = struct.Struct("=BBH")  # struct nfgenmsg: family, version, res_id (res_id is big endian)
_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_ERRNO = struct.Struct("=i")
_U32 = struct.Struct("=I")

_TYPE_MASK = ct.NLA_TYPE_MASK
_NESTED = ct.NLA_F_NESTED


class CodecError(ValueError):
    """A netlink message or attribute is truncated or inconsistent."""


class Entry(NamedTuple):
    """One conntrack entry as ctnetlink carries it.

    ``key`` identifies the flow within a conntrack table: the address family, the zone and the
    original-direction tuple as the kernel encodes it (see ``make_key``). ``attrs`` are the
    message's top-level attributes exactly as received.
    """

    key: bytes
    family: int
    attrs: bytes


class Record(NamedTuple):
    """An entry kept inside a larger buffer (a sync message, its attributes from ``start`` on), to
    be written with its CTA_TIMEOUT moved by ``extend`` seconds (never below 1): a commit of
    cached flows gives each what is left of its time without copying it into an Entry first."""

    key: bytes
    family: int
    buf: bytes
    start: int
    extend: float

    @property
    def attrs(self) -> bytes:
        """The attributes as an Entry has them, the timeout moved."""
        attrs = self.buf[self.start:]
        at = timeout_offset(attrs) if self.extend else -1
        if at < 0:
            return attrs
        return attrs[:at] + _BE32.pack(moved(_BE32.unpack_from(attrs, at)[0], self.extend)) + attrs[at + 4:]


def moved(seconds: int, extend: float) -> int:
    """CTA_TIMEOUT moved by ``extend``: at least 1, at most what its u32 holds (a peer's timeout
    near 2^32 plus a margin must not stop a commit)."""
    return max(1, min(int(seconds + extend + 0.999), 0xFFFFFFFF))


class EventKind(IntEnum):
    NEW = 1
    UPDATE = 2
    DESTROY = 3


class Event(NamedTuple):
    """A conntrack event. ``portid`` is the netlink port whose request caused it (0: a packet)."""

    kind: EventKind
    entry: Entry
    portid: int


class Reply(NamedTuple):
    """An NLMSG_ERROR answer to a request: ``errno`` 0 is an acknowledgement."""

    seq: int
    errno: int


class DumpPart(NamedTuple):
    """What one receive buffer of a dump held."""

    entries: list[Entry]
    done: bool
    errno: int  # non-zero if the kernel ended the dump with an error
    interrupted: bool  # NLM_F_DUMP_INTR: the table changed while it was being dumped


def align(n: int) -> int:
    return (n + 3) & ~3


# --- flow keys -------------------------------------------------------------------------------------

_ZONE0 = b"\x00\x00"


def make_key(family: int, zone: int, orig: bytes) -> bytes:
    """Flow key: family (1 byte), zone (2 bytes, big endian), CTA_TUPLE_ORIG payload."""
    return bytes((family, zone >> 8, zone & 0xFF)) + orig


def split_key(key: bytes) -> tuple[int, int, bytes]:
    """Inverse of ``make_key``: (family, zone, original tuple payload)."""
    if len(key) < 3:
        raise CodecError(f"flow key of {len(key)} bytes is too short")
    return key[0], (key[1] << 8) | key[2], key[3:]


# --- attribute walking -----------------------------------------------------------------------------


def iter_attrs(buf: bytes, start: int = 0, end: int | None = None) -> list[tuple[int, int, int]]:
    """The attributes in ``buf[start:end]`` as (type with flags stripped, payload start, payload end).

    Raises CodecError on a truncated or overlong attribute; trailing padding shorter than an
    attribute header is ignored, as the kernel's nla_parse does.
    """
    if end is None:
        end = len(buf)
    out = []
    off = start
    while end - off >= 4:
        alen, atype = _NLA.unpack_from(buf, off)
        if alen < 4 or off + alen > end:
            raise CodecError(f"attribute type {atype & _TYPE_MASK} at offset {off} has bad length {alen}")
        out.append((atype & _TYPE_MASK, off + 4, off + alen))
        off += (alen + 3) & ~3
    return out


def attr_map(buf: bytes, start: int = 0, end: int | None = None) -> dict[int, bytes]:
    """The attributes in ``buf[start:end]`` as {type: payload}; the last of duplicates wins."""
    return {t: buf[s:e] for t, s, e in iter_attrs(buf, start, end)}


def attr(atype: int, payload: bytes, nested: bool = False) -> bytes:
    """Encode one attribute, padded to 4 bytes."""
    n = 4 + len(payload)
    head = _NLA.pack(n, atype | (_NESTED if nested else 0))
    return head + payload + b"\x00" * (align(n) - n)


# --- decoding --------------------------------------------------------------------------------------


def key_from_attrs(family: int, buf: bytes, start: int = 0, end: int | None = None) -> bytes:
    """The flow key of the ctnetlink attributes in ``buf[start:end]`` (see make_key).

    The kernel emits CTA_TUPLE_ORIG, CTA_TUPLE_REPLY and (for a non-default zone) CTA_ZONE first
    (net/netfilter/nf_conntrack_netlink.c, ctnetlink_fill_info), so the key is found by looking at
    three attributes; any other order falls back to a full walk.
    """
    if end is None:
        end = len(buf)
    if end - start >= 4:
        alen, atype = _NLA.unpack_from(buf, start)
        if atype & _TYPE_MASK == ct.CTA_TUPLE_ORIG and 4 <= alen <= end - start:
            off = start + ((alen + 3) & ~3)
            if end - off >= 4:
                rlen, rtype = _NLA.unpack_from(buf, off)
                if rtype & _TYPE_MASK == ct.CTA_TUPLE_REPLY and 4 <= rlen <= end - off:
                    off += (rlen + 3) & ~3
                    zone = _ZONE0
                    if end - off >= 4:
                        zlen, ztype = _NLA.unpack_from(buf, off)
                        if ztype & _TYPE_MASK == ct.CTA_ZONE:
                            if zlen != 6 or off + zlen > end:
                                raise CodecError(f"CTA_ZONE has bad length {zlen}")
                            zone = buf[off + 4:off + 6]
                    return _FAMILY_BYTE[family & 0xFF] + zone + buf[start + 4:start + alen]
    return _key_slow(family, buf, start, end)


_FAMILY_BYTE = [bytes((i,)) for i in range(256)]


def entry_from_attrs(family: int, buf: bytes, start: int = 0, end: int | None = None) -> Entry:
    """An Entry of the ctnetlink attributes in ``buf[start:end]``."""
    if end is None:
        end = len(buf)
    return Entry(key_from_attrs(family, buf, start, end), family, buf[start:end])


def _key_slow(family: int, buf: bytes, start: int, end: int) -> bytes:
    orig = None
    zone = _ZONE0
    for t, s, e in iter_attrs(buf, start, end):
        if t == ct.CTA_TUPLE_ORIG:
            orig = buf[s:e]
        elif t == ct.CTA_ZONE:
            if e - s != 2:
                raise CodecError(f"CTA_ZONE has bad length {e - s + 4}")
            zone = buf[s:e]
    if orig is None:
        raise CodecError("conntrack message has no CTA_TUPLE_ORIG")
    return bytes((family & 0xFF,)) + zone + orig


def _header(buf: bytes, off: int, n: int) -> tuple[int, int, int, int, int]:
    if n - off < 16:
        raise CodecError(f"netlink header truncated at offset {off}")
    mlen, mtype, mflags, mseq, mpid = _NLMSG.unpack_from(buf, off)
    if mlen < 16 or off + mlen > n:
        raise CodecError(f"netlink message at offset {off} has bad length {mlen}")
    return mlen, mtype, mflags, mseq, mpid


def _error(buf: bytes, off: int, mlen: int) -> int:
    if mlen < 20:
        raise CodecError("NLMSG_ERROR message truncated")
    code: int = _ERRNO.unpack_from(buf, off + 16)[0]
    return -code


def decode_dump(buf: bytes, seq: int | None = None) -> DumpPart:
    """Decode one receive buffer of a conntrack dump (CT_NEW messages, then NLMSG_DONE).

    With ``seq``, messages answering another request (a late reply to an abandoned one) are
    skipped instead of being taken for part of this dump, or for its end.
    """
    entries, done, errno, interrupted = walk_dump(buf, seq, entry_from_attrs)
    return DumpPart(entries, done, errno, interrupted)


def walk_dump(buf: bytes, seq: int | None, make: Callable[[int, bytes, int, int], T],
              fast: dict[tuple[int, int], Callable[[bytes, int], T | None]] | None = None,
              kind: int = ct.MSG_CT_NEW) -> tuple[list[T], bool, int, bool]:
    """decode_dump's walk, with ``make(family, buf, start, end)`` called on each entry's attributes
    (a listing formats them straight from the buffer): (made, done, errno, interrupted). ``kind``:
    the message type a dump's entries come as (ct.MSG_EXP_NEW for a dump of expectations).

    ``fast`` maps (family, message length) to a function tried first, ``f(buf, start)``, which
    may answer None to pass the entry to ``make``: a listing's formatters, one call per entry."""
    if fast is None:
        fast = {}
    get = fast.get
    made: list[T] = []
    append = made.append
    n = len(buf)
    off = 0
    done = False
    errno = 0
    interrupted = False
    unpack = _NLMSG.unpack_from
    while off < n:
        if n - off < 16:
            raise CodecError(f"netlink header truncated at offset {off}")
        mlen, mtype, mflags, mseq, _pid = unpack(buf, off)
        if mlen < 16 or off + mlen > n:
            raise CodecError(f"netlink message at offset {off} has bad length {mlen}")
        if seq is not None and mseq != seq:
            pass
        elif mtype == kind:
            if mlen < 20:
                raise CodecError("conntrack message shorter than its nfgenmsg header")
            f = get((buf[off + 16], mlen)) if fast else None
            item = f(buf, off + 20) if f is not None else None
            append(make(buf[off + 16], buf, off + 20, off + mlen) if item is None else item)
            if mflags & ct.NLM_F_DUMP_INTR:
                interrupted = True
        elif mtype == ct.NLMSG_DONE:
            done = True
            if mflags & ct.NLM_F_DUMP_INTR:
                interrupted = True
        elif mtype == ct.NLMSG_ERROR:
            errno = _error(buf, off, mlen)
            done = True
        off += (mlen + 3) & ~3
    return made, done, errno, interrupted


def dump_finished(buf: bytes, seq: int) -> bool:
    """Whether a receive buffer ends the dump ``seq`` (NLMSG_DONE or an error), reading headers only."""
    n = len(buf)
    off = 0
    while n - off >= 16:
        mlen, mtype, _flags, mseq = _NLMSG_LEN_TYPE.unpack_from(buf, off)
        if (mtype == ct.NLMSG_DONE or mtype == ct.NLMSG_ERROR) and mseq == seq:
            return True
        if mlen < 16:
            return True  # malformed: let the decoder report it
        off += (mlen + 3) & ~3
    return False


_NLMSG_LEN_TYPE = struct.Struct("=IHHI")
_NEW_FLAGS = ct.NLM_F_CREATE | ct.NLM_F_EXCL


def decode_events(buf: bytes, skip_portid: int = -1) -> list[Event]:
    """Decode one receive buffer of the conntrack event groups.

    NEW and UPDATE both arrive as IPCTNL_MSG_CT_NEW; the kernel marks a new entry with
    NLM_F_CREATE|NLM_F_EXCL in the header (ctnetlink_conntrack_event). Events whose port id is
    ``skip_portid`` (the echo of the reader's own writes) are left out before they are decoded.
    """
    events: list[Event] = []
    n = len(buf)
    off = 0
    while off < n:
        mlen, mtype, mflags, _seq, mpid = _header(buf, off, n)
        if mpid == skip_portid:
            pass  # caused by the reader's own writes: not even decoded
        elif mtype == ct.MSG_CT_NEW or mtype == ct.MSG_CT_DELETE:
            if mlen < 20:
                raise CodecError("conntrack message shorter than its nfgenmsg header")
            entry = entry_from_attrs(buf[off + 16], buf, off + 20, off + mlen)
            if mtype == ct.MSG_CT_DELETE:
                kind = EventKind.DESTROY
            elif mflags & _NEW_FLAGS == _NEW_FLAGS:
                kind = EventKind.NEW
            else:
                kind = EventKind.UPDATE
            events.append(Event(kind, entry, mpid))
        off += (mlen + 3) & ~3
    return events


def decode_replies(buf: bytes) -> list[Reply]:
    """The NLMSG_ERROR answers (errors and acknowledgements) in a receive buffer."""
    out = []
    n = len(buf)
    off = 0
    while off < n:
        mlen, mtype, _flags, mseq, _pid = _header(buf, off, n)
        if mtype == ct.NLMSG_ERROR:
            out.append(Reply(mseq, _error(buf, off, mlen)))
        off += (mlen + 3) & ~3
    return out


class Stats(NamedTuple):
    """An IPCTNL_MSG_CT_GET_STATS answer; ``errno`` non-zero if the request failed."""

    errno: int
    entries: int
    max_entries: int


def decode_stats(buf: bytes, seq: int) -> Stats | None:
    """The answer to statistics request ``seq`` in a receive buffer, or None if it is not there."""
    n = len(buf)
    off = 0
    while off < n:
        mlen, mtype, _flags, mseq, _pid = _header(buf, off, n)
        if mseq != seq:
            pass
        elif mtype == ct.NLMSG_ERROR:
            err = _error(buf, off, mlen)
            if err:
                return Stats(err, 0, 0)
        elif mtype == ct.MSG_CT_GET_STATS:
            attrs = attr_map(buf, off + 20, off + mlen)
            try:
                count = _BE32.unpack(attrs[ct.CTA_STATS_GLOBAL_ENTRIES])[0]
                limit = _BE32.unpack(attrs[ct.CTA_STATS_GLOBAL_MAX_ENTRIES])[0]
            except (KeyError, struct.error) as exc:
                raise CodecError("conntrack statistics answer lacks the global counters") from exc
            return Stats(0, count, limit)
        off += (mlen + 3) & ~3
    return None


# --- encoding --------------------------------------------------------------------------------------


def message(mtype: int, flags: int, seq: int, family: int, body: bytes = b"") -> bytes:
    """A complete ctnetlink message: nlmsghdr + nfgenmsg + attributes."""
    return _NLMSG.pack(20 + len(body), mtype, flags, seq, 0) + _NFGEN.pack(family, ct.NFNETLINK_V0, 0) + body


def dump_request(seq: int, family: int = 0) -> bytes:
    """Dump the table; family 0 (AF_UNSPEC) dumps IPv4 and IPv6 together."""
    return message(ct.MSG_CT_GET, ct.NLM_F_REQUEST | ct.NLM_F_DUMP, seq, family)


def stats_request(seq: int) -> bytes:
    return message(ct.MSG_CT_GET_STATS, ct.NLM_F_REQUEST, seq, 0)


def flush_request(seq: int, family: int = 0) -> bytes:
    """CT_DELETE without a tuple flushes the table (of one family, or all when family is 0)."""
    return message(ct.MSG_CT_DELETE, ct.NLM_F_REQUEST | ct.NLM_F_ACK, seq, family)


def delete_request(key: bytes, seq: int, flags: int = ct.NLM_F_REQUEST, mtype: int = ct.MSG_CT_DELETE) -> bytes:
    family, zone, orig = split_key(key)
    body = _NLA.pack(4 + len(orig), ct.CTA_TUPLE_ORIG | _NESTED) + orig
    if zone:
        body += attr(ct.CTA_ZONE, _BE16.pack(zone))
    return message(mtype, flags, seq, family, body)


def get_request(key: bytes, seq: int) -> bytes:
    """CT_GET of one entry by a tuple: the kernel's lookup matches it against either direction
    (both are in its hash), so a reply-direction packet's own tuple finds its entry; ENOENT if none."""
    return delete_request(key, seq, mtype=ct.MSG_CT_GET)


# Attributes the kernel will not take in a CT_NEW (they describe this kernel's instance of the
# flow, not the flow): ctnetlink_create_conntrack ignores or rejects them.
NOT_SETTABLE = frozenset({
    ct.CTA_COUNTERS_ORIG, ct.CTA_COUNTERS_REPLY, ct.CTA_USE, ct.CTA_ID, ct.CTA_SECMARK,
    ct.CTA_SECCTX, ct.CTA_TIMESTAMP, ct.CTA_TIMESTAMP_EVENT, ct.CTA_STATUS_MASK, ct.CTA_FILTER,
    ct.CTA_MARK_MASK, ct.CTA_LABELS_MASK, ct.CTA_NAT_SRC, ct.CTA_NAT_DST,
})


_MISSING: Any = object()
LAYOUTS_MAX = 512  # layouts remembered per plan cache (a few per kernel; more means odd input)


def extend_ranges(ranges: list[slice], start: int, stop: int) -> None:
    """Add bytes start..stop to a list of ranges to copy, joining it to the last one if adjacent."""
    if ranges and ranges[-1].stop == start:
        ranges[-1] = slice(ranges[-1].start, stop)
    else:
        ranges.append(slice(start, stop))


def ranges_getter(ranges: list[slice]) -> Callable[[Any], tuple[Any, ...]]:
    """One C call that slices all ranges out of a buffer."""
    getter = operator.itemgetter(*ranges)
    return getter if len(ranges) > 1 else (lambda b: (getter(b),))


# --- replication form ------------------------------------------------------------------------------


class _StripPlan(NamedTuple):
    heads: struct.Struct  # reads every attribute header word
    expect: tuple[int, ...]
    keep: Callable[[bytes], tuple[bytes, ...]] | None  # None: nothing to strip in this layout
    synproxy: int  # offset of a CTA_SYNPROXY attribute, -1 if none
    keep_no_synproxy: Callable[[bytes], tuple[bytes, ...]] | None  # when that one is all zero


# The kernel puts a CTA_SYNPROXY on every entry once the extension exists; all zero, it says "not
# a SYNPROXY flow", which is also what a kernel assumes without it, so it is not worth 28 bytes of
# every replicated flow.
_ZERO_SYNPROXY = attr(ct.CTA_SYNPROXY, attr(1, bytes(4)) + attr(2, bytes(4)) + attr(3, bytes(4)), nested=True)




_STRIP_PLANS: dict[tuple[int, bytes], _StripPlan | None] = {}


def without_zero_synproxy(ranges: list[slice], synproxy: int) -> Callable[[Any], tuple[Any, ...]]:
    """The getter of ``ranges`` less the all-zero CTA_SYNPROXY attribute at offset ``synproxy``."""
    end = synproxy + len(_ZERO_SYNPROXY)
    cut: list[slice] = []
    for r in ranges:
        if r.start <= synproxy < r.stop:
            cut += [x for x in (slice(r.start, synproxy), slice(end, r.stop)) if x.stop > x.start]
        else:
            cut.append(r)
    return ranges_getter(cut) if cut else (lambda b: (b"",))


def _plan_strip(buf: bytes) -> _StripPlan | None:
    fmt = ["="]
    expect = []
    ranges: list[slice] = []
    pos = 0
    dropped = False
    synproxy = -1
    for t, s, e in iter_attrs(buf):
        off = s - 4
        fmt.append(f"{off - pos}xI" if off > pos else "I")
        pos = off + 4
        expect.append(_U32.unpack_from(buf, off)[0])
        nxt = off + align(e - off)
        if t in NOT_SETTABLE:
            dropped = True
            continue
        if t == ct.CTA_SYNPROXY and nxt - off == len(_ZERO_SYNPROXY):
            synproxy = off
        extend_ranges(ranges, off, nxt)
    if not ranges or ranges[-1].stop > len(buf):
        return None
    keep = ranges_getter(ranges) if dropped else None
    keep_no_synproxy = without_zero_synproxy(ranges, synproxy) if synproxy >= 0 else None
    return _StripPlan(struct.Struct("".join(fmt)), tuple(expect), keep, synproxy, keep_no_synproxy)


def strip_local(entry: Entry) -> Entry:
    """The entry without what describes only this kernel's copy of the flow (CTA_ID, CTA_USE,
    counters, timestamps, security context): what replication carries and other kernels accept.

    Runs once per kernel event, so like request.new_request it follows a plan learnt per layout.
    """
    buf = entry.attrs
    pkey = (len(buf), buf[:8])
    plan = _STRIP_PLANS.get(pkey, _MISSING)
    if plan is _MISSING:
        if len(_STRIP_PLANS) >= LAYOUTS_MAX:
            _STRIP_PLANS.clear()
        plan = _STRIP_PLANS[pkey] = _plan_strip(buf)
    if plan is not None and plan.heads.unpack_from(buf) == plan.expect:
        so = plan.synproxy
        if so >= 0 and plan.keep_no_synproxy is not None and buf[so:so + 28] == _ZERO_SYNPROXY:
            return Entry(entry.key, entry.family, b"".join(plan.keep_no_synproxy(buf)))
        if plan.keep is None:
            return entry
        return Entry(entry.key, entry.family, b"".join(plan.keep(buf)))
    kept = [buf[s - 4:s - 4 + align(e - s + 4)] for t, s, e in iter_attrs(buf)
            if t not in NOT_SETTABLE and buf[s - 4:s - 4 + align(e - s + 4)] != _ZERO_SYNPROXY]
    return Entry(entry.key, entry.family, b"".join(kept))


def same_but_timeout(a: bytes, b: bytes, timeout: int = ct.CTA_TIMEOUT) -> bool:
    """Whether two attribute runs describe the same state of a flow: equal but, perhaps, for the
    seconds left in CTA_TIMEOUT (``timeout``: an expectation's CTA_EXPECT_TIMEOUT), which count
    down in every dump."""
    if a == b:
        return True
    n = len(a)
    if n != len(b):
        return False
    # only the headers up to the timeout are read (the kernel puts it fifth): a dump read whole
    # after an overrun compares every flow this way (InternalCache.kernel_resync)
    off = 0
    unpack = _NLA.unpack_from
    while n - off >= 4:
        alen, atype = unpack(a, off)
        if alen < 4 or off + alen > n:
            raise CodecError(f"attribute type {atype & _TYPE_MASK} at offset {off} has bad length {alen}")
        if atype & _TYPE_MASK == timeout:
            end = off + alen
            return a[:off + 4] == b[:off + 4] and a[end:] == b[end:]
        off += (alen + 3) & ~3
    return False


def timeout_offset(buf: bytes, start: int = 0) -> int:
    """Where the seconds of CTA_TIMEOUT lie in the attributes ``buf[start:]`` (a big-endian u32,
    include/uapi/linux/netfilter/nfnetlink_conntrack.h), or -1 when there are none. The kernel
    puts it fourth or fifth (after the tuples, the zone and the status), so this reads a few
    attribute headers, not all of them."""
    off = start
    n = len(buf)
    unpack = _NLA.unpack_from
    while n - off >= 4:
        alen, atype = unpack(buf, off)
        if alen < 4 or off + alen > n:
            return -1
        if atype & _TYPE_MASK == ct.CTA_TIMEOUT:
            return off + 4 if alen == 8 else -1
        off += (alen + 3) & ~3
    return -1


def timeout_of(buf: bytes, start: int = 0) -> int:
    """The seconds left in CTA_TIMEOUT (0 when there are none: such a flow counts as running out).

    Runs for every cached flow in each expiry pass, so the offset is remembered per (length,
    first attribute header) and only checked (the attribute header before it must be
    CTA_TIMEOUT's) instead of walking the attributes again."""
    key = (len(buf), start, buf[start:start + 4])
    at = _TIMEOUT_AT.get(key, -2)
    if at < 0 or buf[at - 4:at] != _TIMEOUT_HEAD:
        at = timeout_offset(buf, start)
        if len(_TIMEOUT_AT) >= LAYOUTS_MAX:
            _TIMEOUT_AT.clear()
        _TIMEOUT_AT[key] = at
    return _BE32.unpack_from(buf, at)[0] if at >= 0 else 0


_TIMEOUT_AT: dict[tuple[int, int, bytes], int] = {}
_TIMEOUT_HEAD = struct.pack("=HH", 8, ct.CTA_TIMEOUT)


"""What of the table is replicated, and when, as ctbridge.toml writes it: the sync delay per
protocol (sync.delay, sync.delay_by_protocol), coalescing (sync.coalesce) and the no-sync
selection (filter.no_sync_marks, no_sync_labels, no_sync_zones, no_sync_ports): parsed from
their strings, checked (problems: one line each, as settings reports them), and turned into
what the engine takes (ctbridge.sync.filter.NoSync, a protocol's delay by number).

Imports ctbridge.conntrack.abi and ctbridge.sync.filter; settings and replication import it.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

from ctbridge.conntrack import abi as ct
from ctbridge.sync.filter import NoSync

PROTOCOLS = {name: num for num, name in ct.PROTO_NAMES.items()}
MAX_DELAY = 3600.0  # a delay longer than an hour protects nothing a failover would lose
MARK_MAX = 0xFFFFFFFF  # the ct mark is 32 bits (CTA_MARK, include/uapi/linux/netfilter/nfnetlink_conntrack.h)
LABEL_BITS = 128  # XT_CONNLABEL_MAXBIT + 1 (include/uapi/linux/netfilter/xt_connlabel.h)
ZONE_MAX = 0xFFFF  # CTA_ZONE is 16 bits
_PORTS = re.compile(r"\s*([0-9]{1,5})\s*(?:-\s*([0-9]{1,5})\s*)?")
_MARK = re.compile(r"\s*(0x[0-9a-fA-F]+|[0-9]+)\s*(?:/\s*(0x[0-9a-fA-F]+|[0-9]+)\s*)?")

Problem = tuple[str, str, str]  # (section, key, the one-line message)
# A cluster description's [replication] table (docs/cluster.md): these keys, checked as
# ctbridge.toml's are, rendered into every node's [sync] or [filter]
REPLICATION_KEYS: dict[str, tuple[str, type, Any]] = {
    "delay": ("sync", float, 0.0), "delay_by_protocol": ("sync", list, []), "coalesce": ("sync", float, 0.0),
    "no_sync_marks": ("filter", list, []), "no_sync_labels": ("filter", list, []),
    "no_sync_zones": ("filter", list, []), "no_sync_ports": ("filter", list, []),
}


def protocol_number(name: str) -> int | None:
    """A protocol by name (ct.PROTO_NAMES) or number, None if it is neither."""
    if name in PROTOCOLS:
        return PROTOCOLS[name]
    return int(name) if name.isascii() and name.isdigit() and int(name) <= 255 else None


def delays(items: tuple[str, ...]) -> dict[int, float]:
    """sync.delay_by_protocol ("PROTOCOL SECONDS" each) by protocol number; an item that is not
    one (problems() says so) is left out."""
    out: dict[int, float] = {}
    for item in items:
        parts = str(item).split()
        proto = protocol_number(parts[0]) if len(parts) == 2 else None
        try:
            seconds = float(parts[1]) if proto is not None else -1.0
        except ValueError:
            continue
        if proto is not None and 0 <= seconds <= MAX_DELAY:
            out[proto] = seconds
    return out


def mark(item: str) -> tuple[int, int] | None:
    """ "VALUE/MASK" or "VALUE" (all 32 bits) as (value, mask); None if it is neither, or the value
    has bits outside the mask (it could never match)."""
    m = _MARK.fullmatch(item)
    if m is None:
        return None
    value = int(m.group(1), 0)
    mask = int(m.group(2), 0) if m.group(2) else MARK_MAX
    if value > MARK_MAX or not 0 < mask <= MARK_MAX or value & ~mask:  # mask 0: every flow, nothing replicated
        return None
    return value, mask


def port_range(item: str) -> tuple[int, int] | None:
    """ "PORT" or "LOW-HIGH" (1-65535) as (low, high), None if it is neither."""
    m = _PORTS.fullmatch(item)
    if m is None:
        return None
    low, high = int(m.group(1)), int(m.group(2) or m.group(1))
    return (low, high) if 1 <= low <= high <= 65535 else None


def no_sync(filt: Any) -> NoSync | None:
    """The [filter] no-sync keys (checked) as the engine's NoSync; None when none is set."""
    marks = tuple(m for m in (mark(str(x)) for x in filt.no_sync_marks) if m is not None)
    ports = tuple(p for p in (port_range(str(x)) for x in filt.no_sync_ports) if p is not None)
    selection = NoSync(marks=marks, labels=frozenset(filt.no_sync_labels), zones=frozenset(filt.no_sync_zones),
                       ports=ports)
    return selection if selection.selects() else None


def problems(sync: Any, filt: Any, defer_queue: int) -> list[Problem]:
    """What is wrong with these keys of [sync] and [filter], each said once."""
    out: list[Problem] = []
    for proto in filt.protocols:
        if proto not in PROTOCOLS and not (isinstance(proto, int) and 0 <= proto <= 255):
            out.append(("filter", "protocols", f"filter.protocols: unknown protocol {proto!r}; use "
                        + ", ".join(sorted(PROTOCOLS)) + " or a number"))
    if not 0 <= sync.delay <= MAX_DELAY:
        out.append(("sync", "delay", f"sync.delay = {sync.delay}: seconds from 0 (off) to {MAX_DELAY:.0f}"))
    for item in sync.delay_by_protocol:
        parts = str(item).split()
        if len(parts) != 2 or protocol_number(parts[0]) not in delays((str(item),)):
            out.append(("sync", "delay_by_protocol", f"sync.delay_by_protocol: {item!r} is not \"PROTOCOL SECONDS\" "
                        f"(a protocol name or number, a space, 0-{MAX_DELAY:.0f} seconds), e.g. \"tcp 30\""))
    if defer_queue and (sync.delay > 0 or any(float(s) > 0 for s in delays(sync.delay_by_protocol).values())):
        out.append(("sync", "delay", "sync.delay with apply.defer_queue: active-active waits for every peer's "
                    "new flows, which a delay keeps back; set one of them to 0"))
    if not 0 <= sync.coalesce <= 1:
        out.append(("sync", "coalesce", f"sync.coalesce = {sync.coalesce}: seconds from 0 (off) to 1"))
    for item in filt.no_sync_marks:
        if mark(str(item)) is None:
            out.append(("filter", "no_sync_marks", f"filter.no_sync_marks: {item!r} is not \"VALUE/MASK\" or "
                        "\"VALUE\" (32-bit numbers, 0x for hex; no bit of the value outside the mask; a mask of 0 "
                        "would select every flow)"))
    for label in filt.no_sync_labels:
        if isinstance(label, bool) or not (isinstance(label, int) and 0 <= label < LABEL_BITS):
            out.append(("filter", "no_sync_labels", f"filter.no_sync_labels: {label!r} is not a ct label bit "
                        f"(0-{LABEL_BITS - 1})"))
    for zone in filt.no_sync_zones:
        if isinstance(zone, bool) or not (isinstance(zone, int) and 0 <= zone <= ZONE_MAX):
            out.append(("filter", "no_sync_zones", f"filter.no_sync_zones: {zone!r} is not a conntrack zone "
                        f"(0-{ZONE_MAX})"))
    for item in filt.no_sync_ports:
        if port_range(str(item)) is None:
            out.append(("filter", "no_sync_ports", f"filter.no_sync_ports: {item!r} is not \"PORT\" or "
                        "\"LOW-HIGH\" (1-65535)"))
    return out


def replication_problems(table: dict[str, Any], where: str, defer_queue: int, backend: str) -> list[str]:
    """What is wrong with a cluster description's [replication] table (``where`` names the file),
    one line each."""
    out: list[str] = []
    for key, value in table.items():
        if key not in REPLICATION_KEYS:
            out.append(f"{where}: [replication] has no key {key!r}; keys are " + ", ".join(REPLICATION_KEYS))
            continue
        kind = REPLICATION_KEYS[key][1]
        if isinstance(value, bool) or not (isinstance(value, kind) or (kind is float and isinstance(value, int))):
            out.append(f"{where}: [replication] {key} must be {'a number' if kind is float else 'a list'}, "
                       f"not {value!r}")
    if out:
        return out
    given = {key: table.get(key, default) for key, (_section, _kind, default) in REPLICATION_KEYS.items()}
    sync = SimpleNamespace(**{k: float(v) if isinstance(v, int) else tuple(v) if isinstance(v, list) else v
                              for k, v in given.items()})
    filt = SimpleNamespace(protocols=(), **{k: tuple(v) for k, v in given.items() if k.startswith("no_sync")})
    out += [f"{where}: [replication] {message}" for _s, _k, message in problems(sync, filt, defer_queue)]
    if backend == "conntrackd" and table:
        out.append(f"{where}: [replication] is ctbridge's own replication; backend = \"conntrackd\" has none of "
                   "it: remove the table or use backend = \"ctbridge\"")
    return out

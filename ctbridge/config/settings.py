"""Configuration: one TOML file per node, every key with its default in SCHEMA below.

load() parses and checks; errors name the file, the line, the key and the fix ("FILE:LINE: ...").
Every problem of a file is reported at once. Checks that need the host (is the sync address on
this host? is the key readable?) are in ctbridge.config.host.problems(), so parse() stays pure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import re
import tomllib
import typing
from dataclasses import dataclass, field
from typing import Any

from ctbridge.config import selection
from ctbridge.conntrack import abi as ct

DEFAULT_PATH = "/etc/ctbridge/ctbridge.toml"


def _key(default: Any, doc: str, choices: tuple[str, ...] = (), required: bool = False) -> Any:
    """A key of a section: its default, the line docs/config.md shows for it, its choices."""
    return field(default=default, metadata={"doc": doc, "choices": choices, "required": required})


# The one place every key, its type and its default is defined: one frozen dataclass per section.
# SCHEMA below is read off them; docs/config.md describes the same keys (a test checks the two
# agree). Lists are tuples here, so that a Config cannot change once checked.

@dataclass(frozen=True)
class NodeSettings:
    name: str = _key("", "this node's name, unique in the cluster (its node id is derived from it)", required=True)
    state_dir: str = _key("/var/lib/ctbridge", "where the boot epoch is kept across restarts")


@dataclass(frozen=True)
class SyncLink:
    """One sync link: this node's address on it and the peers' (or its multicast group). The
    first is [sync]'s own local/peers/group/interface; [[sync.links]] add more, in order of
    preference. The i-th peer of every link is the same node."""

    local: str
    peers: tuple[str, ...] = ()
    group: str = ""
    interface: str = ""


LINK_KEYS = ("local", "peers", "group", "interface")
MAX_LINKS = 4  # sync links in all, [sync]'s own included (ctbridge.sync.wire.MAX_LINKS)


@dataclass(frozen=True)
class SyncSettings:
    local: str = _key("", "this node's address on the sync link", required=True)
    peers: tuple[str, ...] = _key((), "unicast: the other nodes' sync addresses")
    group: str = _key("", "multicast: the group address (instead of peers)")
    interface: str = _key("", "multicast: the sync interface")
    port: int = _key(3780, "UDP port, the same on every node")
    key_file: str = _key("", "file with the pre-shared key (`ctbridge keygen`)")
    previous_key_file: str = _key("", "during a key rollover: a second key that is accepted, never used to sign")
    cluster: str = _key("", "the cluster's name, covered by every MAC (a key file reused by another cluster "
                        "is refused by it); `ctbridge render` writes it")
    encrypt: str = _key("off", "seal the sync payload: \"aes-256-gcm\" or \"chacha20-poly1305\" (needs "
                        "python3-cryptography; clear datagrams are still taken); \"accept\" opens sealed ones "
                        "and sends in clear (turning it on without an outage)",
                        ("off", "accept", "aes-256-gcm", "chacha20-poly1305"))
    max_flows: int = _key(0, "flows kept per peer (0: the kernel's nf_conntrack_max); beyond, the peer's copy "
                          "is incomplete and the refusals counted")
    auth: str = _key("blake2b", "MAC algorithm; \"none\" (labs only) must be said explicitly",
                     ("blake2b", "hmac-sha256", "none"))
    mode: str = _key("reliable", "\"reliable\" (acknowledged, resent) or \"best-effort\"", ("reliable", "best-effort"))
    mtu: int = _key(1500, "MTU of the sync link; datagrams are never larger than it")
    dscp: int = _key(48, "DSCP of the sync datagrams (RFC 2474; 48 = CS6, network control, RFC 4594): a "
                     "congested sync interface or switch queues and drops transit traffic first; 0: unmarked")
    priority: int = _key(6, "SO_PRIORITY of the sync datagrams (socket(7)): the band a priority queueing "
                         "discipline on the sync interface gives them (6, TC_PRIO_INTERACTIVE, its highest "
                         "ordinary one); 0: the kernel's default")
    alive_interval: float = _key(1.0, "seconds between datagrams when there is nothing to say")
    peer_timeout: float = _key(5.0, "seconds of silence after which a peer stops holding back resends")
    resend_limit: int = _key(16384, "datagrams kept for resending; past it, peers get a bulk transfer")
    max_age: float = _key(0.0, "reject datagrams whose sender clock is this many seconds off (0: off)")
    refresh_interval: float = _key(0.0, "seconds between sweeps of this kernel's table for flows whose timeouts "
                                   "traffic restarted (the kernel sends no event for it), sent again before peers' "
                                   "copies run out; 0: a quarter of the shortest UDP, ICMP or generic timeout, "
                                   "1-10 s. A sweep waits at least 20 times the last one's duration")
    expiry_margin: float = _key(30.0, "seconds a peer's flow is kept after the timeout it last came with ran out "
                                "(a dead peer's flows go too); a commit gives each flow what is left of it. 0: "
                                "never expire")
    expectations: bool = _key(False, "replicate the expectations of the kernel's helpers (`ct helper` in the "
                              "ruleset: FTP, SIP), so that a data connection a client opens after a failover is "
                              "RELATED on the new master; every node must run a ctbridge that knows them (older "
                              "ones drop the datagrams that carry one)")
    delay: float = _key(0.0, "seconds a new flow must live before it is replicated: a flow that ends sooner "
                        "is never sent, and a failover loses only flows younger than this (docs/failover.md, "
                        "\"Sync delay\"); 0: at once. Not with apply.defer_queue")
    delay_by_protocol: tuple[str, ...] = _key((), "sync.delay per protocol, written \"PROTOCOL SECONDS\", e.g. "
                                              "[\"udp 2\", \"tcp 30\"] (a protocol not named: sync.delay)")
    coalesce: float = _key(0.0, "seconds an update of a flow peers have waits for the next, to go out once, as the "
                           "flow is then; worth it at about the round trip of the flows' paths (docs/protocol.md, "
                           "\"Coalescing\": 5 ms saved nothing at 20 ms); new flows and deletions never wait; "
                           "0: off (updates read together still go out once); at most 1")
    links: tuple[SyncLink, ...] = _key((), "redundant sync links, written [[sync.links]] with local and peers "
                                       "(or group and interface): used in order when the ones before fail")
    link_timeout: float = _key(1.0, "seconds without a two-way exchange on a sync link before traffic moves "
                               "to the next one")


@dataclass(frozen=True)
class ControlSettings:
    socket: str = _key("/run/ctbridge/ctbridge.sock", "UNIX socket of the control protocol (CLI, hook)")


@dataclass(frozen=True)
class ApplySettings:
    mode: str = _key("commit", "\"commit\": peers' flows go into the kernel on MASTER; \"inject\": as they arrive",
                     ("commit", "inject"))
    purge_timeout: float = _key(60.0, "seconds after BACKUP before flows this node had as master are removed "
                                "from its kernel")
    liberal_tcp: bool = _key(True, "mark committed TCP flows BE_LIBERAL (window state is not replicated)")
    gate: bool = _key(False, "commit mode: drop new forwarded flows while not MASTER, so packets that reach "
                      "the new master before its commit are not NATed anew (an nftables table; needs nft)")
    event_buffer: int = _key(128 << 20, "bytes of receive buffer for kernel events (about 1 KiB each: a "
                             "burst of 100,000 new flows needs about 100 MiB); it doubles after an overrun, up to "
                             "256 MiB")
    event_queue: int = _key(256 << 20, "bytes of kernel events read from that buffer and not yet taken by the "
                            "event loop (about 270 each: the default holds about a million, a burst the size of "
                            "a large table; memory is taken only while the loop is behind): a thread drains the "
                            "buffer into this queue while the loop is busy, so a stall of the loop does not "
                            "overrun the buffer; when the queue is full the thread stops reading and an overrun "
                            "is detected as without it")
    defer_queue: int = _key(0, "active-active: the netfilter queue (NFQUEUE number, 1-65535) where a TCP SYN-ACK "
                            "waits on this node until the flow a peer replicated is in its kernel, and a client's "
                            "first packets until the reply's state is; the daemon adds its rules itself "
                            "(iptables-nft and an nftables table; docs/failover.md, \"Active-active\"); 0: off. "
                            "Needs mode = \"inject\"")
    defer_wait: float = _key(0.1, "active-active: seconds a held packet waits at most for its flow; then it "
                             "passes as it would have without the defer. A packet whose flow comes waits only "
                             "until it comes")
    defer_udp_ports: str = _key("", "active-active: the peers' source NAT ports (\"LOW-HIGH\", several joined by "
                                "commas; `ctbridge render` writes them): a UDP packet addressed to this node at "
                                "one of them, of a flow not yet seen here, waits like a SYN-ACK (the first reply "
                                "of a peer's NATed flow); \"\": UDP is not held")
    backend: str = _key("ctbridge", "who replicates: \"ctbridge\" (its own sync), or \"conntrackd\": an existing "
                        "conntrackd, which ctbridge drives through the primary-backup steps in order, each checked "
                        "(ctbridge keeps the FIFO, interlock, gate and metrics)", ("ctbridge", "conntrackd"))
    conntrackd: str = _key("conntrackd", "backend conntrackd: the conntrackd program")
    conntrackd_config: str = _key("/etc/conntrackd/conntrackd.conf", "backend conntrackd: its configuration "
                                  "(`ctbridge render` writes it from the cluster description)")
    step_timeout: float = _key(30.0, "backend conntrackd: seconds one conntrackd step may take before the "
                               "transition fails")


@dataclass(frozen=True)
class FilterSettings:
    protocols: tuple[str | int, ...] = _key((), "replicate only these protocols (names or numbers; empty: all)")
    accept: tuple[str, ...] = _key((), "replicate only flows whose original or reply source is in these CIDRs")
    ignore: tuple[str, ...] = _key((), "never replicate flows whose original or reply source is in these CIDRs "
                                   "(loopback and the sync addresses always are)")
    tcp_states: tuple[str, ...] = _key((), "replicate TCP flows only in these states (empty: all)")
    peer_accept: tuple[str, ...] = _key((), "take from peer NODE only flows whose original or reply source is in "
                                        "CIDR, written \"NODE CIDR\" (peers not named: no limit but the filters "
                                        "above, which apply on receive too)")
    no_sync_marks: tuple[str, ...] = _key((), "never replicate flows whose ct mark matches: \"VALUE/MASK\" "
                                          "(mark & MASK == VALUE) or \"VALUE\", e.g. [\"0x100/0x100\"]")
    no_sync_labels: tuple[int, ...] = _key((), "never replicate flows with one of these ct label bits (0-127)")
    no_sync_zones: tuple[int, ...] = _key((), "never replicate flows of these conntrack zones")
    no_sync_ports: tuple[str, ...] = _key((), "never replicate flows to these ports (the original direction's "
                                          "destination: \"PORT\" or \"LOW-HIGH\"), e.g. [\"53\"]; the "
                                          "no_sync keys apply on receive too, and the event socket's kernel-side "
                                          "filter drops most of their events")


@dataclass(frozen=True)
class KeepalivedSettings:
    notify_fifo: str = _key("", "read keepalived's notify_fifo here (ordered transitions)")
    instances: tuple[str, ...] = _key((), "VRRP instances/groups whose transitions count (empty: all)")
    track_file: str = _key("", "priority interlock: keep this track_file at 0 while the external cache is complete")
    incomplete_value: int = _key(-254, "what the track_file holds while the external cache is incomplete")
    peer_gone_complete: bool = _key(False, "active-active: a peer that was whole here and went silent or "
                                    "restarted does not count against this node until its flows are all here "
                                    "again: the survivor keeps its priority while hearing nobody, and takes the "
                                    "instances of a node whose daemon died (its unit's ExecStopPost demotes it; "
                                    "`ctbridge render` writes both)")
    vips: tuple[str, ...] = _key((), "the virtual addresses keepalived gives this node as master: a daemon that "
                                 "restarts while this node holds one comes back as master")


@dataclass(frozen=True)
class MetricsSettings:
    listen: str = _key("", "address:port of a Prometheus text endpoint (empty: none)")


@dataclass(frozen=True)
class LogSettings:
    level: str = _key("info", "debug, info, warning or error", ("debug", "info", "warning", "error"))


SECTION_TYPES: dict[str, type] = {
    "node": NodeSettings, "sync": SyncSettings, "control": ControlSettings, "apply": ApplySettings,
    "filter": FilterSettings, "keepalived": KeepalivedSettings, "metrics": MetricsSettings, "log": LogSettings,
}


@dataclass(frozen=True)
class Key:
    """One key as the file and the docs see it (read off the section dataclasses)."""

    section: str
    name: str
    kind: type  # what the TOML value must be: str, int, float, bool or list
    default: Any  # None: required; a list for list keys, as in TOML
    doc: str
    choices: tuple[str, ...] = ()


def _schema() -> tuple[Key, ...]:
    keys = []
    for section, cls in SECTION_TYPES.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            kind = list if typing.get_origin(hint) is tuple else hint
            default: Any = f.default
            default = None if f.metadata["required"] else (list(default) if kind is list else default)
            keys.append(Key(section, f.name, kind, default, f.metadata["doc"], f.metadata["choices"]))
    return tuple(keys)


SCHEMA: tuple[Key, ...] = _schema()
SECTIONS = tuple(SECTION_TYPES)
_BY_NAME = {(k.section, k.name): k for k in SCHEMA}
PROTOCOLS = selection.PROTOCOLS
TCP_STATE_NUMBERS = {name: i for i, name in enumerate(ct.TCP_STATES)}


class ConfigError(Exception):
    """A configuration that must not be run. ``problems`` are lines, each FILE:LINE: what and how
    to fix; ``str()`` joins them (one line when there is one problem)."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class Config:
    """A checked configuration: one typed, frozen record per section."""

    path: str
    node: NodeSettings
    sync: SyncSettings
    control: ControlSettings = ControlSettings()
    apply: ApplySettings = ApplySettings()
    filter: FilterSettings = FilterSettings()
    keepalived: KeepalivedSettings = KeepalivedSettings()
    metrics: MetricsSettings = MetricsSettings()
    log: LogSettings = LogSettings()

    @property
    def node_id(self) -> int:
        return node_id(self.node.name)

    @property
    def multicast(self) -> bool:
        return bool(self.sync.group)

    def sync_links(self) -> list[SyncLink]:
        """Every sync link in order of preference, [sync]'s own first."""
        s = self.sync
        return [SyncLink(s.local, s.peers, s.group, s.interface), *s.links]

    def peer_addresses(self) -> list[str]:
        return list(self.sync.peers)

    def max_datagram(self) -> int:
        """MTU less the IP and UDP headers of the sync link's family."""
        v6 = any(ipaddress.ip_address(link.local).version == 6 for link in self.sync_links())
        return self.sync.mtu - (48 if v6 else 28)


def node_id(name: str) -> int:
    """A node's id on the wire: the first 4 bytes of SHA-256 of its name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")


def _line_of(text: str, section: str, name: str | None) -> int:
    """The line of [section] key = ... (or of [section]) in the file, 0 if not found."""
    lines = text.splitlines()
    in_section = False
    section_line = 0
    for i, line in enumerate(lines, 1):
        stripped = line.strip()
        m = re.match(r"^\[([^\]]+)\]", stripped)
        if m:
            in_section = m.group(1).strip() == section
            if in_section:
                section_line = i
            continue
        if in_section and name and re.match(rf"^{re.escape(name)}\s*=", stripped):
            return i
    return section_line


def _link_line(text: str, i: int) -> int:
    """The line of the i-th [[sync.links]] table (or of links = in [sync]), 0 if not found."""
    tables = [n for n, line in enumerate(text.splitlines(), 1) if re.match(r"^\s*\[\[\s*sync\.links\s*\]\]", line)]
    return tables[i] if i < len(tables) else _line_of(text, "sync", "links")


def _links(value: list[Any], fail: typing.Callable[[int, str], None]) -> list[SyncLink]:
    """[[sync.links]] tables as SyncLinks; a table with a problem is reported and left out."""
    links = []
    for i, table in enumerate(value):
        where = f"sync.links #{i + 1}"
        if not isinstance(table, dict):
            fail(i, f"{where} must be a table, written [[sync.links]] with local = ... and peers = [...]")
            continue
        ok = True
        for k, v in table.items():
            if k not in LINK_KEYS:
                fail(i, f"{where}: unknown key {k!r}; a link takes " + ", ".join(LINK_KEYS))
                ok = False
            elif k == "peers" and not (isinstance(v, list) and all(isinstance(a, str) for a in v)):
                fail(i, f"{where}: peers must be a list of addresses, not {v!r}")
                ok = False
            elif k != "peers" and not isinstance(v, str):
                fail(i, f"{where}: {k} must be a string, not {v!r}")
                ok = False
        if not isinstance(table.get("local"), str) or not table.get("local"):
            if ok:
                fail(i, f"{where}: has no local address; add local = \"ADDRESS\" (this node's on that link)")
            ok = False
        if ok:
            links.append(SyncLink(table["local"], tuple(table.get("peers", ())), table.get("group", ""),
                                  table.get("interface", "")))
    return links


def load(path: str) -> Config:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; write one (see docs/config.md) or pass -c FILE") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from None
    return parse(raw.decode("utf-8", "replace"), path)


def parse(text: str, path: str = "<config>") -> Config:
    """Parse and check a configuration; raises ConfigError with every problem, each FILE:LINE."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ConfigError(f"{path}:{m.group(1) if m else 0}: not valid TOML: {exc}") from None
    problems: list[str] = []

    def fail(section: str, name: str | None, message: str) -> None:
        if name and name.startswith("links#"):  # a [[sync.links]] table: its own line
            problems.append(f"{path}:{_link_line(text, int(name[6:]))}: {message}")
            return
        problems.append(f"{path}:{_line_of(text, section, name)}: {message}")

    def fail_link(i: int, message: str) -> None:
        problems.append(f"{path}:{_link_line(text, i)}: {message}")

    values: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    invalid: set[str] = set()  # "section.key" given with a wrong type or choice: not checked further
    for section, table in data.items():
        if section not in SECTIONS:
            fail(section, None, f"unknown section [{section}]; sections are {', '.join(SECTIONS)}")
            continue
        if not isinstance(table, dict):
            fail(section, None, f"{section} must be a [section]")
            continue
        for name, value in table.items():
            key = _BY_NAME.get((section, name))
            if key is None:
                known = ", ".join(k.name for k in SCHEMA if k.section == section)
                fail(section, name, f"unknown key {section}.{name}; [{section}] takes {known}")
                continue
            if key.kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, key.kind) or (key.kind is int and isinstance(value, bool)):
                want = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
                        list: "a list"}.get(key.kind, "another type")
                fail(section, name, f"{section}.{name} must be {want}, not {value!r}")
                invalid.add(f"{section}.{name}")
                continue
            if key.choices and value not in key.choices:
                choices = ", ".join(repr(c) for c in key.choices)
                fail(section, name, f"{section}.{name} = {value!r}; use one of {choices}")
                invalid.add(f"{section}.{name}")
                continue
            if (section, name) == ("sync", "links") and isinstance(value, list):
                value = _links(value, fail_link)
            values[section][name] = tuple(value) if isinstance(value, list) else value
    sections = {section: SECTION_TYPES[section](**given) for section, given in values.items()}
    cfg = Config(path, **sections)
    _check(cfg, fail, invalid)
    if problems:
        raise ConfigError(problems)
    return cfg


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _check_links(cfg: Config, fail: typing.Callable[[str, str | None, str], None]) -> None:
    """The redundant links agree with [sync]'s own: same kind (unicast or multicast), as many
    peers, addresses that are addresses and not used twice."""
    sync = cfg.sync
    if not sync.links:
        return
    if len(sync.links) + 1 > MAX_LINKS:
        fail("sync", "links", f"sync.links: {len(sync.links)} redundant links; at most {MAX_LINKS - 1} "
             f"(a node has at most {MAX_LINKS} sync links)")
    if sync.link_timeout <= 0:
        fail("sync", "link_timeout", "sync.link_timeout must be positive")
    seen: dict[str, str] = {}
    for n, link in enumerate(cfg.sync_links()):
        where = "sync.local" if n == 0 else f"sync.links #{n}"
        at = f"links#{n - 1}"
        if n > 0 and link.group and not _is_ip(link.group):
            fail("sync", at, f"{where}: group {link.group!r} is not an IP address")
        local = ipaddress.ip_address(link.local) if _is_ip(link.local) else None
        for a in (link.local, *link.peers):
            if not _is_ip(a):
                if n > 0:  # [sync]'s own are reported by _check
                    fail("sync", at, f"{where}: {a!r} is not an IP address")
                continue
            addr = ipaddress.ip_address(a)
            if n > 0 and local is not None and addr.version != local.version:
                fail("sync", at, f"{where}: {a} and its local address {link.local} are of different IP versions")
            ip = str(addr)
            other = seen.setdefault(ip, where)
            if other != where:
                fail("sync", at, f"{where}: address {ip} is also on {other}; each link has its own addresses")
        if n == 0:
            continue
        if cfg.multicast:
            if link.peers or not link.group or not link.interface:
                fail("sync", at, f"{where}: [sync] is multicast, so every link needs group and interface "
                     "(and no peers)")
            elif _is_ip(link.group) and _is_ip(sync.group) and any(
                    ipaddress.ip_address(link.group) == ipaddress.ip_address(g)
                    for g in [sync.group, *(other.group for other in sync.links[:n - 1])] if _is_ip(g)):
                fail("sync", at, f"{where}: group {link.group} is also another link's; give each link its own group")
            elif any(link.interface == other.interface for other in cfg.sync_links()[:n]):
                fail("sync", at, f"{where}: interface {link.interface} is also another link's; give each link its "
                     "own interface")
        else:
            if link.group or link.interface:
                fail("sync", at, f"{where}: [sync] is unicast, so links take local and peers, not group "
                     "or interface")
            if len(link.peers) != len(sync.peers):
                fail("sync", at, f"{where}: {len(link.peers)} peer(s) but sync.peers has {len(sync.peers)}; "
                     "list every peer on every link, in the same order")


def _check(cfg: Config, fail: typing.Callable[[str, str | None, str], None], invalid: set[str]) -> None:
    """Every problem of a parsed configuration, each reported once through ``fail``. A check that
    reads a key already refused for its type or choice (``invalid``) is skipped: "auth = 'md5'"
    must not also say that key_file is missing."""
    if invalid:
        given = fail

        def fail(section: str, name: str | None, message: str) -> None:
            if not any(key in message for key in invalid):
                given(section, name, message)
    _check_addresses(cfg, fail)
    _check_links(cfg, fail)
    _check_values(cfg, fail, invalid)


def _check_addresses(cfg: Config, fail: typing.Callable[[str, str | None, str], None]) -> None:
    """The node's name and its addresses on the sync link: local, unicast peers or a multicast group."""
    sync = cfg.sync
    if not cfg.node.name:
        fail("node", "name", "node.name is missing; give every node a unique name, e.g. name = \"fw1\"")
    local_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    if not sync.local:
        fail("sync", "local", "sync.local is missing: this node's address on the sync link")
    else:
        try:
            local_ip = ipaddress.ip_address(sync.local)
        except ValueError:
            fail("sync", "local", f"sync.local = {sync.local!r} is not an IP address")
    if sync.peers and sync.group:
        fail("sync", "group", "sync.peers and sync.group both set: use unicast peers or a multicast group")
    if not sync.peers and not sync.group:
        fail("sync", "peers", "no peers: set sync.peers = [\"addr\", ...] or sync.group and sync.interface")
    for p in sync.peers:
        try:
            ip = ipaddress.ip_address(p)
        except (ValueError, TypeError):
            fail("sync", "peers", f"sync.peers: {p!r} is not an IP address")
            continue
        if local_ip is not None and ip.version != local_ip.version:
            fail("sync", "peers", f"sync.peers: {p} and sync.local {sync.local} are of different IP versions")
        if ip == local_ip:
            fail("sync", "peers", f"sync.peers lists this node's own address {p}")
    if sync.group:
        try:
            if not ipaddress.ip_address(sync.group).is_multicast:
                fail("sync", "group", f"sync.group = {sync.group} is not a multicast address (224.0.0.0/4, ff00::/8)")
        except ValueError:
            fail("sync", "group", f"sync.group = {sync.group!r} is not an IP address")
        if not sync.interface:
            fail("sync", "interface", "multicast needs sync.interface, the sync link's interface name")


def _check_values(cfg: Config, fail: typing.Callable[[str, str | None, str], None], invalid: set[str]) -> None:
    """Ports, sizes, intervals, filters, the backend, the VIPs, the metrics endpoint."""
    sync = cfg.sync
    if not 1 <= sync.port <= 65535:
        fail("sync", "port", f"sync.port = {sync.port} is not a UDP port (1-65535)")
    if sync.mtu < 576:
        fail("sync", "mtu", "sync.mtu below 576 cannot carry a flow")
    if sync.auth != "none" and not sync.key_file and "sync.auth" not in invalid:
        fail("sync", "key_file", "sync.key_file is missing; create a key with `ctbridge keygen FILE` "
             "(or set auth = \"none\" for a lab without authentication)")
    for name, seconds in (("alive_interval", sync.alive_interval), ("peer_timeout", sync.peer_timeout)):
        if seconds <= 0:
            fail("sync", name, f"sync.{name} must be positive")
    for item in cfg.filter.peer_accept:
        parts = item.split()
        try:
            if len(parts) != 2:
                raise ValueError
            ipaddress.ip_network(parts[1], strict=False)
        except ValueError:
            fail("filter", "peer_accept", f"filter.peer_accept: {item!r} is not \"NODE CIDR\" (a node name, a space, "
                 "an address or CIDR)")
    for name, seconds in (("refresh_interval", sync.refresh_interval), ("expiry_margin", sync.expiry_margin)):
        if seconds < 0:
            fail("sync", name, f"sync.{name} = {seconds} is negative")
    if cfg.apply.backend == "conntrackd" and cfg.apply.mode != "commit":
        fail("apply", "mode", "apply.backend = \"conntrackd\" commits on MASTER (conntrackd -c): apply.mode must "
             "be \"commit\"")
    if cfg.apply.step_timeout <= 0:
        fail("apply", "step_timeout", "apply.step_timeout must be positive")
    for vip in cfg.keepalived.vips:
        try:
            ipaddress.ip_interface(vip)
        except ValueError:
            fail("keepalived", "vips", f"keepalived.vips: {vip!r} is not an address (with or without a prefix length)")
    if cfg.sync.max_flows < 0:
        fail("sync", "max_flows", f"sync.max_flows: {cfg.sync.max_flows} is negative; 0 means the kernel's "
             "nf_conntrack_max")
    for name, cidrs in (("accept", cfg.filter.accept), ("ignore", cfg.filter.ignore)):
        for cidr in cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except (ValueError, TypeError):
                fail("filter", name, f"filter.{name}: {cidr!r} is not an address or CIDR")
    for state in cfg.filter.tcp_states:
        if state not in TCP_STATE_NUMBERS:
            fail("filter", "tcp_states", f"filter.tcp_states: unknown state {state!r}; use " + ", ".join(ct.TCP_STATES))
    listen = cfg.metrics.listen
    if listen and not re.match(r"^(\[[0-9a-fA-F:.]+\]|[^:\s]+):\d+$", listen):
        fail("metrics", "listen", f"metrics.listen = {listen!r}; write ADDRESS:PORT, e.g. 127.0.0.1:9780")
    if cfg.apply.event_buffer < 4096:
        fail("apply", "event_buffer", "apply.event_buffer below 4096 bytes cannot hold one event")
    if cfg.apply.event_queue < 65536:
        fail("apply", "event_queue", "apply.event_queue below 65536 bytes cannot hold one read of 128 events")
    if cfg.apply.purge_timeout < 0:
        fail("apply", "purge_timeout", "apply.purge_timeout must not be negative")
    if not 0 <= cfg.apply.defer_queue <= 65535:
        fail("apply", "defer_queue", f"apply.defer_queue = {cfg.apply.defer_queue} is not a netfilter queue "
             "(1-65535; 0: off)")
    elif cfg.apply.defer_queue and cfg.apply.mode != "inject":
        fail("apply", "defer_queue", "apply.defer_queue waits for peers' flows to be written as they arrive: "
             "apply.mode must be \"inject\"")
    if not 0 <= cfg.sync.dscp <= 63:
        fail("sync", "dscp", f"sync.dscp = {cfg.sync.dscp}: a DSCP is 0-63 (48: CS6)")
    if not 0 <= cfg.sync.priority <= 15:
        fail("sync", "priority", f"sync.priority = {cfg.sync.priority}: a socket priority is 0-15 (TC_PRIO_*)")
    if cfg.apply.defer_udp_ports and not all(
            (m := re.fullmatch(r"\s*([1-9][0-9]{0,4})\s*(?:-\s*([1-9][0-9]{0,4})\s*)?", part)) is not None
            and 1 <= int(m.group(1)) <= int(m.group(2) or m.group(1)) <= 65535
            for part in cfg.apply.defer_udp_ports.split(",")):
        fail("apply", "defer_udp_ports", f"apply.defer_udp_ports = {cfg.apply.defer_udp_ports!r}; write port ranges "
             "\"LOW-HIGH\" (1-65535) joined by commas, e.g. \"1024-33279,49152-65535\"")
    for section, name, message in selection.problems(cfg.sync, cfg.filter, cfg.apply.defer_queue):
        fail(section, name, message)
    if not 0 < cfg.apply.defer_wait <= 1:
        fail("apply", "defer_wait", f"apply.defer_wait = {cfg.apply.defer_wait}: a held packet waits more than "
             "0 and at most 1 second")

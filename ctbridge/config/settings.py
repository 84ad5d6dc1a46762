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
class SyncSettings:
    local: str = _key("", "this node's address on the sync link", required=True)
    peers: tuple[str, ...] = _key((), "unicast: the other nodes' sync addresses")
    group: str = _key("", "multicast: the group address (instead of peers)")
    interface: str = _key("", "multicast: the sync interface")
    port: int = _key(3780, "UDP port, the same on every node")
    key_file: str = _key("", "file with the pre-shared key (`ctbridge keygen`)")
    previous_key_file: str = _key("", "during a key rollover: a second key that is accepted, never used to sign")
    auth: str = _key("blake2b", "MAC algorithm; \"none\" (labs only) must be said explicitly",
                     ("blake2b", "hmac-sha256", "none"))
    mode: str = _key("reliable", "\"reliable\" (acknowledged, resent) or \"best-effort\"", ("reliable", "best-effort"))
    mtu: int = _key(1500, "MTU of the sync link; datagrams are never larger than it")
    alive_interval: float = _key(1.0, "seconds between datagrams when there is nothing to say")
    peer_timeout: float = _key(5.0, "seconds of silence after which a peer stops holding back resends")
    resend_limit: int = _key(16384, "datagrams kept for resending; past it, peers get a bulk transfer")
    max_age: float = _key(0.0, "reject datagrams whose sender clock is this many seconds off (0: off)")


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


@dataclass(frozen=True)
class FilterSettings:
    protocols: tuple[str | int, ...] = _key((), "replicate only these protocols (names or numbers; empty: all)")
    accept: tuple[str, ...] = _key((), "replicate only flows whose original or reply source is in these CIDRs")
    ignore: tuple[str, ...] = _key((), "never replicate flows whose original or reply source is in these CIDRs "
                                   "(loopback and the sync addresses always are)")
    tcp_states: tuple[str, ...] = _key((), "replicate TCP flows only in these states (empty: all)")


@dataclass(frozen=True)
class KeepalivedSettings:
    notify_fifo: str = _key("", "read keepalived's notify_fifo here (ordered transitions)")
    instances: tuple[str, ...] = _key((), "VRRP instances/groups whose transitions count (empty: all)")
    track_file: str = _key("", "priority interlock: keep this track_file at 0 while the external cache is complete")
    incomplete_value: int = _key(-254, "what the track_file holds while the external cache is incomplete")


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
PROTOCOLS = {name: num for num, name in ct.PROTO_NAMES.items()}
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

    def peer_addresses(self) -> list[str]:
        return list(self.sync.peers)

    def max_datagram(self) -> int:
        """MTU less the IP and UDP headers of the sync link's family."""
        v6 = ipaddress.ip_address(self.sync.local).version == 6
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
        problems.append(f"{path}:{_line_of(text, section, name)}: {message}")

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
            values[section][name] = tuple(value) if isinstance(value, list) else value
    sections = {section: SECTION_TYPES[section](**given) for section, given in values.items()}
    cfg = Config(path, **sections)
    _check(cfg, fail, invalid)
    if problems:
        raise ConfigError(problems)
    return cfg


def _check(cfg: Config, fail: typing.Callable[[str, str | None, str], None], invalid: set[str]) -> None:
    """Every problem of a parsed configuration, each reported once through ``fail``. A check that
    reads a key already refused for its type or choice (``invalid``) is skipped: "auth = 'md5'"
    must not also say that key_file is missing."""
    if invalid:
        given = fail

        def fail(section: str, name: str | None, message: str) -> None:
            if not any(key in message for key in invalid):
                given(section, name, message)
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
    for proto in cfg.filter.protocols:
        if proto not in PROTOCOLS and not (isinstance(proto, int) and 0 <= proto <= 255):
            fail("filter", "protocols", f"filter.protocols: unknown protocol {proto!r}; use "
                 + ", ".join(sorted(PROTOCOLS)) + " or a number")
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
    if cfg.apply.purge_timeout < 0:
        fail("apply", "purge_timeout", "apply.purge_timeout must not be negative")

"""Configuration: one TOML file per node, every key with its default in SCHEMA below.

load() parses and checks; errors name the file, the line, the key and the fix ("FILE:LINE: ...").
Checks that need the host (is the sync address on this host? is the key readable?) are in
host_problems(), so check() stays pure for the same input.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from ctbridge.conntrack import abi as ct

DEFAULT_PATH = "/etc/ctbridge/ctbridge.toml"


@dataclass(frozen=True)
class Key:
    section: str
    name: str
    kind: type | tuple[type, ...]
    default: Any
    doc: str
    choices: tuple[str, ...] = ()


# The one place every key and its default is defined; docs/config.md describes the same keys
# (a test checks that the two agree).
SCHEMA: tuple[Key, ...] = (
    Key("node", "name", str, None, "this node's name, unique in the cluster (its node id is derived from it)"),
    Key("node", "state_dir", str, "/var/lib/ctbridge", "where the boot epoch is kept across restarts"),
    Key("sync", "local", str, None, "this node's address on the sync link"),
    Key("sync", "peers", list, [], "unicast: the other nodes' sync addresses"),
    Key("sync", "group", str, "", "multicast: the group address (instead of peers)"),
    Key("sync", "interface", str, "", "multicast: the sync interface"),
    Key("sync", "port", int, 3780, "UDP port, the same on every node"),
    Key("sync", "key_file", str, "", "file with the pre-shared key (`ctbridge keygen`)"),
    Key("sync", "previous_key_file", str, "",
        "during a key rollover: a second key that is accepted, never used to sign"),
    Key("sync", "auth", str, "blake2b", "MAC algorithm; \"none\" (labs only) must be said explicitly",
        ("blake2b", "hmac-sha256", "none")),
    Key("sync", "mode", str, "reliable", "\"reliable\" (acknowledged, resent) or \"best-effort\"",
        ("reliable", "best-effort")),
    Key("sync", "mtu", int, 1500, "MTU of the sync link; datagrams are never larger than it"),
    Key("sync", "alive_interval", float, 1.0, "seconds between datagrams when there is nothing to say"),
    Key("sync", "peer_timeout", float, 5.0, "seconds of silence after which a peer stops holding back resends"),
    Key("sync", "resend_limit", int, 16384, "datagrams kept for resending; past it, peers get a bulk transfer"),
    Key("sync", "max_age", float, 0.0, "reject datagrams whose sender clock is this many seconds off (0: off)"),
    Key("control", "socket", str, "/run/ctbridge/ctbridge.sock", "UNIX socket of the control protocol (CLI, hook)"),
    Key("apply", "mode", str, "commit", "\"commit\": peers' flows go into the kernel on MASTER; \"inject\": as they "
        "arrive", ("commit", "inject")),
    Key("apply", "purge_timeout", float, 60.0, "seconds after BACKUP before flows this node had as master are removed "
        "from its kernel"),
    Key("apply", "liberal_tcp", bool, True, "mark committed TCP flows BE_LIBERAL (window state is not replicated)"),
    Key("apply", "gate", bool, False, "commit mode: drop new forwarded flows while not MASTER, so packets that reach "
        "the new master before its commit are not NATed anew (an nftables table; needs nft)"),
    Key("apply", "event_buffer", int, 32 << 20, "bytes of receive buffer for kernel events (about 1 KiB each); "
        "it doubles after an overrun, up to 256 MiB"),
    Key("filter", "protocols", list, [], "replicate only these protocols (names or numbers; empty: all)"),
    Key("filter", "accept", list, [], "replicate only flows whose original or reply source is in these CIDRs"),
    Key("filter", "ignore", list, [], "never replicate flows whose original or reply source is in these CIDRs "
        "(loopback and the sync addresses always are)"),
    Key("filter", "tcp_states", list, [], "replicate TCP flows only in these states (empty: all)"),
    Key("keepalived", "notify_fifo", str, "", "read keepalived's notify_fifo here (ordered transitions)"),
    Key("keepalived", "instances", list, [], "VRRP instances/groups whose transitions count (empty: all)"),
    Key("keepalived", "track_file", str, "", "priority interlock: keep this track_file at 0 while the external "
        "cache is complete"),
    Key("keepalived", "incomplete_value", int, -254, "what the track_file holds while the external cache is "
        "incomplete"),
    Key("metrics", "listen", str, "", "address:port of a Prometheus text endpoint (empty: none)"),
    Key("log", "level", str, "info", "debug, info, warning or error", ("debug", "info", "warning", "error")),
)
SECTIONS = tuple(dict.fromkeys(k.section for k in SCHEMA))
_BY_NAME = {(k.section, k.name): k for k in SCHEMA}
PROTOCOLS = {name: num for num, name in ct.PROTO_NAMES.items()}
TCP_STATE_NUMBERS = {name: i for i, name in enumerate(ct.TCP_STATES)}


class ConfigError(Exception):
    """A configuration that must not be run; ``str()`` is one line: FILE:LINE: what and how to fix."""


@dataclass(frozen=True)
class Config:
    path: str
    values: dict[tuple[str, str], Any] = field(repr=False)

    def __getitem__(self, dotted: str) -> Any:
        section, name = dotted.split(".")
        return self.values[(section, name)]

    @property
    def node_id(self) -> int:
        return node_id(self["node.name"])

    @property
    def multicast(self) -> bool:
        return bool(self["sync.group"])

    def peer_addresses(self) -> list[str]:
        return list(self["sync.peers"])

    def max_datagram(self) -> int:
        """MTU less the IP and UDP headers of the sync link's family."""
        v6 = ipaddress.ip_address(self["sync.local"]).version == 6
        return int(self["sync.mtu"]) - (48 if v6 else 28)


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
    """Parse and check a configuration; raises ConfigError with FILE:LINE."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ConfigError(f"{path}:{m.group(1) if m else 0}: not valid TOML: {exc}") from None

    def fail(section: str, name: str | None, message: str) -> ConfigError:
        return ConfigError(f"{path}:{_line_of(text, section, name)}: {message}")

    values: dict[tuple[str, str], Any] = {}
    for section, table in data.items():
        if section not in SECTIONS:
            raise fail(section, None, f"unknown section [{section}]; sections are {', '.join(SECTIONS)}")
        if not isinstance(table, dict):
            raise fail(section, None, f"{section} must be a [section]")
        for name, value in table.items():
            key = _BY_NAME.get((section, name))
            if key is None:
                known = ", ".join(k.name for k in SCHEMA if k.section == section)
                raise fail(section, name, f"unknown key {section}.{name}; [{section}] takes {known}")
            if key.kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, key.kind) or (key.kind is int and isinstance(value, bool)):
                want = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
                        list: "a list"}.get(key.kind if isinstance(key.kind, type) else str, "another type")
                raise fail(section, name, f"{section}.{name} must be {want}, not {value!r}")
            if key.choices and value not in key.choices:
                raise fail(section, name, f"{section}.{name} = {value!r}; use one of "
                           + ", ".join(repr(c) for c in key.choices))
            values[(section, name)] = value
    for key in SCHEMA:
        values.setdefault((key.section, key.name), key.default)
    _check(values, fail)
    return Config(path, values)


def _check(v: dict[tuple[str, str], Any], fail: Any) -> None:
    if not v[("node", "name")]:
        raise fail("node", "name", "node.name is missing; give every node a unique name, e.g. name = \"fw1\"")
    local = v[("sync", "local")]
    if not local:
        raise fail("sync", "local", "sync.local is missing: this node's address on the sync link")
    try:
        local_ip = ipaddress.ip_address(local)
    except ValueError:
        raise fail("sync", "local", f"sync.local = {local!r} is not an IP address") from None
    peers, group = v[("sync", "peers")], v[("sync", "group")]
    if peers and group:
        raise fail("sync", "group", "sync.peers and sync.group both set: use unicast peers or a multicast group")
    if not peers and not group:
        raise fail("sync", "peers", "no peers: set sync.peers = [\"addr\", ...] or sync.group and sync.interface")
    for p in peers:
        try:
            ip = ipaddress.ip_address(p)
        except (ValueError, TypeError):
            raise fail("sync", "peers", f"sync.peers: {p!r} is not an IP address") from None
        if ip.version != local_ip.version:
            raise fail("sync", "peers", f"sync.peers: {p} and sync.local {local} are of different IP versions")
        if ip == local_ip:
            raise fail("sync", "peers", f"sync.peers lists this node's own address {p}")
    if group:
        try:
            gip = ipaddress.ip_address(group)
        except ValueError:
            raise fail("sync", "group", f"sync.group = {group!r} is not an IP address") from None
        if not gip.is_multicast:
            raise fail("sync", "group", f"sync.group = {group} is not a multicast address (224.0.0.0/4, ff00::/8)")
        if not v[("sync", "interface")]:
            raise fail("sync", "interface", "multicast needs sync.interface, the sync link's interface name")
    if not 1 <= v[("sync", "port")] <= 65535:
        raise fail("sync", "port", f"sync.port = {v[('sync', 'port')]} is not a UDP port (1-65535)")
    if v[("sync", "mtu")] < 576:
        raise fail("sync", "mtu", "sync.mtu below 576 cannot carry a flow")
    if v[("sync", "auth")] != "none" and not v[("sync", "key_file")]:
        raise fail("sync", "key_file", "sync.key_file is missing; create a key with `ctbridge keygen FILE` "
                   "(or set auth = \"none\" for a lab without authentication)")
    for name in ("alive_interval", "peer_timeout"):
        if v[("sync", name)] <= 0:
            raise fail("sync", name, f"sync.{name} must be positive")
    for proto in v[("filter", "protocols")]:
        if proto not in PROTOCOLS and not (isinstance(proto, int) and 0 <= proto <= 255):
            raise fail("filter", "protocols", f"filter.protocols: unknown protocol {proto!r}; use "
                       + ", ".join(sorted(PROTOCOLS)) + " or a number")
    for name in ("accept", "ignore"):
        for cidr in v[("filter", name)]:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except (ValueError, TypeError):
                raise fail("filter", name, f"filter.{name}: {cidr!r} is not an address or CIDR") from None
    for state in v[("filter", "tcp_states")]:
        if state not in TCP_STATE_NUMBERS:
            raise fail("filter", "tcp_states", f"filter.tcp_states: unknown state {state!r}; use "
                       + ", ".join(ct.TCP_STATES))
    listen = v[("metrics", "listen")]
    if listen and not re.match(r"^(\[[0-9a-fA-F:.]+\]|[^:\s]+):\d+$", listen):
        raise fail("metrics", "listen", f"metrics.listen = {listen!r}; write ADDRESS:PORT, e.g. 127.0.0.1:9780")
    if v[("apply", "event_buffer")] < 4096:
        raise fail("apply", "event_buffer", "apply.event_buffer below 4096 bytes cannot hold one event")
    if v[("apply", "purge_timeout")] < 0:
        raise fail("apply", "purge_timeout", "apply.purge_timeout must not be negative")


def check_main(path: str) -> list[str]:
    """What `ctbridge check` reports: the problems of a file, or [] when it can run here."""
    try:
        cfg = load(path)
    except ConfigError as exc:
        return [str(exc)]
    from ctbridge.config import host  # host facts: addresses, key files; imported late to keep this pure
    return host.problems(cfg)

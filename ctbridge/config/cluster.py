"""A cluster description: one TOML file for every firewall of a cluster, from which `ctbridge render`
makes each node's keepalived.conf, ctbridge.toml, nftables snippet and systemd unit.

load() parses; verify() is pure (no host facts, the input is not changed) and returns every problem,
each naming the node or instance at fault and the fix. See docs/cluster.md for the keys.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass
from typing import Any

from ctbridge.config import selection

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Where the Debian package puts things; a lab (several nodes on one host) overrides them per node.
DEFAULT_PATHS = {
    "config_dir": "/etc/ctbridge",
    "run_dir": "/run/ctbridge",
    "state_dir": "/var/lib/ctbridge",
    "hook": "/usr/lib/ctbridge/ctbridge-notify",
    "ctbridge": "/usr/bin/ctbridge",
}
NOTIFY_MODES = ("hook", "fifo")
TRANSPORTS = ("unicast", "multicast")
APPLY_MODES = ("commit", "inject")
# active-standby: one sync group, one master; active-active: each instance its own master, both
# nodes forward, peers' flows injected as they arrive, the defer on (docs/failover.md, "Active-active")
MODES = ("active-standby", "active-active")
# active-active: an instance's priority on the node that is its master, and on the others
MASTER_PRIORITY = 150
BACKUP_PRIORITY = 100
BACKENDS = ("ctbridge", "conntrackd")  # who replicates (ctbridge.daemon.conntrackd)


def parse_ports(text: str) -> tuple[int, int] | None:
    """"LOW-HIGH" as two ports (1-65535, LOW <= HIGH), or None."""
    m = re.fullmatch(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*", text)
    if m is None:
        return None
    low, high = int(m.group(1)), int(m.group(2))
    return (low, high) if 1 <= low <= high <= 65535 else None


class ClusterError(ValueError):
    """A cluster description that cannot be rendered; the message lists what is wrong and the fix."""


@dataclass(frozen=True)
class Interface:
    name: str
    address: IPInterface


@dataclass(frozen=True)
class Node:
    name: str
    priority: int
    sync: Interface | None
    interfaces: dict[str, Interface]  # by role: "lan", "wan", ...
    metrics: str
    sync_links: tuple[Interface, ...] = ()  # redundant sync links after ``sync``, in order of preference


@dataclass(frozen=True)
class Instance:
    name: str
    side: str  # the interface role of every node this instance runs on
    virtual_router_id: int
    vips: tuple[IPInterface, ...]
    advert_int: float
    master: str = ""  # active-active: the node that is this instance's master while it is up


@dataclass(frozen=True)
class Cluster:
    name: str
    key_file: str
    secret: str  # the cluster secret on the rendering machine ("": a group key the operator copies)
    apply_mode: str
    transport: str  # of both the sync link and VRRP adverts
    sync_group: str  # multicast group of the sync link ("" for unicast)
    sync_link_groups: list[str]  # multicast: one group per redundant sync link
    sync_port: int
    notify: str  # "hook" (keepalived runs the notify hook) or "fifo" (notify_fifo, ordered)
    interlock: bool
    maintenance: bool  # a track file that drains the node when it holds 1
    gate: bool  # commit mode: ctbridge's commit gate (ctbridge.daemon.gate)
    vrrp_version: int
    group: str  # the vrrp_sync_group's name
    nodes: tuple[Node, ...]
    instances: tuple[Instance, ...]
    paths: dict[str, str]
    path: str = "<cluster>"
    backend: str = "ctbridge"  # "conntrackd": an existing conntrackd replicates, driven by ctbridge
    table_size: int = 0  # flows each node's conntrack table must hold (0: the kernel's own sizing)
    mode: str = "active-standby"
    defer_queue: int = 1  # active-active: the netfilter queue of the defer (apply.defer_queue)
    nat_ports: str = ""  # "LOW-HIGH": source NAT ports, shared out among the nodes (ctbridge-nat.nft)
    own_flows: bool = False  # replicate the nodes' own flows (to and from their interface addresses)
    replication: dict[str, Any] | None = None  # [replication]: sync delay, coalescing, no-sync (config.selection)

    def demotion(self) -> int:
        """How far the interlock lowers an incomplete node's priority: below every complete node
        (the highest priority less the lowest, plus one), yet not to FAULT (keepalived.conf(5),
        track_file: a result below -253 is FAULT; the effective priority stays within [1, 254]),
        so an incomplete node never preempts a complete one and still becomes master alone."""
        if self.mode == "active-active":
            return MASTER_PRIORITY - BACKUP_PRIORITY + 1
        priorities = [n.priority for n in self.nodes] or [100]
        return max(priorities) - min(priorities) + 1

    def priority(self, instance: Instance, node: Node) -> int:
        """The node's priority in the instance: its own, or in active-active the instance's master's
        or a backup's (so each instance has the master the description names)."""
        if self.mode != "active-active":
            return node.priority
        return MASTER_PRIORITY if instance.master == node.name else BACKUP_PRIORITY

    def nat_ports_of(self, node: Node) -> tuple[int, int] | None:
        """The source NAT ports the node may use (None: nat_ports not set). Active-standby: all of
        them (one node forwards at a time); active-active: its share, by its place among the nodes,
        so that two nodes never pick the same binding for two different flows."""
        low, high = parse_ports(self.nat_ports) or (0, -1)
        if high < low:
            return None
        if self.mode != "active-active":
            return low, high
        index = [n.name for n in self.nodes].index(node.name)
        share = (high - low + 1) // len(self.nodes)
        first = low + index * share
        return first, (high if index == len(self.nodes) - 1 else first + share - 1)

    def peer_nat_ports(self, node: Node) -> str:
        """Active-active: the other nodes' shares of nat_ports, "LOW-HIGH,..." (apply.defer_udp_ports:
        a UDP packet to one of them is a reply to a peer's flow); "" otherwise."""
        if self.mode != "active-active":
            return ""
        shares = (self.nat_ports_of(peer) for peer in self.peers(node))
        return ",".join(f"{s[0]}-{s[1]}" for s in shares if s is not None)

    def own_addresses(self) -> list[str]:
        """Every node's interface addresses, as host prefixes (filter.ignore unless own_flows): a
        flow to or from one (keepalived's unicast VRRP, ssh to a node) exists only on that node,
        and written on another it is at best useless (with `ct original zone set` on the LAN, one
        could not be written at all, and every failover counted a failed commit)."""
        if self.own_flows:
            return []
        hosts = {str(i.address.ip): i.address.max_prefixlen for n in self.nodes for i in n.interfaces.values()}
        return [f"{ip}/{length}" for ip, length in sorted(hosts.items())]

    def vips(self) -> list[str]:
        """Every virtual address of the cluster's instances, without its prefix length."""
        return [str(v.ip) for inst in self.instances for v in inst.vips]

    def secret_path(self) -> str:
        """The cluster secret's file, relative paths taken from the description's directory."""
        if not self.secret or os.path.isabs(self.secret):
            return self.secret
        return os.path.join(os.path.dirname(os.path.abspath(self.path)), self.secret)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise ClusterError(f"{self.path}: no node {name!r} in this cluster; nodes are "
                           + ", ".join(n.name for n in self.nodes))

    def peers(self, node: Node) -> list[Node]:
        return [n for n in self.nodes if n is not node]

    def paths_for(self, node: Node) -> dict[str, str]:
        """The cluster's paths with {node} replaced: several nodes can share one host (a lab)."""
        return {k: v.replace("{node}", node.name) for k, v in self.paths.items()}


NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # what keepalived.conf and node ids take unquoted
IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")  # IFNAMSIZ - 1, include/uapi/linux/if.h
# [cluster] key -> (type, default); every value is checked against its type (bool is not an int)
CLUSTER_KEYS: dict[str, tuple[type, Any]] = {
    "name": (str, "cluster"), "key_file": (str, "/etc/ctbridge/sync.key"), "secret": (str, ""),
    "apply_mode": (str, "commit"),
    "transport": (str, "unicast"), "sync_group": (str, ""), "sync_link_groups": (list, []), "sync_port": (int, 3780),
    "notify": (str, "fifo"),
    "interlock": (bool, True), "maintenance": (bool, True), "gate": (bool, True), "vrrp_version": (int, 2),
    "group": (str, "G1"), "backend": (str, "ctbridge"), "table_size": (int, 0),
    "mode": (str, "active-standby"), "defer_queue": (int, 1), "nat_ports": (str, ""), "own_flows": (bool, False),
}
# The largest table_size render sizes for: the kernel's hash takes any size, but 2^26 buckets of 8
# bytes is half a GiB before a single flow; a larger table is a typo more likely than a plan
TABLE_SIZE_MAX = 1 << 26
_KIND = {str: "a string", int: "an integer", bool: "true or false", float: "a number", dict: "a table",
         list: "a list"}


class _Reader:
    """Typed access to the parsed TOML that collects problems instead of raising on the first."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[str] = []

    def value(self, where: str, table: dict[str, Any], key: str, kind: type, default: Any) -> Any:
        if key not in table:
            return default
        v = table[key]
        ok = isinstance(v, kind) and not (kind in (int, float) and isinstance(v, bool))
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            return float(v)
        if not ok:
            self.problems.append(f"{where}: {key} must be {_KIND[kind]}, not {v!r}")
            return default
        return v

    def name(self, where: str, value: str, example: str) -> bool:
        if not NAME.match(value):
            self.problems.append(f"{where}: name {value!r} must be letters, digits, '_', '.' or '-' "
                                 f"(it goes unquoted into keepalived.conf), e.g. {example!r}")
            return False
        return True

    def entry(self, kind: str, i: int, raw: dict[str, Any], keys: tuple[str, ...],
              example: str) -> tuple[str, str] | None:
        """A [[node]] or [[instance]] table's name and how messages name it; None without a name."""
        name = raw.get("name")
        where = f"{kind} {name!r}" if isinstance(name, str) else f"{kind} #{i + 1}"
        if not isinstance(name, str) or not name:
            self.problems.append(f"{where}: has no name; add name = \"{example}\"")
            return None
        self.name(where, name, example)
        for key in raw:
            if key not in keys:
                article = "an" if kind[0] in "aeiou" else "a"
                self.problems.append(f"{where}: unknown key {key!r}; {article} {kind} has " + ", ".join(keys))
        return name, where

    def tables(self, data: dict[str, Any], key: str) -> list[dict[str, Any]]:
        v = data.get(key, [])
        if not isinstance(v, list) or not all(isinstance(t, dict) for t in v):
            self.problems.append(f"{self.path}: {key} must be written [[{key}]] (an array of tables), "
                                 f"one per {key}")
            return []
        return v

    def table(self, data: dict[str, Any], key: str) -> dict[str, Any]:
        v = data.get(key, {})
        if not isinstance(v, dict):
            self.problems.append(f"{self.path}: {key} must be a table, written [{key}]")
            return {}
        return v

    def interface(self, where: str, value: Any) -> Interface | None:
        if not isinstance(value, dict) or not isinstance(value.get("name"), str) or "address" not in value:
            self.problems.append(f"{where}: write {{ name = \"IFNAME\", address = \"ADDRESS/PREFIX\" }}")
            return None
        if not IFNAME.match(value["name"]):
            self.problems.append(f"{where}: {value['name']!r} is not an interface name (at most 15 letters, "
                                 "digits, '_', '.', '-')")
            return None
        try:
            address = ipaddress.ip_interface(value["address"])
        except (ValueError, TypeError):
            self.problems.append(f"{where}: address {value['address']!r} is not ADDRESS/PREFIX, e.g. "
                                 "\"192.0.2.2/24\"")
            return None
        if "/" not in str(value["address"]):
            self.problems.append(f"{where}: address {value['address']!r} needs its prefix length, e.g. "
                                 f"\"{address.ip}/24\"")
            return None
        return Interface(value["name"], address)


def parse(text: str, path: str = "<cluster>") -> Cluster:
    """The description as typed values; shape errors raise ClusterError (all of them, one per line)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ClusterError(f"{path}: not valid TOML: {exc}") from None
    r = _Reader(path)
    for section in data:
        if section not in ("cluster", "node", "instance", "paths", "replication"):
            r.problems.append(f"{path}: unknown section [{section}]; sections are [cluster], [[node]], "
                              "[[instance]], [paths], [replication]")
    top = r.table(data, "cluster")
    for key in top:
        if key not in CLUSTER_KEYS:
            r.problems.append(f"{path}: [cluster] has no key {key!r}; keys are " + ", ".join(sorted(CLUSTER_KEYS)))
    settings = {key: r.value(f"{path}: [cluster]", top, key, kind, default)
                for key, (kind, default) in CLUSTER_KEYS.items()}
    r.name(f"{path}: [cluster] group", settings["group"], "G1")
    nodes: list[Node] = []
    for i, raw in enumerate(r.tables(data, "node")):
        named = r.entry("node", i, raw, ("name", "priority", "sync", "sync_links", "interfaces", "metrics"),
                        f"fw{i + 1}")
        if named is None:
            continue
        name, where = named
        sync = r.interface(f"{where}: sync", raw["sync"]) if "sync" in raw else None
        interfaces: dict[str, Interface] = {}
        for role, value in r.value(where, raw, "interfaces", dict, {}).items():
            iface = r.interface(f"{where}: interfaces.{role}", value)
            if iface is not None:
                interfaces[role] = iface
        priority = r.value(where, raw, "priority", int, 100)
        if not 1 <= priority <= 254:
            r.problems.append(f"{where}: priority {priority!r} must be 1-254 (255 is for the address owner)")
        links = []
        for k, value in enumerate(r.value(where, raw, "sync_links", list, [])):
            iface = r.interface(f"{where}: sync_links #{k + 1}", value)
            if iface is not None:
                links.append(iface)
        nodes.append(Node(name, priority, sync, interfaces, r.value(where, raw, "metrics", str, ""), tuple(links)))
    instances: list[Instance] = []
    for i, raw in enumerate(r.tables(data, "instance")):
        named = r.entry("instance", i, raw, ("name", "side", "virtual_router_id", "vips", "advert_int", "master"),
                        "LAN")
        if named is None:
            continue
        name, where = named
        vips: list[IPInterface] = []
        for vip in r.value(where, raw, "vips", list, []):
            try:
                vips.append(ipaddress.ip_interface(vip))
            except (ValueError, TypeError):
                r.problems.append(f"{where}: VIP {vip!r} is not ADDRESS/PREFIX")
        vrid = r.value(where, raw, "virtual_router_id", int, None)
        if vrid is None and "virtual_router_id" not in raw:
            r.problems.append(f"{where}: has no virtual_router_id; add one (1-255), unique on its link")
        elif vrid is not None and not 1 <= vrid <= 255:
            r.problems.append(f"{where}: virtual_router_id {vrid!r} must be 1-255")
        advert = r.value(where, raw, "advert_int", float, 1.0)
        if advert <= 0:
            r.problems.append(f"{where}: advert_int {advert!r} must be a positive number of seconds")
        instances.append(Instance(name, r.value(where, raw, "side", str, ""), vrid or 0, tuple(vips), advert,
                                  r.value(where, raw, "master", str, "")))
    paths = dict(DEFAULT_PATHS)
    for key, value in r.table(data, "paths").items():
        if key not in DEFAULT_PATHS:
            r.problems.append(f"{path}: [paths] has no key {key!r}; keys are " + ", ".join(DEFAULT_PATHS))
        elif not isinstance(value, str) or not value.startswith("/") or any(ch.isspace() for ch in value):
            r.problems.append(f"{path}: [paths] {key} = {value!r} must be an absolute path without spaces "
                              "(it goes into the systemd unit)")
        else:
            paths[key] = value
    replication = r.table(data, "replication")
    if r.problems:
        raise ClusterError("\n".join(r.problems))
    return Cluster(**settings, nodes=tuple(nodes), instances=tuple(instances), paths=paths, path=path,
                   replication=replication)


def load(path: str) -> Cluster:
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError as exc:
        raise ClusterError(f"{path}: cannot be read: {exc.strerror}") from None
    return parse(text, path)


def verify(c: Cluster) -> list[str]:
    """Every reason the cluster cannot work, each naming the object and the fix; [] when it can."""
    return _verify_cluster(c) + _verify_sync(c) + _verify_links(c) + _verify_instances(c)


def _verify_cluster(c: Cluster) -> list[str]:
    """The [cluster] table's own keys: priorities for the interlock, modes, ports, the backend."""
    p: list[str] = []
    if c.interlock and c.nodes and min(n.priority for n in c.nodes) < 2:
        p.append(f"cluster {c.name!r}: with the interlock, every priority must be at least 2 (a demoted node "
                 "clamps to 1, and would tie with a complete node of priority 1)")
    if c.interlock and c.nodes and c.demotion() > 253:
        p.append(f"cluster {c.name!r}: node priorities span {c.demotion() - 1}; the interlock needs them within 252 "
                 "of each other (an incomplete node is lowered below the lowest, and -254 would be FAULT)")
    for value, allowed, key in ((c.apply_mode, APPLY_MODES, "apply_mode"), (c.transport, TRANSPORTS, "transport"),
                                (c.notify, NOTIFY_MODES, "notify"), (c.backend, BACKENDS, "backend")):
        if value not in allowed:
            p.append(f"cluster {c.name!r}: {key} = {value!r}; use " + " or ".join(repr(a) for a in allowed))
    if c.vrrp_version not in (2, 3):
        p.append(f"cluster {c.name!r}: vrrp_version = {c.vrrp_version}; use 2 or 3")
    if not 1 <= c.sync_port <= 65535:
        p.append(f"cluster {c.name!r}: sync_port = {c.sync_port} is not a UDP port (1-65535)")
    if len(c.nodes) < 2:
        p.append(f"cluster {c.name!r}: has {len(c.nodes)} node(s); a cluster needs at least two [[node]] tables")
    if not 0 <= c.table_size <= TABLE_SIZE_MAX:
        p.append(f"cluster {c.name!r}: table_size = {c.table_size}; give the flows a node's table must hold, "
                 f"0-{TABLE_SIZE_MAX} (0: leave the kernel's sizing alone)")
    p += _verify_mode(c)
    p += selection.replication_problems(c.replication or {}, f"cluster {c.name!r}",
                                        c.defer_queue if c.mode == "active-active" else 0, c.backend)
    if c.backend == "conntrackd":
        if c.apply_mode != "commit":
            p.append(f"cluster {c.name!r}: backend = \"conntrackd\" commits on MASTER (conntrackd -c); set "
                     "apply_mode = \"commit\"")
        if c.transport == "unicast" and len(c.nodes) > 2:
            p.append(f"cluster {c.name!r}: conntrackd's UDP sync has one destination; with {len(c.nodes)} nodes use "
                     "transport = \"multicast\"")
        if any(n.sync_links for n in c.nodes):
            p.append(f"cluster {c.name!r}: backend = \"conntrackd\" renders the first sync link only; remove the "
                     "redundant ones (sync_links) or use backend = \"ctbridge\"")
    return p


def _verify_mode(c: Cluster) -> list[str]:
    """active-active: inject mode, ctbridge's own replication, each instance a master of its own."""
    p: list[str] = []
    if c.mode not in MODES:
        return [f"cluster {c.name!r}: mode = {c.mode!r}; use " + " or ".join(repr(m) for m in MODES)]
    if c.nat_ports and parse_ports(c.nat_ports) is None:
        p.append(f"cluster {c.name!r}: nat_ports = {c.nat_ports!r}; write \"LOW-HIGH\", e.g. \"1024-65535\"")
    if c.mode == "active-standby":
        p += [f"instance {i.name!r}: master is for mode = \"active-active\"; remove it"
              for i in c.instances if i.master]
        return p
    if c.apply_mode != "inject":
        p.append(f"cluster {c.name!r}: mode = \"active-active\" writes peers' flows as they arrive; set "
                 "apply_mode = \"inject\"")
    if c.backend != "ctbridge":
        p.append(f"cluster {c.name!r}: mode = \"active-active\" needs backend = \"ctbridge\" (the defer)")
    if not 1 <= c.defer_queue <= 65535:
        p.append(f"cluster {c.name!r}: defer_queue = {c.defer_queue} is not a netfilter queue (1-65535)")
    names = {n.name for n in c.nodes}
    for i in c.instances:
        if i.master not in names:
            p.append(f"instance {i.name!r}: active-active needs master = one of " + ", ".join(sorted(names)))
    if len({i.master for i in c.instances}) < 2:
        p.append(f"cluster {c.name!r}: active-active needs instances with different masters (one per node "
                 "that forwards), or ECMP routers in front: see docs/cluster.md")
    ports = parse_ports(c.nat_ports)
    if ports is not None and ports[1] - ports[0] + 1 < len(c.nodes):
        p.append(f"cluster {c.name!r}: nat_ports {c.nat_ports!r} has fewer ports than nodes")
    return p


def _verify_sync(c: Cluster) -> list[str]:
    """Node names, and the sync link: an address on it for every node, one family, unicast xor multicast."""
    p: list[str] = []
    names = [n.name for n in c.nodes]
    for name in sorted({n for n in names if names.count(n) > 1}):
        p.append(f"node {name!r}: the name is used twice; node names must be unique (they become node ids)")
    # the sync link: every node needs an address on it, all of one family, unicast xor multicast
    families = set()
    for n in c.nodes:
        if n.sync is None:
            p.append(f"node {n.name!r}: has no sync address; add "
                     "sync = { name = \"IFNAME\", address = \"ADDR/LEN\" }")
        else:
            families.add(n.sync.address.version)
    if len(families) > 1:
        p.append(f"cluster {c.name!r}: sync addresses mix IPv4 and IPv6; give every node a sync address of one family")
    if c.transport == "unicast" and c.sync_group:
        p.append(f"cluster {c.name!r}: transport is unicast but sync_group = {c.sync_group!r} is set (multicast); "
                 "remove sync_group or set transport = \"multicast\"")
    if c.transport == "multicast":
        try:
            group = ipaddress.ip_address(c.sync_group)
        except ValueError:
            p.append(f"cluster {c.name!r}: transport is multicast but sync_group = {c.sync_group!r} is not an "
                     "address; set sync_group, e.g. \"225.0.0.50\"")
        else:
            if not group.is_multicast:
                p.append(f"cluster {c.name!r}: sync_group {group} is not a multicast address")
            elif families and group.version not in families:
                p.append(f"cluster {c.name!r}: sync_group {group} and the sync addresses are of different families")
    seen_sync: dict[IPAddress, str] = {}
    for n in c.nodes:
        for link in [i for i in (n.sync, *n.sync_links) if i is not None]:
            if link.address.ip in seen_sync:
                other = seen_sync[link.address.ip]
                p.append(f"node {n.name!r}: sync address {link.address.ip} is also "
                         + ("on another of its sync links" if other == n.name else f"node {other!r}'s"))
            seen_sync[link.address.ip] = n.name
    return p


def _verify_instances(c: Cluster) -> list[str]:
    """The VRRP instances: names, VIPs of one family inside each node's subnet, ids unique per link."""
    p: list[str] = []
    vrids: dict[tuple[str, str, int, int], str] = {}
    inames = [i.name for i in c.instances]
    for name in sorted({n for n in inames if inames.count(n) > 1}):
        p.append(f"instance {name!r}: the name is used twice; instance names must be unique")
    if not c.instances:
        p.append(f"cluster {c.name!r}: has no [[instance]]; add one VRRP instance per side (e.g. LAN and WAN)")
    for inst in c.instances:
        where = f"instance {inst.name!r}"
        if not inst.vips:
            p.append(f"{where}: has no vips; add vips = [\"ADDRESS/PREFIX\"]")
            continue
        versions = {v.version for v in inst.vips}
        if len(versions) > 1:
            p.append(f"{where}: mixes IPv4 and IPv6 VIPs; VRRP carries one family per instance, make two instances")
            continue
        version = versions.pop()
        if c.vrrp_version == 2 and version == 6:
            p.append(f"{where}: IPv6 VIPs need VRRP version 3; set vrrp_version = 3 in [cluster]")
        if c.vrrp_version == 2 and inst.advert_int != int(inst.advert_int):
            p.append(f"{where}: advert_int {inst.advert_int} needs VRRP version 3 (version 2 counts whole seconds)")
        for n in c.nodes:
            iface = n.interfaces.get(inst.side)
            if iface is None:
                p.append(f"node {n.name!r}: has no interface for side {inst.side!r} of {where}; add "
                         f"interfaces.{inst.side} = {{ name = \"IFNAME\", address = \"ADDR/LEN\" }}")
                continue
            # a virtual router is named by (link, family, id): two instances of one family on the
            # same interface need different ids (RFC 5798 section 5.2.3)
            other = vrids.setdefault((n.name, iface.name, version, inst.virtual_router_id), inst.name)
            if other != inst.name:
                p.append(f"{where}: virtual_router_id {inst.virtual_router_id} is also instance {other!r}'s on "
                         f"node {n.name!r}'s {iface.name} (IPv{version}); give each instance on a link its own id "
                         "(1-255)")
            if iface.address.version != version:
                p.append(f"node {n.name!r}: interface {iface.name} has an IPv{iface.address.version} address but "
                         f"{where} has IPv{version} VIPs; VRRP adverts need a source of the VIPs' family")
                continue
            for vip in inst.vips:
                if vip.ip not in iface.address.network:
                    p.append(f"{where}: VIP {vip} is outside node {n.name!r}'s {iface.name} subnet "
                             f"{iface.address.network}; use a VIP in that subnet or fix the interface address")
                elif vip.ip == iface.address.ip:
                    p.append(f"{where}: VIP {vip.ip} is node {n.name!r}'s own address on {iface.name}; a VIP must "
                             "be an address no node owns")
    return p


MAX_SYNC_LINKS = 4  # ctbridge.config.settings.MAX_LINKS


def _verify_links(c: Cluster) -> list[str]:
    """Redundant sync links: every node has as many, each link of one family on every node, at
    most four links in all; multicast: one group per redundant link."""
    p: list[str] = []
    counts = {len(n.sync_links) for n in c.nodes}
    if len(counts) > 1:
        p.append(f"cluster {c.name!r}: nodes have different numbers of sync_links ("
                 + ", ".join(f"{n.name}: {len(n.sync_links)}" for n in c.nodes)
                 + "); give every node an address on every sync link")
        return p
    count = counts.pop() if counts else 0
    if count + 1 > MAX_SYNC_LINKS:
        p.append(f"cluster {c.name!r}: {count} sync_links per node; at most {MAX_SYNC_LINKS - 1} "
                 f"(a node has at most {MAX_SYNC_LINKS} sync links)")
    for k in range(count):
        families = {n.sync_links[k].address.version for n in c.nodes}
        if len(families) > 1:
            p.append(f"cluster {c.name!r}: sync_links #{k + 1} mixes IPv4 and IPv6 across nodes; "
                     "give every node an address of one family on it")
            continue
        first = c.nodes[0].sync_links[k]
        for n in c.nodes[1:]:
            if n.sync_links[k].address.ip not in first.address.network:
                p.append(f"node {n.name!r}: sync_links #{k + 1} address {n.sync_links[k].address.ip} is outside "
                         f"node {c.nodes[0].name!r}'s {first.address.network} on that link; the nodes' addresses "
                         "on one link share its subnet")
    for n in c.nodes:
        links = [i for i in (n.sync, *n.sync_links) if i is not None]
        names = [i.name for i in links]
        for name in sorted({x for x in names if names.count(x) > 1}):
            p.append(f"node {n.name!r}: interface {name} carries two sync links; each link needs its own "
                     "interface (the nftables table tells them apart by it)")
        for i, x in enumerate(links):
            for y in links[i + 1:]:
                if x.address.network.overlaps(y.address.network):  # type: ignore[arg-type,unused-ignore]
                    p.append(f"node {n.name!r}: sync links on {x.name} ({x.address.network}) and {y.name} "
                             f"({y.address.network}) overlap: the kernel would route both over one interface; "
                             "give each link a subnet of its own")
    groups = c.sync_link_groups
    if c.transport == "multicast":
        if len(groups) != count:
            p.append(f"cluster {c.name!r}: transport is multicast and nodes have {count} sync_links, but "
                     f"sync_link_groups lists {len(groups)} group(s); give one group per redundant link")
        for k, g in enumerate(groups):
            try:
                ip = ipaddress.ip_address(g)
            except ValueError:
                p.append(f"cluster {c.name!r}: sync_link_groups: {g!r} is not an address")
                continue
            if not ip.is_multicast:
                p.append(f"cluster {c.name!r}: sync_link_groups: {g} is not a multicast address")
            elif g == c.sync_group or groups.count(g) > 1:
                p.append(f"cluster {c.name!r}: sync_link_groups: {g} is used twice; each link has its own group")
            elif k < count and ip.version != c.nodes[0].sync_links[k].address.version:
                p.append(f"cluster {c.name!r}: sync_link_groups: {g} and sync_links #{k + 1} are of different "
                         "families")
    elif groups:
        p.append(f"cluster {c.name!r}: transport is unicast but sync_link_groups is set (multicast); remove it")
    return p


def checked(c: Cluster) -> Cluster:
    problems = verify(c)
    if problems:
        raise ClusterError("\n".join(f"{c.path}: {m}" for m in problems))
    return c

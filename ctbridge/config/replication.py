"""The configuration as the sync engine takes it: its settings (engine_config), the flow filter
with what is never replicated (flow_filter), what each peer may send (peer_filters), the cap on
a peer's copy (conntrack_max) and the seconds between refresh sweeps (refresh_interval).

What the daemon needs at start and on SIGHUP (only filters and keys change then). It imports
ctbridge.config.settings and ctbridge.sync (the engine's settings and filter types); the daemon
imports it.
"""

from __future__ import annotations

import ipaddress

from ctbridge.config import selection, settings
from ctbridge.config.settings import Config
from ctbridge.sync.engine import EngineConfig
from ctbridge.sync.filter import LOOPBACK, FlowFilter


def flow_filter(cfg: Config) -> FlowFilter:
    """The configured filter, plus what is never replicated: loopback and the sync addresses (of
    every sync link)."""
    sync = [a for link in cfg.sync_links() for a in (link.local, *link.peers)]
    ignore = (*LOOPBACK, *(ipaddress.ip_network(a) for a in sync),
              *(ipaddress.ip_network(c, strict=False) for c in cfg.filter.ignore))
    protos = frozenset(settings.PROTOCOLS.get(p, p) if isinstance(p, str) else p for p in cfg.filter.protocols)
    return FlowFilter(protocols=frozenset(int(p) for p in protos),
                      accept=tuple(ipaddress.ip_network(c, strict=False) for c in cfg.filter.accept),
                      ignore=ignore,
                      tcp_states=frozenset(settings.TCP_STATE_NUMBERS[s] for s in cfg.filter.tcp_states),
                      no_sync=selection.no_sync(cfg.filter))


def peer_filters(cfg: Config) -> dict[int, FlowFilter]:
    """filter.peer_accept as the engine takes it: node id -> what that peer may send (also
    within the filter's own accept and ignore lists, which the engine checks apart)."""
    nets: dict[int, list[ipaddress.IPv4Network | ipaddress.IPv6Network]] = {}
    for item in cfg.filter.peer_accept:
        name, cidr = item.split()
        nets.setdefault(settings.node_id(name), []).append(ipaddress.ip_network(cidr, strict=False))
    return {node: FlowFilter(accept=tuple(n), ignore=()) for node, n in nets.items()}


def conntrack_max() -> int:
    """The kernel's table size (nf_conntrack_max, in proc_sys_net_netfilter(5)'s nf_conntrack
    sysctls): a peer can never need more, so it caps each peer's copy; 0 if it cannot be read."""
    try:
        with open("/proc/sys/net/netfilter/nf_conntrack_max") as f:
            return max(0, int(f.read().strip()))
    except (OSError, ValueError):
        return 0


def refresh_interval(cfg: Config, shortest: float) -> float:
    """Seconds between sweeps: sync.refresh_interval, or a quarter of ``shortest`` (the shortest
    timeout traffic restarts), within 1-10 s."""
    if cfg.sync.refresh_interval > 0:
        return cfg.sync.refresh_interval
    return min(10.0, max(1.0, shortest / 4))


def engine_config(cfg: Config) -> EngineConfig:
    """The engine's settings; sync.max_flows 0 caps each peer's copy at this kernel's table size."""
    return EngineConfig(node_id=cfg.node_id, reliable=cfg.sync.mode == "reliable", apply_mode=cfg.apply.mode,
                        max_datagram=cfg.max_datagram(), alive_interval=cfg.sync.alive_interval,
                        peer_timeout=cfg.sync.peer_timeout, resend_limit=cfg.sync.resend_limit,
                        max_age=cfg.sync.max_age, filter=flow_filter(cfg), peer_filters=peer_filters(cfg),
                        max_entries=cfg.sync.max_flows or conntrack_max(), expiry_margin=cfg.sync.expiry_margin,
                        expectations=cfg.sync.expectations, delay=cfg.sync.delay,
                        delay_by_protocol=selection.delays(cfg.sync.delay_by_protocol), coalesce=cfg.sync.coalesce)

"""Facts about this host that a configuration depends on, and the state ctbridge keeps on it."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import time

from ctbridge import atomicfile
from ctbridge.config import keyfile
from ctbridge.config.settings import Config, ConfigError, load
from ctbridge.sync import wire


def socket_address(address: str, port: int) -> tuple[str, int] | tuple[str, int, int, int]:
    """What bind() and sendto() take for ``address``: an IPv6 link-local address with a scope
    ("fe80::1%sync0") needs the interface index in the 4-tuple (bind() refuses the "%" form)."""
    ip, _, scope = address.partition("%")
    if scope:
        try:
            index = socket.if_nametoindex(scope)
        except OSError:
            index = int(scope) if scope.isdigit() else 0
        return (ip, port, 0, index)
    return (address, port)


def _bind_problem(address: str, port: int) -> str | None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind(socket_address(address, port))
        except OSError as exc:
            return os.strerror(exc.errno or 0) if exc.errno else str(exc)
    return None


def addresses() -> list[str]:
    """This network namespace's addresses, from rtnetlink (pyroute2: the API used here is in
    Debian 12's 0.7.2 and in current releases alike)."""
    from pyroute2 import IPRoute  # type: ignore[import-untyped]
    with IPRoute() as ipr:
        return [str(msg.get_attr("IFA_ADDRESS")) for msg in ipr.get_addr()]


def interface_exists(name: str) -> bool:
    """In this network namespace (unlike /sys/class/net, which shows the namespace sysfs was
    mounted in)."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))


def problems(cfg: Config, daemon_running: bool = False) -> list[str]:
    """Why ``cfg`` cannot run on this host, one line each ("FILE: ..."); [] when it can."""
    out = []
    path = cfg.path
    for n, link in enumerate(cfg.sync_links()):
        key = "sync.local" if n == 0 else f"sync.links #{n} local"
        local = link.local
        problem = _bind_problem(local, 0)
        if problem is not None:
            mine = [a for a in addresses() if not a.startswith(("127.", "::1", "fe80:"))]
            out.append(f"{path}: {key} {local} is not an address of this host ({problem}); use the address "
                       "of this node's sync interface" + (f" (this host has {', '.join(mine[:8])})" if mine else ""))
        elif not daemon_running and not cfg.multicast and cfg.apply.backend == "ctbridge":
            # (with the conntrackd backend, conntrackd holds the port: ctbridge opens no sync socket)
            taken = _bind_problem(local, cfg.sync.port)
            if taken is not None:
                out.append(f"{path}: UDP port {cfg.sync.port} on {local} cannot be bound ({taken}); "
                           "is another ctbridge running? choose another sync.port")
        if link.group and not interface_exists(link.interface):
            out.append(f"{path}: the interface {link.interface} of {key.replace(' local', '')} does not exist "
                       "on this host")
    if cfg.sync.auth != "none" and cfg.sync.key_file:
        try:
            auth(cfg)
        except keyfile.KeyFileError as exc:
            out.append(f"{path}: {exc}")
    if cfg.apply.gate and cfg.apply.mode == "commit":
        why = None if shutil.which("nft") else "the commit gate needs nft(8): apt install nftables"
        if why is not None:
            out.append(f"{path}: apply.gate: {why}, or set gate = false")
    if cfg.apply.defer_queue:
        # the daemon would refuse to start (and be restarted in a loop): said here, where the
        # rendered unit's ExecStartPre runs `ctbridge check` first
        missing = [tool for tool in ("iptables", "ip6tables", "nft") if shutil.which(tool) is None]
        if missing:
            out.append(f"{path}: apply.defer_queue needs {', '.join(missing)} (the NFQUEUE rules and the defer's "
                       "nftables table): apt install iptables nftables, or set defer_queue = 0")
    fifo = cfg.keepalived.notify_fifo
    if fifo and os.path.lexists(fifo) and not stat.S_ISFIFO(os.stat(fifo).st_mode if os.path.exists(fifo) else 0):
        out.append(f"{path}: keepalived.notify_fifo {fifo} exists and is not a FIFO; remove it (ctbridge makes "
                   "the FIFO) or point notify_fifo at keepalived's notify_fifo")
    control_dir = os.path.dirname(cfg.control.socket) or "."
    if not os.path.isdir(control_dir) and not os.access(os.path.dirname(control_dir) or "/", os.W_OK):
        out.append(f"{path}: control.socket directory {control_dir} does not exist and cannot be created")
    return out


def auth(cfg: Config) -> wire.Auth:
    """The keys to sign with (key_file) and accept (also previous_key_file), for this node and
    cluster; KeyFileError, naming the file, for keys that are another node's or cluster's."""
    if cfg.sync.auth == "none":
        return wire.Auth([], "none")
    files = [("key_file", cfg.sync.key_file)]
    if cfg.sync.previous_key_file:
        files.append(("previous_key_file", cfg.sync.previous_key_file))
    sets = []
    cluster = cfg.sync.cluster
    for name, path in files:
        try:
            kf = keyfile.load(path, cfg.sync.auth)
        except keyfile.KeyFileError as exc:
            raise keyfile.KeyFileError(f"sync.{name}: {exc}") from None
        if kf.node and kf.node != cfg.node.name:
            raise keyfile.KeyFileError(f"sync.{name}: {path} holds the keys of node {kf.node}, and this node is "
                                       f"{cfg.node.name}; copy this node's own file (ctbridge render writes one per "
                                       "node)")
        if kf.cluster:
            if cluster and kf.cluster != cluster:
                raise keyfile.KeyFileError(f"sync.{name}: {path} was made for cluster {kf.cluster}, and sync.cluster "
                                           f"is {cluster}; render this cluster's keys")
            cluster = kf.cluster
        sets.append(kf.keys)
    try:
        return wire.Auth(sets, cfg.sync.auth, cluster=cluster, encrypt=cfg.sync.encrypt, node=cfg.node_id)
    except ValueError as exc:  # encryption without its package, or without this node's sealing key
        raise keyfile.KeyFileError(f"sync.encrypt: {exc}") from None


class EpochError(ConfigError):
    """The boot epoch cannot be kept: starting anyway could give peers a lower epoch than the last
    one they saw, and they would reject every datagram of this node as a replay."""


def next_epoch(state_dir: str) -> int:
    """This start's boot epoch: the time in ns, and at least one more than the last start's, so
    peers see a restart even if the clock went backwards. Kept in STATE_DIR/epoch; a file that
    cannot be read or written refuses the start (EpochError), it is never ignored."""
    path = os.path.join(state_dir, "epoch")
    last = 0
    text = ""
    try:
        with open(path) as f:
            text = f.read().strip()
        last = int(text or 0)
    except FileNotFoundError:
        pass
    except ValueError:
        raise EpochError(f"{path}: holds {text[:40]!r}, not an epoch; it is only ever written whole, so "
                         "something else wrote it: restore it or remove it (peers then accept this node "
                         "only once its clock is past its last epoch)") from None
    except OSError as exc:
        raise EpochError(f"{path}: cannot be read: {exc.strerror}") from None
    if not 0 <= last < 2**63:  # the wire carries a u64, and sequence wraps add one each
        raise EpochError(f"{path}: epoch {last} is out of range; restore the file or remove it")
    epoch = max(time.time_ns(), last + 1)
    save_epoch(state_dir, epoch)
    return epoch


def save_epoch(state_dir: str, epoch: int) -> None:
    """Keep ``epoch`` in STATE_DIR/epoch (at start, and when the sequence space wraps)."""
    path = os.path.join(state_dir, "epoch")
    try:
        os.makedirs(state_dir, mode=0o750, exist_ok=True)
        atomicfile.write(path, f"{epoch}\n")
    except OSError as exc:
        raise EpochError(f"{path}: cannot be written ({exc.strerror}); node.state_dir must be a writable "
                         "directory that survives restarts (a read-only or missing one would let this node "
                         "start with an epoch its peers reject)") from None


def check(path: str) -> list[str]:
    """What `ctbridge check` reports: every problem of the file, then of this host for it; [] when
    it can run here."""
    try:
        cfg = load(path)
    except ConfigError as exc:
        return exc.problems
    return problems(cfg)

"""`ctbridge render`: a node's files from the cluster description, through the jinja2 templates.

load -> verify (pure, ctbridge.config.cluster) -> render (this module: strings only) -> write (atomic:
a temporary file in the same directory, fsync, rename), so keepalived or systemd never read half
a file, and a failed render leaves the previous files as they were.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2

from ctbridge import atomicfile
from ctbridge.config import keyfile, resources
from ctbridge.config.cluster import Cluster, Node

# template -> the file it becomes
FILES = {
    "keepalived.conf.j2": "keepalived.conf",
    "ctbridge.toml.j2": "ctbridge.toml",
    "ctbridge-sync.nft.j2": "ctbridge-sync.nft",
    "ctbridge.service.j2": "ctbridge.service",
}


def template_dir() -> Path:
    return resources.template_dir()


def _toml(value: object) -> str:
    """A TOML basic string (JSON's escaping is a subset TOML accepts for strings)."""
    return json.dumps(str(value))


def _nftstr(value: object) -> str:
    return '"' + str(value).replace('"', "") + '"'


def _advert(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"


def environment(directory: Path | None = None) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(directory or template_dir())),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True, autoescape=False)
    env.filters.update(toml=_toml, tomlvalue=json.dumps, nftstr=_nftstr, advert=_advert)
    return env


KEY_FILE = "sync.key"  # the node's pairwise keys, beside the rendered files (mode 0600)
CONNTRACKD_FILE = "conntrackd.conf"  # backend = "conntrackd": its configuration, beside ctbridge.toml
# nat_ports: the node's source NAT ports, a define for the operator's ruleset
NAT_FILE = "ctbridge-nat.nft"
# table_size: the conntrack table's limit and hash, for /etc/sysctl.d/ and /etc/modprobe.d/
SIZING_FILES = {"ctbridge-sysctl.conf.j2": "ctbridge-sysctl.conf",
                "ctbridge-modprobe.conf.j2": "ctbridge-modprobe.conf"}


def render(cluster: Cluster, node: Node, directory: Path | None = None, secret: bytes | None = None
           ) -> dict[str, str]:
    """File name -> content for one node; the cluster must have passed verify(). With the cluster
    ``secret``, also the node's pairwise keys (KEY_FILE), derived from it: the same every time."""
    env = environment(directory)
    context = {"cluster": cluster, "node": node, "peers": cluster.peers(node), "paths": cluster.paths_for(node)}
    files = {out: env.get_template(tpl).render(context) for tpl, out in FILES.items()}
    if cluster.backend == "conntrackd":
        files[CONNTRACKD_FILE] = env.get_template("conntrackd.conf.j2").render(context)
    if cluster.nat_ports:
        files[NAT_FILE] = env.get_template("ctbridge-nat.nft.j2").render(context)
    if cluster.table_size:
        files.update((out, env.get_template(tpl).render(context)) for tpl, out in SIZING_FILES.items())
    if secret is not None:
        files[KEY_FILE] = keyfile.pairwise_text(secret, cluster.name, node.name, [n.name for n in cluster.peers(node)])
    return files


def write_atomic(path: Path, content: str, mode: int = 0o644) -> bool:
    """Replace ``path`` with ``content`` in one rename; False (and no write) if it is unchanged."""
    try:
        if path.read_text() == content:
            return False
    except OSError:
        pass
    atomicfile.write(path, content, mode)
    return True


def write(files: dict[str, str], out: Path) -> list[str]:
    """Write every file into ``out`` (created if missing); the names of those that changed. Keys
    are written readable by their owner only."""
    out.mkdir(parents=True, exist_ok=True)
    return [name for name, content in files.items()
            if write_atomic(out / name, content, 0o600 if name == KEY_FILE else 0o644)]

"""Render one node's keepalived.conf, ctbridge.toml, nftables snippet and systemd unit from a cluster description."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ctbridge.config import cluster, keyfile, render


def setargs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cluster", required=True, metavar="CLUSTER.toml", help="the cluster description")
    parser.add_argument("--node", required=True, metavar="NAME", help="the node to render for")
    parser.add_argument("--out", required=True, metavar="DIR", type=Path, help="where the files go (created)")
    parser.add_argument("--templates", type=Path, default=None, metavar="DIR",
                        help=f"template directory (default: {render.template_dir()})")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        c = cluster.checked(cluster.load(args.cluster))
        node = c.node(args.node)
    except cluster.ClusterError as exc:
        for line in str(exc).splitlines():
            print(f"ctbridge render: {line}", file=sys.stderr)
        return 1
    secret = None
    if c.secret:
        try:
            secret = keyfile.read_secret(c.secret_path())
        except keyfile.KeyFileError as exc:
            print(f"ctbridge render: [cluster] secret: {exc}", file=sys.stderr)
            return 1
    files = render.render(c, node, args.templates, secret)
    changed = render.write(files, args.out)
    for name in files:
        print(f"{args.out / name}: {'written' if name in changed else 'unchanged'}")
    return 0

"""Write a new random sync key (mode 0600) for the cluster."""

from __future__ import annotations

import argparse

from ctbridge.config import keyfile


def setargs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="where to write the key, e.g. /etc/ctbridge/sync.key")
    parser.add_argument("--force", action="store_true", help="replace an existing key file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    keyfile.generate(args.file, force=args.force)
    print(f"wrote a new {keyfile.KEY_BYTES * 8}-bit key to {args.file} (mode 0600); copy it to every node")
    return 0

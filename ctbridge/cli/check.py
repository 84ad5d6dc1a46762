"""Check a configuration file (and this host: addresses, key files, port) without running."""

from __future__ import annotations

import argparse
import sys

from ctbridge.config import host, sizing
from ctbridge.config import settings as config


def setargs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default=config.DEFAULT_PATH, help="configuration file")
    parser.add_argument("--no-host", action="store_true",
                        help="check the file only, not this host (for configs of other nodes)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.no_host:
        try:
            config.load(args.config)
            problems = []
        except config.ConfigError as exc:
            problems = exc.problems
    else:
        problems = host.check(args.config)
        # a warning, not a problem: the daemon runs, but a large table will be slow (sizing.py)
        warning = sizing.host_warning()
        if warning is not None:
            print(f"{args.config}: warning: {warning}", file=sys.stderr)
    for p in problems:
        print(p, file=sys.stderr)
    if not problems:
        print(f"{args.config}: ok")
    return 1 if problems else 0

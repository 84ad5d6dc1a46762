"""Run the daemon in the foreground (logs to stderr; systemd Type=notify aware)."""

from __future__ import annotations

import argparse

from ctbridge.config import settings as config
from ctbridge.daemon import service as daemon


def setargs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default=config.DEFAULT_PATH, help="configuration file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return daemon.main(args.config)

"""Subcommands that ask the running daemon over its control socket."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from ctbridge.config import settings as config
from ctbridge.daemon import control

NOTIFY_TIMEOUT = 60.0  # a commit of a large table takes about a second; keepalived waits for nobody


def _socket(args: argparse.Namespace) -> str:
    return config.load(args.config).control.socket


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default=config.DEFAULT_PATH, help="configuration file")


def _print(answer: dict[str, Any], as_json: bool) -> None:
    answer.pop("ok", None)
    if as_json:
        json.dump(answer, sys.stdout, separators=(",", ":"))
        sys.stdout.write("\n")
        return
    for key, value in answer.items():
        print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")


class Simple:
    """A command that sends one request and prints the answer."""

    def __init__(self, cmd: str, json_flag: bool = False) -> None:
        self.cmd = cmd
        self.json_flag = json_flag

    def setargs(self, parser: argparse.ArgumentParser) -> None:
        _common(parser)
        if self.json_flag:
            parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.set_defaults(func=self.run)

    def run(self, args: argparse.Namespace) -> int:
        _print(control.request(_socket(args), self.cmd), getattr(args, "json", False))
        return 0


class Flush:
    """Drop the internal and/or external cache (the kernel table is not touched)."""

    def setargs(self, parser: argparse.ArgumentParser) -> None:
        _common(parser)
        parser.add_argument("which", nargs="?", choices=["internal", "external"], help="one cache (default: both)")
        parser.set_defaults(func=self.run)

    def run(self, args: argparse.Namespace) -> int:
        _print(control.request(_socket(args), "flush", which=args.which or "both"), False)
        return 0


class Dump:
    """List the internal cache (this node's flows) or the external cache (the peers')."""

    def setargs(self, parser: argparse.ArgumentParser) -> None:
        _common(parser)
        parser.add_argument("which", choices=["internal", "external"])
        parser.add_argument("--json", action="store_true", help="one JSON array of entry objects")
        parser.set_defaults(func=self.run)

    def run(self, args: argparse.Namespace) -> int:
        # the daemon formats the listing and streams it; this only copies its bytes out
        sys.stdout.flush()
        answer = control.stream(_socket(args), "dump", sys.stdout.buffer, timeout=120, which=args.which,
                                format="json" if args.json else "text")
        if "entries" in answer and not answer.get("stream") and isinstance(answer["entries"], list):
            # a daemon from before streamed listings answers with the entries' views in one line
            from ctbridge.conntrack.listing import format_line
            if args.json:
                json.dump(answer["entries"], sys.stdout, separators=(",", ":"))
                sys.stdout.write("\n")
            else:
                sys.stdout.writelines(format_line(v) + "\n" for v in answer["entries"])
        sys.stdout.flush()
        return 0


class Notify:
    """A keepalived transition: `notify INSTANCE|GROUP NAME STATE PRIO` or `notify STATE`."""

    def setargs(self, parser: argparse.ArgumentParser) -> None:
        _common(parser)
        parser.add_argument("--timeout", type=float, default=NOTIFY_TIMEOUT, help="seconds to wait for the daemon")
        parser.add_argument("args", nargs="+", metavar="ARG", help="what keepalived passed to its notify script")
        parser.set_defaults(func=self.run)

    def run(self, args: argparse.Namespace) -> int:
        answer = control.request(_socket(args), "notify", timeout=args.timeout, args=args.args)
        logging.getLogger("ctbridge").debug("notify answer: %s", answer)
        _print(answer, False)
        return 0


COMMANDS: dict[str, Any] = {
    # their one-line help is in ctbridge.cli.HELP
    "status": Simple("status", json_flag=True),
    "stats": Simple("stats", json_flag=True),
    "commit": Simple("commit"),
    "flush": Flush(),
    "resync": Simple("resync"),
    "bulk-send": Simple("bulk-send"),
    "dump": Dump(),
    "notify": Notify(),
}

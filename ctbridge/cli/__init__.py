"""Command line: ``ctbridge SUBCOMMAND ...``. One module per subcommand group, each with
``setargs(parser)`` to declare its arguments and ``cmdline(args)`` to run."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

from ctbridge import __version__
from ctbridge.daemon import control

# command -> the module that implements it. Only the chosen command's module is imported: the
# keepalived hook runs `ctbridge notify` at every transition, and importing every subcommand (the
# kernel adapter, the daemon, jinja2) tripled its start-up time.
MODULES: dict[str, str] = {"run": "ctbridge.cli.run", "check": "ctbridge.cli.check",
                           **{name: "ctbridge.cli.control" for name in control.COMMANDS},
                           "kernel": "ctbridge.cli.kernel", "keygen": "ctbridge.cli.keygen",
                           "render": "ctbridge.cli.render"}
HELP = {
    "run": "Run the daemon (normally started by systemd).",
    "check": "Check a configuration file (and this host) without running.",
    **control.COMMANDS,
    "kernel": "Read this host's conntrack table directly (dump, count).",
    "keygen": "Write a new pre-shared sync key file (mode 0600).",
    "render": "Render a node's keepalived.conf, ctbridge.toml, nftables snippet and unit from a cluster file.",
}


def _command(module: Any, name: str) -> Any:
    commands = getattr(module, "COMMANDS", None)
    return commands[name] if commands is not None else module


def parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser, with arguments only for the command named in ``argv`` (all of them if none)."""
    chosen = next((a for a in argv if not a.startswith("-")), None)
    p = argparse.ArgumentParser(prog="ctbridge", description="conntrack replication for HA firewalls")
    p.add_argument("--version", action="version", version=f"ctbridge {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name in MODULES.items():
        sp = sub.add_parser(name, help=HELP[name])
        if chosen is None or chosen == name:
            _command(importlib.import_module(module_name), name).setargs(sp)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    # Other libraries' debug chatter (pyroute2, and asyncio, which pyroute2 0.9 starts) is not
    # ctbridge's to show, even at log.level = "debug". A filter on the handler, because pyroute2
    # resets its loggers' levels when it opens a socket.
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda r: r.levelno >= logging.WARNING or r.name.split(".")[0] == "ctbridge")
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        return 0
    except Exception as exc:  # one line for people, the traceback only when asked for
        if args.debug:
            raise
        for line in str(exc).splitlines() or [type(exc).__name__]:  # a configuration may have several problems
            print(f"ctbridge: {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

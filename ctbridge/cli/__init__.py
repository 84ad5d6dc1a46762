"""Command line: ``ctbridge SUBCOMMAND ...``. One module per subcommand group, each with
``setargs(parser)`` to declare its arguments and ``cmdline(args)`` to run."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from ctbridge import __version__
from ctbridge.cli import check as check_cmd
from ctbridge.cli import control as control_cmd
from ctbridge.cli import kernel as kernel_cmd
from ctbridge.cli import keygen as keygen_cmd
from ctbridge.cli import render as render_cmd
from ctbridge.cli import run as run_cmd

COMMANDS: dict[str, Any] = {"run": run_cmd, "check": check_cmd, **control_cmd.COMMANDS, "kernel": kernel_cmd,
                            "keygen": keygen_cmd, "render": render_cmd}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctbridge", description="conntrack replication for HA firewalls")
    p.add_argument("--version", action="version", version=f"ctbridge {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module in COMMANDS.items():
        module.setargs(sub.add_parser(name, help=module.__doc__.splitlines()[0] if module.__doc__ else None))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        return 0
    except Exception as exc:  # one line for people, the traceback only when asked for
        if args.debug:
            raise
        print(f"ctbridge: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""Read this node's kernel conntrack table (dump, count)."""

from __future__ import annotations

import argparse
import sys

from ctbridge.conntrack.listing import Listing
from ctbridge.conntrack.table import KernelTable, explain


def setargs(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="kernel_command", metavar="ACTION")
    sub.required = True
    dump = sub.add_parser("dump", help="list every entry of this namespace's conntrack table")
    dump.add_argument("--json", action="store_true", help="print one JSON array of entry objects")
    dump.set_defaults(func=run_dump)
    count = sub.add_parser("count", help="print how many entries the table holds")
    count.set_defaults(func=run_count)


def run_dump(args: argparse.Namespace) -> int:
    """Streamed: each receive buffer of the dump is formatted and written before the next is read."""
    listing = Listing("json" if args.json else "text")
    out = sys.stdout
    sep = ""
    with KernelTable() as table:
        if args.json:
            out.write("[")
        for buf, seq in table.dump_buffers():
            lines, done, errno = listing.kernel(buf, seq)
            if lines:
                if args.json:
                    out.write(sep + ",".join(lines))
                    sep = ","
                else:
                    out.write("\n".join(lines) + "\n")
            if errno:
                raise explain(errno, "conntrack dump")
            if done:
                break
        if args.json:
            out.write("]\n")
    return 0


def run_count(args: argparse.Namespace) -> int:
    with KernelTable() as table:
        print(table.count())
    return 0

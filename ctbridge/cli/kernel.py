"""Read this node's kernel conntrack table (dump, count)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ctbridge.kernel import KernelTable
from ctbridge.view import entry_view


def setargs(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="kernel_command", metavar="ACTION")
    sub.required = True
    dump = sub.add_parser("dump", help="list every entry of this namespace's conntrack table")
    dump.add_argument("--json", action="store_true", help="print one JSON array of entry objects")
    dump.set_defaults(func=run_dump)
    count = sub.add_parser("count", help="print how many entries the table holds")
    count.set_defaults(func=run_count)


def format_line(v: dict[str, Any]) -> str:
    """One entry in the spirit of ``conntrack -L``: original tuple, then reply tuple."""
    def side(prefix: str) -> str:
        words = [f"src={v.get(prefix + 'src')}", f"dst={v.get(prefix + 'dst')}"]
        for k in ("sport", "dport", "type", "code", "id"):
            if prefix + k in v:
                words.append(f"{k}={v[prefix + k]}")
        return " ".join(words)
    head = [v["family"], v["proto"] or "?", str(v.get("timeout", "-"))]
    if "tcp_state" in v:
        head.append(v["tcp_state"])
    tail = [f"mark={v['mark']}"]
    if v["zone"]:
        tail.append(f"zone={v['zone']}")
    if v["status"]:
        tail.append("status=" + ",".join(v["status"]))
    return " ".join([*head, side(""), side("reply_"), *tail])


def run_dump(args: argparse.Namespace) -> int:
    with KernelTable() as table:
        entries = table.dump()
    out = sys.stdout
    if args.json:
        json.dump([entry_view(e) for e in entries], out, separators=(",", ":"))
        out.write("\n")
    else:
        for e in entries:
            out.write(format_line(entry_view(e)) + "\n")
    return 0


def run_count(args: argparse.Namespace) -> int:
    with KernelTable() as table:
        print(table.count())
    return 0

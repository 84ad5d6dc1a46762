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


_TUPLE_WORDS = ("src", "dst", "sport", "dport", "type", "code", "id", "srckey", "dstkey")
_FAMILY_NUMBERS = {"ipv4": 2, "ipv6": 10}


def format_line(v: dict[str, Any]) -> str:
    """One entry the way `conntrack -L -o extended` prints it, so the two can be read side by side."""
    def side(prefix: str) -> list[str]:
        words = []
        for k in _TUPLE_WORDS:
            if prefix + k in v:
                value = v[prefix + k]
                words.append(f"{k}={value:#x}" if k in ("srckey", "dstkey") else f"{k}={value}")
        return words
    words = [f"{v['family']:<8} {_FAMILY_NUMBERS.get(v['family'], 0)} {v['proto'] or '?':<8} {v['protonum']}",
             str(v.get("timeout", 0))]
    state = v.get("tcp_state") or v.get("sctp_state") or v.get("dccp_state")
    if state:
        words.append(state)
    words += side("")
    if "SEEN_REPLY" not in v["status"]:
        words.append("[UNREPLIED]")
    words += side("reply_")
    for flag in ("ASSURED", "OFFLOAD", "HW_OFFLOAD"):
        if flag in v["status"]:
            words.append(f"[{flag}]")
    words.append(f"mark={v['mark']}")
    if v.get("secmark"):
        words.append(f"secmark={v['secmark']}")
    if v["zone"]:
        words.append(f"zone={v['zone']}")
    if "zone_orig" in v:
        words.append(f"zone-orig={v['zone_orig']}")
    if "zone_reply" in v:
        words.append(f"zone-reply={v['zone_reply']}")
    if "helper" in v:
        words.append(f"helper={v['helper']}")
    if "use" in v:  # the kernel's reference count; caches do not carry it
        words.append(f"use={v['use']}")
    return " ".join(words)


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

"""Subcommands that ask the running daemon over its control socket."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from ctbridge.config import settings as config
from ctbridge.daemon import control

# `commit` and `notify` wait while the daemon reports progress, and give up only when it has made
# none for this long: a commit of 1M flows takes minutes, yet each second writes thousands
NOTIFY_TIMEOUT = 60.0


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


class Waiting:
    """A command that may run long (a commit): it waits while the daemon reports progress (shown
    on a terminal) and fails, saying where it stood, only once that stops for ``--stall`` s."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def setargs(self, parser: argparse.ArgumentParser) -> None:
        _common(parser)
        _stall(parser)
        parser.set_defaults(func=self.run)

    def run(self, args: argparse.Namespace) -> int:
        _print(control.request(_socket(args), self.cmd, stall=args.stall, on_progress=_show_progress), False)
        return 0


def _stall(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stall", "--timeout", dest="stall", type=float, default=NOTIFY_TIMEOUT, metavar="SECONDS",
                        help="fail when the daemon makes no progress for this long (default %(default)s; no bound "
                             "while it progresses)")


def _show_progress(report: dict[str, Any]) -> None:
    if sys.stderr.isatty():
        print(control.describe_progress(report), file=sys.stderr, flush=True)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.1f} s ago"
    return f"{seconds / 60:.0f} min ago" if seconds < 7200 else f"{seconds / 3600:.0f} h ago"


def _yes(value: Any) -> str:
    return "yes" if value else "no"


def format_status(st: dict[str, Any], now: float) -> str:
    """`ctbridge status` for people: the node, its caches, its peers (a table), its queues, the
    last commit and the gate. ``now``: wall time, for the commit's age."""
    internal, external = st.get("internal", {}), st.get("external", {})
    exp = st.get("expectations", {})
    inter = st.get("interlock", {})
    lines = [f"node      {st.get('node', '?')} ({st.get('node_id', '?')})   role {st.get('role', '?')}   "
             f"apply {st.get('apply_mode', '?')}   gate {st.get('gate') or 'not used'}"]
    backend = st.get("backend", {})
    if backend.get("name") == "conntrackd":
        steps = backend.get("steps") or []
        last = steps[-1] if steps else None
        lines.append("backend   conntrackd, " + ("answers" if backend.get("alive") else "DOES NOT ANSWER")
                     + f"; {backend.get('failures', 0)} steps failed"
                     + (f"; last step {last['flag']} {'ok' if last['ok'] else 'FAILED: ' + str(last.get('error'))}"
                        if last else ""))
    lines.append(f"internal  {internal.get('entries', 0)} entries (this node's flows"
                 + (f", {exp.get('internal', 0)} of them expectations" if exp.get("enabled") else "") + ")")
    lines.append(f"external  {external.get('entries', 0)} entries (the peers'), "
                 f"{'complete' if external.get('complete') else 'INCOMPLETE'}"
                 + (f"; interlock {'may take over' if inter.get('may_take_over') else 'holds it back'}"
                    if inter.get("value") is not None else ""))
    peers = st.get("peers", [])
    if peers:
        rows = [("PEER", "ADDRESS", "ALIVE", "SYNCED", "PROVEN", "LAST HEARD", "FLOWS", "REFUSED", "REJECTED", "GAP",
                 "PROTOCOL")]
        for p in peers:
            rejected = sum(p.get("rejected", {}).values())
            gap = p.get("gap")
            rows.append((str(p.get("node")), str(p.get("address") or "-"), _yes(p.get("alive")), _yes(p.get("synced")),
                         _yes(p.get("proven")), _ago(p.get("last_heard")), str(p.get("entries", 0)),
                         str(p.get("refused_total", p.get("refused", 0))), str(rejected),
                         f"{gap[0]}-{gap[1]}" if gap else "-", str(p.get("protocol", "-"))))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines.append("peers")
        lines.extend("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
    else:
        lines.append("peers     none heard yet")
    loop = st.get("loop")
    if loop:
        lines.append(f"loop      longest stall {loop.get('recent_longest_stall_seconds', 0):.3f} s in the last "
                     f"{loop.get('recent_seconds', 60):.0f} s ({loop.get('longest_stall_seconds', 0):.3f} s "
                     "since the start)")
    q = st.get("queues", {})
    if q:
        lines.append("queues    " + ", ".join(f"{k} {v}" for k, v in q.items()))
    c = st.get("commit", {})
    if c.get("at"):
        lines.append(f"commit    {c.get('entries', 0)} flows in {c.get('seconds', 0):.3f} s, {c.get('failed', 0)} "
                     f"failed, {_ago(now - c['at'])}")
    else:
        lines.append("commit    none since the start")
    return "\n".join(lines)


class Status:
    """The node at a glance (a table of its peers); --json for machines."""

    def setargs(self, parser: argparse.ArgumentParser) -> None:
        _common(parser)
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.set_defaults(func=self.run)

    def run(self, args: argparse.Namespace) -> int:
        answer = control.request(_socket(args), "status")
        if args.json:
            _print(answer, True)
        else:
            import time
            answer.pop("ok", None)
            print(format_status(answer, time.time()))
        return 0


def format_diff(answer: dict[str, Any]) -> str:
    """`ctbridge diff` for people: a line per peer, then the flows that differ."""
    lines = []
    for p in answer.get("peers", []):
        if not p.get("answered"):
            lines.append(f"peer {p['peer']}: no answer within the time allowed")
            continue
        if p["equal"]:
            lines.append(f"peer {p['peer']}: equal ({p['theirs']} flows)")
            continue
        lines.append(f"peer {p['peer']}: {len(p['missing'])} missing here, {len(p['extra'])} extra here, "
                     f"{len(p['stale'])} in another state (the peer has {p['theirs']} flows, this node's copy "
                     f"{p['ours']})" + (f"; {p['refused']} of the missing refused by this node's filters"
                                        if p.get("refused") else "")
                     + ("; more differ than were listed" if p.get("truncated") else ""))
        for what, label in (("missing", "missing"), ("extra", "extra"), ("stale", "stale")):
            lines.extend(f"  {label:<8} {line}" for line in p[what])
    return "\n".join(lines)


class Diff:
    """Compare this node's copies with the peers' own tables; exit 0 only when every one is equal
    (changes in flight show as differences: run it again to tell them from real ones)."""

    def setargs(self, parser: argparse.ArgumentParser) -> None:
        _common(parser)
        parser.add_argument("--peer", metavar="NODE", help="only this peer (its node id, as status shows it)")
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.set_defaults(func=self.run)

    def run(self, args: argparse.Namespace) -> int:
        kw = {"peer": args.peer} if args.peer else {}
        answer = control.request(_socket(args), "diff", timeout=60, **kw)
        equal = bool(answer.get("equal"))
        if args.json:
            _print(answer, True)
        else:
            print(format_diff(answer))
        return 0 if equal else 1


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
        _stall(parser)
        parser.add_argument("args", nargs="+", metavar="ARG", help="what keepalived passed to its notify script")
        parser.set_defaults(func=self.run)

    def run(self, args: argparse.Namespace) -> int:
        answer = control.request(_socket(args), "notify", stall=args.stall, on_progress=_show_progress,
                                 args=args.args)
        logging.getLogger("ctbridge").debug("notify answer: %s", answer)
        _print(answer, False)
        return 0


COMMANDS: dict[str, Any] = {
    # their one-line help is in ctbridge.cli.HELP
    "status": Status(),
    "stats": Simple("stats", json_flag=True),
    "commit": Waiting("commit"),
    "flush": Flush(),
    "resync": Simple("resync"),
    "bulk-send": Simple("bulk-send"),
    "rebuild": Simple("rebuild"),
    "diff": Diff(),
    "dump": Dump(),
    "notify": Notify(),
}

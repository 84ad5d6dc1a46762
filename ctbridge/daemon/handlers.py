"""The daemon's answers to control requests: one handler per command of
ctbridge.daemon.control.COMMANDS, dispatched through a table (``Handlers.table``).

Every request is answered (control.serve writes the answer; a ValueError a handler raises
becomes "bad request: ...", any other error its message); `dump` answers with a stream, written
in chunks so the sync link and kernel events are served while a large cache is listed.

Imports ctbridge.conntrack (listing lines), ctbridge.sync (the engine, the FLOW message's
layout) and the daemon's control, keepalived, kernelio, stats (STATUS_KEYS) and transitions;
service wires it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from ctbridge.conntrack.abi import CTA_TUPLE_ORIG
from ctbridge.conntrack.codec import CodecError, Entry, attr
from ctbridge.conntrack.expectation import is_expectation
from ctbridge.conntrack.listing import Listing, format_line
from ctbridge.conntrack.view import entry_view
from ctbridge.daemon import control, keepalived
from ctbridge.daemon.kernelio import KernelReader
from ctbridge.daemon.stats import STATUS_KEYS
from ctbridge.daemon.transitions import Transitions
from ctbridge.sync import wire
from ctbridge.sync.engine import Engine

LISTING_CHUNK = 2000  # entries formatted between two writes to a listing's client (about 0.4 MB)
DIFF_TIMEOUT = 10.0  # seconds `ctbridge diff` waits for the peers' answers
DIFF_RETRY = 1.2  # ... asking again this often (a peer answers one question for its sums a second)

async def listing(flows: list[tuple[bytes, bytes]], form: str) -> AsyncIterator[bytes]:
    """A cache's listing in chunks, exactly the bytes `ctbridge dump` prints. The event loop runs
    between chunks (each is written out before the next is made), so sync and kernel events go on
    while a large cache is listed. ``flows`` is the snapshot of (key, FLOW message) taken when the
    listing was asked; the formatter reads each message where it lies, copying nothing."""
    lister = Listing(form)
    one = lister.one
    head = wire.FLOW_HEADER
    text = form == "text"
    for i in range(0, max(len(flows), 1), LISTING_CHUNK):
        # a FLOW message: its family at byte 1, the kernel's attributes after its head; the zone
        # is the flow key's (bytes 1-2 of the key)
        lines = [one(msg[1], msg, head, len(msg), (key[1] << 8) | key[2]) for key, msg in flows[i:i + LISTING_CHUNK]]
        if text:
            yield ("\n".join(lines) + "\n").encode() if lines else b""
        else:
            last = i + LISTING_CHUNK >= len(flows)
            yield (("[" if i == 0 else ",") + ",".join(lines) + ("]\n" if last else "")).encode()
        await asyncio.sleep(0)


def describe(key: bytes, msg: bytes | None) -> str:
    """A flow (or expectation) as a listing line: as our copy has it, or from its key alone."""
    if msg is not None:
        entry = wire.flow_entry(key, msg)
        if is_expectation(key):  # its tuple is what names it
            entry = Entry(key, entry.family, attr(CTA_TUPLE_ORIG, key[3:], nested=True))
    else:
        entry = Entry(key, key[0] & 0x7F, attr(CTA_TUPLE_ORIG, key[3:], nested=True))
    try:
        line = format_line(entry_view(entry))
    except (CodecError, ValueError, IndexError, KeyError) as exc:  # a peer's key is a peer's bytes
        line = f"(a key that does not read: {exc or type(exc).__name__})"
    return ("expectation " + line) if is_expectation(key) else line


class Handlers:
    """The control commands of one daemon. ``stats`` makes `ctbridge stats`' answer."""

    def __init__(self, engine: Engine, reader: KernelReader, transitions: Transitions,
                 stats: Callable[[], dict[str, Any]], after_input: Callable[[], None]) -> None:
        self.engine = engine
        self.reader = reader
        self.transitions = transitions
        self.stats = stats
        self.after_input = after_input
        self.table: dict[str, control.Handler] = {
            "status": self.on_status, "stats": self.on_stats, "commit": self.on_commit, "flush": self.on_flush,
            "resync": self.on_resync, "bulk-send": self.on_bulk_send, "rebuild": self.on_rebuild,
            "diff": self.on_diff, "dump": self.on_dump, "notify": self.on_notify,
        }

    async def handle(self, req: dict[str, Any]) -> dict[str, Any] | control.Stream:
        """A control request (ctbridge.daemon.control.COMMANDS names them)."""
        cmd = req["cmd"]
        if cmd not in control.COMMANDS:
            raise ValueError(control.unknown(cmd))
        return await self.table[cmd](req)

    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time()

    async def on_status(self, req: dict[str, Any]) -> dict[str, Any]:
        st = self.stats()
        return {"ok": True, **{k: st[k] for k in STATUS_KEYS}}

    async def on_stats(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, **self.stats()}

    async def on_notify(self, req: dict[str, Any]) -> dict[str, Any]:
        args = req.get("args")
        if not isinstance(args, list):
            raise ValueError('notify needs "args": the keepalived notify arguments')
        return await self.transitions.transition(keepalived.parse_args([str(a) for a in args]))

    async def on_commit(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self.transitions.commit_now()

    async def on_flush(self, req: dict[str, Any]) -> dict[str, Any]:
        which = req.get("which", "both")
        if which not in ("internal", "external", "both"):
            raise ValueError("flush takes internal, external or nothing (both)")
        if which in ("internal", "both"):
            self.engine.flush_internal()
            # read again at once, and announced: the sweeps refresh only what the cache holds,
            # and what peers were told of the flushed flows is unknown now
            await self.reader.resync()
        if which in ("external", "both"):
            self.engine.flush_external()
        return {"ok": True, "flushed": which}

    async def on_resync(self, req: dict[str, Any]) -> dict[str, Any]:
        self.engine.request_resync(self.now())
        self.after_input()
        return {"ok": True}

    async def on_rebuild(self, req: dict[str, Any]) -> dict[str, Any]:
        """The internal cache from a dump of this kernel's table (and its expectations), as after
        lost events: flows that changed, appeared or went are sent; the others are not."""
        before = self.engine.stats["tx_datagrams"]
        flows = await self.reader.resync()
        return {"ok": True, "flows": flows, "datagrams": self.engine.stats["tx_datagrams"] - before}

    async def on_diff(self, req: dict[str, Any]) -> dict[str, Any]:
        """This node's copy of each live peer's table (or of ``peer``'s) against that table
        (Engine.diff_start: sums by bucket over the sync link, then the keys of the buckets that
        differ): the flows missing here, extra here, or in another state, each as a listing line."""
        want = req.get("peer")
        live = self.engine.live_peers()
        peers = [node for node in live if want is None or f"{node:08x}" == str(want).lower()]
        if not peers:
            known = ", ".join(f"{node:08x}" for node in live) or "none"
            raise ValueError(f"no live peer {want!r} to compare with (live peers: {known})" if want is not None
                             else "no live peer to compare with")
        started = {node: self.engine.diff_start(node, self.now()) for node in peers}
        self.after_input()
        results = await self._diff_results(started)
        out = []
        for node in started:
            result = results.get(node)
            if result is None:
                out.append({"peer": f"{node:08x}", "answered": False, "equal": False})
                continue
            held = self.engine.peer_flow
            lines = {what: [describe(k, held(node, k)) for k in result[what]]
                     for what in ("missing", "extra", "stale")}
            out.append({"peer": f"{node:08x}", "answered": True, "equal": result["equal"],
                        "theirs": result["theirs"], "ours": result["ours"], **lines,
                        "refused": len(result["refused"]), "truncated": result["truncated"]})
        return {"ok": True, "equal": all(p["equal"] for p in out), "peers": out}

    async def _diff_results(self, started: dict[int, int]) -> dict[int, dict[str, Any]]:
        """The peers' answers to the diffs ``started`` (node -> request), asked again every
        DIFF_RETRY, for at most DIFF_TIMEOUT."""
        now = self.now
        results: dict[int, dict[str, Any]] = {}
        deadline = now() + DIFF_TIMEOUT
        again = now() + DIFF_RETRY
        while len(results) < len(started) and now() < deadline:
            await asyncio.sleep(0.05)
            for node, request in started.items():
                result = self.engine.diff_result(request)
                if result is not None:
                    results[node] = result
                elif now() >= again:
                    self.engine.diff_retry(request)
            if now() >= again:
                again = now() + DIFF_RETRY
                self.after_input()
        return results

    async def on_bulk_send(self, req: dict[str, Any]) -> dict[str, Any]:
        self.engine.bulk_send(self.now())
        self.after_input()
        return {"ok": True, "flows": len(self.engine.internal)}

    async def on_dump(self, req: dict[str, Any]) -> control.Stream:
        which = req.get("which")
        if which not in ("internal", "external"):
            raise ValueError("dump takes internal or external")
        form = req.get("format", "text")
        if form not in ("text", "json"):
            raise ValueError("dump's format is text or json")
        flows = self.engine.internal_messages() if which == "internal" else self.engine.external_messages()
        stream = control.Stream(listing(flows, form))
        stream.trailer["entries"] = len(flows)
        return stream

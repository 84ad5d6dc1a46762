"""The control protocol: a UNIX socket, one JSON request per line, one JSON answer per line.

Every request gets an answer: {"ok": true, ...} or {"ok": false, "error": "..."}. The CLI and the
keepalived hook are clients; the daemon serves.

A listing (``dump``) is too large for one line, so it is streamed: the answer line carries
``"stream": true``, then come chunks, each a decimal byte count on a line of its own and that many
bytes, then a chunk of 0, then a trailer line, {"ok": true, ...} or {"ok": false, "error": ...}.
The chunks are the listing's bytes as the client prints them; the daemon formats the next chunk
only when the socket has taken the last, so a listing never stalls it (it keeps the snapshot of
the cache, references to its entries, until the client has read the listing or gone).

A request that may run long (a MASTER transition's commit of a large table) may say
``"progress": true``: until its answer the daemon then writes, every PROGRESS_INTERVAL, a line
{"progress": {...}} (no "ok"): the step under way, the kernel's answers so far, in a commit the
flows written of how many. A client waits as long as these change and gives up only when they
stop changing for its stall bound (``request``'s ``stall``), or no line comes at all. A daemon
that does not know the key answers once, as to any request.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:  # the CLI's clients (the keepalived hook) start faster without asyncio
    import asyncio

log = logging.getLogger(__name__)

class Stream:
    """A handler's answer that is streamed: ``chunks`` yields the bytes; ``trailer`` is sent after
    them (the handler may fill it in while the chunks are made)."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self.chunks = chunks
        self.trailer: dict[str, Any] = {"ok": True}


Handler = Callable[[dict[str, Any]], Awaitable["dict[str, Any] | Stream"]]
Progress = Callable[[], dict[str, Any]]  # what a request under way has done so far
LINE_LIMIT = 1 << 20  # requests and answers are small; listings are streamed
PROGRESS_INTERVAL = 1.0  # seconds between two progress lines to a client that asked for them


# The control commands and their one-line help: the CLI's subcommands and help texts, the
# daemon's dispatch and its answer to an unknown command all come from this table.
COMMANDS: dict[str, str] = {
    "status": "Role, cache sizes and peers of the running daemon.",
    "stats": "Counters of the running daemon (--json: machine-readable).",
    "commit": "Write the external cache into the kernel now.",
    "flush": "Empty the internal, the external or both caches of the running daemon.",
    "resync": "Ask the peers for their whole internal caches.",
    "bulk-send": "Send this node's whole internal cache to the peers.",
    "rebuild": "Read this kernel's table again into the internal cache, and send what changed.",
    "diff": "Compare this node's copy of each peer's flows with the peer's own table (exit 0: equal).",
    "dump": "Print the running daemon's internal or external cache.",
    "notify": "Pass a keepalived transition to the running daemon (what the notify hook runs).",
}


def unknown(cmd: str) -> str:
    return f"unknown command {cmd!r}; commands are {', '.join(COMMANDS)}"


class ControlError(Exception):
    """The daemon could not be asked, or answered with an error; the message says which."""


def _in_use(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


async def serve(path: str, handler: Handler, progress: Progress | None = None) -> asyncio.AbstractServer:
    """Listen on ``path``; a stale socket file from a dead daemon is replaced, a live one refused.
    ``progress``: what a request that asked for progress lines is told while it runs."""
    import asyncio
    if os.path.exists(path):
        if _in_use(path):
            raise ControlError(f"control socket {path} is in use: another ctbridge is running "
                               "(stop it, or give this one another control.socket)")
        os.unlink(path)
    os.makedirs(os.path.dirname(path) or ".", mode=0o750, exist_ok=True)

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                        raise ValueError('a request is a JSON object with a "cmd" string')
                    if request.get("progress") is True and progress is not None:
                        answer = await _with_progress(writer, handler(request), progress)
                    else:
                        answer = await handler(request)
                except (ValueError, json.JSONDecodeError) as exc:
                    answer = {"ok": False, "error": f"bad request: {exc}"}
                except Exception as exc:  # the daemon goes on; the client learns what happened
                    log.exception("control request failed")
                    answer = {"ok": False, "error": str(exc) or type(exc).__name__}
                if isinstance(answer, Stream):
                    await _send_stream(writer, answer)
                    continue
                writer.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(client, path, limit=LINE_LIMIT)
    os.chmod(path, 0o660)
    return server


async def _with_progress(writer: asyncio.StreamWriter, work: Awaitable[dict[str, Any] | Stream],
                         progress: Progress) -> dict[str, Any] | Stream:
    """``work``'s answer, with a progress line to the client every PROGRESS_INTERVAL meanwhile.
    The work goes on if the client goes away (a transition is not abandoned half-way)."""
    import asyncio
    task = asyncio.ensure_future(work)
    for _ in range(1 << 40):  # bounded: one turn per interval
        done, _pending = await asyncio.wait({task}, timeout=PROGRESS_INTERVAL)
        if done:
            break
        try:
            writer.write(json.dumps({"progress": progress()}, separators=(",", ":")).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):  # the client left: its answer goes nowhere, the work goes on
            return await task
    return task.result()


async def _send_stream(writer: asyncio.StreamWriter, stream: Stream) -> None:
    writer.write(b'{"ok":true,"stream":true}\n')
    try:
        async for chunk in stream.chunks:
            if chunk:
                writer.write(b"%d\n" % len(chunk) + chunk)
                await writer.drain()
    except (ConnectionError, OSError):
        raise
    except Exception as exc:  # the listing stops; the trailer says why
        log.exception("streamed control answer failed")
        stream.trailer = {"ok": False, "error": str(exc) or type(exc).__name__}
    writer.write(b"0\n" + json.dumps(stream.trailer, separators=(",", ":")).encode() + b"\n")
    await writer.drain()


def _connect(path: str, timeout: float) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except FileNotFoundError:
        s.close()
        raise ControlError(f"no daemon at {path}: is `ctbridge run` running with this configuration?") from None
    except OSError as exc:
        s.close()
        raise ControlError(f"cannot reach the daemon at {path}: {exc.strerror}") from None
    return s


def stream(path: str, cmd: str, out: BinaryIO, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
    """Ask the daemon for a streamed answer and copy its bytes to ``out`` as they come; the
    trailer's fields, or ControlError. ``timeout`` bounds each wait, not the whole listing."""
    with _connect(path, timeout) as s, s.makefile("rb") as f:
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        try:
            answer = _answer(f.readline(LINE_LIMIT), cmd)
            if not answer.get("stream"):
                return answer  # a plain answer (the daemon has nothing to stream)
            for _ in range(1 << 40):  # bounded: a chunk is at least one byte
                size = f.readline(32)
                if not size.strip().isdigit():
                    raise ControlError(f"the daemon's answer to {cmd!r} broke off")
                n = int(size)
                if n == 0:
                    break
                data = f.read(n)
                if len(data) != n:
                    raise ControlError(f"the daemon's answer to {cmd!r} broke off")
                out.write(data)
            return _answer(f.readline(LINE_LIMIT), cmd)
        except TimeoutError:
            raise ControlError(f"the daemon did not answer {cmd!r} within {timeout:.0f} s") from None


def _answer(line: bytes, cmd: str) -> dict[str, Any]:
    try:
        answer = json.loads(line)
    except json.JSONDecodeError:
        raise ControlError(f"the daemon closed the connection without answering {cmd!r}") from None
    if not isinstance(answer, dict):
        raise ControlError(f"the daemon's answer to {cmd!r} is not a JSON object")
    if not answer.get("ok"):
        raise ControlError(answer.get("error", "the daemon refused"))
    return answer


def request(path: str, cmd: str, timeout: float = 30.0, stall: float | None = None,
            on_progress: Callable[[dict[str, Any]], None] | None = None, **args: Any) -> dict[str, Any]:
    """Ask the daemon; the answer's fields, or ControlError with its error message. With
    ``stall``, no bound on the whole: the daemon reports progress and the request fails only when
    that has not changed for ``stall`` seconds (or nothing came for as long); ``on_progress``
    sees each report."""
    if stall is None:
        with _connect(path, timeout) as s, s.makefile("rb") as f:
            s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            try:
                return _answer(f.readline(LINE_LIMIT), cmd)
            except TimeoutError:
                raise ControlError(f"the daemon did not answer {cmd!r} within {timeout:.0f} s") from None
    import time
    with _connect(path, stall) as s, s.makefile("rb") as f:
        s.sendall(json.dumps({"cmd": cmd, **args, "progress": True}).encode() + b"\n")
        last: dict[str, Any] | None = None
        changed = time.monotonic()
        for _ in range(1 << 40):  # bounded: each turn reads a line, at most ``stall`` apart
            try:
                line = f.readline(LINE_LIMIT)
            except TimeoutError:
                raise ControlError(f"the daemon did not answer {cmd!r} nor report progress for {stall:.0f} s"
                                   ) from None
            report = _progress_of(line)
            if report is None:
                return _answer(line, cmd)
            if on_progress is not None:
                on_progress(report)
            if report != last:
                last, changed = report, time.monotonic()
            elif time.monotonic() - changed >= stall:
                raise ControlError(f"the daemon's {cmd!r} made no progress for {stall:.0f} s "
                                   f"({describe_progress(report)}); it may still finish: see `ctbridge status`")
    raise ControlError(f"the daemon's answer to {cmd!r} never came")


def _progress_of(line: bytes) -> dict[str, Any] | None:
    """A progress line's report, or None for any other line (the answer)."""
    try:
        message = json.loads(line)
    except json.JSONDecodeError:
        return None
    if isinstance(message, dict) and "ok" not in message and isinstance(message.get("progress"), dict):
        report: dict[str, Any] = message["progress"]
        return report
    return None


def describe_progress(report: dict[str, Any]) -> str:
    """A progress report in words: "commit: 120,000 of 1,000,000 flows written"."""
    step = report.get("step") or "waiting for the transition before it"
    written, of = report.get("written"), report.get("of")
    if isinstance(written, int) and isinstance(of, int):
        return f"{step}: {written:,} of {of:,} flows written"
    return f"{step}: {report.get('kernel_requests', 0):,} kernel requests answered so far"

"""The control protocol: a UNIX socket, one JSON request per line, one JSON answer per line.

Every request gets an answer: {"ok": true, ...} or {"ok": false, "error": "..."}. The CLI and the
keepalived hook are clients; the daemon serves.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI's clients (the keepalived hook) start faster without asyncio
    import asyncio

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
LINE_LIMIT = 1 << 20  # requests are small; answers (dumps) can be large


class ControlError(Exception):
    """The daemon could not be asked, or answered with an error; the message says which."""


def _in_use(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


async def serve(path: str, handler: Handler) -> asyncio.AbstractServer:
    """Listen on ``path``; a stale socket file from a dead daemon is replaced, a live one refused."""
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
                    answer = await handler(request)
                except (ValueError, json.JSONDecodeError) as exc:
                    answer = {"ok": False, "error": f"bad request: {exc}"}
                except Exception as exc:  # the daemon goes on; the client learns what happened
                    log.exception("control request failed")
                    answer = {"ok": False, "error": str(exc) or type(exc).__name__}
                writer.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(client, path, limit=LINE_LIMIT)
    os.chmod(path, 0o660)
    return server


def request(path: str, cmd: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
    """Ask the daemon; the answer's fields, or ControlError with its error message."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except FileNotFoundError:
            raise ControlError(f"no daemon at {path}: is `ctbridge run` running with this configuration?") from None
        except OSError as exc:
            raise ControlError(f"cannot reach the daemon at {path}: {exc.strerror}") from None
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        chunks = []
        try:
            while True:
                data = s.recv(1 << 20)
                if not data:
                    break
                chunks.append(data)
                if data.endswith(b"\n"):
                    break
        except TimeoutError:
            raise ControlError(f"the daemon did not answer {cmd!r} within {timeout:.0f} s") from None
    try:
        answer = json.loads(b"".join(chunks))
    except json.JSONDecodeError:
        raise ControlError(f"the daemon closed the connection without answering {cmd!r}") from None
    if not answer.get("ok"):
        raise ControlError(answer.get("error", "the daemon refused"))
    return dict(answer)

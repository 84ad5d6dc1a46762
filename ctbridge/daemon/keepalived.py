"""keepalived's side of the integration: its notify arguments, its notify_fifo lines, track files.

keepalived forks notify scripts without waiting for them, so two transitions can run at once and
in any order; only the notify_fifo delivers them in order. Both end up as a Transition given to
the daemon, which applies them one at a time.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import stat
from collections.abc import AsyncIterator
from typing import NamedTuple

from ctbridge import atomicfile

STATES = ("MASTER", "BACKUP", "FAULT", "STOP", "DELETED")


class Transition(NamedTuple):
    kind: str  # "INSTANCE", "GROUP" or "" (notify_master & co. say only the state)
    name: str
    state: str
    priority: int


class FifoError(Exception):
    """The notify FIFO cannot be read; the message says how to fix it."""


class NotifyError(ValueError):
    """Arguments or a FIFO line that do not describe a transition; the message says what is expected."""


def parse_args(args: list[str]) -> Transition:
    """keepalived's notify arguments: `INSTANCE|GROUP NAME STATE PRIORITY`, or just `STATE` (as
    notify_master/notify_backup/notify_fault scripts would pass it)."""
    words = [a.strip('"') for a in args]
    if len(words) == 1 and words[0].upper() in STATES:
        return Transition("", "", words[0].upper(), 0)
    if len(words) in (3, 4) and words[0].upper() in ("INSTANCE", "GROUP") and words[2].upper() in STATES:
        try:
            prio = int(words[3]) if len(words) == 4 else 0
        except ValueError:
            raise NotifyError(f"priority {words[3]!r} is not a number") from None
        return Transition(words[0].upper(), words[1], words[2].upper(), prio)
    raise NotifyError("expected `INSTANCE|GROUP NAME STATE [PRIORITY]` or `STATE` (STATE is one of "
                      + ", ".join(STATES) + f"), got {' '.join(args)!r}")


_FIFO_LINE = re.compile(r'^(INSTANCE|GROUP)\s+("[^"]*"|\S+)\s+(MASTER|BACKUP|FAULT|STOP|DELETED)\s*(-?\d+)?\s*$')


def parse_fifo_line(line: str) -> Transition | None:
    """A notify_fifo line, e.g. `INSTANCE "VI_1" MASTER 100`; None for lines that are not a
    transition (MASTER_RX_LOWER_PRI, priority changes, virtual servers)."""
    m = _FIFO_LINE.match(line.strip())
    if not m:
        return None
    name = shlex.split(m.group(2))[0] if m.group(2).startswith('"') else m.group(2)
    return Transition(m.group(1), name, m.group(3), int(m.group(4) or 0))


ROLE_FILE = "role"  # beside the control socket, in the runtime directory (a tmpfs: gone at reboot)


def read_role(path: str) -> str | None:
    """The role keepalived gave this node last, as the daemon kept it ("MASTER", "BACKUP",
    "FAULT"); None when there is none or it cannot be read (a first start, a reboot)."""
    try:
        with open(path) as f:
            role = f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return role if role in ("MASTER", "BACKUP", "FAULT") else None


def write_track_file(path: str, value: int) -> None:
    """Atomically: keepalived may read the file at any moment (track_file reads an integer)."""
    atomicfile.write(path, f"{value}\n")


FIFO_RETRY = 0.2  # seconds before a read-only FIFO is opened again after keepalived closed it


async def fifo_transitions(path: str) -> AsyncIterator[Transition]:
    """The transitions keepalived writes into its notify_fifo, in order, for as long as it runs.

    The FIFO is made (mode 0600) if it is not there yet. It is opened read-write, so keepalived's
    restarts are no end of file. If keepalived made it first (root's, mode 0644) and this process
    is not root, it is read read-only, and opened again whenever keepalived closes it.
    """
    loop = asyncio.get_running_loop()
    if not os.path.exists(path):
        os.mkfifo(path, 0o600)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
            reopen = False
        except PermissionError:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            except PermissionError:
                raise FifoError(
                    f"cannot read keepalived's notify FIFO {path}: permission denied; remove it and "
                    "restart ctbridge before keepalived, or make it readable by ctbridge's user") from None
            reopen = True
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.close(fd)
            raise FifoError(f"keepalived's notify FIFO {path} is not a FIFO; remove it (ctbridge makes the FIFO) "
                            "or point keepalived.notify_fifo at keepalived's notify_fifo")
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await loop.connect_read_pipe(lambda p=protocol: p,  # type: ignore[misc]
                                                    os.fdopen(fd, "rb", buffering=0))
        try:
            while line := await reader.readline():
                t = parse_fifo_line(line.decode("utf-8", "replace"))
                if t is not None:
                    yield t
        finally:
            transport.close()
        if not reopen:
            return
        await asyncio.sleep(FIFO_RETRY)  # no writer yet: try again

"""keepalived's side of the integration: its notify arguments, its notify_fifo lines, track files.

keepalived forks notify scripts without waiting for them, so two transitions can run at once and
in any order; only the notify_fifo delivers them in order. Both end up as a Transition given to
the daemon, which applies them one at a time.
"""

from __future__ import annotations

import re
import shlex
from typing import NamedTuple

from ctbridge import atomicfile

STATES = ("MASTER", "BACKUP", "FAULT", "STOP", "DELETED")


class Transition(NamedTuple):
    kind: str  # "INSTANCE", "GROUP" or "" (notify_master & co. say only the state)
    name: str
    state: str
    priority: int


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


def write_track_file(path: str, value: int) -> None:
    """Atomically: keepalived may read the file at any moment (track_file reads an integer)."""
    atomicfile.write(path, f"{value}\n")

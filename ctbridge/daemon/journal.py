"""Log lines the systemd journal files under their priority.

When a service's stderr is the journal, journald reads a line that starts with "<N>" as being of
syslog priority N (sd-daemon(3), SyslogLevelPrefix= in systemd.exec(5)): `journalctl -p err`
then finds ctbridge's errors, and `-p warning` its warnings. systemd says that stderr is the
journal by setting $JOURNAL_STREAM to the stream's "device:inode" (systemd.exec(5)); anywhere else
(a terminal, a test's log file) the lines stay as they were, with the level's name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

# syslog(3) priorities: LOG_CRIT 2, LOG_ERR 3, LOG_WARNING 4, LOG_INFO 6, LOG_DEBUG 7
PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
LOG_DEBUG = 7


def priority(levelno: int) -> int:
    for level, prio in PRIORITIES:
        if levelno >= level:
            return prio
    return LOG_DEBUG


def is_journal(fd: int, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``fd`` is the stream $JOURNAL_STREAM names (device:inode)."""
    dev, _, ino = environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(fd)
        return bool(ino) and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):  # closed, or not two numbers
        return False


class PriorityFormatter(logging.Formatter):
    """"<N>logger: message": the journal shows the priority, so the level's name goes. Every line
    of a multi-line message (a traceback) carries it, or journald files the rest at info."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines() or [""])


def use_journal_priorities(fd: int = 2) -> bool:
    """Give the root logger's handlers that write to ``fd`` the journal's prefix, if ``fd`` is
    the journal; whether it is."""
    if not is_journal(fd):
        return False
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        try:
            if stream is not None and stream.fileno() == fd:
                handler.setFormatter(PriorityFormatter())
        except (OSError, ValueError):  # a stream without a descriptor
            continue
    return True

"""Replacing a file so that no reader ever sees half of it, and a crash leaves the old or the new.

keepalived reads the track files at any moment, systemd and keepalived read what `ctbridge render`
writes, and the epoch and key files must survive a power cut: all go through ``write``. The
temporary file is made by mkstemp (an unpredictable name, created exclusively, so a symlink
planted in the directory is never followed), given its mode, flushed to disk, renamed over the
target, and the directory is flushed too so that the rename itself is durable (rename(2), fsync(2)).
"""

from __future__ import annotations

import contextlib
import os
import tempfile


def write(path: str | os.PathLike[str], content: str, mode: int = 0o644) -> None:
    """Replace ``path`` with ``content`` (mode ``mode``) in one rename."""
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    except OSError:  # some file systems cannot flush a directory; the rename is done all the same
        pass
    finally:
        os.close(dfd)

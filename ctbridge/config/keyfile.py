"""Pre-shared sync keys: one key per file, hex encoded, readable by its owner only."""

from __future__ import annotations

import os
import secrets
import stat

from ctbridge import atomicfile
from ctbridge.sync.wire import KEY_MIN_BYTES

KEY_BYTES = 32


class KeyFileError(Exception):
    """A key file that cannot be used; the message names the file and the fix."""


def generate(path: str, force: bool = False) -> None:
    """Write a new random key to ``path`` with mode 0600 (atomically: temporary file + rename)."""
    if os.path.exists(path) and not force:
        raise KeyFileError(f"{path} exists; keep it, or pass --force to replace it (every node needs the new key)")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise KeyFileError(f"directory {directory} does not exist; create it first")
    atomicfile.write(path, "# ctbridge sync key: copy this file to every node of the cluster (mode 0600)\n"
                     + secrets.token_hex(KEY_BYTES) + "\n", mode=0o600)


def load(path: str) -> bytes:
    """The key in ``path``. Refuses a file others can read, like ssh does with private keys."""
    try:
        st = os.stat(path)
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist; create one with `ctbridge keygen {path}` "
                           "and copy it to every node") from None
    except PermissionError:
        raise KeyFileError(f"key file {path} is not readable by this user; run as root or fix its owner") from None
    except OSError as exc:
        raise KeyFileError(f"key file {path} cannot be read: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"key file {path} is accessible by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                           f"run `chmod 600 {path}`")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if len(lines) != 1:
        raise KeyFileError(f"key file {path} must hold exactly one line of hex (found {len(lines)}); "
                           f"make a new one with `ctbridge keygen`")
    try:
        key = bytes.fromhex(lines[0])
    except ValueError:
        raise KeyFileError(f"key file {path} is not hex; make a new one with `ctbridge keygen`") from None
    if len(key) < KEY_MIN_BYTES:
        raise KeyFileError(f"key in {path} has {len(key)} bytes, at least {KEY_MIN_BYTES} are needed; "
                           f"make a new one with `ctbridge keygen`")
    return key

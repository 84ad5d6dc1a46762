"""Sync keys: `ctbridge keygen` and loading, with errors a person can act on."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ctbridge.config import keyfile


def keygen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ctbridge", "keygen", *args], capture_output=True, text=True,
                          timeout=60)


def test_keygen_writes_a_private_key_that_loads(tmp_path: Path) -> None:
    path = tmp_path / "sync.key"
    res = keygen(str(path))
    assert res.returncode == 0, res.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = keyfile.load(str(path))
    assert len(key) == 32
    assert keyfile.load(str(path)) == key
    again = keygen(str(path))  # never overwrites by accident
    assert again.returncode == 1 and "--force" in again.stderr and again.stderr.count("\n") == 1
    assert keyfile.load(str(path)) == key
    assert keygen(str(path), "--force").returncode == 0
    assert keyfile.load(str(path)) != key


@pytest.mark.parametrize("content, mode, message", [
    (None, 0o600, "does not exist; create one with `ctbridge keygen"),
    ("00" * 32, 0o644, "chmod 600"),
    ("zz" * 32, 0o600, "is not hex"),
    ("00" * 8, 0o600, "at least 16 are needed"),
    ("# nothing\n", 0o600, "exactly one line of hex"),
])
def test_bad_key_files_are_refused_with_the_fix(tmp_path: Path, content: str | None, mode: int, message: str) -> None:
    path = tmp_path / "k"
    if content is not None:
        path.write_text(content)
        os.chmod(path, mode)
    with pytest.raises(keyfile.KeyFileError, match=message.replace("(", r"\(")) as err:
        keyfile.load(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)

"""One way to replace a file: whole or not at all, with its mode, never through a planted link."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ctbridge import atomicfile


def test_replaces_with_the_mode_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "track"
    target.write_text("-254\n")
    atomicfile.write(target, "0\n", mode=0o600)
    assert target.read_text() == "0\n"
    assert target.stat().st_mode & 0o777 == 0o600
    assert os.listdir(tmp_path) == ["track"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "epoch"
    target.write_text("1\n")
    with pytest.raises(TypeError):
        atomicfile.write(target, 12345)  # type: ignore[arg-type]
    assert target.read_text() == "1\n" and os.listdir(tmp_path) == ["epoch"]


def test_a_link_planted_at_the_old_temporary_name_is_not_followed(tmp_path: Path) -> None:
    # the track file used to be written through PATH.tmp.PID, a name anyone could guess
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    target = tmp_path / "track"
    os.symlink(victim, f"{target}.tmp.{os.getpid()}")
    atomicfile.write(target, "0\n")
    assert victim.read_text() == "precious\n" and target.read_text() == "0\n"
    assert not target.is_symlink()

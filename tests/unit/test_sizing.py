"""The conntrack hash against the table's limit (config/sizing.py) and `ctbridge check`'s warning."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from ctbridge.cli import check
from ctbridge.config import sizing


def test_a_hash_sized_as_the_kernel_sizes_it_gets_no_warning() -> None:
    assert sizing.hash_warning(262_144, 262_144) is None
    assert sizing.hash_warning(524_288, 262_144) is None  # two per bucket: still fine
    assert sizing.hash_warning(0, 262_144) is None and sizing.hash_warning(1_000_000, 0) is None  # unknown


def test_a_limit_raised_without_the_hash_is_warned_about_with_the_settings_that_fix_it() -> None:
    warning = sizing.hash_warning(1_048_576, 262_144)
    assert warning is not None
    assert "4.0 flows per bucket" in warning
    assert "net.netfilter.nf_conntrack_buckets = 1048576" in warning
    assert "options nf_conntrack hashsize=1048576" in warning
    assert "\n" not in warning


def test_unreadable_sysctls_read_as_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sizing, "MAX_PATH", tmp_path / "missing")
    bad = tmp_path / "buckets"
    bad.write_text("many\n")
    monkeypatch.setattr(sizing, "BUCKETS_PATH", bad)
    assert sizing.read_sizes() == (0, 0) and sizing.host_warning() is None


def test_check_prints_the_warning_and_still_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    limit, buckets = tmp_path / "max", tmp_path / "buckets"
    limit.write_text("4194304\n")
    buckets.write_text("262144\n")
    monkeypatch.setattr(sizing, "MAX_PATH", limit)
    monkeypatch.setattr(sizing, "BUCKETS_PATH", buckets)
    monkeypatch.setattr(check.host, "check", lambda path: [])
    parser = argparse.ArgumentParser()
    check.setargs(parser)
    args = parser.parse_args(["-c", str(tmp_path / "ctbridge.toml")])
    assert check.run(args) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: nf_conntrack_max is 4,194,304" in err and "16.0 flows per bucket" in err

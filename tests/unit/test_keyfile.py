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
    key = keyfile.load(str(path)).keys.group
    assert len(key) == 32
    assert keyfile.load(str(path)).keys.group == key
    again = keygen(str(path))  # never overwrites by accident
    assert again.returncode == 1 and "--force" in again.stderr and again.stderr.count("\n") == 1
    assert keyfile.load(str(path)).keys.group == key
    assert keygen(str(path), "--force").returncode == 0
    assert keyfile.load(str(path)).keys.group != key


@pytest.mark.parametrize("content, mode, message", [
    (None, 0o600, "does not exist; create one with `ctbridge keygen"),
    ("00" * 32, 0o644, "chmod 600"),
    ("zz" * 32, 0o600, "is not hex"),
    ("00" * 8, 0o600, "at least 16 are needed"),
    ("# nothing\n", 0o600, "holds no key"),
    ("cluster c\nnode a\nalgorithm blake2b\ngeneration 5a\n", 0o600, "lacks peer lines"),
    ("cluster c\nnode a\nalgorithm blake2b\ngeneration 5a\npeer b 00\n", 0o600, "at least 16 are needed"),
    ("cluster c\nnode a\nalgorithm md5\ngeneration 5a\npeer b " + "00" * 32 + "\n", 0o600,
     "unknown authentication algorithm"),
    ("cluster c\nnode a\nalgorithm blake2b\ngeneration 1ff\npeer b " + "00" * 32 + "\n", 0o600,
     "not a byte in hex"),
    ("cluster c\nnode a\nalgorithm blake2b\ngeneration 5a\npeer a " + "00" * 32 + "\n", 0o600,
     "among its own peers"),
    ("garbage here\n", 0o600, "cannot read"),
])
def test_bad_key_files_are_refused_with_the_fix(tmp_path: Path, content: str | None, mode: int, message: str) -> None:
    path = tmp_path / "k"
    if content is not None:
        path.write_text(content)
        os.chmod(path, mode)
    with pytest.raises(keyfile.KeyFileError, match=message.replace("(", r"\(")) as err:
        keyfile.load(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_pairwise_files_hold_only_the_nodes_own_keys_and_agree_pair_by_pair(tmp_path: Path) -> None:
    """Each node's file holds a key per peer; the two ends of a pair hold the same key, and no
    file holds a key of a pair its node is not part of."""
    from ctbridge.config.settings import node_id
    secret = bytes(range(32))
    names = ["fw1", "fw2", "fw3"]
    loaded = {}
    for n in names:
        path = tmp_path / n
        path.write_text(keyfile.pairwise_text(secret, "edge", n, names))
        os.chmod(path, 0o600)
        loaded[n] = keyfile.load(str(path))
        assert loaded[n].node == n and loaded[n].cluster == "edge"
        assert set(loaded[n].keys.pairs) == {node_id(p) for p in names if p != n}
    for a in names:
        for b in names:
            if a != b:
                assert loaded[a].keys.pairs[node_id(b)] == loaded[b].keys.pairs[node_id(a)]
    k12 = loaded["fw1"].keys.pairs[node_id("fw2")]
    assert k12 not in loaded["fw3"].keys.pairs.values()
    assert len({loaded[n].keys.key_id for n in names}) == 1  # one generation
    assert keyfile.pair_key(secret, "other", "fw1", "fw2") != k12  # bound to the cluster


@pytest.mark.parametrize("node, cluster_name, message", [
    ("fw2", "", "holds the keys of node fw1, and this node is fw2"),
    ("fw1", "other", "was made for cluster edge, and sync.cluster is other"),
])
def test_a_key_file_of_another_node_or_cluster_refuses_the_start(tmp_path: Path, node: str, cluster_name: str,
                                                                  message: str) -> None:
    from ctbridge.config import host, settings
    path = tmp_path / "sync.key"
    path.write_text(keyfile.pairwise_text(bytes(32), "edge", "fw1", ["fw1", "fw2"]))
    os.chmod(path, 0o600)
    cfg = settings.parse(f'[node]\nname = "{node}"\n[sync]\nlocal = "192.0.2.1"\npeers = ["192.0.2.2"]\n'
                         f'key_file = "{path}"\ncluster = "{cluster_name}"\n', "c.toml")
    with pytest.raises(keyfile.KeyFileError, match=message):
        host.auth(cfg)
    ok = settings.parse(f'[node]\nname = "fw1"\n[sync]\nlocal = "192.0.2.1"\npeers = ["192.0.2.2"]\n'
                        f'key_file = "{path}"\n', "c.toml")
    auth = host.auth(ok)
    assert auth.pairwise and auth.peers() == [settings.node_id("fw2")]
    assert auth.salt == host.auth(ok).salt  # the cluster's identity from the file: "edge"

"""Sync key files, readable by their owner only.

Two kinds (docs/protocol.md, "Authentication"):

* a **group key**: one line of hex, the same file on every node (``ctbridge keygen FILE``). Every
  holder can sign as any node. It is also what a *cluster secret* looks like: the file, kept on
  the machine that renders the cluster, from which each node's pairwise keys are derived.
* a node's **pairwise keys** (``ctbridge render`` writes them from the cluster secret): one key per
  peer, shared with that peer only, so a node can speak only for itself::

      # ctbridge pairwise sync keys of node fw1 ...
      cluster edge
      node fw1
      algorithm blake2b
      generation 5a
      peer fw2 3f1c...
      seal fw1 9a0e...   (the key each node seals its datagrams with, if sync.encrypt is on)
      seal fw2 77b2...
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from dataclasses import dataclass

from ctbridge import atomicfile
from ctbridge.config.settings import node_id
from ctbridge.sync import wire
from ctbridge.sync.wire import KEY_MIN_BYTES

KEY_BYTES = 32
_PAIR_PERSON = b"ctbridge pairkey"  # BLAKE2b personalization of the pair key derivation (16 bytes)
_SEAL_PERSON = b"ctbridge sealkey"  # ... and of the sealing keys


class KeyFileError(Exception):
    """A key file that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class KeyFile:
    """What a key file holds: the key set, and for pairwise keys whose they are."""

    keys: wire.KeySet
    cluster: str = ""  # pairwise: the cluster they were made for
    node: str = ""  # pairwise: the node that holds them


def generate(path: str, force: bool = False) -> None:
    """Write a new random key to ``path`` with mode 0600 (atomically: temporary file + rename)."""
    if os.path.exists(path) and not force:
        raise KeyFileError(f"{path} exists; keep it, or pass --force to replace it (every node needs the new key)")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise KeyFileError(f"directory {directory} does not exist; create it first")
    atomicfile.write(path, "# ctbridge sync key: a group key for every node, or the cluster secret that "
                     "`ctbridge render` derives each node's pairwise keys from (mode 0600)\n"
                     + secrets.token_hex(KEY_BYTES) + "\n", mode=0o600)


def pair_key(secret: bytes, cluster: str, a: str, b: str) -> bytes:
    """The key nodes ``a`` and ``b`` share, derived from the cluster secret (the same whichever
    of them asks). Keyed BLAKE2b as a PRF (RFC 7693); the names are NUL-separated, and node names
    cannot hold NUL."""
    first, second = sorted((a, b))
    label = b"\0".join(x.encode() for x in (cluster, first, second))
    return hashlib.blake2b(label, key=secret, digest_size=KEY_BYTES, person=_PAIR_PERSON).digest()


def seal_key(secret: bytes, cluster: str, node: str) -> bytes:
    """The key ``node`` seals its datagrams with (every member holds every member's)."""
    label = b"\0".join(x.encode() for x in (cluster, node))
    return hashlib.blake2b(label, key=secret, digest_size=KEY_BYTES, person=_SEAL_PERSON).digest()


def pairwise_text(secret: bytes, cluster: str, node: str, peers: list[str], algorithm: str = "blake2b") -> str:
    """The key file of ``node``: a key for each peer, derived from the cluster secret. The key id
    (``generation``) is the secret's, so every node's file of one secret agrees on it."""
    lines = [f"# ctbridge pairwise sync keys of node {node} in cluster {cluster}: only this node may hold",
             "# them (mode 0600); written by `ctbridge render` from the cluster secret",
             f"cluster {cluster}", f"node {node}", f"algorithm {algorithm}",
             f"generation {wire.key_id(secret):02x}"]
    lines += [f"peer {p} {pair_key(secret, cluster, node, p).hex()}" for p in sorted(peers) if p != node]
    lines += [f"seal {n} {seal_key(secret, cluster, n).hex()}" for n in sorted({node, *peers})]
    return "\n".join(lines) + "\n"


def read_secret(path: str) -> bytes:
    """A group key file's key (a cluster secret)."""
    if not os.path.exists(path):
        raise KeyFileError(f"cluster secret {path} does not exist; make it once with `ctbridge keygen {path}` "
                           "(it stays on the machine that renders; each node gets only its own sync.key)")
    kf = load(path)
    if not kf.keys.group:
        raise KeyFileError(f"{path} holds a node's pairwise keys, not a cluster secret; make one with "
                           f"`ctbridge keygen {path}`")
    return kf.keys.group


def load(path: str, algorithm: str = "blake2b") -> KeyFile:
    """The keys in ``path``. Refuses a file others can read, like ssh does with private keys.
    ``algorithm`` is a group key's (a pairwise file names its own)."""
    try:
        st = os.stat(path)
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist; create one with `ctbridge keygen {path}` "
                           "and copy it to every node, or render the nodes' keys with `ctbridge render`") from None
    except PermissionError:
        raise KeyFileError(f"key file {path} is not readable by this user; run as root or fix its owner") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"key file {path} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"key file {path} is accessible by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                           f"run `chmod 600 {path}`")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not lines:
        raise KeyFileError(f"key file {path} holds no key; make one with `ctbridge keygen {path}`, or render the "
                           "node's keys with `ctbridge render`")
    if len(lines) == 1 and " " not in lines[0]:
        key = _hex(path, lines[0])
        return KeyFile(_keyset(path, algorithm, wire.key_id(key), group=key))
    return _pairwise(path, lines)


def _hex(path: str, text: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise KeyFileError(f"key file {path}: {text[:12]!r}... is not hex; make a new one with `ctbridge keygen`, "
                           "or render the node's keys again") from None
    if len(key) < KEY_MIN_BYTES:
        raise KeyFileError(f"key in {path} has {len(key)} bytes, at least {KEY_MIN_BYTES} are needed; "
                           f"make a new one with `ctbridge keygen`")
    return key


def _keyset(path: str, algorithm: str, kid: int, group: bytes = b"", pairs: dict[int, bytes] | None = None,
            seals: dict[int, bytes] | None = None) -> wire.KeySet:
    try:
        return wire.KeySet(algorithm, kid, group=group, pairs=pairs or {}, seals=seals or {})
    except ValueError as exc:
        raise KeyFileError(f"key file {path}: {exc}") from None


def _pairwise(path: str, lines: list[str]) -> KeyFile:
    fields: dict[str, str] = {}
    peers: dict[str, bytes] = {}
    seals: dict[str, bytes] = {}
    for line in lines:
        word, _, rest = line.partition(" ")
        if word in ("peer", "seal"):
            name, _, key = rest.strip().partition(" ")
            into = peers if word == "peer" else seals
            if not name or not key or name in into:
                raise KeyFileError(f"key file {path}: {line[:40]!r}: a {word} line is `{word} NAME HEX`, once per "
                                   "node")
            into[name] = _hex(path, key.strip())
        elif word in ("cluster", "node", "algorithm", "generation") and rest.strip() and word not in fields:
            fields[word] = rest.strip()
        else:
            raise KeyFileError(f"key file {path}: cannot read {line[:40]!r}; expected one line of hex (a group key) "
                               "or the cluster, node, algorithm, generation and peer lines `ctbridge render` writes")
    missing = [w for w in ("cluster", "node", "algorithm", "generation") if w not in fields]
    if missing or not peers:
        raise KeyFileError(f"key file {path} lacks " + ", ".join(missing + ([] if peers else ["peer lines"]))
                           + "; render the node's keys again with `ctbridge render`")
    try:
        kid = int(fields["generation"], 16)
        if not 0 <= kid <= 255:
            raise ValueError
    except ValueError:
        raise KeyFileError(f"key file {path}: generation {fields['generation']!r} is not a byte in hex") from None
    if fields["node"] in peers:
        raise KeyFileError(f"key file {path} names node {fields['node']} among its own peers")
    ids = {node_id(n): n for n in peers}
    if len(ids) != len(peers) or node_id(fields["node"]) in ids:
        raise KeyFileError(f"key file {path}: two node names give the same node id; rename one of them")
    keys = _keyset(path, fields["algorithm"], kid, pairs={i: peers[n] for i, n in ids.items()},
                   seals={node_id(n): k for n, k in seals.items()})
    return KeyFile(keys, cluster=fields["cluster"], node=fields["node"])

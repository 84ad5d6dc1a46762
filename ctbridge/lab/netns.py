"""Network namespaces for the lab, the demo and the tests: unique names, always removed, and a way
to open sockets inside one from this process."""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import subprocess
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000  # From include/uapi/linux/sched.h
_libc = ctypes.CDLL(None, use_errno=True)
_counter = itertools.count()


def unique_name(tag: str) -> str:
    return f"ctb-{tag}-{os.getpid()}-{next(_counter)}"


def run(ns: str, *argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command inside namespace ``ns`` and capture its output."""
    return subprocess.run(["ip", "netns", "exec", ns, *argv], check=check, text=True, input=input,
                          capture_output=True, timeout=120)


@contextlib.contextmanager
def namespace(tag: str) -> Iterator[str]:
    """A fresh network namespace with loopback up, removed on exit whatever happened."""
    name = unique_name(tag)
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        run(name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """Switch this thread into ``ns``; sockets opened meanwhile stay bound to it after the switch back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns back: {os.strerror(err)}")
    finally:
        os.close(own)
        os.close(target)

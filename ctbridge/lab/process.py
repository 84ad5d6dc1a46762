"""Processes in the lab's namespaces (each in a session of its own, its output in a log file),
and the bounded wait every lab step uses.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ctbridge.daemon import control
from ctbridge.lab.topology import ROOT


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0, step: float = 0.1) -> Any:
    """Poll check() until it returns something true (bounded in time); that value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(control.ControlError, OSError):
            last = check()
            if last:
                return last
        time.sleep(step)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


class Process:
    """A command in a namespace, in its own session (so Ctrl-C in a terminal reaches only us), whose
    output goes to a log file; stop() ends its whole process group."""

    def __init__(self, name: str, ns: str, argv: list[str], log: Path, env: dict[str, str] | None = None,
                 stdout_pipe: bool = False) -> None:
        self.name = name
        self.log = log
        self.logf = open(log, "ab")
        try:
            self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE if stdout_pipe else self.logf, stderr=self.logf,
                                         start_new_session=True, env={**os.environ, **(env or {})}, cwd=ROOT)
        except BaseException:
            self.logf.close()
            raise

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        # children left in the group (keepalived's VRRP process, a hook) go too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self.logf.close()
        return self.proc.returncode

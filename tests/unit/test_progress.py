"""A long request's progress (ctbridge/daemon/control.py): the daemon reports it while a commit
runs, and `ctbridge commit`, `ctbridge notify` and the keepalived hook wait as long as it moves,
failing only once it has stopped for their stall bound. A real control server on a UNIX socket in
a thread of its own, its handler a stand-in for a commit that takes longer than the bound."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ctbridge.daemon import control

ROOT = Path(__file__).resolve().parents[2]


class Daemon:
    """A control server whose 'commit' and 'notify' take ``seconds``, writing ``step`` flows every
    0.1 s of it (0: stuck), while progress says how far it got."""

    def __init__(self, path: str, seconds: float, step: int) -> None:
        self.path, self.seconds, self.step = path, seconds, step
        self.written = 0
        self.asked: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        self.asked.append(req)
        for _ in range(round(self.seconds / 0.1)):
            await asyncio.sleep(0.1)
            self.written += self.step
        return {"ok": True, "committed": self.written}

    def progress(self) -> dict[str, Any]:
        return {"step": "commit", "kernel_requests": self.written, "written": self.written, "of": 1_000_000}

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self.server = await control.serve(self.path, self.handle, self.progress)
            self.ready.set()
            await asyncio.Event().wait()
        self.main = self.loop.create_task(main())
        try:
            self.loop.run_until_complete(self.main)
        except asyncio.CancelledError:  # __exit__ cancelled every task
            pass
        finally:
            self.loop.close()

    def __enter__(self) -> Daemon:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def shutdown() -> None:  # the server, its clients (a stuck commit too), then main()
            self.server.close()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and t is not self.main]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            self.main.cancel()
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(shutdown()))
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "ctbridge.sock")


def test_a_commit_longer_than_the_bound_is_waited_for_while_it_progresses(sock: str) -> None:
    reports: list[dict[str, Any]] = []
    with Daemon(sock, seconds=3.5, step=1000) as d:
        answer = control.request(sock, "commit", stall=1.5, on_progress=reports.append)
    assert answer["committed"] == 35_000
    assert len(reports) >= 2 and reports[-1]["written"] > reports[0]["written"]
    assert d.asked[0]["progress"] is True


def test_a_stuck_commit_fails_once_it_has_made_no_progress_for_the_bound_saying_where_it_stood(sock: str) -> None:
    with Daemon(sock, seconds=30, step=0), pytest.raises(control.ControlError) as err:
        control.request(sock, "commit", stall=2.5)
    assert str(err.value) == ("the daemon's 'commit' made no progress for 2 s (commit: 0 of 1,000,000 flows "
                              "written); it may still finish: see `ctbridge status`")


def test_without_a_stall_bound_a_request_is_answered_once_as_before(sock: str) -> None:
    """Old clients (and every other command) send no "progress" key and get one line."""
    with Daemon(sock, seconds=0.3, step=1) as d:
        assert control.request(sock, "commit", timeout=10) == {"ok": True, "committed": 3}
    assert "progress" not in d.asked[0]


def hook(sock: str, tmp_path: Path, stall: float, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "ctbridge.toml"
    config.write_text(f'[control]\nsocket = "{sock}"\n')
    env = {**os.environ, "CTBRIDGE_CONFIG": str(config), "CTBRIDGE_TIMEOUT": str(stall)}
    return subprocess.run([sys.executable, "-IS", str(ROOT / "hooks" / "ctbridge-notify"), *args],
                          env=env, capture_output=True, text=True, timeout=60)


def test_the_hook_waits_for_a_commit_longer_than_its_bound_while_it_progresses(sock: str, tmp_path: Path) -> None:
    with Daemon(sock, seconds=3.5, step=1000) as d:
        res = hook(sock, tmp_path, 1.5, "INSTANCE", "VI_1", "MASTER", "100")
    assert res.returncode == 0, res.stderr
    assert "committed: 35000" in res.stdout
    assert d.asked[0] == {"cmd": "notify", "args": ["INSTANCE", "VI_1", "MASTER", "100"], "progress": True}


def test_the_hook_fails_clearly_on_a_stuck_commit(sock: str, tmp_path: Path) -> None:
    with Daemon(sock, seconds=30, step=0):
        res = hook(sock, tmp_path, 2.5, "MASTER")
    assert res.returncode == 1
    assert res.stderr.strip() == ("ctbridge-notify: the daemon made no progress for 2 s (commit: 0 of 1,000,000 "
                                  "flows written); it may still finish: see `ctbridge status`")


def test_the_hook_reads_an_answer_that_comes_with_no_progress_line(sock: str, tmp_path: Path) -> None:
    with Daemon(sock, seconds=0.2, step=5):
        res = hook(sock, tmp_path, 5, "BACKUP")
    assert res.returncode == 0 and "committed: 10" in res.stdout

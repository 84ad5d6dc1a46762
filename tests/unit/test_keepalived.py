"""keepalived's notify_fifo read for real (a FIFO in a temporary directory), without root."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

from ctbridge.daemon import keepalived
from ctbridge.daemon.keepalived import Transition


def test_fifo_lines_become_transitions_in_order_and_other_lines_are_skipped(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.fifo")

    async def read(n: int) -> list[Transition]:
        out: list[Transition] = []
        stream = keepalived.fifo_transitions(path)
        reader = asyncio.ensure_future(_take(stream, n, out))
        for _ in range(100):  # the FIFO exists once the reader made it
            if os.path.exists(path):
                break
            await asyncio.sleep(0.01)
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, b'MASTER_RX_LOWER_PRI "VI_1" 100\nINSTANCE "VI_1" MASTER 100\nGROUP "G1" BACKUP 0\n'
                     b'nonsense\nINSTANCE "VI_1" FAULT 0\n')
        os.close(fd)
        await asyncio.wait_for(reader, 5)
        await stream.aclose()
        return out

    got = asyncio.run(read(3))
    assert [(t.kind, t.name, t.state) for t in got] == [("INSTANCE", "VI_1", "MASTER"), ("GROUP", "G1", "BACKUP"),
                                                         ("INSTANCE", "VI_1", "FAULT")]
    assert stat.S_ISFIFO(os.stat(path).st_mode) and os.stat(path).st_mode & 0o777 == 0o600


async def _take(stream: object, n: int, out: list[Transition]) -> None:
    async for t in stream:  # type: ignore[attr-defined]
        out.append(t)
        if len(out) == n:
            return


def test_a_notify_fifo_that_is_a_regular_file_is_refused_with_one_line(tmp_path: Path) -> None:
    """A regular file at the FIFO's path was opened and read as if keepalived wrote to it."""
    import pytest

    from ctbridge.config import host, settings
    path = tmp_path / "notify.fifo"
    path.write_text('INSTANCE "VI_1" MASTER 100\n')

    async def first() -> None:
        async for _t in keepalived.fifo_transitions(str(path)):
            raise AssertionError("read a regular file as the FIFO")
    with pytest.raises(keepalived.FifoError, match="is not a FIFO"):
        asyncio.run(first())
    cfg = settings.parse(f'[node]\nname = "fw1"\n[sync]\nlocal = "127.0.0.1"\npeers = ["127.0.0.2"]\nauth = "none"\n'
                         f'[keepalived]\nnotify_fifo = "{path}"\n[control]\nsocket = "{tmp_path}/s.sock"\n')
    assert any("is not a FIFO" in p for p in host.problems(cfg))

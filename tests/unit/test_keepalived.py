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

"""sync.dscp and sync.priority on the sync socket itself (the daemon test reads the DSCP off the
datagrams as they arrive)."""

from __future__ import annotations

import socket

import pytest

from ctbridge.config import settings
from ctbridge.config.settings import SyncLink
from ctbridge.daemon.synclink import sync_socket


def test_the_sync_socket_marks_its_datagrams_cs6_with_priority_6_by_default() -> None:
    cfg = settings.parse('[node]\nname = "fw1"\n[sync]\nlocal = "127.0.0.1"\npeers = ["127.0.0.2"]\nauth = "none"\n')
    assert (cfg.sync.dscp, cfg.sync.priority) == (48, 6)
    sock = sync_socket(SyncLink(local="127.0.0.1"), 0, cfg.sync.dscp, cfg.sync.priority)
    try:
        assert sock.getsockopt(socket.IPPROTO_IP, socket.IP_TOS) == 0xC0  # CS6 in the upper six bits
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY) == 6  # set after the TOS, kept
    finally:
        sock.close()


@pytest.mark.parametrize(("key", "value"), [("dscp", 64), ("dscp", -1), ("priority", 16)])
def test_out_of_range_values_refuse_to_start(key: str, value: int) -> None:
    with pytest.raises(settings.ConfigError, match=f"sync.{key}"):
        settings.parse('[node]\nname = "fw1"\n[sync]\nlocal = "127.0.0.1"\npeers = ["127.0.0.2"]\nauth = "none"\n'
                       f"{key} = {value}\n")

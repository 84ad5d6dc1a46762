"""Offloaded flows in the lab (docs/kernel.md, "Offloaded flows"): both firewalls put established
forwarded flows into an nftables flowtable, as OpenWrt and VyOS do, so the master's kernel marks
them OFFLOAD and refreshes their timeouts without events. They still survive a failover and a
failback: the standby has them from their events and the refresh sweeps, and the new master's
commit writes them as ordinary entries (the kernel ignores OFFLOAD from user space) until its own
flowtable takes them.

Needs a kernel with flowtables (nf_flow_table, nft_flow_offload); skips with the reason elsewhere
(the kernel of the machine this project's CI runs on has none)."""

from __future__ import annotations

import contextlib
import subprocess

import pytest

from ctbridge.lab import Options, lab, netns
from ctbridge.lab.scenario import Switch, switch
from tests.conftest import require

pytestmark = [pytest.mark.root, pytest.mark.lab]

TCP, UDP = 50, 10
FLOWTABLE = """
table inet lab_offload {
    flowtable ft {
        hook ingress priority 0
        devices = { lan0, wan0 }
    }
    chain forward {
        type filter hook forward priority filter - 5; policy accept;
        ct state established meta l4proto { tcp, udp } flow add @ft
    }
}
"""


def flowtables_here() -> str:
    """'' where this kernel takes a flowtable, else why not (nft's words)."""
    with netns.namespace("ft") as ns:
        netns.run(ns, "ip", "link", "add", "lan0", "type", "veth", "peer", "name", "wan0")
        done = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=FLOWTABLE, text=True,
                              capture_output=True, timeout=30, check=False)
        return "" if done.returncode == 0 else (done.stderr.strip().splitlines() or ["nft failed"])[0]


def survived(s: Switch) -> None:
    assert s.recovered is not None, f"{s.how}: flows did not recover: {s.status}"
    assert s.status["tcp_failed"] == 0 and s.status["tcp_alive"] == TCP, s.status["errors"]
    assert s.status["udp_rebound"] == 0, f"{s.how}: UDP flows were NATed anew"


def test_offloaded_flows_survive_a_failover_and_a_failback() -> None:
    require("keepalived")
    why = flowtables_here()
    if why:
        pytest.skip(f"this kernel has no nftables flowtables (nft: {why})")
    with contextlib.ExitStack() as stack:
        the_lab = stack.enter_context(lab(Options(tcp=TCP, udp=UDP)))
        for fw in the_lab.fws:
            netns.run(fw.ns, "nft", "-f", "-", input=FLOWTABLE)
        the_lab.start()
        fw1, fw2 = the_lab.fws
        listed = fw1.run("conntrack", "-L").stdout
        assert "[OFFLOAD]" in listed, "the master's flowtable offloaded nothing"
        survived(switch(the_lab, "keepalived stopped", fw1, fw2))
        survived(switch(the_lab, "keepalived started", fw1, fw1))

"""The active-active defer's policy (daemon/defer.py, DeferPolicy) on a fake clock: which packets
go on at once, which wait, and that every held packet goes on, found or not, within its wait."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctbridge.daemon.defer import DeferPolicy

KEY = b"\x02\x00\x00flow"


def test_a_packet_goes_on_at_once_when_waiting_cannot_help() -> None:
    p = DeferPolicy(wait=0.02, max_held=1)
    assert p.arrive(1, None, False, True, 0.0)  # no flow to look up (another protocol)
    assert p.arrive(2, KEY, True, True, 0.0)  # its flow is in the kernel already
    assert p.arrive(3, KEY, False, False, 0.0)  # no live, complete peer: nothing is coming
    assert not p.arrive(4, KEY, False, True, 0.0)  # held
    assert p.arrive(5, KEY + b"2", False, True, 0.0)  # the bound is reached: on at once
    assert {k: v for k, v in p.stats.items() if v} == {
        "packets": 5, "passed_unkeyed": 1, "passed_present": 1, "passed_no_peer": 1, "held": 1, "passed_full": 1}


def test_a_held_packet_goes_on_when_its_flow_is_found_or_its_wait_ends() -> None:
    p = DeferPolicy(wait=0.02)
    for pid in (1, 2, 3):
        assert not p.arrive(pid, KEY + bytes((pid,)), False, True, 1.0 + pid / 1000)
    assert p.deadline() == 1.021
    assert p.found([2, 9], 1.004) == [2]  # 9 is not held (passed already): ignored
    assert p.expire(1.0205) == []
    assert p.expire(1.021) == [1]
    assert p.waiting() == [(3, KEY + b"\x03")]
    assert p.release_all(1.022) == [3]
    assert not p.held and p.deadline() is None
    assert (p.stats["released_found"], p.stats["released_timeout"], p.stats["released_stop"]) == (1, 1, 1)
    lat = p.latency()
    assert lat["max"] == 0.02 and lat["p50"] > 0.0


def test_no_packet_is_held_past_its_wait_whatever_the_order_of_events() -> None:
    """A fake clock in uneven steps, packets arriving and flows found at random: at every step
    nothing held is older than the wait plus the step, and at the end nothing is held."""
    import random
    rng = random.Random(3)
    p = DeferPolicy(wait=0.02, max_held=50)
    now = 0.0
    for pid in range(2000):
        now += rng.choice((0.0, 0.0005, 0.003, 0.011))
        p.arrive(pid, KEY + pid.to_bytes(4, "big"), rng.random() < 0.3, rng.random() < 0.9, now)
        if rng.random() < 0.2:
            waiting = p.waiting()
            p.found([pid for pid, _k in waiting if rng.random() < 0.5], now)
        p.expire(now)
        assert all(now - since < 0.02 for _k, _d, since in p.held.values())
    p.expire(now + 0.02)
    assert not p.held
    s = p.stats
    assert s["held"] == s["released_found"] + s["released_timeout"]
    assert s["packets"] == s["held"] + sum(v for k, v in s.items() if k.startswith("passed_"))


def test_a_packet_may_pass_when_its_entry_is_there_and_for_the_origin_has_seen_a_reply() -> None:
    """The reply direction (the SYN-ACK on the node that did not see the SYN) needs the entry; the
    original direction (the client's ACK on the node whose entry never saw the SYN-ACK) needs the
    entry to have seen a reply, which the other node's replication brings."""
    from ctbridge.conntrack import abi as ct
    from ctbridge.conntrack import codec
    from ctbridge.daemon.defer import may_pass
    from tests.support import builders

    client, server = bytes((203, 0, 113, 100)), bytes((198, 51, 100, 100))
    orig = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_TCP, client, server, 40000, 5001)
    reply = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_TCP, server, client, 5001, 40000)

    def entry(status: int) -> bytes:
        return builders.build_entry(ct.AF_INET, orig, reply, status=status, tcp_state=1).attrs

    origin_key, reply_key = codec.make_key(ct.AF_INET, 0, orig), codec.make_key(ct.AF_INET, 0, reply)
    assert not may_pass(reply_key, None) and not may_pass(origin_key, None)
    assert may_pass(reply_key, entry(ct.IPS_CONFIRMED))
    assert not may_pass(origin_key, entry(ct.IPS_CONFIRMED))
    assert may_pass(origin_key, entry(ct.IPS_CONFIRMED | ct.IPS_SEEN_REPLY))


def test_the_defer_table_marks_what_it_has_not_seen_and_takes_the_mark_off_again() -> None:
    from ctbridge.daemon.defer import DONE, MARK, nft_script, rules
    script = nft_script()
    # both directions' tuples, for TCP (past a reply) and UDP (any entry)
    assert script.count("add @seen4") == 4 and script.count("add @seen6") == 4
    assert f"meta mark set meta mark | {MARK:#x}" in script and "priority -310" in script  # before conntrack
    assert f"meta mark set meta mark & {0xFFFFFFFF & ~(MARK | DONE):#x}" in script and "priority -150" in script
    for rule in rules(9):  # never a packet a verdict sent round again; passed while nobody is bound
        assert "--queue-bypass" in rule and rule[rule.index("--mark", rule.index("!")) + 1] == f"{DONE:#x}/{DONE:#x}"


def test_check_says_what_the_defer_needs_before_the_daemon_refuses_to_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: without ip6tables the daemon added the IPv4 rule, then refused to start,
    and systemd restarted it in a loop; `ctbridge check` (the unit's ExecStartPre) said nothing."""
    import shutil

    from ctbridge.config import host, settings
    cfg = settings.parse(f'[node]\nname = "fw1"\n[sync]\nlocal = "127.0.0.1"\npeers = ["127.0.0.2"]\nauth = "none"\n'
                         f'[apply]\nmode = "inject"\ndefer_queue = 9\n[control]\nsocket = "{tmp_path}/s.sock"\n')
    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool == "ip6tables" else real(tool))
    assert any("apply.defer_queue needs ip6tables" in p for p in host.problems(cfg))
    monkeypatch.setattr(shutil, "which", lambda tool: "/usr/sbin/" + tool)
    assert not any("defer_queue" in p for p in host.problems(cfg))


def test_udp_is_held_only_at_the_peers_nat_ports_addressed_to_this_node() -> None:
    from ctbridge.config import settings
    from ctbridge.daemon.defer import nft_script
    assert "udp" not in nft_script().split("chain pick")[1]  # no ports: no UDP held
    pick = nft_script("1024-33279, 40000").split("chain pick")[1]
    assert pick.count("udp dport { 1024-33279,40000 } fib daddr type local") == 2  # IPv4 and IPv6
    base = '[node]\nname = "fw1"\n[sync]\nlocal = "127.0.0.1"\npeers = ["127.0.0.2"]\nauth = "none"\n'
    assert "udp dport != 3780" in nft_script("1024-33279", sync_port=3780)  # the sync link's datagrams
    for bad in ("1024", "0-10", "2000-1000", "1-70000", "a-b", "1-2,", "01024-02000"):
        if bad == "1024":
            assert settings.parse(base + f'[apply]\ndefer_udp_ports = "{bad}"\n').apply.defer_udp_ports == "1024"
            continue
        with pytest.raises(settings.ConfigError, match="defer_udp_ports"):
            settings.parse(base + f'[apply]\ndefer_udp_ports = "{bad}"\n')


def test_a_udp_packet_needs_only_its_entry_in_either_direction() -> None:
    """Found by review: one-way UDP to the firewall (syslog, a tunnel) never sees a reply, and
    every datagram waited the whole defer_wait."""
    from ctbridge.conntrack import abi as ct
    from ctbridge.conntrack import codec
    from ctbridge.daemon.defer import may_pass
    from tests.support import builders
    src, dst = bytes((198, 51, 100, 7)), bytes((203, 0, 113, 1))
    orig = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_UDP, src, dst, 40000, 514)
    reply = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_UDP, dst, src, 514, 40000)
    unreplied = builders.build_entry(ct.AF_INET, orig, reply, status=ct.IPS_CONFIRMED).attrs  # no reply seen
    key = codec.make_key(ct.AF_INET, 0, orig)
    assert may_pass(key, unreplied) and not may_pass(key, None)

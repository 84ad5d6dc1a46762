"""The commit gate: while this node is not MASTER, new forwarded flows are dropped.

keepalived raises the VIPs before its notify hook has run, so the first packets of existing flows
can reach the new master before their entries are committed. Without a gate the kernel would
create fresh entries for them (UDP, and TCP with nf_conntrack_tcp_loose): a NAT binding made anew
(another random port), and a later commit that cannot replace it (EEXIST keeps the kernel's
binding). With the gate those packets are dropped instead; TCP resends them and UDP's next
datagram finds the committed entry.

The forward hook is gated, and, for the VIPs (keepalived.vips) only, the input hook: a reply to a
NATed flow is addressed to the VIP and, before its entry is committed, is not de-NATed but
delivered to the firewall itself, where a strict ruleset drops it as unknown (the soak counted
12 such drops at a first failover with 100,000 flows to commit). A node that is not MASTER holds
no VIP, so nothing else addressed to one reaches it; the firewall's own traffic (ssh to its own
addresses, VRRP, the sync link) is never gated.

The gate is an nftables table of its own, made and removed with nft(8): one command per
transition, so it composes with any ruleset. Removing the table opens the gate; so does a clean
stop of the daemon, so a stopped ctbridge never keeps a firewall closed (fail open: only the
flows that were not replicated are lost then).

This module holds the nft scripts and ``GateKeeper``, which opens and closes the gate for the
daemon's transitions and keeps its state in the stats. It imports nothing of ctbridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("ctbridge")

TABLE = "ctbridge_gate"
NFT_TIMEOUT = 10.0  # seconds; nft holds the transition lock while it runs
COMMENT = "ctbridge commit gate: this node is not MASTER"


def closed_script(vips: Iterable[str] = ()) -> str:
    """The nft script that closes the gate: the forward chain, and an input chain for ``vips``
    (addresses, a prefix length allowed)."""
    v4 = sorted({str(ipaddress.ip_interface(v).ip) for v in vips if ipaddress.ip_interface(v).version == 4})
    v6 = sorted({str(ipaddress.ip_interface(v).ip) for v in vips if ipaddress.ip_interface(v).version == 6})
    rules = [f"        {fam} daddr {{ {', '.join(addrs)} }} ct state new,invalid counter drop comment \"{COMMENT}\""
             for fam, addrs in (("ip", v4), ("ip6", v6)) if addrs]
    inbound = ("" if not rules else "    chain input {\n        type filter hook input priority filter - 20; "
               "policy accept;\n" + "\n".join(rules) + "\n    }\n")
    return (f"table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n"
            "    chain forward {\n        type filter hook forward priority filter - 20; policy accept;\n"
            f"        ct state new counter drop comment \"{COMMENT}\"\n    }}\n{inbound}}}\n")


class GateError(RuntimeError):
    pass


async def _nft(script: str | None, *args: str) -> tuple[int, bytes, str]:
    """nft with ``args`` (``-f -`` reading ``script`` when given): its exit status (-1: it did not
    finish within NFT_TIMEOUT), its output and its error text."""
    argv = ["nft", *args, *(("-f", "-") if script is not None else ())]
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                env={**os.environ, "LC_ALL": "C"})
    try:
        out, err = await asyncio.wait_for(proc.communicate(script.encode() if script is not None else None),
                                          NFT_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, b"", f"nft did not finish within {NFT_TIMEOUT:.0f} s"
    return proc.returncode or 0, out, err.decode(errors="replace").strip()


async def dropped() -> int | None:
    """The packets the closed gate has dropped so far (its rules' counters); None when they
    cannot be read (no table: 0). Read just before the gate opens: deleting the table takes its
    counters with it. Packets dropped between the read and the delete, a few milliseconds, are
    not counted (nft cannot list and delete in one batch)."""
    rc, out, err = await _nft(None, "-j", "list", "table", "inet", TABLE)
    if rc != 0:
        return 0 if "No such file or directory" in err else None
    try:
        items = json.loads(out)["nftables"]
        return sum(int(e["counter"]["packets"]) for item in items for e in item.get("rule", {}).get("expr", ())
                   if isinstance(e, dict) and "counter" in e)
    except (ValueError, KeyError, TypeError):
        return None


async def close(vips: Iterable[str] = ()) -> None:
    rc, _, err = await _nft(closed_script(vips))
    if rc != 0:
        raise GateError(f"cannot close the commit gate: nft said {err or rc}")


async def open_() -> None:
    # declaring the table first makes the delete succeed whether or not it existed
    rc, _, err = await _nft(f"table inet {TABLE}\ndelete table inet {TABLE}\n")
    if rc != 0:
        raise GateError(f"cannot open the commit gate: nft said {err or rc}")


OPEN_ATTEMPTS = 60  # a gate that cannot be opened is tried again every second for a minute; then
# the operator has the error in the log


class GateKeeper:
    """The gate of one daemon: closed while not MASTER, opened once the flows are committed.

    ``gated``: the gate is used (apply.gate in commit mode); ``stats``: the daemon's stats
    sections, whose "gate" this keeps (None until set, "open", "closed", "failed to ...")."""

    def __init__(self, gated: bool, vips: Iterable[str], stats: dict[str, Any]) -> None:
        self.gated = gated
        self.vips = tuple(vips)
        self.stats = stats
        self.retry: asyncio.Future[None] | None = None

    async def set(self, closed: bool) -> None:
        """Close or open the gate (nothing if it is so already). At start the daemon closes it
        only on a node holding none of keepalived.vips (a standby, RoleKeeper.restore); a
        master's is left as it is, and keepalived's next word sets it. A gate that cannot be
        opened is retried in the background: a master must never keep new flows out."""
        want = "closed" if closed else "open"
        if not self.gated or self.stats["gate"] == want:
            return
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None
        try:
            if closed:
                await close(self.vips)
            else:
                await self._open()
        except (GateError, OSError) as exc:
            log.error("%s", exc)
            self.stats["gate"] = f"failed to {'close' if closed else 'open'}"
            if not closed:
                self.retry = asyncio.ensure_future(self._open_until_done())
            return
        self.stats["gate"] = want
        log.info("commit gate %s", want)

    async def _open_until_done(self) -> None:
        for attempt in range(1, OPEN_ATTEMPTS + 1):
            await asyncio.sleep(1)
            try:
                await self._open()
            except (GateError, OSError) as exc:
                log.error("attempt %d: %s", attempt, exc)
                continue
            self.stats["gate"] = "open"
            log.info("commit gate open (attempt %d)", attempt)
            break
        self.retry = None

    async def _open(self) -> None:
        """Open the gate, its drops counted first (stats "gate_packets", kept across openings;
        counted only when the opening succeeds, so a retried one counts them once)."""
        count = await dropped()
        await open_()
        self.stats["gate_packets"] += count or 0

    async def stop(self) -> None:
        """At the daemon's stop: fail open, a stopped daemon blocks nothing."""
        if self.retry is not None:
            self.retry.cancel()
        if self.stats["gate"] not in (None, "open"):
            with contextlib.suppress(Exception):
                await self._open()

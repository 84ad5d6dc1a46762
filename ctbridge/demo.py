"""`make demo`: replicate a live conntrack table between two firewall namespaces and show it.

Builds two network namespaces, fw1 (active) and fw2 (standby), gives fw1 real NATed flows made by
real packets plus a few entries of other protocols, then copies fw1's table into fw2 through
ctbridge's kernel adapter and shows both sides with the conntrack CLI as witness. Everything is
removed at the end, also after Ctrl-C or a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time

from ctbridge import netns
from ctbridge.kernel import KernelTable
from ctbridge.view import entry_view

NAT_RULES = """
table ip nat {
  chain post {
    type nat hook postrouting priority 100;
    ip daddr 198.51.100.0/24 meta l4proto { tcp, udp } snat to 203.0.113.7:40000-40999
    ip daddr 198.51.100.0/24 meta l4proto icmp snat to 203.0.113.7
  }
}
"""
TRAFFIC = """
import socket
for port in range(5000, 5012):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("192.0.2.1", port))
    s.sendto(b"demo", ("198.51.100.%d" % (port - 4990), 53))
"""
CLI_FLOWS = [
    "-p tcp -s 192.0.2.50 -d 198.51.100.80 --sport 43210 --dport 443 -r 198.51.100.80 -q 203.0.113.7 "
    "--reply-port-src 443 --reply-port-dst 40123 --state ESTABLISHED -u SEEN_REPLY,ASSURED -t 3600 -m 1",
    "-p tcp -s 2001:db8::50 -d 2001:db8:1::80 --sport 43211 --dport 22 --state ESTABLISHED -u SEEN_REPLY,ASSURED "
    "-t 3600",
    "-p udp -s 192.0.2.51 -d 198.51.100.123 --sport 123 --dport 123 -t 120 --zone 10",
]


def say(text: str = "") -> None:
    print(text, flush=True)


def table_lines(ns: str) -> list[str]:
    out = netns.run(ns, "conntrack", "-L", "-o", "extended", check=False).stdout
    return sorted(" ".join(line.split()) for line in out.splitlines() if line.strip())


def main() -> int:
    if os.geteuid() != 0:
        print("ctbridge demo: needs root (it builds network namespaces); run `make demo` as root", file=sys.stderr)
        return 1
    for tool in ("ip", "conntrack", "nft"):
        if shutil.which(tool) is None:
            print(f"ctbridge demo: `{tool}` is missing; `make demo` installs it", file=sys.stderr)
            return 1
    with contextlib.ExitStack() as stack:
        fw1 = stack.enter_context(netns.namespace("fw1"))
        fw2 = stack.enter_context(netns.namespace("fw2"))
        say(f"lab: {fw1} (active) and {fw2} (standby), sync link 192.0.2.253 <-> 192.0.2.254")
        netns.run(fw1, "ip", "link", "add", "sync0", "type", "veth", "peer", "name", "sync1", "netns", fw2)
        netns.run(fw1, "ip", "addr", "add", "192.0.2.253/30", "dev", "sync0")
        netns.run(fw2, "ip", "addr", "add", "192.0.2.254/30", "dev", "sync1")
        netns.run(fw1, "ip", "link", "set", "sync0", "up")
        netns.run(fw2, "ip", "link", "set", "sync1", "up")
        # fw1's LAN side, with a WAN route into a veth stub, so real packets get conntracked and NATed
        netns.run(fw1, "ip", "link", "add", "wan0", "type", "veth", "peer", "name", "wan1")
        for cmd in (["ip", "link", "set", "wan0", "up"], ["ip", "link", "set", "wan1", "up"],
                    ["ip", "addr", "add", "192.0.2.1/25", "dev", "wan0"],
                    ["ip", "route", "add", "198.51.100.0/24", "dev", "wan0"]):
            netns.run(fw1, *cmd)
        for host in range(10, 22):
            netns.run(fw1, "ip", "neigh", "add", f"198.51.100.{host}", "lladdr", "02:00:00:00:00:01", "dev", "wan0")
        netns.run(fw1, "nft", "-f", "-", input=NAT_RULES)
        netns.run(fw1, sys.executable, "-c", TRAFFIC)
        for args in CLI_FLOWS:
            netns.run(fw1, "conntrack", "-I", *args.split())

        say("\nfw1's conntrack table (conntrack -L):")
        for line in table_lines(fw1):
            say("  " + line)
        with netns.inside(fw1):
            active = KernelTable()
        with netns.inside(fw2):
            standby = KernelTable()
        with active, standby:
            start = time.perf_counter()
            entries = active.dump()
            dumped = time.perf_counter() - start
            result = standby.commit(entries)
        nat = sum(1 for e in entries if "SRC_NAT" in entry_view(e)["status"])
        say(f"\nctbridge: dumped {len(entries)} flows from fw1 in {dumped * 1000:.1f} ms "
            f"({nat} with a source-NAT binding), committed {result.created} into fw2 in "
            f"{result.seconds * 1000:.1f} ms, {len(result.failed)} failed")
        say("\nfw2's conntrack table after the commit (conntrack -L):")
        for line in table_lines(fw2):
            say("  " + line)
        # everything but the remaining timeout (the 5th word) must be identical
        before = sorted(w[:4] + w[5:] for w in (line.split() for line in table_lines(fw1)))
        after = sorted(w[:4] + w[5:] for w in (line.split() for line in table_lines(fw2)))
        ok = before == after and not result.failed
        say(f"\n{'OK' if ok else 'MISMATCH'}: fw2 holds the same {len(after)} flows as fw1 "
            "(tuples, NAT bindings, TCP state, mark, zone; timeouts within seconds)")
        say("cleaning up the lab")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)

"""`make demo`: a live failover of a stateful NAT firewall pair, with connections that survive it.

Builds the HA lab (ctbridge.lab): a client, fw1 and fw2 running keepalived, nftables and ctbridge,
and a server, each in a network namespace of its own. 200 TCP connections and 20 UDP flows run
through the active firewall, every byte checked. Then fw1's keepalived is stopped (fw2 takes over),
started again (fw1 takes back), fw1's LAN link is taken down and brought up. A status line shows the
flows while this happens; a table sums it up. Everything is removed at the end, also after Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import Any

from ctbridge.lab import Lab, Options, lab
from ctbridge.lab.scenario import FAILOVERS, Switch, switch, table


def say(text: str = "") -> None:
    print(text, flush=True)


class Progress:
    """One status line, redrawn in place on a terminal (a line every few seconds otherwise)."""

    def __init__(self, the_lab: Lab) -> None:
        self.lab = the_lab
        self.tty = sys.stdout.isatty()
        self.started = time.monotonic()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def line(self) -> str:
        s: dict[str, Any] = self.lab.status()
        master = self.lab.master()
        now = time.monotonic()
        moving = sum(1 for t in (s.get("tcp_oldest"),) if t is not None and now - t < 1.0)
        standby = next((fw for fw in self.lab.fws if fw is not master), None)
        held = "-"
        if standby is not None:
            try:
                held = str(self.lab.replicator.replicated(standby))
            except Exception:  # the standby's daemon may be restarting: show a dash
                held = "-"
        return (f"[{now - self.started:6.1f}s] master {master.name if master else 'none':4} | "
                f"TCP {s.get('tcp_alive', 0)}/{self.lab.options.tcp} open, {s.get('tcp_failed', 0)} failed, "
                f"{'all moving' if moving else 'stalled  '} | UDP {s.get('udp_flows', 0)} flows, "
                f"{s.get('udp_rebound', 0)} re-NATed | {s.get('bytes', 0) / 1e6:7.1f} MB | standby holds {held}")

    def run(self) -> None:
        last = 0.0
        while not self.stop.wait(0.25):
            try:
                text = self.line()
            except Exception:  # the lab is being torn down
                continue
            if self.tty:
                sys.stdout.write("\r" + text + "\033[K")
                sys.stdout.flush()
            elif time.monotonic() - last >= 3:
                say(text)
                last = time.monotonic()

    def note(self, text: str) -> None:
        if self.tty:
            sys.stdout.write("\r\033[K")
        say(text)

    def __enter__(self) -> Progress:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(2)
        if self.tty:
            sys.stdout.write("\r\033[K")
            sys.stdout.flush()


def demo(options: Options) -> int:
    say(f"Building the lab: client, fw1 + fw2 (keepalived, nftables NAT, ctbridge {options.apply_mode} mode), "
        "server ...")
    switches: list[Switch] = []
    commits: list[str] = []
    with lab(options) as the_lab:
        the_lab.start()
        say(f"fw1 is master; {options.tcp} TCP connections and {options.udp} UDP flows run through it, "
            "SNATed to the WAN VIP with random ports.")
        with Progress(the_lab) as progress:
            time.sleep(3)
            for how, on, new in FAILOVERS:
                fw, target = the_lab.fws[on], the_lab.fws[new]
                progress.note(f"-> {how} on {fw.name}: {target.name} should take over")
                s = switch(the_lab, how, fw, target)
                switches.append(s)
                stats = target.request("stats")
                commit = stats["commit"]
                commits.append(f"{target.name}: {commit['entries']} flows committed in "
                               f"{commit['seconds'] * 1000:.0f} ms" if options.apply_mode == "commit"
                               else f"{target.name}: the flows were already in its kernel (inject mode)")
                progress.note(f"   {target.name} is master after {s.to_master:.2f} s; "
                              + (f"every flow moved data again {s.recovered:.2f} s later" if s.recovered is not None
                                 else "FLOWS DID NOT RECOVER"))
                time.sleep(3)
        final = the_lab.stop()
    say()
    for row in table(switches):
        say(row)
    say()
    say("flows: TCP+UDP of the client in the master's kernel (conntrack -L); replicated: flows the new master held "
        "for its peer;\ncommitted: from keepalived's MASTER notification until the flows were in the new master's "
        "kernel; dropped: forwarded packets both firewalls dropped.")
    for line in commits:
        say(f"  {line}")
    ok = (all(s.recovered is not None for s in switches) and final.get("tcp_failed") == 0
          and final.get("udp_rebound") == 0 and final.get("tcp_open") == options.tcp)
    say()
    say(f"Result: {final.get('tcp_open', 0)} TCP connections opened, {final.get('tcp_failed', 0)} failed, "
        f"{final.get('bytes', 0) / 1e6:.1f} MB echoed and checked byte for byte; "
        f"{final.get('udp_rebound', 0)} of {final.get('udp_flows', 0)} UDP flows NATed anew.")
    say("Every connection survived every failover." if ok else "SOME CONNECTIONS DID NOT SURVIVE.")
    say("The lab is removed.")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctbridge.lab.demo", description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("commit", "inject"), default="commit", help="ctbridge apply mode")
    p.add_argument("--tcp", type=int, default=200)
    p.add_argument("--udp", type=int, default=20)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("make demo needs root: it creates network namespaces and runs keepalived", file=sys.stderr)
        return 1
    # SIGINT and SIGTERM unwind the stack, so the lab is torn down either way (SIGINT explicitly:
    # a shell starts background jobs with it ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return demo(Options(apply_mode=args.mode, tcp=args.tcp, udp=args.udp))
    except KeyboardInterrupt:
        print("\ninterrupted; the lab is removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

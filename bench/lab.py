"""The HA lab three times, side by side: ctbridge, then conntrackd (FTFW over UDP) driven by the
same keepalived with primary-backup semantics, then conntrackd driven by ctbridge (apply.backend =
"conntrackd": keepalived's FIFO, ordered and checked steps, the interlock and the gate), through
the same four failovers and the same traffic.

    python bench/lab.py [--tcp 200] [--udp 20] [--mode commit|inject] [--json FILE]

For each change of master it prints, for both: the flows still moving data afterwards (TCP), the
UDP flows NATed anew (their binding was lost), the seconds from keepalived's MASTER notify until
the hook had committed the flows, the seconds until every flow moved again, and the forwarded
packets the firewalls dropped meanwhile.

conntrackd's hook (written here from conntrackd(8), with the semantics of the primary-backup
script that conntrack-tools ships): MASTER: commit the external cache (-c), then flush the caches
(-f), resync the internal cache from the kernel (-R) and bulk-send it (-B), the last three without
keeping keepalived's hook waiting, as ctbridge's MASTER hook answers after its commit; BACKUP:
shorten the kernel timers of the old entries (-t), ask the peer for a resync (-n); FAULT: -t.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ctbridge.lab import Firewall, Options, lab, wait_for
from ctbridge.lab.process import Process
from ctbridge.lab.scenario import FAILOVERS, Switch, switch
from ctbridge.lab.topology import SYNC_PORT

CONNTRACKD_CONF = """# conntrackd.conf for {name} in the lab (bench/lab.py); see conntrackd.conf(5)
Sync {{
    Mode FTFW {{
        ResendQueueSize 131072
        PurgeTimeout 60
    }}
    UDP {{
        IPv4_address {local}
        IPv4_Destination_Address {peer}
        Port {port}
        Interface sync0
        SndSocketBuffer 8388608
        RcvSocketBuffer 8388608
        Checksum on
    }}
}}
General {{
    Systemd no
    HashSize 32768
    HashLimit 131072
    LogFile {dir}/conntrackd.log
    Syslog off
    LockFile {dir}/conntrackd.lock
    UNIX {{
        Path {dir}/conntrackd.ctl
    }}
    NetlinkBufferSize 8388608
    NetlinkBufferSizeMaxGrowth 67108864
    Filter From Userspace {{
        Address Ignore {{
            IPv4_address 127.0.0.1
            IPv4_address 198.51.100.0/30
            IPv4_address 192.0.2.2
            IPv4_address 192.0.2.3
            IPv4_address 203.0.113.2
            IPv4_address 203.0.113.3
        }}
    }}
}}
"""

HOOK = """#!/bin/sh
# keepalived notify hook for conntrackd in the lab: GROUP|INSTANCE NAME STATE PRIORITY
c="conntrackd -C {conf}"
case "$3" in
MASTER)
    $c -c                       # commit the external cache into the kernel: the flows are there now
    ( $c -f; $c -R; $c -B ) </dev/null >/dev/null 2>&1 &   # flush, resync internal, bulk send
    ;;
BACKUP)
    $c -t                       # old entries expire soon unless packets keep them alive
    $c -n                       # ask the peer for its whole table
    ;;
FAULT)
    $c -t
    ;;
esac
exit 0
"""


class ConntrackdReplicator:
    name = "conntrackd"
    interlock = False

    def prepare(self, fw: Firewall, fws: Sequence[Firewall]) -> None:
        peer = next(other for other in fws if other is not fw)
        conf = fw.dir / "conntrackd.conf"
        conf.write_text(CONNTRACKD_CONF.format(name=fw.name, local=fw.sync, peer=peer.sync, port=SYNC_PORT,
                                               dir=fw.dir))
        hook = fw.dir / "conntrackd-hook"
        hook.write_text(HOOK.format(conf=conf))
        hook.chmod(0o755)
        fw.write_notify_wrapper(shlex.quote(str(hook)))

    def start(self, fw: Firewall) -> None:
        fw.daemon = Process(f"{fw.name} conntrackd", fw.ns, ["conntrackd", "-C", str(fw.dir / "conntrackd.conf")],
                            fw.dir / "conntrackd.console")
        wait_for(f"{fw.name}'s conntrackd to answer", lambda: fw.conntrackd_caches() is not None, timeout=30)

    def stop(self, fw: Firewall, sig: int = signal.SIGTERM) -> None:
        if fw.daemon is not None:
            fw.daemon.stop(sig)
            fw.daemon = None

    def master_seconds(self, fw: Firewall, since: float) -> float | None:
        return None  # the hook's duration: keepalived starts it, it returns after `conntrackd -c`

    def replicated(self, fw: Firewall) -> int | None:
        stats = fw.conntrackd_caches() if fw.daemon is not None else None
        return stats.get("external") if stats else None


def run(replicator: Any, options: Options) -> list[Switch]:
    switches = []
    with lab(options, replicator) as the_lab:
        the_lab.start()
        fw2 = the_lab.fws[1]
        wait_for("the standby to hold every flow",
                 lambda: (the_lab.replicator.replicated(fw2) or 0) >= options.tcp + options.udp, timeout=60)
        for how, on, new in FAILOVERS:
            time.sleep(3)
            s = switch(the_lab, how, the_lab.fws[on], the_lab.fws[new], recover_timeout=20)
            print(f"  {replicator.name}: {how}: {s.tcp_moving}/{options.tcp} TCP moving, {s.udp_renat} UDP re-NATed, "
                  f"committed after {_ms(s.to_committed)} ms, recovered "
                  f"{'never' if s.recovered is None else f'{s.recovered:.2f} s'}, dropped {s.dropped}", flush=True)
            switches.append(s)
        the_lab.stop()
    return switches


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tcp", type=int, default=200)
    p.add_argument("--udp", type=int, default=20)
    p.add_argument("--mode", choices=("commit", "inject"), default="commit", help="ctbridge's apply mode")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    for tool in ("keepalived", "conntrackd", "conntrack", "nft"):
        if shutil.which(tool) is None:
            print(f"bench/lab.py needs {tool} (make deps installs it)", file=sys.stderr)
            return 1
    from ctbridge.lab.firewall import CtbridgeReplicator
    options = Options(apply_mode=args.mode, tcp=args.tcp, udp=args.udp)
    print(f"ctbridge ({args.mode} mode):", flush=True)
    ours = run(CtbridgeReplicator(options), options)
    print("conntrackd (FTFW/UDP, primary-backup semantics):", flush=True)
    theirs = run(ConntrackdReplicator(), Options(tcp=args.tcp, udp=args.udp, notify="hook"))
    print("conntrackd driven by ctbridge (apply.backend = \"conntrackd\", notify FIFO):", flush=True)
    driven_options = Options(tcp=args.tcp, udp=args.udp, backend="conntrackd")
    driven = run(CtbridgeReplicator(driven_options), driven_options)
    print()
    head = (f"{'failover':<20} | {'TCP moving after':>18} | {'UDP re-NATed':>12} | {'MASTER->committed ms':>20} | "
            f"{'all flows move s':>18} | {'packets dropped':>15}")
    print(f"{'':<20} | {'ctbridge / conntrackd / conntrackd driven by ctbridge':^18}")
    print(head)
    print("-" * len(head))
    for a, b, c in zip(ours, theirs, driven, strict=True):
        print(f"{a.how:<20} | {f'{a.tcp_moving} / {b.tcp_moving} / {c.tcp_moving}':>18} | "
              f"{f'{a.udp_renat} / {b.udp_renat} / {c.udp_renat}':>12} | "
              f"{f'{_ms(a.to_committed)} / {_ms(b.to_committed)} / {_ms(c.to_committed)}':>20} | "
              f"{f'{_fmt(a.recovered)} / {_fmt(b.recovered)} / {_fmt(c.recovered)}':>18} | "
              f"{f'{a.dropped} / {b.dropped} / {c.dropped}':>15}")
    hooks = [(a.to_committed, b.to_committed) for a, b in zip(ours, theirs, strict=True)
             if a.to_committed and b.to_committed]
    if hooks:
        ratio = sum(b for _, b in hooks) / sum(a for a, _ in hooks)
        print(f"\nMASTER -> committed: ctbridge {ratio:.2f}x conntrackd's speed (conntrackd's time / ctbridge's, over "
              f"{len(hooks)} failovers); flows moving after all failovers: ctbridge "
              f"{min(s.tcp_moving for s in ours)}/{args.tcp}, "
              f"conntrackd {min(s.tcp_moving for s in theirs)}/{args.tcp}")
    if args.json:
        def rows(switches: list[Switch]) -> list[dict[str, Any]]:
            return [{k: v for k, v in vars(s).items() if k != "status"} for s in switches]
        args.json.write_text(json.dumps({"ctbridge": rows(ours), "conntrackd": rows(theirs),
                                         "conntrackd driven by ctbridge": rows(driven)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measure conntrack-tools' `conntrackd -c` (external cache -> kernel commit) on this machine.

    python bench/conntrackd_harness.py [--entries N] [--events]

Used by bench/kernel.py so that ctbridge's commit rate and conntrackd's are measured in the same run, on the same
kernel, under the same load. measure_conntrackd() (the default) times the bulk-sync and commit paths:

  1. two fresh network namespaces A and B joined by a veth pair (192.0.2.1/24 <-> 192.0.2.2/24);
  2. A's kernel table is filled with N established TCP flows through `conntrack -R`;
  3. one conntrackd per namespace (FTFW over UDP on the veth) is started; A's picks the flows up from its
     start-up kernel dump, then `conntrackd -B` (bulk send) pushes them to B's external cache (timed: sync rate);
  4. B's kernel table is flushed and `conntrackd -c` commits B's external cache into it (timed until B's kernel
     holds all N flows, in case the commit finishes after the client returns: commit rate).

measure_conntrackd_events() (--events) times the *event* path instead, with the same namespaces and configurations:

  1. as above;
  2. both daemons are started on empty kernel tables and become ready;
  3. A's kernel table is filled with N established TCP flows by a single `conntrack -R`; A's conntrackd learns them
     from ctnetlink events and forwards them to B as they arrive. Timed from the start of the load until B's external
     cache holds all N, within EVENTS_TIMEOUT. An insert burst can overrun A's netlink event socket, after which
     conntrackd only converges through its scheduled kernel resync (NetlinkOverrunResync, 30 s by default); not
     converging within the bound is a result (converged=False with the counts reached), not an error.

Only documentation addresses are used (RFC 5737), and nothing leaves the two namespaces. Namespaces, daemons and the
temporary directory are removed on every exit path, Ctrl-C included. Only the standard library is used; the
conntrack-tools binaries are driven as external programs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctbridge.daemon.conntrackd import cache_sizes

# Bounds on every wait. The sync and commit bounds are generous: conntrackd runs at a real-time priority and is
# normally done in seconds, so hitting these means "broken", not "slow".
READY_TIMEOUT = 30.0  # daemon start-up, including its initial kernel dump
INTERNAL_TIMEOUT = 60.0  # A's internal cache catching up with A's kernel table
SYNC_TIMEOUT = 120.0  # A -> B bulk transfer
COMMIT_TIMEOUT = 120.0  # conntrackd -c, and B's kernel table reaching N afterwards
EVENTS_TIMEOUT = 120.0  # event path: start of `conntrack -R` -> B's external cache holding N (covers one overrun
#                         resync, which conntrackd schedules 30 s after the overrun by default)
CMD_TIMEOUT = 30.0  # any short control command (ip, conntrackd -s, conntrack -C/-F)
STOP_TIMEOUT = 5.0  # SIGTERM -> exit, before SIGKILL

SYNC_PORT = 3780
ADDR_A = "192.0.2.1"  # RFC 5737 TEST-NET-1: the dedicated sync link
ADDR_B = "192.0.2.2"
# conntrackd 1.4.7 rejects `Interface cdA` with a syntax error (its config lexer seems to take words made only of
# hex digits for something other than a name), so the veth names deliberately contain non-hex letters.
VETH_A = "vctba"
VETH_B = "vctbb"
# Flows: TEST-NET-2 clients -> TEST-NET-3 servers, port 80. 254 hosts x 64512 ports per server address.
SRC_NET = "198.51.100"
DST_NET = "203.0.113"
PORT_BASE = 1024
PORTS = 65536 - PORT_BASE
HOSTS = 254
MAX_ENTRIES = HOSTS * PORTS * HOSTS

_seq = itertools.count()  # makes namespace names unique across several calls in one process


class HarnessError(Exception):
    """A step failed; the message is one line meant for the benchmark's output."""


@dataclass
class _Node:
    label: str
    netns: str
    veth: str
    addr: str
    peer: str
    tmp: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def conf(self) -> Path:
        return self.tmp / f"conntrackd-{self.label}.conf"

    @property
    def log_file(self) -> Path:
        return self.tmp / f"conntrackd-{self.label}.log"

    @property
    def console(self) -> Path:
        return self.tmp / f"conntrackd-{self.label}.out"


def _one_line(text: str | bytes | None, limit: int = 200) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:limit]


def _run(argv: list[str], timeout: float = CMD_TIMEOUT) -> str:
    """Run a command to completion and return its stdout; any failure becomes a one-line HarnessError."""
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:  # run() has already killed the child
        raise HarnessError(f"{' '.join(argv[-3:])}: timed out after {timeout:.0f}s") from exc
    except OSError as exc:
        raise HarnessError(f"{argv[0]}: {exc}") from exc
    if res.returncode != 0:
        detail = _one_line(res.stderr) or _one_line(res.stdout) or f"exit status {res.returncode}"
        raise HarnessError(f"{' '.join(argv[3:] if argv[:2] == ['ip', 'netns'] else argv)}: {detail}")
    return res.stdout


def _in_ns(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def _entry_line(i: int) -> str:
    """The i-th flow in `conntrack -L -o save` format; distinct i give distinct tuples."""
    src = f"{SRC_NET}.{1 + i % HOSTS}"
    port = PORT_BASE + (i // HOSTS) % PORTS
    dst = f"{DST_NET}.{1 + i // (HOSTS * PORTS)}"
    return (f"-A -t 3600 -u ASSURED -s {src} -d {dst} -r {dst} -q {src} -p tcp --sport {port} --dport 80 "
            f"--reply-port-src 80 --reply-port-dst {port} --state ESTABLISHED\n")


def _render_conf(node: _Node, n: int) -> str:
    # The cache must hold every flow with room to spare: conntrackd(8) recommends HashLimit at twice the kernel
    # limit, because dead entries linger in the cache while they wait for acknowledgement.
    hash_size = max(32768, 1 << max(n - 1, 1).bit_length())
    hash_limit = max(131072, 2 * n)
    # The resend queue keeps every unacknowledged message of the bulk transfer; too small a queue makes FTFW drop
    # what it could otherwise retransmit.
    resend = max(131072, 2 * n)
    return f"""\
# Generated by bench/conntrackd_harness.py for one benchmark run; see conntrackd.conf(5).
Sync {{
\tMode FTFW {{
\t\tResendQueueSize {resend}
\t}}
\tUDP {{
\t\tIPv4_address {node.addr}
\t\tIPv4_Destination_Address {node.peer}
\t\tPort {SYNC_PORT}
\t\tInterface {node.veth}
\t\tSndSocketBuffer 8388608
\t\tRcvSocketBuffer 8388608
\t\tChecksum on
\t}}
}}
General {{
\tSystemd no
\tHashSize {hash_size}
\tHashLimit {hash_limit}
\tLogFile {node.log_file}
\tSyslog off
\tLockFile {node.tmp / f"conntrackd-{node.label}.lock"}
\tUNIX {{
\t\tPath {node.tmp / f"conntrackd-{node.label}.ctl"}
\t}}
\t# The kernel emits events far faster than the daemon drains them during bulk inserts; a small socket buffer
\t# overruns and triggers a (slow) resync instead.
\tNetlinkBufferSize 8388608
\tNetlinkBufferSizeMaxGrowth 67108864
\tFilter From Userspace {{
\t\tProtocol Accept {{
\t\t\tTCP
\t\t}}
\t\tAddress Accept {{
\t\t\tIPv4_address {SRC_NET}.0/24
\t\t\tIPv4_address {DST_NET}.0/24
\t\t}}
\t}}
}}
"""


def _stats(node: _Node, timeout: float = CMD_TIMEOUT) -> tuple[int, int]:
    """(internal, external) cache sizes from `conntrackd -s`, far cheaper than dumping the caches."""
    out = _run(_in_ns(node.netns, "conntrackd", "-C", str(node.conf), "-s"), timeout=timeout)
    found = cache_sizes(out)
    if len(found) != 2:
        raise HarnessError(f"conntrackd -s in {node.label}: unexpected output: {_one_line(out)!r}")
    return found["internal"], found["external"]


def _kernel_count(ns: str) -> int:
    out = _run(_in_ns(ns, "conntrack", "-C")).strip()
    if not out.isdigit():
        raise HarnessError(f"conntrack -C: unexpected output {out!r}")
    return int(out)


def _check_alive(node: _Node) -> None:
    if node.proc is not None and node.proc.poll() is not None:
        why = ""
        for f in (node.log_file, node.console):
            if f.exists():
                why = why or _one_line(f.read_text(errors="replace"))
        raise HarnessError(f"conntrackd in {node.label} exited with status {node.proc.returncode}: {why}")


def _poll(fetch: Callable[[], int], target: int, start: float, timeout: float) -> tuple[int, float | None]:
    """Poll fetch() until it reaches target or timeout seconds after start have passed.

    Returns the last value and the seconds from start until the target was seen (None on timeout). The delay backs
    off from 2 ms, so short phases are timed finely without hammering the daemon during long ones."""
    delay = 0.002
    value = fetch()
    while value < target:
        left = timeout - (time.perf_counter() - start)
        if left <= 0:
            return value, None
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.1)
        value = fetch()
    return value, time.perf_counter() - start


def _rss(node: _Node) -> int:
    """Resident memory of a node's conntrackd, 0 if it cannot be read."""
    try:
        import psutil
        return int(psutil.Process(node.proc.pid).memory_info().rss) if node.proc is not None else 0
    except Exception:
        return 0


def _cpu(node: _Node) -> float:
    """User + system CPU seconds of a node's conntrackd so far, 0 if it cannot be read."""
    try:
        import psutil
        if node.proc is None:
            return 0.0
        t = psutil.Process(node.proc.pid).cpu_times()
        return float(t.user + t.system)
    except Exception:
        return 0.0


def link_bytes(ns: str, dev: str) -> int:
    """Bytes ``dev`` in namespace ``ns`` has sent (its kernel counter), 0 if it cannot be read."""
    try:
        out = subprocess.run(["ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev], capture_output=True,
                             text=True, timeout=CMD_TIMEOUT, check=True).stdout
        return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])
    except (subprocess.SubprocessError, OSError, ValueError, KeyError, IndexError):
        return 0


def loss_ruleset(percent: int, port: int = SYNC_PORT) -> str:
    """nftables: drop ``percent`` % of the sync datagrams entering and leaving a namespace (this kernel
    has no netem; numgen random is uniform, nft(8))."""
    return (f"table inet ctb_loss {{\n chain input {{\n  type filter hook input priority 0;\n"
            f"  udp dport {port} numgen random mod 100 < {percent} counter drop\n }}\n"
            f" chain output {{\n  type filter hook output priority 0;\n"
            f"  udp dport {port} numgen random mod 100 < {percent} counter drop\n }}\n}}\n")


def _start_daemon(node: _Node) -> None:
    # Foreground mode (no -d) keeps the daemon as our direct child: we know its pid, can reap it, and see its exit.
    # `ip netns exec` execs the command in place, and the new session keeps a terminal's Ctrl-C away from it, so
    # the daemon is only ever stopped by our own cleanup.
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    with node.console.open("wb") as out:
        node.proc = subprocess.Popen(_in_ns(node.netns, "conntrackd", "-C", str(node.conf)), stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def _wait_ready(node: _Node) -> None:
    """Wait until the control socket answers (the daemon only serves it after its initial kernel dump)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        _check_alive(node)
        try:
            _stats(node)
            return
        except HarnessError:
            if time.monotonic() >= deadline:
                raise HarnessError(f"conntrackd in {node.label} not answering after {READY_TIMEOUT:.0f}s") from None
        time.sleep(0.05)


def _stop_daemon(node: _Node) -> None:
    proc = node.proc
    if proc is None:
        return
    if proc.poll() is None:
        # SIGTERM lets conntrackd remove its lock file and socket; the group kill also covers anything it forked.
        for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, STOP_TIMEOUT)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    node.proc = None


def _delete_netns(ns: str) -> None:
    # A namespace outlives `ip netns del` while processes still run in it; anything left in one of *our* namespaces
    # was started by this harness, so end it by pid first.
    res = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=CMD_TIMEOUT, check=False)
    for pid in res.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=CMD_TIMEOUT, check=False)


@contextmanager
def _no_sigint() -> Iterator[None]:
    """Ignore further Ctrl-C while cleaning up, so a second keypress cannot leave namespaces or daemons behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _build_netns(a: _Node, b: _Node, created: list[str]) -> None:
    for node in (a, b):
        _run(["ip", "netns", "add", node.netns])
        created.append(node.netns)
    # Created directly inside A with its peer inside B: the veth never exists in the host namespace.
    _run(["ip", "-n", a.netns, "link", "add", a.veth, "type", "veth", "peer", "name", b.veth, "netns", b.netns])
    for node in (a, b):
        _run(["ip", "-n", node.netns, "addr", "add", f"{node.addr}/24", "dev", node.veth])
        _run(["ip", "-n", node.netns, "link", "set", "lo", "up"])
        _run(["ip", "-n", node.netns, "link", "set", node.veth, "up"])


def _check_kernel_limit(ns: str, n: int) -> None:
    # The limit counts per namespace but cannot be raised above the host's value from inside one, and the host's
    # sysctl is not ours to change: refuse early rather than fail half-way through the insert.
    raw = _run(_in_ns(ns, "sysctl", "-n", "net.netfilter.nf_conntrack_max")).strip()
    limit = int(raw) if raw.isdigit() else 0
    if limit and n > limit:
        raise HarnessError(f"{n} entries exceed net.netfilter.nf_conntrack_max={limit}")


def _preflight(n: int) -> str:
    """Fail fast, with one line, on anything that would make the measurement meaningless; return the version."""
    if not 1 <= n <= MAX_ENTRIES:
        raise HarnessError(f"entries must be between 1 and {MAX_ENTRIES}")
    if os.geteuid() != 0:
        raise HarnessError("needs root (network namespaces, conntrack tables)")
    for tool in ("ip", "conntrack", "conntrackd"):
        if shutil.which(tool) is None:
            raise HarnessError(f"{tool} not found (apt-get install iproute2 conntrack conntrackd)")
    found = re.search(r"v(\d+(?:\.\d+)+)", _run(["conntrackd", "-v"]))
    return found.group(1) if found else "unknown"


def _make_tmp() -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="ctb-cd-"))
    # A UNIX socket path must fit in sun_path (108 bytes); a long $TMPDIR would make conntrackd fail obscurely.
    if len(str(tmp / "conntrackd-a.ctl")) >= 100:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix="ctb-cd-", dir="/tmp"))
    return tmp


def _setup_pair(n: int, a: _Node, b: _Node, created: list[str]) -> None:
    _build_netns(a, b, created)
    _check_kernel_limit(a.netns, n)
    _check_kernel_limit(b.netns, n)


def _write_flows(node: _Node, n: int) -> Path:
    flows = node.tmp / "flows.save"
    with flows.open("w") as f:
        f.writelines(_entry_line(i) for i in range(n))
    return flows


def _load_flows(node: _Node, flows: Path, n: int, result: dict[str, Any], log: Callable[..., object]) -> float:
    """One `conntrack -R` of the n flows into node's kernel table; returns its perf_counter() start time.

    result["load_seconds"] is the time of the `conntrack -R` process itself."""
    start = time.perf_counter()
    if result.get("loader") == "burst":  # ctbridge's batched CT_NEW: the whole table in about 0.2 s
        out = _run(_in_ns(node.netns, sys.executable, str(Path(__file__).with_name("burst_load.py")), str(n)),
                   timeout=max(60.0, n / 1000)).split()
        # the clock starts when the kernel write does (burst_load.py prints it, CLOCK_MONOTONIC)
        start = float(out[1]) + time.perf_counter() - time.monotonic()
    else:
        _run(_in_ns(node.netns, "conntrack", "-R", str(flows)), timeout=max(60.0, n / 1000))
    result["load_seconds"] = round(time.perf_counter() - start, 6)
    loaded = _kernel_count(node.netns)
    if loaded < n:
        raise HarnessError(f"conntrack -R put only {loaded}/{n} entries into {node.label.upper()}'s kernel table")
    log(f"conntrackd harness: {n} flows loaded into {node.netns} in {result['load_seconds']:.3f}s")
    return start


def _start_pair(n: int, a: _Node, b: _Node) -> None:
    for node in (b, a):  # B first, so it is listening before A has anything to say
        node.conf.write_text(_render_conf(node, n))
        _start_daemon(node)
    for node in (b, a):
        _wait_ready(node)


def _measure(n: int, a: _Node, b: _Node, created: list[str], result: dict[str, Any],
             log: Callable[..., object]) -> None:
    _setup_pair(n, a, b, created)

    # A's kernel table is filled *before* its daemon starts: conntrackd dumps the kernel table into its internal
    # cache at start-up, which is deterministic, whereas learning 10^5 flows from events depends on the netlink
    # buffer keeping up (that path is measure_conntrackd_events()).
    _load_flows(a, _write_flows(a, n), n, result, log)
    _start_pair(n, a, b)

    def alive() -> None:
        _check_alive(a)
        _check_alive(b)

    def internal_a() -> int:
        alive()
        return _stats(a)[0]

    def external_b() -> int:
        alive()
        return _stats(b)[1]

    start = time.perf_counter()
    cached, seen = _poll(internal_a, n, start, INTERNAL_TIMEOUT / 2)
    if seen is None:
        # The start-up dump came up short (e.g. a netlink overrun): ask for an explicit resync against the kernel.
        log(f"conntrackd harness: A's internal cache holds {cached}/{n}; requesting a kernel resync (-R)")
        _run(_in_ns(a.netns, "conntrackd", "-C", str(a.conf), "-R"), timeout=INTERNAL_TIMEOUT)
        cached, seen = _poll(internal_a, n, start, INTERNAL_TIMEOUT)
    if seen is None:
        raise HarnessError(f"A's internal cache holds only {cached}/{n} entries after {INTERNAL_TIMEOUT:.0f}s")

    # FTFW does not push the start-up dump to the peer by itself; -B (bulk send) transfers A's whole internal
    # cache, which is the same path a backup takes when it asks to be resynchronised.
    result["external_before_bulk"] = _stats(b)[1]
    rss_before = _rss(b)
    start = time.perf_counter()
    _run(_in_ns(a.netns, "conntrackd", "-C", str(a.conf), "-B"))
    synced, sync_s = _poll(external_b, n, start, SYNC_TIMEOUT)
    result["synced"] = synced
    rss_after = _rss(b)
    if rss_before and rss_after and synced:
        # what B's daemon grew by to hold the peer's flows: memory per cached flow
        result["rss_per_flow"] = round((rss_after - rss_before) / synced, 1)
    if sync_s is not None:
        result["sync_seconds"] = round(sync_s, 6)
        result["sync_rate"] = round(n / sync_s)
        log(f"conntrackd harness: B's external cache holds {synced} entries after {sync_s:.3f}s "
            f"({n / sync_s:,.0f}/s)")
    elif synced == 0:
        raise HarnessError(f"nothing reached B's external cache within {SYNC_TIMEOUT:.0f}s")
    else:
        log(f"conntrackd harness: B's external cache stuck at {synced}/{n}; committing what it has")
    # The statistics counter is what we poll; cross-check it once against an actual dump of the cache.
    result["external_dump_lines"] = len(
        _run(_in_ns(b.netns, "conntrackd", "-C", str(b.conf), "-e"), timeout=COMMIT_TIMEOUT).splitlines())

    # B's kernel table never saw these flows, but flush it anyway so every committed entry is a fresh insert; the
    # baseline absorbs anything else the namespace might be tracking.
    _run(_in_ns(b.netns, "conntrack", "-F"))
    base = _kernel_count(b.netns)
    target = synced

    def committed_b() -> int:
        return _kernel_count(b.netns) - base

    argv = _in_ns(b.netns, "conntrackd", "-C", str(b.conf), "-c")
    start = time.perf_counter()
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=COMMIT_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"conntrackd -c did not return within {COMMIT_TIMEOUT:.0f}s") from exc
    returned = time.perf_counter() - start
    result["commit_return_seconds"] = round(returned, 6)
    if res.returncode != 0:
        # Keep measuring: a partial commit still says something, and the count below shows how partial.
        result["commit_exit_status"] = res.returncode
        log(f"conntrackd harness: conntrackd -c exited {res.returncode}: {_one_line(res.stderr or res.stdout)}")
    # Some conntrackd versions hand the commit to a child or to the event loop and answer early, so the clock
    # stops only once B's kernel table really holds the entries.
    committed = committed_b()
    if committed >= target:
        commit_s: float | None = returned
        result["commit_async"] = False
    else:
        committed, commit_s = _poll(committed_b, target, start, COMMIT_TIMEOUT)
        result["commit_async"] = True
    result["committed"] = committed
    if commit_s is not None and commit_s > 0:
        result["commit_seconds"] = round(commit_s, 6)
        result["commit_rate"] = round(committed / commit_s)
        log(f"conntrackd harness: conntrackd -c put {committed} entries into B's kernel in {commit_s:.3f}s "
            f"({committed / commit_s:,.0f}/s; client returned after {returned:.3f}s)")

    problems = []
    if synced < n:
        problems.append(f"only {synced}/{n} entries reached B's external cache within {SYNC_TIMEOUT:.0f}s")
    if committed < n:
        problems.append(f"only {committed}/{n} entries reached B's kernel table after conntrackd -c")
    if res.returncode != 0:
        problems.append(f"conntrackd -c exited {res.returncode}")
    result["ok"] = not problems
    result["error"] = "; ".join(problems) or None


_OVERRUN_LOG = re.compile(r"overrun|doubled|losing events|resync", re.IGNORECASE)
_NETLINK_STATS = {
    "events_received": r"events received:\s*(\d+)",
    "events_filtered": r"events filtered:\s*(\d+)",
    "netlink_overruns": r"netlink overrun:\s*(\d+)",
    "kernel_resyncs": r"resync with kernel table:\s*(\d+)",
    "buffer_bytes": r"current buffer size \(in bytes\):\s*(\d+)",
}


def _overrun_hint(a: _Node, b: _Node) -> dict[str, Any]:
    """Best-effort evidence of netlink overruns and kernel resyncs: A's runtime netlink statistics (A is the one
    listening to kernel events) and the matching lines of both daemons' logs. Never raises."""
    hint: dict[str, Any] = {}
    try:
        out = _run(_in_ns(a.netns, "conntrackd", "-C", str(a.conf), "-s", "runtime"))
    except HarnessError as exc:
        hint["stats_error"] = str(exc)
    else:
        for key, pattern in _NETLINK_STATS.items():
            found = re.search(pattern, out)
            if found:
                hint[key] = int(found.group(1))
    lines: list[str] = []
    for node in (a, b):
        try:
            text = node.log_file.read_text(errors="replace")
        except OSError:
            continue
        lines += [f"{node.label}: {ln.strip()[:200]}" for ln in text.splitlines() if _OVERRUN_LOG.search(ln)]
    hint["log"] = lines[:10]
    if len(lines) > 10:
        hint["log_lines_left_off"] = len(lines) - 10
    return hint


def _measure_events(n: int, a: _Node, b: _Node, created: list[str], result: dict[str, Any],
                    log: Callable[..., object]) -> None:
    _setup_pair(n, a, b, created)
    flows = _write_flows(a, n)  # written before the clock starts
    _start_pair(n, a, b)
    internal, external = _stats(a)[0], _stats(b)[1]
    if internal or external:  # fresh namespaces: anything here would be counted as synced
        raise HarnessError(f"caches not empty before the load (A internal {internal}, B external {external})")
    if result.get("loss"):
        subprocess.run(_in_ns(b.netns, "nft", "-f", "-"), input=loss_ruleset(result["loss"]), text=True,
                       check=True, timeout=CMD_TIMEOUT, capture_output=True)
    cpu0 = (_cpu(a), _cpu(b))
    bytes0 = link_bytes(a.netns, a.veth) + link_bytes(b.netns, b.veth)

    # The load runs to completion before the first poll: `conntrackd -s` is served by the same event loop that
    # drains the netlink event socket, so polling during the burst would itself slow the daemon down. The poll
    # right after the load still catches a sync that finished with the load, so sync_seconds can be no shorter
    # than load_seconds plus one query. That first sample is taken even if the load alone outlasted the bound.
    start = _load_flows(a, flows, n, result, log)

    def alive() -> None:
        _check_alive(a)
        _check_alive(b)

    internal_s: float | None = None
    external_s: float | None = None
    delay = 0.002
    while True:
        alive()
        left = result["timeout_seconds"] - (time.perf_counter() - start)
        # A daemon busy with a resync may answer slowly: a query that times out is a missed sample, not an error,
        # and no query may run past the bound.
        try:
            internal = _stats(a, timeout=max(1.0, min(CMD_TIMEOUT, left)))[0]
            external = _stats(b, timeout=max(1.0, min(CMD_TIMEOUT, left)))[1]
        except HarnessError as exc:
            alive()
            result["poll_errors"] = result.get("poll_errors", 0) + 1
            result["last_poll_error"] = str(exc)
        else:
            now = time.perf_counter() - start
            result["internal_reached"] = max(result["internal_reached"], internal)
            result["external_reached"] = max(result["external_reached"], external)
            if internal_s is None and internal >= n:
                internal_s = now
                log(f"conntrackd harness: A's internal cache holds {internal} entries {now:.3f}s after the load "
                    f"started")
            if external >= n:
                external_s = now
                break
        left = result["timeout_seconds"] - (time.perf_counter() - start)
        if left <= 0:
            break
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.1)

    result["cpu_seconds"] = round(_cpu(a) - cpu0[0] + _cpu(b) - cpu0[1], 3)
    result["link_bytes"] = link_bytes(a.netns, a.veth) + link_bytes(b.netns, b.veth) - bytes0
    result["internal_seconds"] = None if internal_s is None else round(internal_s, 6)
    result["converged"] = external_s is not None
    if external_s is not None:
        result["sync_seconds"] = round(external_s, 6)
        result["sync_rate"] = round(n / external_s)
        log(f"conntrackd harness: B's external cache holds {result['external_reached']} entries {external_s:.3f}s "
            f"after the load started ({n / external_s:,.0f}/s)")
    else:
        log(f"conntrackd harness: not converged within {result['timeout_seconds']:.0f}s: A's internal cache reached "
            f"{result['internal_reached']}/{n}, B's external cache {result['external_reached']}/{n}")
    result["overruns_hint"] = _overrun_hint(a, b)
    if result.get("resync") and external_s is not None:
        result["resync_seconds"] = _restart_and_resync(n, b, result["timeout_seconds"])
    result["ok"] = True
    result["error"] = None


def _restart_and_resync(n: int, b: _Node, timeout: float) -> float | None:
    """B's conntrackd stopped and started again, then asked for a resync (`conntrackd -n`, what
    keepalived's primary-backup.sh runs on BACKUP): seconds from the restart until B's external
    cache holds n again (None past ``timeout``). The same clock as bench/scale.py's resync of
    ctbridge: from the start of the new daemon."""
    _stop_daemon(b)
    start = time.perf_counter()
    _start_daemon(b)
    _wait_ready(b)
    _run(_in_ns(b.netns, "conntrackd", "-C", str(b.conf), "-n"))

    def external_b() -> int:
        _check_alive(b)
        return _stats(b)[1]
    _held, seen = _poll(external_b, n, start, timeout)
    return None if seen is None else round(seen, 6)


def _run_pair(n: int, result: dict[str, Any], body: Callable[..., None], log: Callable[..., object]) -> dict[str, Any]:
    """Preflight, then body(n, a, b, created, result, log) on a fresh pair of namespaces; always cleans up.

    A failed measurement becomes ok=False with a one-line error; KeyboardInterrupt and SystemExit propagate, after
    cleanup."""
    try:
        result["version"] = _preflight(n)
    except HarnessError as exc:
        result["error"] = str(exc)
        return result

    seq = next(_seq)
    tmp = _make_tmp()
    a = _Node("a", f"ctb-cd-a-{os.getpid()}-{seq}", VETH_A, ADDR_A, ADDR_B, tmp)
    b = _Node("b", f"ctb-cd-b-{os.getpid()}-{seq}", VETH_B, ADDR_B, ADDR_A, tmp)
    created: list[str] = []
    try:
        body(n, a, b, created, result, log)
    except HarnessError as exc:
        result["ok"], result["error"] = False, str(exc)
    except Exception as exc:  # a bug or an unexpected environment must not take the caller's benchmark down
        result["ok"], result["error"] = False, f"{type(exc).__name__}: {_one_line(str(exc))}"
    finally:
        with _no_sigint():
            for node in (a, b):
                try:
                    _stop_daemon(node)
                except Exception as exc:
                    log(f"conntrackd harness: stopping conntrackd in {node.label}: {exc}")
            for ns in reversed(created):
                try:
                    _delete_netns(ns)
                except Exception as exc:
                    log(f"conntrackd harness: deleting namespace {ns}: {exc}")
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def measure_conntrackd(n: int, log: Callable[..., object] = print) -> dict[str, Any]:
    """Time conntrackd's A -> B sync and B's `conntrackd -c` for n TCP flows; never raises for a failed measurement.

    On failure the dict has ok=False and a one-line error, so a caller can print its other results regardless.
    KeyboardInterrupt and SystemExit still propagate, after cleanup."""
    result: dict[str, Any] = {
        "entries": n, "synced": 0, "sync_seconds": None, "sync_rate": None, "commit_seconds": None,
        "commit_return_seconds": None, "commit_rate": None, "committed": 0, "ok": False, "error": None,
        "version": None,
    }
    return _run_pair(n, result, _measure, log)


def measure_conntrackd_events(n: int, log: Callable[..., object] = print, burst: bool = False,
                              loss: int = 0, timeout: float = EVENTS_TIMEOUT, resync: bool = False) -> dict[str, Any]:
    """Time conntrackd's event path: n TCP flows loaded by one `conntrack -R` into A's kernel while both daemons run,
    until B's external cache holds all n (at most EVENTS_TIMEOUT seconds after the load started).

    ok=True means the measurement ran; "converged" says whether B's external cache reached n within the bound, and
    "internal_reached"/"external_reached" how far A's internal and B's external caches got. sync_seconds and
    internal_seconds count from the start of the load; load_seconds is the `conntrack -R` process alone.
    "overruns_hint" holds A's netlink statistics (`conntrackd -s runtime`) and any overrun/resync log lines. Never
    raises for a failed measurement (ok=False, one-line error); KeyboardInterrupt and SystemExit propagate, after
    cleanup. ``resync``: then B's daemon is restarted and resynced (resync_seconds, _restart_and_resync)."""
    result: dict[str, Any] = {
        "resync": resync, "resync_seconds": None,
        "ok": False, "error": None, "entries": n, "load_seconds": None, "sync_seconds": None, "sync_rate": None,
        "internal_seconds": None, "converged": False, "external_reached": 0, "internal_reached": 0,
        "overruns_hint": None, "timeout_seconds": timeout, "version": None,
        "loader": "burst" if burst else "restore", "loss": loss, "cpu_seconds": None, "link_bytes": None,
    }
    return _run_pair(n, result, _measure_events, log)


def tx_bytes(ns: str) -> int:
    """Bytes the namespace's interfaces but loopback have sent (`ip -s link`): the sync link's,
    where it is the only other interface."""
    links = json.loads(_run(["ip", "-n", ns, "-j", "-s", "link", "show"], timeout=COMMIT_TIMEOUT))
    return sum(int(link["stats64"]["tx"]["bytes"]) for link in links if link.get("ifname") != "lo")


def _measure_churn(n: int, a: _Node, b: _Node, created: list[str], result: dict[str, Any],
                   log: Callable[..., object], *, load: Callable[[str], dict[str, Any]],
                   churn: Callable[[str], dict[str, Any]], compare: Callable[[str, str], tuple[int, int, int]],
                   settle: float) -> None:
    _setup_pair(n, a, b, created)
    _start_pair(n, a, b)
    standing = load(a.netns)["created"]
    start = time.perf_counter()

    def external_b() -> int:
        _check_alive(a)
        _check_alive(b)
        return _stats(b)[1]

    held, seen = _poll(external_b, standing, start, SYNC_TIMEOUT)
    if seen is None:
        raise HarnessError(f"B's external cache holds {held} of the {standing} standing flows after "
                           f"{SYNC_TIMEOUT:.0f} s")
    before = _overrun_hint(a, b)
    cpu0 = (_cpu(a), _cpu(b))
    tx0 = tx_bytes(a.netns)
    gen = churn(a.netns)
    time.sleep(max(0.0, gen["end"] + settle - time.monotonic()))
    result["cpu_a"] = round(_cpu(a) - cpu0[0], 3)
    result["cpu_b"] = round(_cpu(b) - cpu0[1], 3)
    result["link_bytes"] = tx_bytes(a.netns) - tx0
    after = _overrun_hint(a, b)
    for key, name in (("netlink_overruns", "overruns"), ("kernel_resyncs", "kernel_resyncs")):
        # None when `conntrackd -s runtime` did not say (never a silent 0)
        result[name] = after[key] - before[key] if key in after and key in before else None
    result["overruns_hint"] = after
    result["generator"] = gen
    kernel = _run(_in_ns(a.netns, "conntrack", "-L"), timeout=COMMIT_TIMEOUT)
    external = _run(_in_ns(b.netns, "conntrackd", "-C", str(b.conf), "-e"), timeout=COMMIT_TIMEOUT)
    result["missing"], result["stale"], result["flows"] = compare(kernel, external)
    result["ok"] = True


def measure_conntrackd_churn(capacity: int, load: Callable[[str], dict[str, Any]],
                             churn: Callable[[str], dict[str, Any]],
                             compare: Callable[[str, str], tuple[int, int, int]],
                             settle: float = 5.0, log: Callable[..., object] = print) -> dict[str, Any]:
    """Sustained churn through conntrackd (bench/churn.py): in a fresh pair, ``load(A's namespace)``
    writes the standing flows; once B's external cache holds them, ``churn(A's namespace)`` runs the
    churn (both return what the generator printed, with the CLOCK_MONOTONIC ``end`` of its writes),
    and ``settle`` seconds after that end ``compare(A's `conntrack -L`, B's `conntrackd -e`)`` gives
    (missing, stale, flows in A's table). ``capacity``: the most flows A's table holds at once (sizes the caches).

    cpu_a/cpu_b are each daemon's CPU seconds from just before the churn to the comparison;
    overruns and kernel_resyncs A's netlink overruns and resyncs meanwhile (`conntrackd -s
    runtime`). Never raises for a failed measurement (ok=False, one-line error)."""
    result: dict[str, Any] = {"ok": False, "error": None, "missing": None, "stale": None, "cpu_a": None,
                              "cpu_b": None, "overruns": None, "version": None}

    def body(n: int, a: _Node, b: _Node, created: list[str], res: dict[str, Any], lg: Callable[..., object]) -> None:
        _measure_churn(n, a, b, created, res, lg, load=load, churn=churn, compare=compare, settle=settle)
    return _run_pair(capacity, result, body, log)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=100_000, help="number of TCP flows (default 100000)")
    ap.add_argument("--events", action="store_true",
                    help="measure the event path (conntrack -R into A while both daemons run) instead of -B/-c")
    args = ap.parse_args(argv)
    measure = measure_conntrackd_events if args.events else measure_conntrackd
    # SIGTERM becomes SystemExit so the cleanup in the measurement runs, as it does for Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        res = measure(args.entries, log=lambda *a: print(*a, file=sys.stderr))
    except KeyboardInterrupt:
        return 130
    print(json.dumps(res, indent=2))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

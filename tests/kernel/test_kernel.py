"""The kernel adapter against the real conntrack table, in fresh network namespaces, with the
`conntrack` CLI as the independent witness."""

from __future__ import annotations

import asyncio
import errno
import json
import sys

import pytest

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec
from ctbridge.conntrack.codec import EventKind, split_key
from ctbridge.conntrack.eventsocket import EventSocket
from ctbridge.conntrack.table import KernelTable
from ctbridge.conntrack.view import entry_view
from ctbridge.lab import netns
from tests.support import builders, witness

pytestmark = pytest.mark.root

# Entries made with the conntrack CLI: (what it is, arguments to `conntrack -I`).
CLI_ENTRIES = [
    ("tcp established, source NAT", "-p tcp -s 192.0.2.10 -d 198.51.100.20 --sport 40000 --dport 443 "
     "-r 198.51.100.20 -q 203.0.113.1 --reply-port-src 443 --reply-port-dst 61000 --state ESTABLISHED "
     "-u SEEN_REPLY,ASSURED -t 600"),
    ("tcp established, destination NAT", "-p tcp -s 198.51.100.30 -d 203.0.113.1 --sport 50000 --dport 80 "
     "-r 192.0.2.80 -q 198.51.100.30 --reply-port-src 8080 --reply-port-dst 50000 --state ESTABLISHED "
     "-u SEEN_REPLY,ASSURED -t 600"),
    ("udp with a mark", "-p udp -s 192.0.2.11 -d 198.51.100.53 --sport 33333 --dport 53 -m 42 -t 120"),
    ("udp in zone 7", "-p udp -s 192.0.2.12 -d 198.51.100.53 --sport 33334 --dport 53 --zone 7 -t 120"),
    ("icmp echo", "-p icmp -s 192.0.2.13 -d 198.51.100.1 --icmp-type 8 --icmp-code 0 --icmp-id 77 -t 30"),
    ("ipv6 tcp", "-p tcp -s 2001:db8::1 -d 2001:db8:1::2 --sport 40001 --dport 22 --state ESTABLISHED "
     "-u SEEN_REPLY,ASSURED -t 600"),
    ("icmpv6 echo", "-p icmpv6 -s 2001:db8::1 -d 2001:db8:1::2 --icmpv6-type 128 --icmpv6-code 0 "
     "--icmpv6-id 5 -t 30"),
    ("sctp", "-p sctp -s 192.0.2.14 -d 198.51.100.5 --sport 3868 --dport 3868 --state ESTABLISHED "
     "--orig-vtag 1234 --reply-vtag 5678 -t 300"),
    ("gre", "-p gre -s 192.0.2.15 -d 198.51.100.7 --srckey 10 --dstkey 20 -t 300"),
    ("udplite", "-p udplite -s 192.0.2.16 -d 198.51.100.8 --sport 1 --dport 2 -t 120"),
]


def make_cli_entries(ns: str) -> None:
    for what, args in CLI_ENTRIES:
        res = netns.run(ns, "conntrack", "-I", *args.split(), check=False)
        assert res.returncode == 0, f"conntrack -I ({what}) failed: {res.stderr.strip()}"


def dump_in(ns: str) -> list[codec.Entry]:
    with netns.inside(ns):
        table = KernelTable()
    with table:
        return table.dump()


def assert_same_table(ours: list[dict], theirs: list[dict]) -> None:
    by_id = {witness.flow_id(v): v for v in theirs}
    assert len(ours) == len(theirs), f"{len(ours)} entries vs {len(theirs)} in conntrack -L"
    for v in ours:
        other = by_id.get(witness.flow_id(v))
        assert other is not None, f"no conntrack -L line for {v}"
        assert witness.mismatches(v, other) == [], v


def test_dump_matches_conntrack_cli(ns: str) -> None:
    make_cli_entries(ns)
    entries = dump_in(ns)
    assert_same_table([entry_view(e) for e in entries], witness.listing(ns))
    views = {v["proto"] + ":" + v["src"]: v for v in map(entry_view, entries)}
    assert views["udp:192.0.2.11"]["mark"] == 42
    assert views["udp:192.0.2.12"]["zone"] == 7
    assert views["tcp:192.0.2.10"]["reply_dst"] == "203.0.113.1"
    assert views["tcp:198.51.100.30"]["reply_src"] == "192.0.2.80"
    assert views["tcp:2001:db8::1"]["tcp_state"] == "ESTABLISHED"
    assert views["sctp:192.0.2.14"]["sctp_state"] == "ESTABLISHED"


def test_count_and_cli(ns: str) -> None:
    make_cli_entries(ns)
    with netns.inside(ns):
        table = KernelTable()
    with table:
        assert table.count() == len(CLI_ENTRIES)
    res = netns.run(ns, sys.executable, "-m", "ctbridge", "kernel", "count")
    assert res.stdout.strip() == str(len(CLI_ENTRIES))
    res = netns.run(ns, sys.executable, "-m", "ctbridge", "kernel", "dump", "--json")
    parsed = json.loads(res.stdout)
    assert isinstance(parsed, list) and len(parsed) == len(CLI_ENTRIES)
    for v in parsed:
        assert {"family", "proto", "src", "dst", "reply_src", "reply_dst", "status", "timeout", "mark",
                "zone"} <= v.keys()
    assert_same_table(parsed, witness.listing(ns))
    # The text form reads like conntrack -L -o extended: the same line for every flow, but for
    # the seconds left, which may tick between the two listings.
    def normal(lines: list[str]) -> list[list[str]]:
        return sorted(w[:4] + w[5:] for w in (line.split() for line in lines if line.strip()))
    ours = netns.run(ns, sys.executable, "-m", "ctbridge", "kernel", "dump").stdout.splitlines()
    theirs = netns.run(ns, "conntrack", "-L", "-o", "extended").stdout.splitlines()
    assert normal(ours) == normal(theirs)


def test_commit_into_second_namespace(ns: str, ns2: str) -> None:
    make_cli_entries(ns)
    entries = dump_in(ns)
    with netns.inside(ns2):
        table = KernelTable()
    with table:
        result = table.commit(entries)
        assert result.failed == [] and result.created == len(entries)
        # The witness sees the same flows in the second table, field by field.
        assert_same_table([entry_view(e) for e in entries], witness.listing(ns2))
        # Committing again updates in place rather than failing.
        again = table.commit(entries)
        assert again.failed == [] and again.updated == len(entries) and again.created == 0
        assert table.count() == len(entries)
        # Told which flows exist, it updates those at once; a wrong hint costs a create, no failure.
        gone_key = entries[0].key
        assert table.delete([gone_key]).done == 1
        hinted = table.commit(entries, existing={e.key for e in entries})
        assert hinted.failed == [] and hinted.updated == len(entries) - 1 and hinted.created == 1
        assert_same_table([entry_view(e) for e in entries], witness.listing(ns2))
        # TCP entries restored without window state are liberal, so mid-stream packets pass.
        for e in table.dump():
            v = entry_view(e)
            if v["proto"] == "tcp":
                assert v["tcp_flags_original"] & 0x08 and v["tcp_flags_reply"] & 0x08, v
        # delete by key, then the rest by flush
        first, rest = entries[:3], entries[3:]
        gone = table.delete([e.key for e in first])
        assert (gone.done, gone.missing, gone.failed) == (3, 0, [])
        assert table.delete([first[0].key]).missing == 1
        assert {witness.flow_id(v) for v in witness.listing(ns2)} == {
            witness.flow_id(entry_view(e)) for e in rest}
        table.flush()
        assert table.count() == 0
        assert witness.listing(ns2) == []


NAT_RULES = """
table ip nat {
  chain post {
    type nat hook postrouting priority 100;
    ip daddr 198.51.100.0/24 meta l4proto { tcp, udp } snat to 203.0.113.7:40000-40010
  }
  chain out {
    type nat hook output priority -100;
    ip daddr 198.51.100.9 udp dport 53 dnat to 198.51.100.10:8080
  }
}
"""


def make_nat_flows(ns: str) -> None:
    """Two UDP flows NATed by nftables: source NAT to 203.0.113.7, one also destination NAT."""
    netns.run(ns, "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    for cmd in (["ip", "link", "set", "v0", "up"], ["ip", "link", "set", "v1", "up"],
                ["ip", "addr", "add", "192.0.2.1/24", "dev", "v0"],
                ["ip", "route", "add", "198.51.100.0/24", "dev", "v0"],
                ["ip", "neigh", "add", "198.51.100.3", "lladdr", "02:00:00:00:00:01", "dev", "v0"],
                ["ip", "neigh", "add", "198.51.100.10", "lladdr", "02:00:00:00:00:01", "dev", "v0"]):
        netns.run(ns, *cmd)
    netns.run(ns, "nft", "-f", "-", input=NAT_RULES)
    sender = ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
              "s.bind(('192.0.2.1', 5555))\n"
              "s.sendto(b'x', ('198.51.100.9', 53))\ns.sendto(b'x', ('198.51.100.3', 53))\n")
    netns.run(ns, sys.executable, "-c", sender)


def test_real_nat_bindings_survive_commit(ns: str, ns2: str) -> None:
    """Flows NATed by nftables, not made up by the CLI: the kernel must recreate the binding."""
    make_nat_flows(ns)
    entries = dump_in(ns)
    views = [entry_view(e) for e in entries]
    assert len(views) == 2 and all("SRC_NAT" in v["status"] for v in views)
    assert any("DST_NAT" in v["status"] for v in views)
    with netns.inside(ns2):
        table = KernelTable()
    with table:
        assert table.commit(entries).failed == []
        copied = {witness.flow_id(v): v for v in map(entry_view, table.dump())}
    for v in views:
        c = copied[witness.flow_id(v)]
        for k in ("reply_src", "reply_dst", "reply_sport", "reply_dport"):
            assert c[k] == v[k], (k, c, v)
        assert [s for s in c["status"] if "NAT" in s] == [s for s in v["status"] if "NAT" in s]


def _collect(sock: EventSocket, want: int, rounds: int = 50) -> list[codec.Event]:
    async def run() -> list[codec.Event]:
        got: list[codec.Event] = []
        stream = sock.stream()
        try:
            for _ in range(rounds):
                batch = await asyncio.wait_for(anext(stream), 5)
                got.extend(batch.events)
                if len(got) >= want:
                    break
        finally:
            await stream.aclose()
        return got
    return asyncio.run(run())


def test_events_new_update_destroy(ns: str) -> None:
    with netns.inside(ns):
        sock = EventSocket()
        table = KernelTable()
    with sock, table:
        args = "-p tcp -s 192.0.2.20 -d 198.51.100.20 --sport 1234 --dport 80 --state ESTABLISHED -t 100".split()
        netns.run(ns, "conntrack", "-I", *args)
        netns.run(ns, "conntrack", "-U", *args[:10], "-m", "9")
        netns.run(ns, "conntrack", "-D", *args[:10])
        events = _collect(sock, 3)
        assert [e.kind for e in events] == [EventKind.NEW, EventKind.UPDATE, EventKind.DESTROY]
        assert len({e.entry.key for e in events}) == 1
        assert entry_view(events[1].entry)["mark"] == 9
        assert all(e.portid not in (0, table.portid) for e in events)  # caused by the CLI
        # Our own writes come back tagged with our port id, so they will not be replicated back.
        entries = [events[0].entry]
        table.commit(entries)
        own = _collect(sock, 1)
        assert own and all(e.portid == table.portid for e in own)
        assert own[0].kind == EventKind.NEW


def test_overrun_is_reported(ns: str) -> None:
    source = builders.tcp_flows(3000)
    with netns.inside(ns):
        sock = EventSocket(rcvbuf=4096)
        table = KernelTable()
    with sock, table:
        assert table.commit(source).failed == []
        batch = sock.read(limit=10_000)
        assert batch.overrun and sock.overruns >= 1
        # The subscription survives an overrun.
        sock.read(limit=10_000)  # drain
        netns.run(ns, "conntrack", "-D", "-p", "tcp", "-s", "198.51.100.1", "--sport", "1024")
        assert any(e.kind == EventKind.DESTROY for e in _collect(sock, 1))


def test_cli_reports_errors_in_one_line(ns: str) -> None:
    """Without CAP_NET_ADMIN the kernel refuses; the CLI says so in one line and how to fix it."""
    res = netns.run(ns, "setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin", "--",
                    sys.executable, "-m", "ctbridge", "kernel", "dump", check=False)
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "CAP_NET_ADMIN" in res.stderr, res.stderr


LABEL_RULES = """
table inet labels {
  chain out {
    type filter hook output priority 0;
    ct label set 5
  }
}
"""


def test_labels_survive_commit(ns: str, ns2: str) -> None:
    """Connection labels are stored only where a ruleset uses them (the kernel allocates label
    space for a namespace once a rule refers to ct labels), as on a real standby."""
    for where in (ns, ns2):
        netns.run(where, "nft", "-f", "-", input=LABEL_RULES)
    netns.run(ns, sys.executable, "-c",
              "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', 9))\n")
    entries = dump_in(ns)
    assert [entry_view(e).get("labels") for e in entries] == ["20" + "00" * 15]  # bit 5
    with netns.inside(ns2):
        table = KernelTable()
    with table:
        assert table.commit(entries).failed == []
        assert [entry_view(e).get("labels") for e in table.dump()] == ["20" + "00" * 15]


def _table(ns: str, **kw: int) -> KernelTable:
    with netns.inside(ns):
        return KernelTable(**kw)


def _related_pair() -> tuple[codec.Entry, codec.Entry]:
    """An FTP-like control flow and a data flow related to it (CTA_TUPLE_MASTER)."""
    from ctbridge.conntrack import abi as ct
    a, b = bytes((192, 0, 2, 30)), bytes((198, 51, 100, 30))
    ctl = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_TCP, a, b, 40000, 21)
    master = builders.build_entry(ct.AF_INET, ctl, builders.encode_tuple(ct.AF_INET, ct.IPPROTO_TCP, b, a, 21, 40000),
                               status=ct.IPS_CONFIRMED | ct.IPS_SEEN_REPLY | ct.IPS_ASSURED, timeout=600, tcp_state=3)
    data = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_TCP, a, b, 40001, 20000)
    back = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_TCP, b, a, 20000, 40001)
    child = builders.build_entry(ct.AF_INET, data, back,
                              status=ct.IPS_CONFIRMED | ct.IPS_EXPECTED, timeout=120, tcp_state=1,
                              extra=codec.attr(ct.CTA_TUPLE_MASTER, ctl, nested=True))
    return master, child


def test_related_flow_committed_before_its_master_and_then_updated(ns: str) -> None:
    from ctbridge.conntrack import abi as ct
    master, child = _related_pair()
    with _table(ns) as table:
        result = table.commit([child, master])  # the child first: ENOENT, retried after the master
        assert result.failed == [] and result.created == 2
        views = {v["sport"]: v for v in map(entry_view, table.dump())}
        assert "EXPECTED" in views[40001]["status"] and views[40001]["master"]["sport"] == 40000
        # The data flow is answered later on the active node: the update must carry SEEN_REPLY and
        # ASSURED although the kernel refuses any change of the EXPECTED bit.
        status = ct.IPS_CONFIRMED | ct.IPS_EXPECTED | ct.IPS_SEEN_REPLY | ct.IPS_ASSURED
        later = builders.build_entry(ct.AF_INET, codec.split_key(child.key)[2],
                                  codec.attr_map(child.attrs)[ct.CTA_TUPLE_REPLY], status=status, timeout=300,
                                  tcp_state=3, extra=codec.attr(ct.CTA_TUPLE_MASTER,
                                                                codec.split_key(master.key)[2], nested=True))
        again = table.commit([later])
        assert (again.updated, again.failed) == (1, [])
        v = {v["sport"]: v for v in map(entry_view, table.dump())}[40001]
        assert {"EXPECTED", "SEEN_REPLY", "ASSURED"} <= set(v["status"]) and v["tcp_state"] == "ESTABLISHED"


def test_update_that_would_clear_a_bit_is_retried_without_the_status(ns: str) -> None:
    (assured,) = builders.tcp_flows(1)  # SEEN_REPLY | ASSURED
    from ctbridge.conntrack import abi as ct
    attrs = codec.attr_map(assured.attrs)
    plain = builders.build_entry(ct.AF_INET, attrs[ct.CTA_TUPLE_ORIG], attrs[ct.CTA_TUPLE_REPLY],
                              status=ct.IPS_CONFIRMED, timeout=77, mark=5, tcp_state=3)
    with _table(ns) as table:
        table.commit([assured])
        result = table.commit([plain])  # ASSURED may not be cleared: EBUSY, then without status
        assert (result.updated, result.failed) == (1, [])
        (v,) = map(entry_view, table.dump())
        assert v["mark"] == 5 and "ASSURED" in v["status"]


def test_failures_map_to_their_entries_across_batches(ns: str) -> None:
    from ctbridge.conntrack import abi as ct
    good = builders.tcp_flows(3000)
    bad = []
    for i in range(100):  # an original TCP tuple with a UDP reply tuple: the kernel says EINVAL
        src, dst = bytes((192, 0, 2, 60)), bytes((203, 0, 113, 60))
        orig = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_TCP, src, dst, 2000 + i, 80)
        reply = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_UDP, dst, src, 80, 2000 + i)
        bad.append(builders.build_entry(ct.AF_INET, orig, reply, tcp_state=3))
    # and one entry the codec cannot even encode (a 2-byte CTA_STATUS) must not stop the others
    orig = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_TCP, bytes((192, 0, 2, 61)), bytes((203, 0, 113, 61)), 1, 2)
    broken = codec.Entry(codec.make_key(ct.AF_INET, 0, orig), ct.AF_INET,
                         codec.attr(ct.CTA_TUPLE_ORIG, orig, nested=True) + codec.attr(ct.CTA_STATUS, b"\x00\x08"))
    mixed = good[:1500] + bad[:50] + [broken] + good[1500:] + bad[50:]
    with _table(ns, batch_bytes=20_000) as table:  # many small batches
        result = table.commit(mixed)
        assert len({e.key for e in bad}) == 100
        assert sorted(f.entry_key for f in result.failed) == sorted([e.key for e in bad] + [broken.key])
        assert {f.errno for f in result.failed} == {22}  # EINVAL
        assert result.created == len(good)
        assert table.count() == len(good)


def test_abandoned_dump_leaves_the_table_usable(ns: str) -> None:
    flows = builders.tcp_flows(5000)
    with _table(ns) as table:
        table.commit(flows)
        parts = table.dump_parts()
        next(parts)
        parts.close()
        assert table.count() == 5000
        again = table.commit(flows[:10])
        assert (again.updated, again.failed) == (10, [])
        assert len(table.dump()) == 5000


def test_delete_names_the_zone(ns: str) -> None:
    args = "-p udp -s 192.0.2.40 -d 198.51.100.40 --sport 1000 --dport 53 -t 100".split()
    netns.run(ns, "conntrack", "-I", *args)
    netns.run(ns, "conntrack", "-I", *args, "--zone", "3")
    with _table(ns) as table:
        zoned = [e for e in table.dump() if entry_view(e)["zone"] == 3]
        assert len(zoned) == 1
        assert table.delete([zoned[0].key]).done == 1
        (left,) = map(entry_view, table.dump())
        assert left["zone"] == 0


def test_a_small_receive_buffer_means_smaller_batches_not_lost_answers(ns: str) -> None:
    keys = [e.key for e in builders.tcp_flows(5000)]
    with _table(ns, rcvbuf=65536) as table:
        assert table.batch_messages < 1000
        result = table.delete(keys)  # every one answers ENOENT
        assert (result.done, result.missing, result.failed) == (0, 5000, [])
        assert table.count() == 0


def test_release_marks_tcp_flows_liberal_and_shortens_timeouts(ns: str) -> None:
    """What a node that lost the master role does with its own flows (issue 14, deliver 4): TCP
    ones become BE_LIBERAL in both directions, every other flag kept; the purge also shortens
    their timeouts, and leaves flows still in use to their packets."""
    flows = builders.tcp_flows(100)
    liberal = ct.IP_CT_TCP_FLAG_BE_LIBERAL
    with _table(ns) as table:
        table.commit(flows, liberal=False)
        before = {e.key: entry_view(e) for e in table.dump()}
        assert not any(v["tcp_flags_original"] & liberal for v in before.values())
        result = table.release([e.key for e in flows[:40]])  # leaving MASTER for FAULT: flags only
        assert (result.done, result.missing, result.failed) == (40, 0, [])
        result = table.release([e.key for e in flows[40:60]] + [builders.tcp_flows(200)[150].key], 30)
        assert (result.done, result.missing, result.failed) == (20, 1, [])
        after = {e.key: entry_view(e) for e in table.dump()}
    for i, e in enumerate(flows):
        v, was = after[e.key], before[e.key]
        released = i < 60
        for side in ("tcp_flags_original", "tcp_flags_reply"):
            assert v[side] == (was[side] | liberal if released else was[side]), (i, side)
        assert (v["timeout"] <= 30) == (40 <= i < 60), (i, v["timeout"])


def test_an_overrun_after_an_overrun_is_reported_too(ns: str) -> None:
    """The kernel reports a netlink overrun once per congestion, and a congestion ends only when
    the queue is empty: a reader that stops early after an overrun must not miss the next one."""
    flows = builders.tcp_flows(6000)
    with netns.inside(ns):
        sock = EventSocket(rcvbuf=4096, max_rcvbuf=16384)
        table = KernelTable()
    with sock, table:
        table.commit(flows[:3000])
        assert sock.read(limit=1).overrun
        table.commit(flows[3000:])
        assert sock.read(limit=1).overrun


def test_a_returning_masters_tcp_entries_lose_their_stale_window_flags(ns: str) -> None:
    """TCP entries the table already holds (a returning master's own): with liberal off they are
    created anew, since an update cannot replace the windows the kernel learnt and their packets
    were INVALID (issue 15, deliver 4); with it on they are updated in place, and the update now
    clears the window flags too. A "data unacknowledged" flag left from the time the node was
    not master stayed set before, and every packet then gave the entry the unacknowledged timeout
    (issue 24, deliver 6: an idle SSH session died after a failback): all 50 kept it."""
    flows = builders.tcp_flows(50)
    window = ct.IP_CT_TCP_FLAG_DATA_UNACKNOWLEDGED | ct.IP_CT_TCP_FLAG_MAXACK_SET

    def window_state(key: bytes, seq: int) -> bytes:  # what one-way traffic leaves in an entry
        family, _zone, orig = split_key(key)
        flags = codec.attr(ct.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, bytes((window, window))) + codec.attr(
            ct.CTA_PROTOINFO_TCP_FLAGS_REPLY, bytes((window, window)))
        body = codec.attr(ct.CTA_TUPLE_ORIG, orig, nested=True) + codec.attr(
            ct.CTA_PROTOINFO, codec.attr(ct.CTA_PROTOINFO_TCP, flags, nested=True), nested=True)
        return codec.message(ct.MSG_CT_NEW, ct.NLM_F_REQUEST, seq, family, body)

    def stale(table: KernelTable) -> int:
        return sum(1 for e in table.dump()
                   if (entry_view(e)["tcp_flags_original"] | entry_view(e)["tcp_flags_reply"]) & window)

    with _table(ns) as table:
        keys = frozenset(e.key for e in flows)
        for liberal in (True, False):
            table.commit(flows)
            assert table._by_key(keys, window_state).done == 50  # the table's key-by-key writer
            assert stale(table) == 50
            again = table.commit(flows, liberal=liberal, existing=keys)
            assert (again.created, again.updated, again.failed) == ((0, 50, []) if liberal else (50, 0, [])), liberal
            assert stale(table) == 0 and len(table.dump()) == 50


def _with_helper(entry: codec.Entry, helper: str = "ftp") -> codec.Entry:
    """The entry with CTA_HELP, as the kernel dumps a flow the FTP helper follows."""
    return codec.Entry(entry.key, entry.family,
                       entry.attrs + codec.attr(ct.CTA_HELP, codec.attr(ct.CTA_HELP_NAME, helper.encode() + b"\0"),
                                                nested=True))


def test_expectations_are_written_after_their_master_with_what_is_left_of_their_timeout(ns: str) -> None:
    """Expectation sync's kernel side (issue 15, deliver 1), witnessed by `conntrack -L expect`:
    the kernel takes an expectation only for a master it holds that has a helper, starts it from
    the helper's policy (300 s for FTP), and a second request sets the replicated timeout."""
    from ctbridge.conntrack import expectation
    master, _child = _related_pair()
    a, b = bytes((192, 0, 2, 30)), bytes((198, 51, 100, 30))
    exp = builders.build_expectation(ct.AF_INET, a, b, 30002, 40000, timeout=300)
    with netns.inside(ns):
        table = KernelTable()
        sock = EventSocket(groups=EventSocket.EXPECT_GROUPS, decode=expectation.decode_events)
    with table, sock:
        # no master yet: refused, and counted as missing (not an error)
        assert table.commit_expectations([exp]).missing == [exp.key]
        # a master without a helper cannot hold one
        assert table.commit([master]).failed == []
        result = table.commit_expectations([exp])
        assert [f.errno for f in result.failed] == [errno.EOPNOTSUPP]
        table.delete([master.key])
        assert table.commit([_with_helper(master)]).failed == []
        result = table.commit_expectations([exp], lambda e: 77)
        assert result.done == 1 and not result.failed, result
        listed = netns.run(ns, "conntrack", "-L", "expect").stdout
        assert "dport=30002" in listed and "helper=ftp" in listed and "master-src=192.0.2.30" in listed
        seconds = int(listed.split()[0])
        assert 70 <= seconds <= 77, listed  # not the helper's 300 s
        (dumped,) = table.dump_expectations()
        assert dumped.key == exp.key and expectation.timeout_of(dumped.attrs) <= 77
        events = _collect(sock, 1)  # the creation (the change of its timeout reports nothing)
        assert events[0].kind is EventKind.NEW and events[0].entry.key == exp.key
        assert all(e.portid == table.portid for e in events)  # ours: the daemon skips them
        # written again (a second commit): found, not doubled
        assert table.commit_expectations([exp], lambda e: 50).done == 1
        assert len(table.dump_expectations()) == 1
        assert table.delete_expectations([exp.key]).done == 1
        assert table.delete_expectations([exp.key]).missing == 1
        assert netns.run(ns, "conntrack", "-L", "expect").stdout.strip() == ""


def test_a_sip_expectation_with_its_class_and_nat_function_goes_from_one_kernel_to_another(ns: str, ns2: str) -> None:
    """The SIP helper's expectations (issue 15, deliver 1: SIP where the kernel has the helper):
    UDP media from any source port, a class (audio) and the SIP NAT function; read from one
    kernel, written into another after the master, witnessed by `conntrack -L expect`."""
    from ctbridge.conntrack import expectation
    a, b = bytes((192, 0, 2, 40)), bytes((198, 51, 100, 40))
    orig = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_UDP, a, b, 5060, 5060)
    reply = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_UDP, b, a, 5060, 5060)
    master = _with_helper(builders.build_entry(ct.AF_INET, orig, reply, status=ct.IPS_CONFIRMED | ct.IPS_SEEN_REPLY,
                                               timeout=180), "sip")
    full = b"\xff" * 4
    attrs = (codec.attr(ct.CTA_EXPECT_TUPLE, builders.encode_tuple(ct.AF_INET, ct.IPPROTO_UDP, b, a, 0, 40000),
                        nested=True)
             + codec.attr(ct.CTA_EXPECT_MASK, builders.encode_tuple(ct.AF_INET, ct.IPPROTO_UDP, full, full, 0, 0xFFFF),
                          nested=True)
             + codec.attr(ct.CTA_EXPECT_MASTER, orig, nested=True)
             + codec.attr(ct.CTA_EXPECT_TIMEOUT, (180).to_bytes(4, "big"))
             + codec.attr(ct.CTA_EXPECT_CLASS, (1).to_bytes(4, "big"))  # SIP_EXPECT_AUDIO
             + codec.attr(ct.CTA_EXPECT_HELP_NAME, b"sip\0") + codec.attr(ct.CTA_EXPECT_FN, b"sip\0"))
    exp = expectation.entry_from_attrs(ct.AF_INET, attrs, 0, len(attrs))
    with _table(ns) as one:
        assert not one.commit([master]).failed
        assert one.commit_expectations([exp]).done == 1
        (dumped,) = one.dump_expectations()
    have = codec.attr_map(dumped.attrs)
    assert have[ct.CTA_EXPECT_CLASS] == (1).to_bytes(4, "big") and have[ct.CTA_EXPECT_HELP_NAME] == b"sip\0"
    with _table(ns2) as two:  # what a peer would write: the master first, then the expectation as dumped
        assert not two.commit([master]).failed
        result = two.commit_expectations([dumped], lambda e: 90)
        assert result.done == 1 and not result.failed and not result.missing, result
    listed = netns.run(ns2, "conntrack", "-L", "expect").stdout
    assert "proto=17" in listed and "dport=40000" in listed and "helper=sip" in listed and "class=1" in listed, listed
    assert int(listed.split()[0]) <= 90


def test_offloaded_entries_are_written_as_ordinary_ones_with_their_timeout(ns: str) -> None:
    """A flowtable (`flow add @ft`) marks its flows OFFLOAD (and HW_OFFLOAD in hardware) and keeps
    their timeout at a day without events (docs/kernel.md, "Offloaded flows"). Those bits are
    among the kernel's IPS_UNCHANGEABLE_MASK: a commit carrying them is neither refused nor
    offloaded; the new master's entry is an ordinary one, with the timeout it was given, until
    its own flowtable offloads it. Both a create and an update of an existing entry."""
    offloaded = ct.IPS_CONFIRMED | ct.IPS_SEEN_REPLY | ct.IPS_ASSURED | ct.IPS_OFFLOAD | ct.IPS_HW_OFFLOAD
    tcp, udp = builders.tcp_flows(2)
    udp_orig = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_UDP, bytes((192, 0, 2, 9)), bytes((198, 51, 100, 53)),
                                     40000, 53)
    udp_reply = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_UDP, bytes((198, 51, 100, 53)), bytes((192, 0, 2, 9)),
                                      53, 40000)
    day = 86400
    entries = []
    for e in (tcp, udp):
        attrs = codec.attr_map(e.attrs)
        entries.append(builders.build_entry(ct.AF_INET, attrs[ct.CTA_TUPLE_ORIG], attrs[ct.CTA_TUPLE_REPLY],
                                            status=offloaded, timeout=day, tcp_state=3))
    entries[1] = builders.build_entry(ct.AF_INET, udp_orig, udp_reply, status=offloaded, timeout=day)
    with _table(ns) as table:
        created = table.commit(entries)
        assert (created.created, created.failed) == (2, [])
        again = table.commit(entries)  # an update of what exists: accepted as well
        assert again.failed == []
        views = [entry_view(e) for e in table.dump()]
    assert len(views) == 2
    for v in views:
        assert "OFFLOAD" not in v["status"] and "HW_OFFLOAD" not in v["status"], v
        assert day - 60 < v["timeout"] <= day, v

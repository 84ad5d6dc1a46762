"""`ctbridge render`: the cluster description's checks, snapshots of the files rendered for the
shipped examples, and the real parsers: `keepalived -t` (in a namespace that has the interfaces),
`nft -c`, `ctbridge check`."""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ctbridge import atomicfile
from ctbridge.config import cluster, render, settings
from tests.support import EXAMPLES, ROOT, SNAPSHOTS

# UPDATE_SNAPSHOTS=1 rewrites the snapshots from the templates (then review the diff)
UPDATE = os.environ.get("UPDATE_SNAPSHOTS") == "1"

TWO = (ROOT / "examples" / "two-nodes-unicast.toml").read_text()


def problems(text: str) -> list[str]:
    return cluster.verify(cluster.parse(text, "c.toml"))


# --- the description's checks ---------------------------------------------------------------------

def test_the_examples_pass_and_verify_changes_nothing() -> None:
    for name in EXAMPLES:
        c = cluster.load(str(ROOT / "examples" / f"{name}.toml"))
        before = copy.deepcopy(c)
        assert cluster.verify(c) == []
        assert c == before


@pytest.mark.parametrize(("edit", "expected"), [
    (("[[instance]]\nname = \"LAN\"", "[[node]]\nname = \"fw1\"\n"
      "sync = { name = \"sync0\", address = \"198.51.100.3/30\" }\n[[instance]]\nname = \"LAN\""),
     "node 'fw1': the name is used twice"),
    (("virtual_router_id = 52", "virtual_router_id = 51\nside2 = 1"), None),  # unknown keys are refused (below)
    (("side = \"wan\"\nvirtual_router_id = 52", "side = \"lan\"\nvirtual_router_id = 51"),
     "instance 'WAN': virtual_router_id 51 is also instance 'LAN''s on node 'fw1''s lan0 (IPv4)"),
    (("vips = [\"192.0.2.1/24\"]", "vips = [\"198.51.100.200/24\"]"),
     "instance 'LAN': VIP 198.51.100.200/24 is outside node 'fw1''s lan0 subnet 192.0.2.0/24"),
    (("vips = [\"192.0.2.1/24\"]", "vips = [\"192.0.2.1/24\", \"2001:db8::1/64\"]"),
     "instance 'LAN': mixes IPv4 and IPv6 VIPs"),
    (("transport = \"unicast\"", "transport = \"unicast\"\nsync_group = \"239.1.2.3\""),
     "transport is unicast but sync_group = '239.1.2.3' is set (multicast)"),
    (("sync = { name = \"sync0\", address = \"198.51.100.2/30\" }\n", ""),
     "node 'fw2': has no sync address; add sync = "),
    (("vips = [\"192.0.2.1/24\"]", "vips = [\"192.0.2.2/24\"]"), "VIP 192.0.2.2 is node 'fw1''s own address"),
    (("interfaces.wan = { name = \"wan0\", address = \"203.0.113.3/24\" }\n", ""),
     "node 'fw2': has no interface for side 'wan' of instance 'WAN'"),
    (("transport = \"unicast\"", "transport = \"multicast\""), "transport is multicast but sync_group = ''"),
    (("apply_mode = \"commit\"", "apply_mode = \"replay\""), "apply_mode = 'replay'; use 'commit' or 'inject'"),
    (("sync_links = [{ name = \"sync1\", address = \"198.51.100.6/30\" }]\n", ""),
     "nodes have different numbers of sync_links (fw1: 1, fw2: 0)"),
    (("address = \"198.51.100.6/30\"", "address = \"198.51.100.2/30\""),
     "node 'fw2': sync address 198.51.100.2 is also on another of its sync links"),
    (("address = \"198.51.100.6/30\"", "address = \"2001:db8::6/64\""), "sync_links #1 mixes IPv4 and IPv6"),
    (("transport = \"unicast\"", "transport = \"unicast\"\nsync_link_groups = [\"239.1.2.4\"]"),
     "transport is unicast but sync_link_groups is set"),
    (("name = \"sync1\", address = \"198.51.100.6/30\"", "name = \"sync0\", address = \"198.51.100.6/30\""),
     "node 'fw2': interface sync0 carries two sync links"),
    (("address = \"198.51.100.6/30\"", "address = \"198.51.100.3/29\""), "overlap: the kernel would route both"),
    (("address = \"198.51.100.6/30\"", "address = \"198.51.100.10/30\""),
     "sync_links #1 address 198.51.100.10 is outside node 'fw1''s 198.51.100.4/30"),
])
def test_each_mistake_names_the_object_and_the_fix(edit: tuple[str, str], expected: str | None) -> None:
    old, new = edit
    assert old in TWO
    text = TWO.replace(old, new, 1)
    if expected is None:
        with pytest.raises(cluster.ClusterError, match="unknown key 'side2'"):
            cluster.parse(text)
        return
    found = problems(text)
    assert any(expected in p for p in found), found


def test_shape_errors_are_all_reported_at_once() -> None:
    text = TWO.replace("priority = 150", "priority = 300").replace('address = "192.0.2.3/24"', 'address = "nope"')
    with pytest.raises(cluster.ClusterError) as err:
        cluster.parse(text, "c.toml")
    lines = str(err.value).splitlines()
    assert len(lines) == 2
    assert "node 'fw1': priority 300 must be 1-254" in lines[0]
    assert "node 'fw2': interfaces.lan: address 'nope' is not ADDRESS/PREFIX" in lines[1]


@pytest.mark.parametrize(("old", "new", "expected"), [
    ('[cluster]\nname = "edge"', 'cluster = 5\n[x]\nname = "edge"', "cluster must be a table, written [cluster]"),
    ("priority = 150", "priority = true", "node 'fw1': priority must be an integer, not True"),
    ("interlock = true", 'interlock = "false"', "[cluster]: interlock must be true or false, not 'false'"),
    ('name = "LAN"', 'name = "LAN side"', "instance 'LAN side': name 'LAN side' must be letters, digits"),
    ("virtual_router_id = 51", 'virtual_router_id = "51"', "virtual_router_id must be an integer, not '51'"),
    ('sync = { name = "sync0"', 'sync = { name = "a-very-long-ifname0"', "is not an interface name (at most 15"),
    ("[[instance]]", '[paths]\nhook = "/usr/lib/my hook"\n[[instance]]', "must be an absolute path without spaces"),
    ('transport = "unicast"', 'transport = "unicast"\nsync_port = "abc"', "sync_port must be an integer, not 'abc'"),
])
def test_wrong_types_are_one_line_problems_not_tracebacks(old: str, new: str, expected: str) -> None:
    """Each used to crash (AttributeError, TypeError) or pass silently (true as a priority)."""
    assert old in TWO
    with pytest.raises(cluster.ClusterError) as err:
        cluster.parse(TWO.replace(old, new, 1), "c.toml")
    assert expected in str(err.value), str(err.value)


def test_a_single_bracket_node_table_is_named() -> None:
    with pytest.raises(cluster.ClusterError, match=r"node must be written \[\[node\]\] \(an array of tables\)"):
        cluster.parse('[cluster]\nname = "x"\n[node]\nname = "fw1"\n', "c.toml")


def test_an_unknown_node_is_refused_with_the_known_ones() -> None:
    c = cluster.parse(TWO, "c.toml")
    with pytest.raises(cluster.ClusterError, match="no node 'fw9' in this cluster; nodes are fw1, fw2"):
        c.node("fw9")


def test_the_cli_prints_one_line_per_problem_and_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text(TWO.replace("virtual_router_id = 52", "virtual_router_id = 51").replace("side = \"wan\"",
                                                                                           "side = \"lan\""))
    res = subprocess.run([sys.executable, "-m", "ctbridge", "render", "--cluster", str(bad), "--node", "fw1",
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert lines and all(line.startswith(f"ctbridge render: {bad}: ") for line in lines)
    assert not (tmp_path / "out").exists()
    res = subprocess.run([sys.executable, "-m", "ctbridge", "render", "--cluster", str(ROOT / "examples" /
                          "two-nodes-unicast.toml"), "--node", "fw7", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 1 and "no node 'fw7'" in res.stderr


# --- rendering ------------------------------------------------------------------------------------

@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_rendered_files_match_their_snapshots(example: str) -> None:
    c = cluster.checked(cluster.load(str(ROOT / "examples" / f"{example}.toml")))
    for node in EXAMPLES[example]:
        files = render.render(c, c.node(node))
        assert sorted(files) == sorted([*render.FILES.values(), *([render.NAT_FILE] if c.nat_ports else [])])
        for name, content in files.items():
            snap = SNAPSHOTS / example / node / name
            if UPDATE:
                snap.parent.mkdir(parents=True, exist_ok=True)
                snap.write_text(content)
            assert snap.read_text() == content, f"{snap} differs: UPDATE_SNAPSHOTS=1 rewrites it (review the diff)"


def test_the_debian_package_ships_the_rendered_unit() -> None:
    c = cluster.checked(cluster.load(str(ROOT / "examples" / "two-nodes-unicast.toml")))
    unit = render.render(c, c.node("fw1"))["ctbridge.service"]
    assert (ROOT / "packaging" / "debian" / "ctbridge.service").read_text() == unit


def test_strict_undefined_and_atomic_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = cluster.checked(cluster.load(str(ROOT / "examples" / "two-nodes-unicast.toml")))
    out = tmp_path / "out"
    assert sorted(render.write(render.render(c, c.node("fw1")), out)) == sorted(render.FILES.values())
    assert render.write(render.render(c, c.node("fw1")), out) == []  # unchanged: nothing rewritten
    before = {p.name: p.read_text() for p in out.iterdir()}
    # a typo in a template is an error, not an empty value
    broken = tmp_path / "templates"
    shutil.copytree(render.template_dir(), broken)
    (broken / "ctbridge.toml.j2").write_text("name = {{ node.nmae }}\n")
    import jinja2
    with pytest.raises(jinja2.UndefinedError, match="nmae"):
        render.render(c, c.node("fw1"), broken)
    # a write that fails half-way (disk full at the second file): each file is whole, old or new,
    # and no temporary file is left behind
    new = {name: content + "# changed\n" for name, content in render.render(c, c.node("fw2")).items()}
    real_replace = os.replace
    calls = []

    def failing_replace(src: str, dst: str) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)
    monkeypatch.setattr(atomicfile.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        render.write(new, out)
    after = {p.name: p.read_text() for p in out.iterdir()}
    assert sorted(after) == sorted(before)  # no temporary files
    assert [name for name in after if after[name] == new[name]] == [Path(calls[0]).name]
    assert all(after[name] == before[name] for name in after if name != Path(calls[0]).name)


# --- the real parsers -------------------------------------------------------------------------------


def test_redundant_multicast_links_are_rendered_with_a_group_each() -> None:
    text = (ROOT / "examples" / "three-nodes-multicast.toml").read_text()
    c = cluster.parse(text)
    assert cluster.verify(c) == []
    nodes = tuple(dataclasses.replace(n, sync_links=(
        cluster.Interface("sync1", ipaddress.ip_interface(f"198.51.100.{9 + i}/29")),)) for i, n in enumerate(c.nodes))
    c = dataclasses.replace(c, nodes=nodes)
    assert any("sync_link_groups lists 0 group(s)" in p for p in cluster.verify(c))
    c = dataclasses.replace(c, sync_link_groups=["239.0.0.51"])
    assert cluster.verify(c) == []
    files = render.render(c, c.nodes[0])
    cfg = settings.parse(files["ctbridge.toml"].replace(c.key_file, "/k"))
    assert cfg.sync_links()[1] == settings.SyncLink("198.51.100.9", (), "239.0.0.51", "sync1")
    assert 'iifname != { "' in files["ctbridge-sync.nft"] and "@peers1" in files["ctbridge-sync.nft"]


def test_render_places_each_nodes_own_pairwise_keys_and_refuses_without_the_secret(tmp_path: Path) -> None:
    """`ctbridge render` with the cluster secret writes the node's sync.key (mode 0600, its own
    pairs only, the same bytes every time); without the secret file it says how to make one."""
    from ctbridge.config import keyfile
    from ctbridge.config.settings import node_id
    desc = tmp_path / "two.toml"
    shutil.copy(ROOT / "examples" / "two-nodes-unicast.toml", desc)

    def render_node(node: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ctbridge", "render", "--cluster", str(desc), "--node", node,
                               "--out", str(tmp_path / node)], capture_output=True, text=True, timeout=60, cwd=ROOT)

    res = render_node("fw1")
    assert res.returncode == 1 and "cluster.secret" in res.stderr and "ctbridge keygen" in res.stderr
    assert res.stderr.count("\n") == 1
    keyfile.generate(str(tmp_path / "cluster.secret"))  # relative to the description
    for node in ("fw1", "fw2"):
        assert render_node(node).returncode == 0
    key = tmp_path / "fw1" / render.KEY_FILE
    assert os.stat(key).st_mode & 0o777 == 0o600
    k1, k2 = (keyfile.load(str(tmp_path / n / render.KEY_FILE)) for n in ("fw1", "fw2"))
    assert k1.node == "fw1" and k1.cluster == "edge" and set(k1.keys.pairs) == {node_id("fw2")}
    assert k1.keys.pairs[node_id("fw2")] == k2.keys.pairs[node_id("fw1")]
    before = key.read_bytes()
    again = render_node("fw1")
    assert f"{key}: unchanged" in again.stdout and key.read_bytes() == before


def test_the_conntrackd_backend_renders_conntrackd_conf_and_points_ctbridge_at_it(tmp_path: Path) -> None:
    """backend = "conntrackd" (issue 15, deliver 3): conntrackd.conf beside the other files, FTFW
    to the one peer, the firewalls' own addresses left out; ctbridge.toml names it. What conntrackd
    cannot do (inject mode, redundant sync links) is said before anything is rendered."""
    one_link = "".join(line for line in TWO.splitlines(keepends=True) if "sync_links" not in line)
    text = one_link.replace("[cluster]\n", '[cluster]\nbackend = "conntrackd"\n', 1)
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    c = cluster.checked(cluster.load(str(path)))
    files = render.render(c, c.node("fw1"))
    conf = files["conntrackd.conf"]
    fw1, fw2 = c.node("fw1"), c.node("fw2")
    assert fw1.sync is not None and fw2.sync is not None
    assert f"IPv4_address {fw1.sync.address.ip}" in conf and f"IPv4_Destination_Address {fw2.sync.address.ip}" in conf
    assert "Mode FTFW" in conf and f"Port {c.sync_port}" in conf
    for n in (fw1, fw2):
        for iface in (n.sync, *n.interfaces.values()):
            assert iface is not None and f"_address {iface.address.ip}\n" in conf  # their own flows stay out
    (tmp_path / "ctbridge.toml").write_text(files["ctbridge.toml"])
    cfg = settings.load(str(tmp_path / "ctbridge.toml"))
    assert cfg.apply.backend == "conntrackd" and cfg.apply.conntrackd_config.endswith("/conntrackd.conf")
    plain = cluster.checked(cluster.parse(one_link, "c.toml"))  # backend "ctbridge": no conntrackd.conf
    assert "conntrackd.conf" not in render.render(plain, plain.node("fw1"))
    assert any('set apply_mode = "commit"' in p for p in problems(text.replace('apply_mode = "commit"',
                                                                              'apply_mode = "inject"')))
    linked = TWO.replace("[cluster]\n", '[cluster]\nbackend = "conntrackd"\n')
    assert any("sync link only" in p for p in problems(linked))


def test_table_size_renders_the_conntrack_limit_and_hash_and_refuses_what_cannot_be_meant(tmp_path: Path) -> None:
    """[cluster] table_size (issue 24, deliver 5): render writes the sysctl settings (the table's
    limit and its hash, alike, as the kernel sizes them by default) and the module option that
    sizes the hash at load; without it, neither file. A size past TABLE_SIZE_MAX is refused."""
    text = TWO.replace("[cluster]\n", "[cluster]\ntable_size = 2000000\n", 1)
    c = cluster.checked(cluster.parse(text, "c.toml"))
    files = render.render(c, c.node("fw2"))
    lines = [line for line in files["ctbridge-sysctl.conf"].splitlines() if line and not line.startswith("#")]
    assert lines == ["net.netfilter.nf_conntrack_max = 2000000", "net.netfilter.nf_conntrack_buckets = 2000000"]
    options = [line for line in files["ctbridge-modprobe.conf"].splitlines() if line and not line.startswith("#")]
    assert options == ["options nf_conntrack hashsize=2000000"]
    assert "fw2" in files["ctbridge-sysctl.conf"]
    plain = cluster.checked(cluster.parse(TWO, "c.toml"))
    assert not {"ctbridge-sysctl.conf", "ctbridge-modprobe.conf"} & set(render.render(plain, plain.node("fw1")))
    huge = TWO.replace("[cluster]\n", f"[cluster]\ntable_size = {cluster.TABLE_SIZE_MAX + 1}\n", 1)
    assert any("table_size = 67108865; give the flows a node's table must hold" in p for p in problems(huge))
    assert any("table_size" in p for p in problems(TWO.replace("[cluster]\n", "[cluster]\ntable_size = -1\n", 1)))


AA = (ROOT / "examples" / "two-nodes-active-active.toml").read_text()


@pytest.mark.parametrize(("edit", "expected"), [
    (("mode = \"active-active\"", "mode = \"active-passive\""), "mode = 'active-passive'; use 'active-standby' or"),
    (("\napply_mode = \"inject\"", "\napply_mode = \"commit\""), "writes peers' flows as they arrive; set apply_mode"),
    (("master = \"fw2\"", "master = \"fw1\""), "active-active needs instances with different masters"),
    (("master = \"fw2\"", "master = \"fw9\""), "instance 'WAN': active-active needs master = one of fw1, fw2"),
    (("nat_ports = \"1024-65535\"", "nat_ports = \"65535-1024\""), "nat_ports = '65535-1024'; write \"LOW-HIGH\""),
    (("nat_ports = \"1024-65535\"", "nat_ports = \"2000-2000\""), "nat_ports '2000-2000' has fewer ports than nodes"),
    (("mode = \"active-active\"", "mode = \"active-standby\""), "instance 'LAN': master is for mode"),
])
def test_active_active_descriptions_are_checked(edit: tuple[str, str], expected: str) -> None:
    old, new = edit
    assert old in AA
    found = problems(AA.replace(old, new, 1))
    assert any(expected in p for p in found), found


def test_active_active_renders_opposite_masters_no_transitions_and_shares_of_the_nat_ports() -> None:
    c = cluster.checked(cluster.parse(AA, "aa.toml"))
    fw1, fw2 = c.node("fw1"), c.node("fw2")
    lan, wan = c.instances
    priorities = (c.priority(lan, fw1), c.priority(lan, fw2), c.priority(wan, fw1), c.priority(wan, fw2))
    assert priorities == (150, 100, 100, 150)
    assert c.demotion() == 51  # an incomplete master (150 - 51) falls below the backup (100)
    assert (c.nat_ports_of(fw1), c.nat_ports_of(fw2)) == ((1024, 33279), (33280, 65535))
    files = render.render(c, fw1)
    assert "vrrp_sync_group" not in files["keepalived.conf"] and "notify" not in files["keepalived.conf"]
    assert "notify_fifo" not in files["ctbridge.toml"] and "defer_queue = 1" in files["ctbridge.toml"]
    cfg = settings.parse(files["ctbridge.toml"], "ctbridge.toml")
    assert (cfg.apply.mode, cfg.apply.defer_queue) == ("inject", 1)
    # a UDP flow's first reply, addressed to fw1 at fw2's ports, waits for fw2's flow; and a peer
    # that falls silent or restarts does not demote fw1
    assert cfg.apply.defer_udp_ports == "33280-65535" and cfg.keepalived.peer_gone_complete
    # a daemon that died demotes its own node: its peer takes its instances
    assert "ExecStopPost=-/bin/sh -c 'echo -51 > /run/ctbridge/complete'" in files["ctbridge.service"]


def test_the_nodes_own_flows_are_left_out_unless_asked_for() -> None:
    """Issue 26: keepalived's unicast VRRP flows were replicated and committed; with `ct original
    zone set` on the LAN one of them could not be written on the new master. The rendered filter
    leaves out flows to and from every node's interface addresses; a NATed flow through the pair
    stays (the filter reads sources only: a reply to the node's address is still replicated)."""
    from ctbridge.config.replication import flow_filter
    from ctbridge.conntrack import abi as ct
    from tests.support import builders

    c = cluster.checked(cluster.parse(AA, "aa.toml"))
    cfg = settings.parse(render.render(c, c.node("fw1"))["ctbridge.toml"], "ctbridge.toml")
    assert set(cfg.filter.ignore) == {"192.0.2.2/32", "192.0.2.3/32", "203.0.113.2/32", "203.0.113.3/32"}
    keep = flow_filter(cfg)

    def entry(src: str, dst: str, reply_src: str, reply_dst: str) -> builders.Entry:
        def b(a: str) -> bytes:
            return bytes(int(x) for x in a.split("."))
        orig = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_UDP, b(src), b(dst), 40000, 53)
        reply = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_UDP, b(reply_src), b(reply_dst), 53, 40000)
        return builders.build_entry(ct.AF_INET, orig, reply)
    assert not keep.accepts(entry("192.0.2.3", "192.0.2.2", "192.0.2.2", "192.0.2.3"))  # fw2's VRRP to fw1
    assert keep.accepts(entry("192.0.2.100", "198.51.100.9", "198.51.100.9", "203.0.113.2"))  # NATed to fw1's own
    text = AA.replace('mode = "active-active"', 'mode = "active-active"\nown_flows = true')
    own = cluster.checked(cluster.parse(text, "aa.toml"))
    assert "[filter]" not in render.render(own, own.node("fw1"))["ctbridge.toml"]


def test_the_replication_table_renders_the_sync_delay_coalescing_and_no_sync_keys() -> None:
    """Issue 26: [replication] in the cluster description reaches every node's ctbridge.toml,
    and from it the engine (the same checks as ctbridge.toml's, in one line each)."""
    from ctbridge.config import replication
    text = TWO + ('\n[replication]\ndelay = 30\ndelay_by_protocol = ["udp 2"]\ncoalesce = 0.01\n'
                  'no_sync_marks = ["0x100/0x100"]\nno_sync_zones = [9]\nno_sync_ports = ["53"]\n')
    c = cluster.checked(cluster.parse(text, "c.toml"))
    for node in ("fw1", "fw2"):
        cfg = settings.parse(render.render(c, c.node(node))["ctbridge.toml"], "ctbridge.toml")
        engine = replication.engine_config(cfg)
        assert (engine.delay, dict(engine.delay_by_protocol), engine.coalesce) == (30.0, {17: 2.0}, 0.01)
        no_sync = engine.filter.no_sync
        assert no_sync is not None and no_sync.marks == ((0x100, 0x100),) and no_sync.zones == {9}
        assert no_sync.ports == ((53, 53),) and not no_sync.labels
    assert problems(TWO + '\n[replication]\ndelay = -3\nno_sync_labels = [200]\nsalt = 1\n') == [
        "cluster 'edge': [replication] has no key 'salt'; keys are delay, delay_by_protocol, coalesce, no_sync_marks, "
        "no_sync_labels, no_sync_zones, no_sync_ports"]
    assert problems(TWO + '\n[replication]\ndelay = -3\nno_sync_labels = [200]\n') == [
        "cluster 'edge': [replication] sync.delay = -3.0: seconds from 0 (off) to 3600",
        "cluster 'edge': [replication] filter.no_sync_labels: 200 is not a ct label bit (0-127)"]
    assert any(p.startswith("cluster 'edge': [replication] is ctbridge's own replication; backend = \"conntrackd\"")
               for p in problems(TWO.replace('[cluster]', '[cluster]\nbackend = "conntrackd"', 1)
                                 + '\n[replication]\nno_sync_ports = ["53"]\n'))
    assert [p for p in problems(AA + '\n[replication]\ndelay = 5\n') if "[replication]" in p] == [
        "cluster 'edge-aa': [replication] sync.delay with apply.defer_queue: active-active waits for every peer's "
        "new flows, which a delay keeps back; set one of them to 0"]

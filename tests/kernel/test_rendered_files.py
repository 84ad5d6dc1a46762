"""What `ctbridge render` writes, checked by the real parsers: `keepalived -t` (in a namespace that
has the interfaces), `nft -c` and loading twice, `ctbridge check` on the host."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

from ctbridge.config import cluster, keyfile, render
from ctbridge.lab import netns
from tests.conftest import require
from tests.support import EXAMPLES, ROOT


def _interfaces(ns: str, names: set[str]) -> None:
    for i, name in enumerate(sorted(names)):
        netns.run(ns, "ip", "link", "add", name, "type", "veth", "peer", "name", f"peer{i}")
        netns.run(ns, "ip", "link", "set", name, "up")



@pytest.mark.root
@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_keepalived_and_nft_accept_what_is_rendered(example: str) -> None:
    require("keepalived")
    c = cluster.checked(cluster.load(str(ROOT / "examples" / f"{example}.toml")))
    with tempfile.TemporaryDirectory(prefix="ctb-render-") as tmp:
        for node_name in EXAMPLES[example]:
            node = c.node(node_name)
            out = Path(tmp) / node_name
            render.write(render.render(c, node), out)
            with netns.namespace("render") as ns:
                names = {i.name for i in node.interfaces.values()} | ({node.sync.name} if node.sync else set())
                _interfaces(ns, names)
                res = netns.run(ns, "keepalived", "-t", "-f", str(out / "keepalived.conf"), check=False)
                assert res.returncode == 0, f"{node_name}: keepalived -t: {res.stdout}{res.stderr}"
                res = netns.run(ns, "nft", "-c", "-f", str(out / "ctbridge-sync.nft"), check=False)
                assert res.returncode == 0, f"{node_name}: nft -c: {res.stderr}"
                # and for real, twice: the snippet replaces its own table
                netns.run(ns, "nft", "-f", str(out / "ctbridge-sync.nft"))
                netns.run(ns, "nft", "-f", str(out / "ctbridge-sync.nft"))
                listed = netns.run(ns, "nft", "list", "table", "inet", "ctbridge_sync").stdout
                peers = [i.address.ip for n in c.peers(node) for i in (n.sync, *n.sync_links) if i is not None]
                assert all(str(p) in listed for p in peers)
                if c.nat_ports:  # the node's NAT ports, used as the file says: in a source NAT rule
                    ruleset = out / "nat-test.nft"
                    ruleset.write_text(f'include "{out / render.NAT_FILE}"\ntable ip nat_test {{\n  chain post {{\n'
                                       '    type nat hook postrouting priority srcnat;\n'
                                       '    oifname "wan0" meta l4proto { tcp, udp } '
                                       'snat to 203.0.113.1:$CTBRIDGE_NAT_PORTS\n  }\n}\n')
                    netns.run(ns, "nft", "-f", str(ruleset))
                    rule = netns.run(ns, "nft", "list", "chain", "ip", "nat_test", "post").stdout
                    low, high = c.nat_ports_of(node) or (0, 0)
                    assert f"snat to 203.0.113.1:{low}-{high}" in rule


@pytest.mark.root
@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_ctbridge_check_accepts_what_is_rendered(example: str, tmp_path: Path) -> None:
    """On a host that has the node's sync address and the key: `ctbridge check` (file and host)."""
    secret = tmp_path / "cluster.secret"
    keyfile.generate(str(secret))
    text = (ROOT / "examples" / f"{example}.toml").read_text().replace(
        "/etc/ctbridge/sync.key", f"{tmp_path}/{{node}}/sync.key").replace('"cluster.secret"', f'"{secret}"')
    text += f'\n[paths]\nrun_dir = "{tmp_path}/{{node}}/run"\nstate_dir = "{tmp_path}/{{node}}/state"\n'
    c = cluster.checked(cluster.parse(text))
    for node_name in EXAMPLES[example]:
        node = c.node(node_name)
        assert node.sync is not None
        out = tmp_path / node_name
        render.write(render.render(c, node, secret=keyfile.read_secret(c.secret_path())), out)
        assert keyfile.load(str(out / render.KEY_FILE)).node == node_name
        (out / "run").mkdir()
        with netns.namespace("check") as ns:
            links = [node.sync, *node.sync_links]
            _interfaces(ns, {link.name for link in links})
            for link in links:
                netns.run(ns, "ip", "addr", "add", str(link.address), "dev", link.name)
            res = netns.run(ns, sys.executable, "-m", "ctbridge", "check", "-c", str(out / "ctbridge.toml"),
                            check=False)
            assert res.returncode == 0, f"{node_name}: {res.stderr}"

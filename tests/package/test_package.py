"""The Debian package: built from this tree, checked by lintian, installed with apt, used for a
replication between two namespaces with the installed /usr/bin/ctbridge (Debian's python3 and its
python3-pyroute2 0.7.2, not the test venv), then purged."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import ctbridge
from ctbridge.lab import netns, wait_for
from tests.conftest import require
from tests.support import ROOT

pytestmark = pytest.mark.root
# Debian's interpreter and tools, never the venv's or pyenv's
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
FLOWS = [
    "-p tcp -s 192.0.2.50 -d 203.0.113.80 --sport 43210 --dport 443 -r 203.0.113.80 -q 198.51.100.7 "
    "--reply-port-src 443 --reply-port-dst 40123 --state ESTABLISHED -u SEEN_REPLY,ASSURED -t 3600 -m 5",
    "-p udp -s 192.0.2.51 -d 203.0.113.53 --sport 5353 --dport 53 -t 120",
]


def sh(*argv: str, timeout: float = 300, check: bool = True, cwd: Path | str = "/") -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, env=ENV, cwd=cwd, timeout=timeout, check=check)


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require("dpkg-buildpackage", "dpkg-dev, debhelper, dh-python and pybuild-plugin-pyproject")
    out = tmp_path_factory.mktemp("deb")
    res = sh(str(ROOT / "packaging" / "build-deb"), str(out), check=False)
    assert res.returncode == 0, res.stderr
    return Path(res.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def installed(deb: Path) -> Iterator[None]:
    if sh("dpkg-query", "-W", "-f=${Status}", "ctbridge", check=False).stdout.startswith("install ok"):
        pytest.fail("ctbridge is already installed on this machine; this test installs and purges it itself")
    res = sh("apt-get", "install", "-y", "-q", "--no-install-recommends", str(deb), check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    try:
        yield
    finally:
        res = sh("apt-get", "purge", "-y", "-q", "ctbridge", check=False)
        assert res.returncode == 0, res.stderr
        assert not Path("/usr/bin/ctbridge").exists() and not Path("/etc/ctbridge/ctbridge.toml").exists()


def test_lintian_reports_no_errors(deb: Path) -> None:
    require("lintian")
    res = sh("lintian", str(deb), check=False)
    errors = [line for line in res.stdout.splitlines() if line.startswith("E:")]
    assert errors == [], res.stdout


def test_installed_package_replicates_and_commits(deb: Path, tmp_path: Path) -> None:
    with installed(deb), contextlib.ExitStack() as stack:
        # what the package put where
        for path in ("/usr/bin/ctbridge", "/usr/lib/ctbridge/ctbridge-notify", "/lib/systemd/system/ctbridge.service",
                     "/usr/share/ctbridge/templates/keepalived.conf.j2", "/etc/ctbridge/ctbridge.toml",
                     "/usr/share/man/man1/ctbridge.1.gz"):
            assert Path(path).exists(), path
        assert sh("getent", "passwd", "ctbridge").returncode == 0
        assert sh("dpkg-query", "-W", "-f=${Version}", "python3-pyroute2").stdout.startswith("0.7.2")  # Debian 12
        version = sh("/usr/bin/ctbridge", "--version").stdout
        assert version.strip() == f"ctbridge {ctbridge.__version__}"
        # render with the installed templates
        shutil.copy("/usr/share/doc/ctbridge/examples/two-nodes-unicast.toml", tmp_path / "cluster.toml")
        sh("/usr/bin/ctbridge", "keygen", str(tmp_path / "cluster.secret"))
        for name in ("fw1", "fw2"):
            res = sh("/usr/bin/ctbridge", "render", "--cluster", str(tmp_path / "cluster.toml"), "--node", name,
                     "--out", str(tmp_path / "rendered" / name))
            assert "keepalived.conf: written" in res.stdout and "sync.key: written" in res.stdout
        # two namespaces on a veth pair, one installed daemon in each, with the rendered pairwise keys
        keys = {name: tmp_path / "rendered" / name / "sync.key" for name in ("fw1", "fw2")}
        a = stack.enter_context(netns.namespace("pkga"))
        b = stack.enter_context(netns.namespace("pkgb"))
        netns.run(a, "ip", "link", "add", "sync0", "type", "veth", "peer", "name", "sync0", "netns", b)
        for ns, addr in ((a, "198.51.100.1"), (b, "198.51.100.2")):
            netns.run(ns, "ip", "addr", "add", f"{addr}/30", "dev", "sync0")
            netns.run(ns, "ip", "link", "set", "sync0", "up")
        # fw2 runs as ctbridge.service would: the user ctbridge with CAP_NET_ADMIN and nothing else
        # (no systemd here: setpriv sets the same user, ambient capability and bounding set)
        home = Path(tempfile.mkdtemp(prefix="ctb-pkg-"))
        stack.callback(shutil.rmtree, home, True)
        home.chmod(0o755)
        shutil.copy(keys["fw1"], tmp_path / "sync.key")
        shutil.copy(keys["fw2"], home / "sync.key")
        shutil.chown(home, "ctbridge", "ctbridge")
        shutil.chown(home / "sync.key", "ctbridge", "ctbridge")
        unprivileged = ["setpriv", "--reuid=ctbridge", "--regid=ctbridge", "--init-groups",
                        "--inh-caps=-all,+net_admin", "--ambient-caps=-all,+net_admin",
                        "--bounding-set=-all,+net_admin", "--no-new-privs"]
        confs = {}
        for ns, name, local, peer, where, prefix in (
                (a, "fw1", "198.51.100.1", "198.51.100.2", tmp_path, []),
                (b, "fw2", "198.51.100.2", "198.51.100.1", home, unprivileged)):
            conf = where / f"{name}.toml"
            conf.write_text(f'[node]\nname = "{name}"\nstate_dir = "{where}/{name}"\n'
                            f'[sync]\nlocal = "{local}"\npeers = ["{peer}"]\nkey_file = "{where}/sync.key"\n'
                            f'[control]\nsocket = "{where}/{name}.sock"\n[apply]\ngate = true\n')
            confs[ns] = conf
            # the installed check: a wrong address is reported with this host's addresses (pyroute2)
            res = sh("ip", "netns", "exec", ns, *prefix, "/usr/bin/ctbridge", "check", "-c", str(conf))
            assert res.returncode == 0, res.stderr
            log = open(tmp_path / f"{name}.log", "wb")
            stack.callback(log.close)
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *prefix, "/usr/bin/ctbridge", "run", "-c", str(conf)],
                                    stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd="/", start_new_session=True)
            stack.callback(_stop, proc)
        def installed_cli(ns: str, *argv: str) -> subprocess.CompletedProcess[str]:
            return sh("ip", "netns", "exec", ns, "/usr/bin/ctbridge", *argv, "-c", str(confs[ns]), check=False)

        for ns in (a, b):
            wait_for("the installed daemons to answer", lambda ns=ns: installed_cli(ns, "status").returncode == 0)
        for flow in FLOWS:
            netns.run(a, "conntrack", "-I", *flow.split())
        wait_for("fw2 to hold fw1's flows",
                 lambda: len(_lines(installed_cli(b, "dump", "external").stdout)) == len(FLOWS))
        def hook(state: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["ip", "netns", "exec", b, "/usr/lib/ctbridge/ctbridge-notify", "GROUP", "G1",
                                   state, "0"], capture_output=True, text=True, timeout=60,
                                  env={**ENV, "CTBRIDGE_CONFIG": str(confs[b])})

        # keepalived's hook, as installed: BACKUP closes the unprivileged daemon's commit gate ...
        assert hook("BACKUP").returncode == 0
        assert "ctbridge_gate" in netns.run(b, "nft", "list", "tables").stdout
        # ... and MASTER commits the flows into fw2's kernel, then opens it
        res = hook("MASTER")
        assert res.returncode == 0, res.stderr
        assert "committed: 2" in res.stdout
        daemon = sh("pgrep", "-u", "ctbridge", "-f", "ctbridge run").stdout.split()
        assert len(daemon) == 1  # the unprivileged one did the commit
        assert "ctbridge_gate" not in netns.run(b, "nft", "list", "tables").stdout  # its gate opened on MASTER
        listing = netns.run(b, "conntrack", "-L").stdout
        assert re.search(r"src=192\.0\.2\.50 .* dst=198\.51\.100\.7 sport=443 dport=40123 .*mark=5", listing), listing
        wrong = tmp_path / "wrong.toml"
        wrong.write_text(confs[a].read_text().replace('local = "198.51.100.1"', 'local = "198.51.100.9"'))
        res = sh("ip", "netns", "exec", a, "/usr/bin/ctbridge", "check", "-c", str(wrong), check=False)
        assert res.returncode == 1 and "(this host has 198.51.100.1)" in res.stderr, res.stderr


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(15)


def newer_deb(out: Path) -> tuple[Path, str]:
    """This tree rebuilt as a newer version (a changelog entry on top, in a copy): what an upgrade
    installs."""
    src = out / "tree"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", "build", ".git", "__pycache__", "*.egg-info", ".mypy_cache", ".ruff_cache", ".pytest_cache"))
    version = f"{ctbridge.__version__}+upgrade1"
    changelog = src / "packaging" / "debian" / "changelog"
    changelog.write_text(f"ctbridge ({version}) unstable; urgency=medium\n\n  * Rebuilt for the upgrade test.\n\n"
                         f" -- ctbridge tests <tests@ctbridge.invalid>  Tue, 01 Dec 2026 00:00:00 +0000\n\n"
                         + changelog.read_text())
    res = sh(str(src / "packaging" / "build-deb"), str(out / "deb"), check=False)
    assert res.returncode == 0, res.stderr
    return Path(res.stdout.strip().splitlines()[-1]), version


def test_upgrading_the_package_on_both_firewalls_under_traffic_moves_nothing(deb: Path, tmp_path: Path) -> None:
    """Issue 14, deliver 1: the lab's two firewalls run the installed package's daemon (Debian's
    Python and pyroute2). A newer build is installed over it and both daemons are restarted, as
    the unit's restart after an upgrade does (no systemd here: the test restarts them). keepalived
    sees no transition, the VIPs never leave fw1, and no flow is lost; a failover afterwards,
    with the new version, still carries every flow."""
    require("keepalived")
    from ctbridge.lab import Options, lab
    from ctbridge.lab.scenario import switch

    newer, version = newer_deb(tmp_path)
    with installed(deb), contextlib.ExitStack() as stack:
        the_lab = stack.enter_context(lab(Options(tcp=100, udp=10, ctbridge=("/usr/bin/ctbridge",))))
        the_lab.start()
        fw1, fw2 = the_lab.fws
        wait_for("fw2 to hold fw1's flows", lambda: fw2.request("status")["external"]["entries"] >= 110)
        masters: list[str] = []
        done = threading.Event()

        def watch() -> None:
            for _ in range(1200):  # bounded: 2 minutes at 0.1 s
                if done.is_set():
                    return
                m = the_lab.master()
                masters.append(m.name if m is not None else "none")
                time.sleep(0.1)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        logs = [(fw.dir / "keepalived.log").read_text().count("Entering") for fw in the_lab.fws]
        try:
            res = sh("apt-get", "install", "-y", "-q", "--no-install-recommends", str(newer), check=False)
            assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
            assert sh("dpkg-query", "-W", "-f=${Version}", "ctbridge").stdout == version
            for fw in the_lab.fws:  # the unit's restart on both nodes at once
                the_lab.replicator.stop(fw)
            for fw in the_lab.fws:
                the_lab.replicator.start(fw)
            wait_for("fw2 to hold fw1's flows again", lambda: fw2.request("stats")["interlock"]["value"] == 0,
                     timeout=60)
            time.sleep(3)
        finally:
            done.set()
            watcher.join(timeout=5)
        assert sh("dpkg-query", "-W", "-f=${Version}", "ctbridge").stdout == version
        assert set(masters) == {"fw1"}, masters
        assert [(fw.dir / "keepalived.log").read_text().count("Entering") for fw in the_lab.fws] == logs
        assert fw1.request("stats")["role"] == "MASTER"
        status = the_lab.status()
        assert status["tcp_failed"] == 0 and status["udp_rebound"] == 0 and status["tcp_alive"] == 100, status
        s = switch(the_lab, "keepalived stopped", fw1, fw2)
        assert s.recovered is not None and s.status["udp_rebound"] == 0 and s.flows_after == {"tcp": 100, "udp": 10}
        final = the_lab.stop()
        assert final["tcp_failed"] == 0 and final["udp_rebound"] == 0, final

"""Clusters of ctbridge daemons in network namespaces, joined by a bridge as their sync link."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ctbridge.daemon import control
from ctbridge.lab import netns
from ctbridge.lab.process import wait_for

ROOT = Path(__file__).resolve().parents[2]


class Node:
    def __init__(self, cluster: Cluster, index: int) -> None:
        self.cluster = cluster
        self.index = index
        self.name = f"fw{index}"
        self.address = f"192.0.2.{10 + index}"
        self.ns = ""
        self.config = cluster.dir / f"{self.name}.toml"
        self.socket = str(cluster.dir / f"{self.name}.sock")
        self.log = cluster.dir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, **sections: dict[str, Any]) -> None:
        others = [n.address for n in self.cluster.nodes if n is not self]
        base: dict[str, dict[str, Any]] = {
            "node": {"name": self.name, "state_dir": str(self.cluster.dir / f"state-{self.name}")},
            "sync": {"local": self.address, "peers": others, "key_file": str(self.cluster.key)},
            "control": {"socket": self.socket},
            "log": {"level": "debug"},
        }
        for section, values in sections.items():
            base.setdefault(section, {}).update(values)
        lines = []
        for section, values in base.items():
            lines.append(f"[{section}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        for k in range(1, self.cluster.links):  # redundant sync links, one more bridge each
            lines += ["[[sync.links]]", f"local = {json.dumps(self.link_address(k))}",
                      "peers = " + json.dumps([n.link_address(k) for n in self.cluster.nodes if n is not self])]
        self.config.write_text("\n".join(lines) + "\n")

    def link_address(self, link: int) -> str:
        """This node's address on sync link ``link`` (0: [sync]'s own, 192.0.2.0/24)."""
        return self.address if link == 0 else f"198.51.{100 + link}.{10 + self.index}"

    def start(self, python_args: tuple[str, ...] = (), python: Path | None = None) -> None:
        """The daemon in its namespace; ``python_args`` go to the interpreter before ``-m ctbridge``
        (bench/profile.py: ``-m cProfile -o FILE``). ``python``: another interpreter, whose own
        ctbridge runs (tests.support.oldrelease: a past release), from a neutral directory and
        without PYTHONPATH, which would put this tree first. ``ip netns exec`` execs it: the
        Popen's pid is the daemon's."""
        self.log_file = open(self.log, "ab")
        env = None
        if python is not None:
            from tests.support.oldrelease import environment
            env = environment()
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, str(python or sys.executable), *python_args, "-m",
                                      "ctbridge", "run", "-c", str(self.config)], stdout=self.log_file,
                                     stderr=subprocess.STDOUT, cwd=self.cluster.dir if python is not None else ROOT,
                                     env=env, start_new_session=True)
        wait_for(f"{self.name} to answer", lambda: self.request("status"), timeout=20)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait(10)
        self.proc = None
        self.log_file.close()
        return code

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        return control.request(self.socket, cmd, timeout=30, **args)

    def ctbridge(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ctbridge", *args], capture_output=True, text=True, cwd=ROOT,
                              timeout=120, check=check)

    def external(self) -> list[dict[str, Any]]:
        return self.dump("external")

    def dump(self, which: str) -> list[dict[str, Any]]:
        """A cache as the daemon streams it to `ctbridge dump WHICH --json`."""
        out = io.BytesIO()
        control.stream(self.socket, "dump", out, timeout=30, which=which, format="json")
        return list(json.loads(out.getvalue()))

    def run(self, *argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return netns.run(self.ns, *argv, check=check, input=input)


class Cluster:
    def __init__(self, size: int, directory: Path, links: int = 1) -> None:
        self.dir = directory
        self.links = links
        self.key = directory / "sync.key"
        self.nodes = [Node(self, i + 1) for i in range(size)]
        self.switch = ""


@contextlib.contextmanager
def cluster(size: int, links: int = 1, **config: dict[str, Any]) -> Iterator[Cluster]:
    """``size`` namespaces on one bridge (in a namespace of its own), each with a written config.
    With ``links`` > 1, each further sync link is another bridge (brK, ports pN-K, interfaces
    syncK, 198.51.(100+K).0/24). Daemons are started by the test; everything is stopped and
    removed on the way out."""
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ctb-")))
        c = Cluster(size, tmp, links)
        subprocess.run([sys.executable, "-m", "ctbridge", "keygen", str(c.key)], check=True, cwd=ROOT, timeout=60,
                       capture_output=True)
        c.switch = stack.enter_context(netns.namespace("sw"))
        netns.run(c.switch, "ip", "link", "add", "br0", "type", "bridge")
        netns.run(c.switch, "ip", "link", "set", "br0", "up")
        for node in c.nodes:
            node.ns = stack.enter_context(netns.namespace(node.name))
            port = f"p{node.index}"
            netns.run(c.switch, "ip", "link", "add", port, "type", "veth", "peer", "name", "sync0", "netns", node.ns)
            netns.run(c.switch, "ip", "link", "set", port, "master", "br0", "up")
            node.run("ip", "addr", "add", f"{node.address}/24", "dev", "sync0")
            node.run("ip", "link", "set", "sync0", "up")
            for k in range(1, links):
                if node.index == 1:
                    netns.run(c.switch, "ip", "link", "add", f"br{k}", "type", "bridge")
                    netns.run(c.switch, "ip", "link", "set", f"br{k}", "up")
                netns.run(c.switch, "ip", "link", "add", f"{port}-{k}", "type", "veth", "peer", "name", f"sync{k}",
                          "netns", node.ns)
                netns.run(c.switch, "ip", "link", "set", f"{port}-{k}", "master", f"br{k}", "up")
                node.run("ip", "addr", "add", f"{node.link_address(k)}/24", "dev", f"sync{k}")
                node.run("ip", "link", "set", f"sync{k}", "up")
        for node in c.nodes:
            node.write_config(**config)
        try:
            yield c
        finally:
            for node in c.nodes:
                node.stop()

"""`pip install` of the project, not editable: the wheel carries the templates and the hook, so an
installed `ctbridge render` writes exactly the snapshot files for every example cluster and node,
from a fresh venv outside the source tree, with no environment variable pointing anywhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import unavailable
from tests.support import EXAMPLES, ROOT, SNAPSHOTS


def _clean_env(home: Path) -> dict[str, str]:
    """This process's environment without anything that could point ctbridge at the source tree."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "CTBRIDGE_TEMPLATES", "VIRTUAL_ENV", "PYTHONHOME")}
    env["HOME"] = str(home)
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with the project's wheel installed, outside the source tree; its bin/ctbridge."""
    base = tmp_path_factory.mktemp("wheel")
    env = _clean_env(base)
    wheels = base / "wheels"
    # --system-site-packages: the test venv's own jinja2/pyroute2/psutil satisfy the dependencies,
    # so the test needs no download; the wheel itself is built from this tree
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, env=env)
    py = venv / "bin" / "python"
    probe = subprocess.run([str(py), "-c", "import jinja2, pyroute2, psutil"], capture_output=True, env=env, timeout=60)
    if probe.returncode != 0:
        unavailable("Debian's python3-jinja2, python3-pyroute2 and python3-psutil beside the interpreter")
    # built the way `pip install .` builds it: in an isolated environment with the newest setuptools
    # from a copy, since a build writes build/ and *.egg-info next to pyproject.toml
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                             ".*_cache", ".hypothesis"))
    res = subprocess.run([str(py), "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(wheels), str(src)],
                         capture_output=True, text=True, env=env, cwd=base, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # a quiet build: setuptools' deprecation warnings (the license table was one) are gone
    noisy = [line for line in (res.stdout + res.stderr).splitlines() if "deprecat" in line.lower()]
    assert noisy == []
    (wheel,) = wheels.glob("ctbridge-*.whl")
    res = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
                         capture_output=True, text=True, env=env, cwd=base, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return venv / "bin" / "ctbridge"


def test_the_wheel_has_the_templates_and_an_executable_hook(installed: Path) -> None:
    venv = installed.parent.parent
    assert sorted(p.name for p in (venv / "share" / "ctbridge" / "templates").iterdir()) == sorted(
        p.name for p in (ROOT / "templates").glob("*.j2"))
    hook = venv / "lib" / "ctbridge" / "ctbridge-notify"
    assert hook.read_bytes() == (ROOT / "hooks" / "ctbridge-notify").read_bytes()
    assert os.access(hook, os.X_OK)


@pytest.mark.parametrize(("example", "node"), [(e, n) for e, nodes in EXAMPLES.items() for n in nodes])
def test_installed_render_writes_the_snapshots(installed: Path, tmp_path: Path, example: str, node: str) -> None:
    # run from an empty directory with a copy of the description: nothing of the source tree is near
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(ROOT / "examples" / f"{example}.toml", work / "cluster.toml")
    for argv in (["keygen", "cluster.secret"], ["render", "--cluster", "cluster.toml", "--node", node, "--out", "out"]):
        res = subprocess.run([str(installed), *argv], capture_output=True, text=True, env=_clean_env(tmp_path),
                             cwd=work, timeout=60)
        assert res.returncode == 0, res.stderr
    expected = SNAPSHOTS / example / node
    written = sorted(p.name for p in (work / "out").iterdir() if p.name != "sync.key")
    assert written == sorted(p.name for p in expected.iterdir())
    key = work / "out" / "sync.key"  # the node's own pairwise keys, from the secret: not a snapshot
    assert key.stat().st_mode & 0o777 == 0o600 and f"node {node}" in key.read_text()
    for name in written:
        assert (work / "out" / name).read_text() == (expected / name).read_text(), name

"""A ctbridge release of the past, runnable beside this tree: the mixed-version tests' other node.

``release(commit)`` takes the commit's tree from this repository (``git archive``) into a temporary
directory and makes a venv for it in seconds, without pip or the network: ``venv --without-pip``,
then two .pth lines in the venv's site-packages, the release's tree first and this interpreter's
site-packages (where the runtime dependencies are, pyroute2, jinja2, psutil) after it. A plain
path line adds that directory only, not the .pth files inside it, so this tree's own editable
install there is not seen: the venv's ``python -m ctbridge`` is the release's. Made once per
test session; gone when the interpreter exits.
"""

from __future__ import annotations

import atexit
import io
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

from tests.support import ROOT

RELEASE_2026_12_01 = "06f3993"  # the release of protocol version 2, ctbridge 0.2.0

_made: dict[str, Path] = {}


class Unavailable(Exception):
    """The release cannot be had here (not a git checkout, or one without that commit): a skip."""


def release(commit: str = RELEASE_2026_12_01) -> Path:
    """The python of a venv that runs ``commit``'s ctbridge; raises Unavailable."""
    if commit in _made:
        return _made[commit]
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        raise Unavailable(f"{ROOT} is not a git checkout: no tree of {commit} to run")
    found = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"],
                           capture_output=True, text=True, timeout=60)
    if found.returncode != 0:
        raise Unavailable(f"commit {commit} is not in this checkout's history (a shallow clone?)")
    top = Path(tempfile.mkdtemp(prefix=f"ctb-release-{commit}-"))
    atexit.register(shutil.rmtree, top, True)
    tree = top / "tree"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit], capture_output=True,
                             timeout=120, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.12 (and 3.11.4): no path leaves the tree
            tar.extractall(tree, filter="data")
        else:
            tar.extractall(tree)  # (this repository's own commit)
    venv = top / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120,
                   capture_output=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True, timeout=60, env=environment(),
                               cwd=top).stdout.strip())
    deps = sysconfig.get_path("purelib")  # this interpreter's: the dependencies
    platdeps = sysconfig.get_path("platlib")
    (site / "00-ctbridge-release.pth").write_text(f"{tree}\n")
    (site / "01-dependencies.pth").write_text("".join(f"{p}\n" for p in dict.fromkeys((deps, platdeps))))
    _made[commit] = python
    return python


def tree_of(python: Path) -> Path:
    """The source tree a release's venv runs."""
    return python.parent.parent.parent / "tree"


def environment() -> dict[str, str]:
    """This process's environment without PYTHONPATH, which would put this tree (the tests run
    with it) before the release's."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def version(python: Path) -> str:
    """What the release's ``ctbridge --version`` says (checks that the venv runs the release)."""
    return subprocess.run([str(python), "-m", "ctbridge", "--version"], capture_output=True, text=True, timeout=60,
                          cwd=tree_of(python).parent, env=environment()).stdout.strip()

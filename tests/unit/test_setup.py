"""`make test` installs what it uses: every program the code, the tests, the lab and the benches run
is provided by a Debian package that the Makefile installs (or by an essential package, which every
Debian root has). The proof is CI's run in a pristine root (.ci/fresh-root); this check names the
missing package before that run does."""

from __future__ import annotations

import ast
import subprocess
from collections.abc import Iterator

from tests.support import ROOT

# program -> the Debian package that provides it (Debian 12)
PROVIDERS = {
    "ip": "iproute2", "bridge": "iproute2", "nft": "nftables", "iptables": "iptables", "sysctl": "procps",
    "pgrep": "procps",
    "conntrack": "conntrack", "conntrackd": "conntrackd", "keepalived": "keepalived", "ping": "iputils-ping",
    "dpkg-buildpackage": "dpkg-dev", "dh": "debhelper", "lintian": "lintian", "python3": "python3",
    "/usr/bin/python3": "python3", "apt-get": "apt", "dpkg-query": "dpkg", "dpkg": "dpkg",
    "setpriv": "util-linux", "timeout": "coreutils", "id": "coreutils", "getent": "libc-bin",
    "make": "make", "git": "git", "perf": "linux-perf",
}
# Priority: required/important packages of a Debian 12 root (mmdebstrap --variant=important),
# plus the three that .ci/fresh-root adds as a fresh server install has them
BASE = {"apt", "dpkg", "coreutils", "util-linux", "libc-bin", "make", "git"}
# the project's own programs, run from the tree or from the installed package
OWN = {"/usr/bin/ctbridge", "/usr/lib/ctbridge/ctbridge-notify"}
# functions whose first string argument names a program: subprocess's, asyncio's, the lab's and
# tests' wrappers (netns.run(ns, PROG, ...), node.run(PROG, ...), sh(PROG, ...)), and the checks
# that look a program up (require(PROG), shutil.which(PROG))
RUNNERS = {"run", "sh", "Popen", "check_output", "check_call", "create_subprocess_exec", "_in_ns", "require",
           "which", "start", "spawn"}


def _strings(node: ast.expr) -> Iterator[ast.expr]:
    if isinstance(node, ast.List | ast.Tuple):
        for item in node.elts:
            yield from _strings(item)
    elif isinstance(node, ast.Starred):
        yield from _strings(node.value)
    else:
        yield node


def _programs(tree: ast.AST) -> Iterator[tuple[str, int]]:
    for call in ast.walk(tree):
        if not isinstance(call, ast.Call):
            continue
        name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
        if name not in RUNNERS:
            continue
        if not call.args:
            continue
        # a list literal is an argv: its first item is the program; direct arguments may lead
        # with a namespace or a node (netns.run(ns, "ip", ...)), so the program is one of two
        listed = isinstance(call.args[0], ast.List | ast.Tuple)
        args = list(_strings(call.args[0])) if listed else [a for arg in call.args for a in _strings(arg)]
        consts = [a.value if isinstance(a, ast.Constant) and isinstance(a.value, str) else None for a in args]
        for c in consts[: 1 if listed else 2]:
            if c is not None and not c.startswith("-"):
                yield c, call.lineno
                break
        # ip netns exec NS PROGRAM ...
        for i in range(len(consts) - 3):
            if consts[i:i + 2] == ["netns", "exec"] and consts[i + 3] is not None:
                yield str(consts[i + 3]), call.lineno


def programs_used() -> dict[str, str]:
    """program -> where it is first run (file:line), over the package, the tests, the benches, the hook."""
    found: dict[str, str] = {}
    files = [*sorted((ROOT / "ctbridge").rglob("*.py")), *sorted((ROOT / "tests").rglob("*.py")),
             *sorted((ROOT / "bench").rglob("*.py")), ROOT / "hooks" / "ctbridge-notify"]
    for path in files:
        for prog, line in _programs(ast.parse(path.read_text(), str(path))):
            found.setdefault(prog, f"{path.relative_to(ROOT)}:{line}")
    return found


def apt_packages() -> set[str]:
    res = subprocess.run(["make", "-s", "--no-print-directory", "print-apt-packages"], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=60)
    return set(res.stdout.split())


def test_every_program_run_is_provided_by_an_installed_package() -> None:
    used = programs_used()
    assert {"ip", "nft", "conntrack", "keepalived", "sysctl", "lintian"} <= set(used)  # the scan sees them
    unknown = {p: where for p, where in used.items() if p not in PROVIDERS and p not in OWN}
    assert unknown == {}, "add these programs and their Debian packages to PROVIDERS (and the Makefile)"
    packages = apt_packages() | BASE
    missing = {p: (PROVIDERS[p], where) for p, where in used.items() if p in PROVIDERS and PROVIDERS[p] not in packages}
    assert missing == {}, "the Makefile's APT_PACKAGES must name these packages"


def test_the_package_build_needs_are_installed() -> None:
    # dpkg-buildpackage checks build-essential on its own, besides debian/control's Build-Depends
    control = (ROOT / "packaging" / "debian" / "control").read_text()
    build = control.split("Build-Depends:", 1)[1].split("\n\n", 1)[0].split("Standards-Version")[0]
    wanted = {"build-essential"} | {d.strip().split()[0] for d in build.replace("\n", " ").split(",") if d.strip()}
    wanted.discard("debhelper-compat")  # a virtual package that debhelper provides
    assert wanted <= apt_packages()
    depends = control.split("\nDepends:", 1)[1].split("\nRecommends")[0]
    runtime = {d.strip().split()[0] for d in depends.replace("\n", " ").split(",") if d.strip() and "${" not in d}
    assert runtime <= apt_packages() | BASE

"""Shared fixtures. Root-only tests skip with a reason on a developer machine without root or the
tools, and fail instead of skipping under CI (CI=true), where `make test` has installed everything."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from types import FrameType
from typing import NoReturn

import pytest

from ctbridge.lab import netns

REQUIRED_TOOLS = ("ip", "conntrack", "nft")


def _root_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces and the conntrack table)"
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        return f"needs {', '.join(missing)} (run `make test`, which installs them)"
    return None


def pytest_configure(config: pytest.Config) -> None:
    """A run stopped with SIGTERM (a CI time limit, `kill`) unwinds as Ctrl-C does: the labs and
    fixtures stop what they started. Their daemons, keepalived and traffic run in sessions of
    their own, out of the signal's reach, and a run that died on SIGTERM left them running."""
    signal.signal(signal.SIGTERM, _interrupted)


def _interrupted(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt("SIGTERM")


def unavailable(what: str) -> NoReturn:
    """Skip (fail under CI, where `make test` has installed everything) for want of ``what``."""
    problem = f"needs {what} (run `make test`, which installs it)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run this test, but it {problem}")
    pytest.skip(problem)


def require(tool: str, why: str = "") -> None:
    """Skip (fail under CI) unless ``tool`` is installed; ``make test`` installs it."""
    if shutil.which(tool) is None:
        unavailable(why or tool)


@pytest.fixture(autouse=True)
def _root_guard(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("root") is None:
        return
    problem = _root_problem()
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run this test, but it {problem}")
    pytest.skip(problem)


@pytest.fixture
def ns() -> Iterator[str]:
    with netns.namespace("a") as name:
        yield name


@pytest.fixture
def ns2() -> Iterator[str]:
    with netns.namespace("b") as name:
        yield name

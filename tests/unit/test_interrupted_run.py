"""A test run stopped with SIGTERM stops what its tests started (tests/conftest.py): a run killed
that way left a lab's daemons and keepalived running, in sessions of their own."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.support import ROOT

SLOW_TEST = '''
import subprocess, time
def test_slow():
    p = subprocess.Popen(["sleep", "300"], start_new_session=True)  # as a lab's processes run
    open({pidfile!r}, "w").write(str(p.pid))
    try:
        time.sleep(120)
    finally:
        p.kill()
        p.wait()
'''


def test_a_run_stopped_with_sigterm_stops_what_its_test_started(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    (tmp_path / "test_slow.py").write_text(SLOW_TEST.format(pidfile=str(pidfile)))
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                            "--rootdir", str(tmp_path), str(tmp_path / "test_slow.py")],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        for _ in range(300):  # bounded: 30 s for the test to start its process
            if pidfile.exists() and pidfile.read_text():
                break
            time.sleep(0.1)
        child = int(pidfile.read_text())
        run.terminate()
        run.wait(30)
        for _ in range(50):  # the finally block has killed and reaped it
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        os.kill(child, 9)
        raise AssertionError("the test's process outlived the run stopped with SIGTERM")
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()

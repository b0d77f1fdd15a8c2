"""``infra.procs.end``: a child that stops on SIGTERM is reaped at once; one that ignores it is killed after the
grace period; nothing to stop is not an error."""

from __future__ import annotations

import subprocess
import sys
import time

from infra import procs

IGNORES_TERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
)


def test_a_child_that_stops_on_sigterm_is_reaped():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    t = time.monotonic()
    procs.end(p, grace_s=10)
    assert p.returncode == -15 and time.monotonic() - t < 5


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period():
    p = subprocess.Popen([sys.executable, "-c", IGNORES_TERM], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    t = time.monotonic()
    procs.end(p, grace_s=0.5)
    assert p.returncode == -9 and 0.5 <= time.monotonic() - t < 5
    p.stdout.close()


def test_nothing_to_stop_is_not_an_error():
    procs.end(None)
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    procs.end(p)
    assert p.returncode == 0

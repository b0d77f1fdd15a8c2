"""Network namespaces per service (``infra/netns.py``, issue 20): a service in one namespace is reached at its own
address from the machine and from another namespace, and nothing is left behind: not by ``destroy``, not by a
run that died without cleaning up (the next ``create`` removes it), not by the fleet rehearsal stopped early.
The suite runs as root (CI's machine), which namespaces need."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from infra import netns
from infra.ports import free_port
from tests.conftest import REPO

TAG = "fwtn"  # this file's own tag and subnet: the rehearsal (fwfl, 10.213.0.0/24) may run beside the suite
SUBNET = "10.214.7.0/24"


def _wait_http(url: str, timeout: float = 20) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_service_in_a_namespace_is_reached_at_its_address_and_destroy_leaves_nothing(tmp_path):
    (tmp_path / "hello.txt").write_text("from inside")
    net = netns.Netns(TAG, ["web", "client"], SUBNET).create()
    try:
        assert sorted(netns.namespaces(TAG)) == [f"{TAG}-client", f"{TAG}-web"]
        addr = net.addr("web")
        assert addr == "10.214.7.2" and net.addr("client") == "10.214.7.3" and net.bridge_addr == "10.214.7.1"
        server = subprocess.Popen(
            [*net.run_in("web"), sys.executable, "-m", "http.server", "8000", "--bind", addr],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert _wait_http(f"http://{addr}:8000/hello.txt") == b"from inside"  # from the machine, over the bridge
        fetched = subprocess.run(
            [*net.run_in("client"), "curl", "-sf", "--max-time", "5", f"http://{addr}:8000/hello.txt"],
            capture_output=True,
            text=True,
        )
        assert fetched.returncode == 0 and fetched.stdout == "from inside", fetched.stderr  # namespace to namespace
        assert server.pid in net.pids("web") and net.pids("client") == []
        # Isolation: the namespace has a loopback of its own; what listens on the machine's 127.0.0.1 is not there.
        port = free_port()
        here = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert _wait_http(f"http://127.0.0.1:{port}/hello.txt") == b"from inside"
            inside = subprocess.run(
                [*net.run_in("client"), "curl", "-sf", "--max-time", "3", f"http://127.0.0.1:{port}/hello.txt"],
                capture_output=True,
            )
            assert inside.returncode != 0, "a namespace reached the machine's loopback"
        finally:
            here.terminate()
            here.wait(10)
    finally:
        gone = net.destroy()
    assert sorted(gone) == [f"{TAG}-client", f"{TAG}-web"]
    assert server.wait(10) is not None, "destroy left the namespace's process running"
    assert netns.namespaces(TAG) == [] and netns.links(TAG) == []


def test_create_removes_what_a_killed_run_left(tmp_path):
    first = netns.Netns(TAG, ["a"], SUBNET).create()
    sleeper = subprocess.Popen([*first.run_in("a"), "sleep", "300"])
    # the run "dies" here without destroy: namespace, bridge and process remain
    assert netns.namespaces(TAG) == [f"{TAG}-a"] and f"{TAG}-br" in netns.links(TAG)
    second = netns.Netns(TAG, ["b"], SUBNET).create()
    try:
        assert netns.namespaces(TAG) == [f"{TAG}-b"]
        assert sleeper.wait(15) is not None, "the earlier run's process survived the clean-up"
    finally:
        second.destroy()
    assert netns.namespaces(TAG) == [] and netns.links(TAG) == []


def test_bad_tags_and_subnets_are_refused_in_one_sentence():
    with pytest.raises(ValueError, match="1-6 letters or digits"):
        netns.Netns("fw-long-tag", ["a"])
    with pytest.raises(ValueError, match="must differ"):
        netns.Netns(TAG, ["a", "a"])
    with pytest.raises(ValueError, match="too few addresses"):
        netns.Netns(TAG, ["a", "b", "c"], "10.214.7.0/30")
    assert netns.namespaces(TAG) == []


@pytest.mark.integration
@pytest.mark.slow
def test_the_rehearsal_stopped_early_removes_every_namespace_and_process(tmp_path):
    """SIGTERM while the brokers start: every ``finally`` runs, the run says so and exits 130, nothing is left."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.fleet", "--netns", "--netns-tag", TAG, "--subnet", SUBNET,
         "--seconds", "5", "--users", "1", "--home", str(tmp_path / "fleet")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not netns.pids_in(f"{TAG}-kafka-1"):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        assert netns.pids_in(f"{TAG}-kafka-1"), "the rehearsal did not start a broker in its namespace in 120 s"
        started = netns.namespaces(TAG)
        assert {f"{TAG}-lb", f"{TAG}-app-0", f"{TAG}-ms-0", f"{TAG}-kafka-3", f"{TAG}-pg"} <= set(started)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
        left, links = netns.namespaces(TAG), netns.links(TAG)
    finally:
        if proc.poll() is None:
            proc.kill()
        netns.cleanup(TAG)  # whatever the assertions below find, the next test starts clean
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; everything it started is stopped" in err
    assert left == [] and links == [], f"left behind: {left} {links}"

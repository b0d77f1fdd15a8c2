"""Free ports for private worlds (``infra/ports.py``): outside the kernel's ephemeral range, and never handed to two
callers. Before, "bind port 0 and close" gave the suite's demo a Prefect port that a pytest-xdist worker's broker
was handed too and bound first (`flywheel up` then failed: "port 56711 already in use")."""

from __future__ import annotations

import random
import socket

from infra import ports


def test_ports_come_from_below_the_ephemeral_range_and_bind(tmp_path, monkeypatch):
    monkeypatch.setattr(ports, "CLAIM_DIR", tmp_path / "claims")
    start = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    got = [ports.free_port() for _ in range(20)]
    assert len(set(got)) == 20
    assert all(ports.LOWEST <= p < start for p in got), got
    with socket.socket() as s:
        s.bind(("127.0.0.1", got[0]))  # free to bind for the server it was meant for


def test_two_callers_drawing_the_same_port_get_different_ones(tmp_path, monkeypatch):
    """Same random draws (two processes are independent; here the worst case): the claim makes the second move on."""
    monkeypatch.setattr(ports, "CLAIM_DIR", tmp_path / "claims")
    seed = 7
    first, second = ports.free_port(rng=random.Random(seed)), ports.free_port(rng=random.Random(seed))
    assert first != second
    assert (tmp_path / "claims" / str(first)).exists() and (tmp_path / "claims" / str(second)).exists()


def test_a_port_in_use_is_never_given(tmp_path, monkeypatch):
    monkeypatch.setattr(ports, "CLAIM_DIR", tmp_path / "claims")
    seed = 11
    taken = random.Random(seed).randrange(ports.LOWEST, ports._ephemeral_start())
    with socket.socket() as s:
        s.bind(("127.0.0.1", taken))
        s.listen()
        assert ports.free_port(rng=random.Random(seed)) != taken


def test_an_old_claim_expires(tmp_path, monkeypatch):
    import os
    import time

    monkeypatch.setattr(ports, "CLAIM_DIR", tmp_path / "claims")
    seed = 5
    first = ports.free_port(rng=random.Random(seed))
    old = time.time() - ports.CLAIM_TTL_S - 10
    os.utime(tmp_path / "claims" / str(first), (old, old))
    again = ports.free_port(rng=random.Random(seed))
    assert again == first, "a claim older than the TTL is released (the bind check still applies)"

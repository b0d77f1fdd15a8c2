"""Free TCP ports for worlds of their own (the demo's stack, the suite's brokers, benchmarks), never handed out twice.

Why not "bind port 0, read it, close": that port comes from the kernel's ephemeral range, and between the close
and the server's own bind anything may take it: another process asking the same way (the suite's run had its demo
give Prefect 56711 while a pytest-xdist worker's broker was handed the same port and bound it first), or any
outgoing connection, whose local port is drawn from that same range. So ``free_port`` draws from below the
ephemeral range (``/proc/sys/net/ipv4/ip_local_port_range``), where no outgoing connection lands, checks that the
port binds, and claims it in a shared directory (``O_EXCL``), so no other caller on the machine gets it for
``CLAIM_TTL_S``: long enough for the server it is meant for to bind it; after that, a port still in use fails
the bind check anyway.
"""

from __future__ import annotations

import os
import random
import socket
import tempfile
import time
from pathlib import Path

CLAIM_DIR = Path(tempfile.gettempdir()) / "flywheel-ports"
CLAIM_TTL_S = 900.0
LOWEST = 20_000


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def _bindable(port: int, host: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _claim(port: int) -> bool:
    CLAIM_DIR.mkdir(mode=0o777, exist_ok=True)
    path = CLAIM_DIR / str(port)
    try:
        if time.time() - path.stat().st_mtime > CLAIM_TTL_S:
            path.unlink(missing_ok=True)  # an old claim: the bind check decides now
    except FileNotFoundError:
        pass
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except FileExistsError:
        return False
    return True


def free_port(host: str = "127.0.0.1", attempts: int = 200, rng: random.Random | None = None) -> int:
    """A port that binds now and that no other caller of this function is given for ``CLAIM_TTL_S``."""
    top = _ephemeral_start()
    low = LOWEST if top > LOWEST + 1_000 else 1_024
    rng = rng or random.Random()
    for _ in range(attempts):
        port = rng.randrange(low, top)
        if _bindable(port, host) and _claim(port):
            return port
    raise RuntimeError(f"no free port in {low}-{top - 1} after {attempts} tries: is the machine out of ports?")

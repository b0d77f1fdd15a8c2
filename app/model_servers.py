"""Which model server serves which version: the release plan decides, this process carries it out.

With ``FLYWHEEL_SERVING=servers`` (``flywheel up`` starts this as its ``model-servers`` child), every version the
current release plan names, and the default version, gets its own model server process (``app/model_server.py``):
canary and production each on their own. A server that dies is restarted on the same port; a version the plan
dropped is stopped once the plan no longer names it; ``FLYWHEEL_MODEL_SERVERS_PER_VERSION`` runs several per
version. What is up is published in ``<home>/serving/servers.json`` (``{"servers": {version: [url, ...]}}``,
written atomically, only servers that answered ``/healthz``), which the app replicas read to build a pool of
remote backends per version (``app/backends/registry.py``, ``app/backends/pool.py``).

    python -m app.model_servers            # until Ctrl-C or SIGTERM; stops every server it started on the way out
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from app.router import ReleasePlan, ReleaseRouter, servable_dir
from feedback.settings import Settings, get_settings
from infra import procs
from infra.ports import free_port

log = logging.getLogger(__name__)

CHECK_S = 1.0  # how often each server's health is looked at
START_TIMEOUT_S = 180.0  # a server that has not answered /healthz by then is killed and started again


def servers_path(settings: Settings) -> Path:
    return settings.home / "serving" / "servers.json"


def published_servers(settings: Settings) -> dict[str, list[str]]:
    """The version -> urls map the manager last published; empty when none (no manager, or nothing up yet)."""
    try:
        data = json.loads(servers_path(settings).read_text())
    except (OSError, ValueError):
        return {}
    servers = data.get("servers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        return {}
    return {str(k): [str(u) for u in v] for k, v in servers.items() if isinstance(v, list) and v}


@dataclass
class Server:
    version: str
    port: int
    host: str = "127.0.0.1"
    netns: str | None = None
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    healthy: bool = False
    restarts: int = 0
    log_path: Path = field(default_factory=Path)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class ServerManager:
    """Keeps one model server per wanted version; ``step`` does one round (tests call it directly)."""

    def __init__(self, settings: Settings, threads: int | None = None):
        self.settings = settings
        self.threads = threads
        self.servers: dict[tuple[str, int], Server] = {}
        self._published: dict[str, list[str]] | None = None
        self._unservable: set[str] = set()  # named by the plan, no model directory here: logged once, not started
        self._env = settings.child_env(Path(__file__).resolve().parents[1])
        self.places = places(settings)
        (settings.home / "serving").mkdir(parents=True, exist_ok=True)

    def wanted(self, plan: ReleasePlan) -> list[str]:
        return list(dict.fromkeys([self.settings.model_version, *plan.versions()]))

    def step(self, plan: ReleasePlan) -> dict[str, list[str]]:
        wanted = []
        for version in self.wanted(plan):
            if servable_dir(self.settings, version) is None:
                if version not in self._unservable:
                    log.error("the plan names %s but no model directory serves it: no server for it", version)
                    self._unservable.add(version)
                continue
            wanted += [(version, i) for i in range(self.settings.model_servers_per_version)]
        for key in wanted:
            server = self.servers.get(key)
            if server is None:
                netns, host = self.places[key[1] % len(self.places)] if self.places else (None, "127.0.0.1")
                server = self.servers[key] = Server(key[0], free_port(), host, netns)
                server.log_path = self.settings.home / "serving" / f"{key[0]}-{key[1]}.log"
            self._look_after(server)
        for key in [k for k in self.servers if k not in wanted]:
            log.info("the plan no longer names %s: stopping its server %d", *key)
            self._stop(self.servers.pop(key))
        up: dict[str, list[str]] = {}
        for (version, _), server in sorted(self.servers.items()):
            if server.healthy:
                up.setdefault(version, []).append(server.url)
        if up != self._published:
            self._publish(up)
        return up

    def _look_after(self, server: Server) -> None:
        if server.proc is not None and server.proc.poll() is not None:
            log.warning("model server of %s exited (%s): restarting it", server.version, server.proc.returncode)
            server.proc, server.healthy = None, False
            server.restarts += 1
        if server.proc is None:
            self._start(server)
            return
        ok = _answers(server.url)
        if not ok and time.monotonic() - server.started_at > START_TIMEOUT_S:
            log.warning("model server of %s did not answer in %.0f s: restarting it", server.version, START_TIMEOUT_S)
            self._stop(server)
            server.restarts += 1
            self._start(server)
            return
        if ok != server.healthy and server.healthy:
            log.warning("model server of %s stopped answering", server.version)
        server.healthy = ok

    def _start(self, server: Server) -> None:
        cmd = [sys.executable, "-m", "app.model_server", "--version", server.version, "--port", str(server.port)]
        cmd += ["--host", server.host]
        if server.netns:
            cmd = ["/usr/sbin/ip", "netns", "exec", server.netns, *cmd]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        with open(server.log_path, "ab") as out:
            server.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=self._env, preexec_fn=_die_with_parent
            )
        server.started_at = time.monotonic()
        log.info("model server of %s starting on port %d (pid %d)", server.version, server.port, server.proc.pid)

    @staticmethod
    def _stop(server: Server) -> None:
        proc, server.proc, server.healthy = server.proc, None, False
        procs.end(proc, 10)

    def _publish(self, up: dict[str, list[str]]) -> None:
        path = servers_path(self.settings)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"servers": up, "updated_at": time.time()}))
        os.replace(tmp, path)
        self._published = up
        log.info("serving: %s", "; ".join(f"{v} at {', '.join(u)}" for v, u in up.items()) or "nothing yet")

    def close(self) -> None:
        for server in self.servers.values():
            self._stop(server)
        self.servers.clear()
        self._publish({})


def places(settings: Settings) -> list[tuple[str | None, str]]:
    """``model_server_places`` as (netns or None, host) pairs; a malformed entry is a ValueError naming it."""
    out = []
    for entry in filter(None, (e.strip() for e in settings.model_server_places.split(","))):
        netns, _, host = entry.rpartition("/")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"FLYWHEEL_MODEL_SERVER_PLACES: {entry!r} is not [netns/]address") from None
        out.append((netns or None, host))
    return out


def _die_with_parent() -> None:
    """In the child before exec: the kernel SIGTERMs it when the manager dies, even by SIGKILL (no orphaned
    server keeps its model and port after ``flywheel down`` or a crash)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def run(settings: Settings | None = None, stop: threading.Event | None = None) -> None:
    settings = settings or get_settings()
    stop = stop or threading.Event()
    router = ReleaseRouter(settings).start()
    manager = ServerManager(settings)
    try:
        while not stop.is_set():
            manager.step(router.plan)
            stop.wait(CHECK_S)
    finally:
        manager.close()
        router.stop()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    run(stop=stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())

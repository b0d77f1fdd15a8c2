"""The real Prefect server (schedules only fire with one): SQLite under ``$FLYWHEEL_HOME/prefect``.

``start(settings)`` launches ``prefect server start --host H --port P`` in its own session, records its pid,
and waits for ``/api/health``; ``stop`` and ``status`` use that pid. ``serve_command(settings)`` is the
``python -m pipelines.serve`` command (and environment) that serves the project's deployments on their
schedules against this server; ``start_serve(settings)`` runs it as a subprocess.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from feedback.settings import Settings


def prefect_dir(settings: Settings) -> Path:
    return (settings.home / "prefect").resolve()


def api_url(settings: Settings) -> str:
    return f"http://{settings.prefect_host}:{settings.prefect_port}/api"


def prefect_env(settings: Settings) -> dict[str, str]:
    """Environment that points a Prefect process at this server and keeps its state under FLYWHEEL_HOME."""
    d = prefect_dir(settings)
    env = dict(os.environ)
    env.update(
        {
            "PREFECT_HOME": str(d),
            "PREFECT_API_DATABASE_CONNECTION_URL": settings.service_database_url("prefect", "asyncpg")
            or f"sqlite+aiosqlite:///{d / 'prefect.db'}",
            "PREFECT_SERVER_API_HOST": settings.prefect_host,
            "PREFECT_SERVER_API_PORT": str(settings.prefect_port),
            "PREFECT_API_URL": api_url(settings),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": os.environ.get("PREFECT_UI_ENABLED", "true"),
            "FLYWHEEL_HOME": str(settings.home.resolve()),
            "FLYWHEEL_PREFECT_HOST": settings.prefect_host,
            "FLYWHEEL_PREFECT_PORT": str(settings.prefect_port),
        }
    )
    return env


def healthy(settings: Settings, timeout_s: float = 2.0) -> bool:
    try:
        return httpx.get(f"{api_url(settings)}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def _pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None


def status(settings: Settings) -> dict:
    return {
        "pid": _pid(prefect_dir(settings) / "server.pid"),
        "healthy": healthy(settings),
        "url": api_url(settings),
        "serve_pid": _pid(prefect_dir(settings) / "serve.pid"),
    }


def start(settings: Settings, timeout_s: float = 90.0) -> dict:
    """Start the server unless one is already healthy at the configured address; wait until it is."""
    return wait_healthy(settings, launch(settings), timeout_s)


def launch(settings: Settings) -> subprocess.Popen | None:
    """Start the server process and return at once (None: one is already healthy here); ``wait_healthy`` waits.
    Its first start migrates a database, so ``flywheel up`` launches it before the broker and waits for it last."""
    if healthy(settings):
        return None
    d = prefect_dir(settings)
    d.mkdir(parents=True, exist_ok=True)
    log = open(d / "server.log", "ab")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            settings.prefect_host,
            "--port",
            str(settings.prefect_port),
        ],
        env=prefect_env(settings),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    (d / "server.pid").write_text(str(proc.pid))
    return proc


def wait_healthy(settings: Settings, proc: subprocess.Popen | None, timeout_s: float = 90.0) -> dict:
    """Wait until the server ``launch`` started answers; stop it and raise if it exits or does not in time."""
    d = prefect_dir(settings)
    deadline = time.monotonic() + timeout_s
    while proc is not None and time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}; see {d / 'server.log'}")
        if healthy(settings):
            return status(settings)
        time.sleep(0.5)
    if proc is None:
        return status(settings)
    stop(settings)
    raise TimeoutError(f"prefect server not healthy after {timeout_s:.0f}s; see {d / 'server.log'}")


def _stop_pid(pidfile: Path, timeout_s: float) -> bool:
    pid = _pid(pidfile)
    if pid is None:
        pidfile.unlink(missing_ok=True)
        return False
    try:  # the server may exit between the pid check and a signal: that is the outcome wanted, not an error
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _pid(pidfile) is not None:
            time.sleep(0.2)
        if _pid(pidfile) is not None:
            os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    pidfile.unlink(missing_ok=True)
    return True


def stop(settings: Settings, timeout_s: float = 20.0) -> bool:
    """Stop the served deployments (if we started them) and the server. True if a server was stopped."""
    _stop_pid(prefect_dir(settings) / "serve.pid", timeout_s)
    return _stop_pid(prefect_dir(settings) / "server.pid", timeout_s)


def serve_command(settings: Settings) -> tuple[list[str], dict[str, str]]:
    return [sys.executable, "-m", "pipelines.serve"], prefect_env(settings)


def start_serve(settings: Settings) -> subprocess.Popen:
    """Serve the deployments (nightly curate, volume trigger, ingest health) against the running server."""
    argv, env = serve_command(settings)
    d = prefect_dir(settings)
    d.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        argv,
        env=env,
        stdout=open(d / "serve.log", "ab"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        cwd=str(Path(__file__).resolve().parents[1]),
    )
    (d / "serve.pid").write_text(str(proc.pid))
    return proc

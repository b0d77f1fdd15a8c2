"""The real MLflow tracking + registry server, so operators browse runs and versions in its UI.

Its stores are the same ones ``training/registry.py`` opens directly when no server runs: the SQLite backend
``$FLYWHEEL_HOME/mlflow/mlflow.db`` and plain artifact files under ``$FLYWHEEL_HOME/mlflow/artifacts``
(``--no-serve-artifacts``: clients write artifacts to the files themselves, so a run logged without the server
and one logged through it look the same). Once the server answers, ``<home>/mlflow/server.json``
(``{"port", "pid", "url", ...}``) says so; ``registry.tracking_uri`` then talks to the server. The marker is
removed on stop, and a marker whose process is gone is ignored, so a killed server never strands the registry.

One worker, and MLflow's job runner off (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``: it starts seven huey
consumers, ~700 MB, for GenAI scoring jobs this project does not use). The server runs in its own session and is
stopped as a process group, so its uvicorn child never outlives it.

- ``start(settings)`` / ``stop(settings)`` / ``status(settings)``: a daemon, like ``infra.prefect_server``;
- ``python -m infra.mlflow_server``: the server in the foreground (what ``flywheel up`` supervises as a child);
  SIGTERM or Ctrl-C stops it and removes the marker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from feedback.settings import Settings

MARKER = "server.json"


class MlflowServerError(RuntimeError):
    """The server could not start; the message says why and what to do."""


def mlflow_dir(settings: Settings) -> Path:
    return (settings.home / "mlflow").resolve()


def url(settings: Settings) -> str:
    return f"http://{settings.mlflow_host}:{settings.mlflow_port}"


def store_uri(settings: Settings) -> str:
    """The SQLite file, or ``flywheel_mlflow`` on the shared PostgreSQL when one is configured."""
    return settings.service_database_url("mlflow", "psycopg") or f"sqlite:///{mlflow_dir(settings) / 'mlflow.db'}"


def artifact_root(settings: Settings) -> str:
    return (mlflow_dir(settings) / "artifacts").as_uri()


def command(settings: Settings) -> list[str]:
    """The ``mlflow server`` command line for this home (MLflow 3.17: uvicorn; loopback hosts are allowed)."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        store_uri(settings),
        "--default-artifact-root",
        artifact_root(settings),
        "--no-serve-artifacts",
        "--host",
        settings.mlflow_host,
        "--port",
        str(settings.mlflow_port),
        "--workers",
        "1",
    ]


def server_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    return env


def healthy(settings: Settings, timeout_s: float = 2.0) -> bool:
    try:
        return httpx.get(f"{url(settings)}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def read_marker(settings: Settings) -> dict[str, Any] | None:
    """The marker of a server this home started whose process is still alive; None otherwise."""
    try:
        info = json.loads((mlflow_dir(settings) / MARKER).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return info if isinstance(info, dict) and _alive(info.get("pid")) else None


def _write_marker(settings: Settings, pid: int) -> None:
    d = mlflow_dir(settings)
    tmp = d / f".{MARKER}.tmp"
    info = {
        "port": settings.mlflow_port,
        "host": settings.mlflow_host,
        "pid": pid,
        "url": url(settings),
        "backend_store_uri": store_uri(settings),
        "artifact_root": artifact_root(settings),
        "started_at": datetime.now(UTC).isoformat(),
    }
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, d / MARKER)  # readers never see half a marker


def status(settings: Settings) -> dict[str, Any]:
    marker = read_marker(settings)
    return {
        "url": url(settings),
        "healthy": healthy(settings),
        "pid": marker["pid"] if marker else None,
        "ours": marker is not None and marker.get("port") == settings.mlflow_port,
        "backend_store_uri": store_uri(settings),
        "artifact_root": artifact_root(settings),
    }


def spawn(settings: Settings, log: Any = None) -> subprocess.Popen:
    """Launch ``mlflow server`` in its own session (so it can be stopped as a group); does not wait."""
    d = mlflow_dir(settings)
    (d / "artifacts").mkdir(parents=True, exist_ok=True)
    out = log if log is not None else open(d / "server.log", "ab")  # noqa: SIM115 - handed to the child
    return subprocess.Popen(
        command(settings),
        env=server_env(settings),
        cwd=str(d),  # MLflow may create ./mlruns or ./mlartifacts beside it: keep them under the home
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_healthy(settings: Settings, proc: subprocess.Popen, timeout_s: float) -> None:
    """Wait until the server answers ``/health``; raise with the log's place if it dies or takes too long."""
    log = mlflow_dir(settings) / "server.log"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise MlflowServerError(f"mlflow server exited with status {proc.returncode}: see {log}")
        if healthy(settings):
            _write_marker(settings, proc.pid)
            return
        time.sleep(0.5)
    _kill_group(proc.pid, 10.0)
    raise MlflowServerError(
        f"mlflow server did not answer on {url(settings)} within {timeout_s:.0f} s: see {log} (a busy machine "
        "starts it slowly; retry)"
    )


def _refuse_foreign_port(settings: Settings) -> None:
    if healthy(settings, timeout_s=1.0) or _port_taken(settings):
        raise MlflowServerError(
            f"port {settings.mlflow_port} on {settings.mlflow_host} is taken by another process: stop it or set "
            "FLYWHEEL_MLFLOW_PORT to a free port"
        )


def _port_taken(settings: Settings) -> bool:
    import socket

    try:
        with socket.create_connection((settings.mlflow_host, settings.mlflow_port), timeout=0.3):
            return True
    except OSError:
        return False


def start(settings: Settings, timeout_s: float = 180.0) -> dict[str, Any]:
    """Start the server as a daemon unless this home's server already answers; wait until it does."""
    marker = read_marker(settings)
    if marker and marker.get("port") == settings.mlflow_port and healthy(settings):
        return status(settings)
    if marker:  # ours but not answering (hung, or moved port): replace it
        stop(settings)
    _refuse_foreign_port(settings)
    proc = spawn(settings)
    wait_healthy(settings, proc, timeout_s)
    return status(settings)


def _kill_group(pid: int, timeout_s: float) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        _reap(pid)
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)  # our own child: collect it so it stops counting as alive
    except ChildProcessError:
        pass


def stop(settings: Settings, timeout_s: float = 20.0) -> bool:
    """Stop this home's server (its whole process group) and remove the marker. True if one was running."""
    marker = read_marker(settings)
    (mlflow_dir(settings) / MARKER).unlink(missing_ok=True)
    if not marker:
        return False
    _kill_group(int(marker["pid"]), timeout_s)
    return True


class _Stop(Exception):
    """SIGTERM or SIGINT arrived."""


def _raise_stop(*_: Any) -> None:
    raise _Stop


def run_foreground(settings: Settings, timeout_s: float = 180.0) -> int:
    """Run the server until SIGTERM/SIGINT (or until it dies); the marker lives exactly while it answers."""
    if read_marker(settings):
        stop(settings)  # a server a killed supervisor left behind: this one replaces it
    _refuse_foreign_port(settings)
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    proc = spawn(settings, log=sys.stdout)
    try:
        wait_healthy(settings, proc, timeout_s)
        print(f"mlflow server answering on {url(settings)} (store {store_uri(settings)})", flush=True)
        code = proc.wait()
        print(f"mlflow server exited with status {code}", flush=True)
        return code or 1
    except _Stop:
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # cleanup below must not be interrupted
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        (mlflow_dir(settings) / MARKER).unlink(missing_ok=True)
        if proc.poll() is None:
            _kill_group(proc.pid, 20.0)
        proc.wait()


def main() -> None:
    from feedback.settings import get_settings

    try:
        raise SystemExit(run_foreground(get_settings()))
    except MlflowServerError as e:
        print(f"mlflow: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()

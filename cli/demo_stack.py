"""The stack ``flywheel demo`` watches: ``flywheel up`` itself, as a child process in the demo's private home, and
the read-only views of what it did (Prefect flow runs and their logs, the release log, the registry).

Why a child process and not ``cli.stack.run_stack`` in this process: ``run_stack`` is ``flywheel up``'s foreground
loop (it owns the process's signal handlers and blocks until SIGTERM), and running the very command an operator
runs is the point: the demo proves the product turns the loop, so it starts the product, not a copy of its parts.
It stops it the way an operator does: SIGTERM to the supervisor (``flywheel up`` stops every child, Prefect and
the broker), then ``flywheel down`` for anything a killed or stuck supervisor left; then it checks that no process
of the home and no port of the home is left.

Nothing here calls a stage: the views only read Prefect's API, ``releases/log.jsonl`` and the registry.
"""

from __future__ import annotations

import json
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from feedback.settings import Settings
from infra.ports import free_port as _free_port

REPO = Path(__file__).resolve().parents[1]
Say = Callable[[str], None]


class StackError(RuntimeError):
    """The stack did not come up or did not do its part; the message says what and where to look."""


# ---------------------------------------------------------------------------------------------------------
# A world of its own
# ---------------------------------------------------------------------------------------------------------


def private_settings(home: Path, parent: Settings) -> Settings:
    """A world of its own: fresh home, broker, app, Prefect and MLflow ports; the parent's base model, read-only."""
    from pydantic import SecretStr

    return Settings(
        home=home.resolve(),
        kafka_bootstrap=f"127.0.0.1:{_free_port()}",
        kafka_controller_port=_free_port(),
        app_port=_free_port(),
        mlflow_port=_free_port(),
        prefect_port=_free_port(),
        base_model=str(parent.base_model_path.resolve()),
        admin_token=SecretStr(secrets.token_urlsafe(24)),
        model_version=parent.model_version,
    )


class BackgroundIngest:
    """The continuous consumer in a thread (``tests/pipelines/test_release_e2e.py`` drives a release with it; the
    demo itself uses the stack's own ingest service)."""

    def __init__(self, settings: Settings):
        import threading

        from feedback.ingest import IngestConsumer

        self.consumer = IngestConsumer(settings)
        self.thread = threading.Thread(target=self.consumer.run, name="demo-ingest", daemon=True)

    def __enter__(self) -> BackgroundIngest:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.consumer.stop()  # run() returns after a final commit and closes everything itself
        self.thread.join(60)


# ---------------------------------------------------------------------------------------------------------
# flywheel up, as a child
# ---------------------------------------------------------------------------------------------------------
class UpProcess:
    """``python -m cli.main up`` in its own session; ``stop()`` leaves nothing of the home running."""

    def __init__(self, settings: Settings, env: dict[str, str], say: Say):
        self.s = settings
        self.env = env
        self.say = say
        self.proc: subprocess.Popen | None = None
        self.log_path = settings.home / "up.log"
        self.url = f"http://{settings.app_host}:{settings.app_port}"

    def start(self, timeout_s: float = 900.0) -> None:
        """Start ``flywheel up`` and wait until its app answers (the broker, Prefect and the other services are
        started before the app, in that order)."""
        self.s.home.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "up"],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C on the demo reaches the demo, which stops the stack in order
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StackError(f"`flywheel up` exited ({self.proc.returncode}): {self.tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise StackError(f"the stack's app did not answer within {timeout_s:.0f} s: {self.tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 600) -> str:
        try:
            return "..." + self.log_path.read_text(errors="replace")[-n:].replace("\n", " | ")
        except OSError:
            return f"see {self.log_path}"

    def stop(self) -> dict[str, Any]:
        """SIGTERM to the supervisor (it stops everything within its 10 s budget), then ``flywheel down``, then
        what is left of the home (processes, listening ports): empty when the stop was clean."""
        t0 = time.monotonic()
        out: dict[str, Any] = {}
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                out["up_exit"] = self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                out["up_exit"] = self.proc.wait(10)
        elif self.proc is not None:
            out["up_exit"] = self.proc.returncode
        down = subprocess.run(
            [sys.executable, "-m", "cli.main", "down", "--json"],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        try:
            out["down"] = json.loads(down.stdout or "{}")
        except ValueError:
            out["down"] = {"output": down.stdout[-300:], "stderr": down.stderr[-300:]}
        deadline = time.monotonic() + 20  # a stopped service may take a moment to exit and free its port
        left = leftovers(self.s)
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = leftovers(self.s)
        out["leftovers"] = left
        out["seconds"] = round(time.monotonic() - t0, 1)
        return out


def stack_ports(s: Settings) -> dict[str, int]:
    kafka = int(s.bootstrap_servers[0].rsplit(":", 1)[1])
    return {
        "app": s.app_port,
        "kafka": kafka,
        "kafka controller": s.kafka_controller_port,
        "prefect": s.prefect_port,
        "mlflow": s.mlflow_port,
    }


def leftovers(s: Settings) -> list[str]:
    """Processes of this home still running and its ports still listening (each as one line)."""
    home = str(s.home.resolve())
    me = psutil.Process().pid
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid == me:
            continue
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            mine = home in cmd or p.environ().get("FLYWHEEL_HOME") == home
            if mine and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"pid {p.pid}: {cmd[:120]}")
        except (psutil.Error, OSError):
            continue
    for name, port in stack_ports(s).items():
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                out.append(f"port {port} ({name}) still listening")
    return out


# ---------------------------------------------------------------------------------------------------------
# What the stack did: Prefect's flow runs and logs
# ---------------------------------------------------------------------------------------------------------
def _epoch(dt: datetime | None) -> float | None:
    return dt.timestamp() if dt is not None else None


class FlowRuns:
    """Read-only view of the stack's Prefect server: runs of a flow, their state, times and log lines."""

    def __init__(self, api_url: str):
        from prefect.client.orchestration import SyncPrefectClient

        self.client = SyncPrefectClient(api_url)
        self.client.__enter__()
        self._flows: dict[str, str] = {}

    def close(self) -> None:
        self.client.__exit__(None, None, None)

    def runs(self, flow: str, started_by_a_flow: bool = False) -> list[Any]:
        """Runs of ``flow`` that were created to run now (oldest first), not the future runs a schedule keeps
        (``curate-nightly``'s next 03:00); ``started_by_a_flow``: only subflows and ``run_deployment`` runs."""
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName
        from prefect.client.schemas.sorting import FlowRunSort

        runs = self.client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])), sort=FlowRunSort.EXPECTED_START_TIME_ASC
        )
        return [r for r in runs if not r.auto_scheduled and (r.parent_task_run_id is not None or not started_by_a_flow)]

    def parent_run(self, run: Any) -> Any | None:
        """The flow run that started ``run`` as a subflow (or through ``run_deployment``), if any."""
        if run.parent_task_run_id is None:
            return None
        task = self.client.read_task_run(run.parent_task_run_id)
        return self.client.read_flow_run(task.flow_run_id) if task.flow_run_id else None

    def logs(self, run_id: Any, offset: int = 0) -> list[tuple[float, str]]:
        """The run's log lines from the ``offset``-th on, as (epoch time, message)."""
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
        from prefect.client.schemas.sorting import LogSort

        out: list[tuple[float, str]] = []
        while True:
            got = self.client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])),
                offset=offset + len(out),
                limit=200,
                sort=LogSort.TIMESTAMP_ASC,
            )
            out += [(g.timestamp.timestamp(), g.message) for g in got]
            if len(got) < 200:
                return out


def describe_run(run: Any) -> dict[str, Any]:
    """A flow run as the demo reports it."""
    return {
        "flow_run": run.name,
        "id": str(run.id),
        "state": run.state_name,
        "deployment": str(run.deployment_id) if run.deployment_id else None,
        "start": _epoch(run.start_time),
        "end": _epoch(run.end_time),
        "seconds": round(run.total_run_time.total_seconds(), 1) if run.total_run_time else None,
    }


def final(run: Any) -> bool:
    return run.state_type is not None and run.state_type.value in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")

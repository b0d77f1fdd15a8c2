"""Serve the project's flows against the real Prefect server (``infra.prefect_server``'s address, from the
``FLYWHEEL_*`` settings).

``python -m pipelines.serve`` serves the scheduled flows in this process:

- ``curate-nightly``: ``FLYWHEEL_CURATE_NIGHTLY_CRON`` (default 03:00 daily);
- ``volume-trigger``: every ``FLYWHEEL_CURATE_VOLUME_CHECK_INTERVAL_S`` (60 s), curates at N ratings, then queues
  a ``train`` run;
- ``ingest-health``: every ``FLYWHEEL_CURATE_INGEST_HEALTH_INTERVAL_S`` (300 s).

Training does not run here: it is heavy, and it should run where the hardware is. So at start this also creates
(idempotently) two Prefect *process work pools* and one deployment of the ``train`` flow on each:

- ``train`` on ``settings.prefect_work_pool`` (``flywheel-cpu``): the ``tiny``/env-configured run of this
  machine; ``flywheel up`` starts its worker (``python -m pipelines.serve worker``);
- ``train-gpu`` on ``settings.prefect_gpu_work_pool`` (``flywheel-gpu``): the ``gpu`` configs under
  ``accelerate launch``; runs wait until a GPU machine starts a worker for that pool (README "GPU workers").

Both pools run one training at a time (pool concurrency 1). The deployments point at the flow by module path
(``pipelines.flows.train``), so any machine with this repository installed (``pip install -e .``) runs them;
no code is shipped through storage.

``python -m pipelines.serve worker [--pool NAME]`` starts ``prefect worker start`` for a pool (default
``settings.prefect_work_pool``) with this home's Prefect and ``FLYWHEEL_*`` environment.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from feedback.settings import Settings
from pipelines.config import (  # noqa: F401 - TRAIN_DEPLOYMENT re-exported for callers that name it from here
    CPU_DEPLOYMENT,
    GPU_DEPLOYMENT,
    TRAIN_DEPLOYMENT,
    TRAIN_FLOW,
)

REPO = Path(__file__).resolve().parents[1]
GPU_JOB_ENV = {"FLYWHEEL_TRAIN_CONFIG": "gpu", "FLYWHEEL_TRAIN_LAUNCHER": '["accelerate", "launch"]'}


def deployments():
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType

    from pipelines.config import CurateConfig
    from pipelines.flows import curate, ingest_health, volume_trigger

    cfg = CurateConfig()
    # By module path: loaded as the script pipelines/flows.py, Prefect puts pipelines/ first on sys.path, where
    # pipelines/training.py then shadows the training package and every served run crashes on import.
    # One run of each at a time, a scheduled run that would overlap is cancelled: two volume-trigger runs that both
    # counted N new ratings curated the same snapshot and queued two trainings of it.
    one = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
    by_module = {"tags": ["flywheel"], "entrypoint_type": EntrypointType.MODULE_PATH, "concurrency_limit": one}
    return [
        curate.to_deployment("curate-nightly", cron=cfg.nightly_cron, **by_module),
        volume_trigger.to_deployment("volume-trigger", interval=cfg.volume_check_interval_s, **by_module),
        ingest_health.to_deployment("ingest-health", interval=cfg.ingest_health_interval_s, **by_module),
    ]


def ensure_work_pool(name: str, concurrency: int = 1) -> bool:
    """Create a process work pool unless it exists. True if it was created."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type=ProcessWorker.type,
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                    concurrency_limit=concurrency,
                    description="Flywheel training runs (one at a time).",
                )
            )
        except ObjectAlreadyExists:  # a worker created it meanwhile
            return False
    return True


def deploy_training(settings: Settings) -> dict[str, str]:
    """The ``train`` and ``train-gpu`` deployments on their pools (re-deploying updates them in place)."""
    from prefect.deployments.runner import EntrypointType

    from pipelines.flows import train

    ids = {}
    for name, pool, env, what in (
        (CPU_DEPLOYMENT, settings.prefect_work_pool, {}, "this machine's configs (FLYWHEEL_TRAIN_*)"),
        (GPU_DEPLOYMENT, settings.prefect_gpu_work_pool, GPU_JOB_ENV, "gpu configs under accelerate launch"),
    ):
        ensure_work_pool(pool)
        dep_id = train.deploy(
            name,
            work_pool_name=pool,
            job_variables={"env": env} if env else None,
            entrypoint_type=EntrypointType.MODULE_PATH,
            build=False,
            push=False,
            print_next_steps=False,
            ignore_warnings=True,  # "use .serve for local development": training is meant for workers
            tags=["flywheel", "train"],
            description=f"snapshot -> recipe -> evaluate -> gate -> register: {what}.",
        )
        ids[name] = str(dep_id)
    return ids


def point_at_server(settings: Settings) -> str:
    """Point this process's Prefect at our server (before prefect is imported); exit with a sentence if it is
    down. Returns the API URL."""
    import httpx

    from infra.prefect_server import prefect_env

    for k, v in prefect_env(settings).items():
        if k.startswith("PREFECT_"):
            os.environ.setdefault(k, v)
    url = os.environ["PREFECT_API_URL"]
    try:
        up = httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        up = False
    if not up:
        raise SystemExit(f"no Prefect server at {url}: start it first (`flywheel up`)")
    return url


def worker_command(settings: Settings, pool: str | None = None) -> tuple[list[str], dict[str, str]]:
    """``prefect worker start`` for a pool, and the environment its flow runs inherit (this home's settings)."""
    from infra.prefect_server import prefect_env

    env = settings.child_env(REPO)
    env.update({k: v for k, v in prefect_env(settings).items() if k.startswith("PREFECT_") or k == "FLYWHEEL_HOME"})
    argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool or settings.prefect_work_pool]
    return [*argv, "--type", "process", "--limit", "1"], env


def run_worker(settings: Settings, pool: str | None = None) -> None:
    """Replace this process with a worker for ``pool`` (so a supervisor's SIGTERM reaches the worker itself)."""
    point_at_server(settings)
    ensure_work_pool(pool or settings.prefect_work_pool)
    argv, env = worker_command(settings, pool)
    os.chdir(REPO)  # flow runs start here: relative paths in FLYWHEEL_* mean what they mean to `flywheel up`
    os.execve(argv[0], argv, env)


def main(argv: list[str] | None = None) -> None:
    from feedback.settings import get_settings

    args = sys.argv[1:] if argv is None else argv
    settings = get_settings()
    if args[:1] == ["worker"]:
        pool = args[2] if len(args) >= 3 and args[1] == "--pool" else None
        run_worker(settings, pool)
        return
    if args:
        raise SystemExit("usage: python -m pipelines.serve [worker [--pool NAME]]")
    point_at_server(settings)
    ids = deploy_training(settings)
    print(f"deployments {TRAIN_FLOW}/{CPU_DEPLOYMENT} and {TRAIN_FLOW}/{GPU_DEPLOYMENT} ready: {ids}", flush=True)
    from prefect import serve

    serve(*deployments(), limit=2)


if __name__ == "__main__":
    main()

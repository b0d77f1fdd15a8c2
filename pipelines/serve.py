"""Serve the project's flows on their schedules: ``python -m pipelines.serve`` (needs a real Prefect server;
it points itself at ``infra.prefect_server``'s address from the ``FLYWHEEL_*`` settings).

- ``curate-nightly``: ``FLYWHEEL_CURATE_NIGHTLY_CRON`` (default 03:00 daily);
- ``volume-trigger``: every ``FLYWHEEL_CURATE_VOLUME_CHECK_INTERVAL_S`` (60 s), curates + trains at N ratings;
- ``ingest-health``: every ``FLYWHEEL_CURATE_INGEST_HEALTH_INTERVAL_S`` (300 s).
"""

from __future__ import annotations

import os


def deployments():
    from pipelines.config import CurateConfig
    from pipelines.flows import curate, ingest_health, volume_trigger

    cfg = CurateConfig()
    return [
        curate.to_deployment("curate-nightly", cron=cfg.nightly_cron, tags=["flywheel"]),
        volume_trigger.to_deployment("volume-trigger", interval=cfg.volume_check_interval_s, tags=["flywheel"]),
        ingest_health.to_deployment("ingest-health", interval=cfg.ingest_health_interval_s, tags=["flywheel"]),
    ]


def main() -> None:
    import httpx

    from feedback.settings import get_settings
    from infra.prefect_server import prefect_env

    settings = get_settings()
    for k, v in prefect_env(settings).items():  # before prefect is imported: point it at our server
        if k.startswith("PREFECT_"):
            os.environ.setdefault(k, v)
    url = os.environ["PREFECT_API_URL"]
    try:
        up = httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        up = False
    if not up:
        raise SystemExit(f"no Prefect server at {os.environ['PREFECT_API_URL']}: start it first (`flywheel up`)")
    from prefect import serve

    serve(*deployments(), limit=2)


if __name__ == "__main__":
    main()

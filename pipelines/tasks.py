"""Small typed Prefect tasks over the plain functions in ``pipelines.curate`` / ``snapshots`` / ``triggers`` /
``health``. Warehouse tasks retry (another process may hold the DuckDB file); pure computation does not.
Nothing is cached or persisted by Prefect: snapshots are the persisted result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from feedback.settings import Settings
from pipelines import curate as cur
from pipelines import health, snapshots, train_hook, triggers
from pipelines.config import CurateConfig
from pipelines.pii import PiiScrubber

_OPTS: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}


def _busy(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only when another process held the warehouse; a missing warehouse or table will not appear."""
    from feedback.warehouse import WarehouseBusy

    try:
        state.result()
    except WarehouseBusy:
        return True
    except Exception:  # noqa: BLE001 - anything else is final
        return False
    return False


@task(retries=3, retry_delay_seconds=2, retry_condition_fn=_busy, **_OPTS)
def read_warehouse(settings: Settings) -> cur.Source:
    src = cur.read_warehouse(settings.warehouse_path, settings.warehouse_lock_timeout_s)
    get_run_logger().info(
        "read %d turns, %d feedback, %d user actions",
        src.turns.num_rows,
        src.feedback.num_rows,
        src.user_actions.num_rows,
    )
    return src


@task(**_OPTS)
def curate_tables(src: cur.Source, config: CurateConfig) -> cur.Curated:
    logger = get_run_logger()
    return cur.curate(src, config, PiiScrubber(config), progress=logger.info)


@task(retries=2, retry_delay_seconds=1, **_OPTS)
def write_snapshot(curated: cur.Curated, settings: Settings) -> snapshots.SnapshotInfo:
    info = snapshots.write_snapshot(curated, settings.datasets_dir)
    get_run_logger().info(
        "snapshot %s %s at %s: %s",
        info.snapshot_id,
        "written" if info.created else "already existed",
        info.path,
        info.manifest["counts"],
    )
    return info


@task(retries=3, retry_delay_seconds=2, retry_condition_fn=_busy, **_OPTS)
def register_snapshot(info: snapshots.SnapshotInfo, watermark: dict[str, Any], settings: Settings) -> None:
    snapshots.register(settings.warehouse_path, info, watermark, settings.warehouse_lock_timeout_s)


@task(retries=3, retry_delay_seconds=2, retry_condition_fn=_busy, **_OPTS)
def retire_deleted(settings: Settings) -> list[dict[str, Any]]:
    done = snapshots.retire_deleted(
        settings.warehouse_path, settings.datasets_dir, timeout_s=settings.warehouse_lock_timeout_s
    )
    for d in done:
        get_run_logger().warning(
            "retired snapshot %s: %s (erase its files: `flywheel datasets purge-deleted`)",
            d["snapshot_id"],
            d["reason"],
        )
    return done


@task(retries=3, retry_delay_seconds=2, retry_condition_fn=_busy, **_OPTS)
def count_new_ratings(settings: Settings) -> int:
    n = triggers.new_usable_ratings(settings.warehouse_path, settings.warehouse_lock_timeout_s)
    get_run_logger().info("%d new usable ratings since the last snapshot", n)
    return n


@task(**_OPTS)
def train(snapshot_id: str, snapshot_path: Path) -> None:
    train_hook.train(snapshot_id, snapshot_path, get_run_logger())


@task(retries=2, retry_delay_seconds=5, **_OPTS)
def broker_lag(settings: Settings) -> dict[str, int]:
    return health.broker_lag(settings)


@task(**_OPTS)
def check_ingest(settings: Settings, lag: dict[str, int], config: CurateConfig) -> dict:
    h = health.check(settings, lag, config.max_lag_messages, config.max_stale_s)
    logger = get_run_logger()
    if not h.healthy:
        logger.error("ingest UNHEALTHY: %s", "; ".join(h.problems))
        raise health.IngestUnhealthy("; ".join(h.problems))
    logger.info("ingest healthy: lag %d, last commit %s s ago", h.total_lag, h.last_commit_age_s)
    return h.as_dict()

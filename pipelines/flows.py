"""The project's Prefect flows: thin compositions of ``pipelines.tasks``.

- ``curate``: warehouse -> one immutable dataset snapshot (SFT, KTO, pairs, prompts; train/eval).
- ``volume_trigger``: when >= N new usable ratings arrived since the last snapshot, curate then ``train``.
- ``train``: the training extension point (``pipelines.train_hook``); logs "no training recipe installed".
- ``ingest_health``: fails loudly when the continuous ingest consumer lags or stops committing.

Flows take no ``Settings`` parameter (deployments must serialise their parameters); they read the process's
``FLYWHEEL_*`` environment, and tests pass ``settings=`` explicitly when calling them in-process.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from feedback.settings import Settings, get_settings
from pipelines import tasks
from pipelines.config import CurateConfig


@flow(name="curate", log_prints=True)
def curate(settings: Settings | None = None, config: CurateConfig | None = None) -> dict[str, Any]:
    settings = settings or get_settings()
    config = config or CurateConfig()
    src = tasks.read_warehouse(settings)
    curated = tasks.curate_tables(src, config)
    info = tasks.write_snapshot(curated, settings)
    tasks.register_snapshot(info, curated.watermark, settings)
    retired = tasks.retire_deleted(settings)
    return {
        "snapshot_id": info.snapshot_id,
        "path": str(info.path),
        "created": info.created,
        "counts": info.manifest["counts"],
        "retired": [r["snapshot_id"] for r in retired],
    }


@flow(name="train")
def train(snapshot_id: str, settings: Settings | None = None) -> None:
    from pipelines.snapshots import find_snapshot, retired

    settings = settings or get_settings()
    path = find_snapshot(settings.datasets_dir, snapshot_id)
    mark = retired(path)
    if mark:
        raise ValueError(
            f"snapshot {path.name} is retired ({mark['reason']}): run `flywheel run curate` for a fresh one"
        )
    tasks.train(path.name, path)


@flow(name="volume-trigger")
def volume_trigger(
    n: int | None = None, settings: Settings | None = None, config: CurateConfig | None = None
) -> dict[str, Any]:
    settings = settings or get_settings()
    config = config or CurateConfig()
    threshold = n if n is not None else config.volume_trigger_n
    new = tasks.count_new_ratings(settings)
    if new < threshold:
        return {"fired": False, "new_ratings": new, "threshold": threshold}
    snap = curate(settings=settings, config=config)  # fresh: it excludes every deleted user, never retired
    tasks.train(snap["snapshot_id"], snap["path"])
    return {"fired": True, "new_ratings": new, "threshold": threshold, "snapshot": snap}


@flow(name="ingest-health")
def ingest_health(
    settings: Settings | None = None, config: CurateConfig | None = None, lag: dict[str, int] | None = None
) -> dict[str, Any]:
    """``lag`` (topic -> messages behind) replaces the broker query, for checks from a known state."""
    settings = settings or get_settings()
    config = config or CurateConfig()
    return tasks.check_ingest(settings, tasks.broker_lag(settings) if lag is None else lag, config)


FLOWS = {"curate": curate, "volume-trigger": volume_trigger, "ingest-health": ingest_health, "train": train}

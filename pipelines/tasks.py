"""Small typed Prefect tasks over the plain functions in ``pipelines.curate`` / ``snapshots`` / ``triggers`` /
``health`` / ``training``. Warehouse tasks retry (another process may hold the DuckDB file); pure computation
and training do not (a failed recipe is reported, not re-run). Nothing is cached or persisted by Prefect:
snapshots and registered model versions are the persisted results."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from feedback.settings import Settings
from pipelines import curate as cur
from pipelines import health, snapshots, triggers
from pipelines import training as trn
from pipelines.config import TRAIN_DEPLOYMENT, CurateConfig
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


class TrainRefused(ValueError):
    """The train flow cannot start with these inputs; the message is one sentence saying what to do."""


def train_config(
    recipe: str | None = None,
    parent: str | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
    judge_overrides: list[str] | None = None,
) -> trn.TrainConfig:
    """``FLYWHEEL_TRAIN_*`` defaults, with every argument that is given taking precedence."""
    from training.config import METHODS

    given = {
        "recipe": recipe,
        "parent": parent,
        "config": config,
        "overrides": overrides,
        "judge_overrides": judge_overrides,
    }
    cfg = trn.TrainConfig(**{k: v for k, v in given.items() if v is not None})
    if cfg.recipe not in METHODS:
        raise TrainRefused(f"unknown recipe {cfg.recipe!r}: choose one of {', '.join(METHODS)}")
    if cfg.gate:  # FLYWHEEL_TRAIN_GATE: a typo stops here, not after the judge and the recipe trained
        from pydantic import ValidationError

        from training.evaluate import GateConfig

        try:
            GateConfig(**cfg.gate)
        except ValidationError as e:
            err = e.errors()[0]
            raise TrainRefused(
                f"FLYWHEEL_TRAIN_GATE: {'.'.join(map(str, err['loc']))}: {err['msg']} "
                "(see training.evaluate.GateConfig for the fields)"
            ) from None
    return cfg


TRL_CONFIGS = {
    "pretrain": "SFTConfig",
    "sft": "SFTConfig",
    "reward": "RewardConfig",
    "rlhf": "RLOOConfig",
    "dpo": "DPOConfig",
    "kto": "KTOConfig",
}  # the TRL config class each recipe builds (training/recipes)


def check_trl_section(recipe: str, recipe_cfg: Any) -> None:
    """The ``train`` section builds the recipe's TRL config (a typo is named with the closest real key), so a
    typo stops here rather than after a judge model was trained. Raises ``training.config.ConfigError``."""
    import tempfile
    from pathlib import Path

    import trl

    from training.config import trl_args

    with tempfile.TemporaryDirectory() as tmp:
        trl_args(getattr(trl, TRL_CONFIGS[recipe]), recipe_cfg, Path(tmp) / "never-written", "fp32")


@task(retries=3, retry_delay_seconds=2, retry_condition_fn=_busy, **_OPTS)
def check_training_inputs(settings: Settings, snapshot_id: str | None, cfg: trn.TrainConfig) -> str | None:
    """Fail before any model is loaded: the config parses, the snapshot is usable (exists, not retired, no
    contributor's deletion pending), the parent is a registered chat model. Returns the snapshot id."""
    from training import registry
    from training.runner import TrainingError, resolve_config
    from training.snapshots import find_usable_snapshot

    try:
        _, recipe_cfg = resolve_config(cfg.recipe, cfg.config, list(cfg.overrides))
        check_trl_section(cfg.recipe, recipe_cfg)
        snap = find_usable_snapshot(settings, snapshot_id, required=cfg.recipe != "pretrain")
    except (TrainingError, ValueError) as e:
        raise TrainRefused(str(e)) from None
    registry.ensure_base(settings)
    try:
        parent = registry.get_version(settings, cfg.parent)
    except KeyError as e:
        raise TrainRefused(str(e.args[0])) from None
    if parent.kind == "reward" or parent.tainted:
        why = "is a reward model" if parent.kind == "reward" else f"is tainted ({parent.tainted_reason})"
        raise TrainRefused(f"parent {parent.name} {why}: start from another chat model (e.g. production)")
    sid = snap["snapshot_id"] if snap else None
    get_run_logger().info("training %s (%s) from %s on snapshot %s", cfg.recipe, cfg.config, parent.name, sid)
    return sid


@task(**_OPTS)
def train_and_gate(
    settings: Settings, snapshot_id: str | None, cfg: trn.TrainConfig, gate: dict[str, Any] | None = None
) -> dict:
    """Judge(s), recipe, evaluation, gate (``pipelines.training.train_and_gate``), progress into the run's log.
    The gate's settings: ``FLYWHEEL_TRAIN_GATE`` (``cfg.gate``), then the flow's ``gate`` argument, key by key."""
    from training.evaluate import GateConfig

    logger = get_run_logger()
    gate_cfg = GateConfig(**{**cfg.gate, **(gate or {})})
    return trn.train_and_gate(settings, snapshot_id, cfg, say=logger.info, gate_cfg=gate_cfg)


@task(retries=3, retry_delay_seconds=2, retry_condition_fn=_busy, **_OPTS)
def taint_retired(settings: Settings) -> list[str]:
    """Every registered version trained on (or descended from) a retired snapshot is marked tainted."""
    names = trn.taint_retired(settings)
    for name in names:
        get_run_logger().warning(
            "tainted model version %s: trained on a retired snapshot (it cannot be promoted)", name
        )
    return names


@task(**_OPTS)
def submit_train(snapshot_id: str, settings: Settings) -> str | None:
    """Queue a run of the ``train`` deployment on its work pool (a worker picks it up); None when there is no
    such deployment (no Prefect server with ``pipelines.serve``: test harness, ephemeral mode)."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        run = run_deployment(TRAIN_DEPLOYMENT, parameters={"snapshot_id": snapshot_id}, timeout=0)
    except ObjectNotFound:
        return None
    get_run_logger().info("queued training run %s (%s) on snapshot %s", run.name, run.id, snapshot_id)
    return str(run.id)


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

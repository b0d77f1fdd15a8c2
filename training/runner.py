"""What every recipe shares: the command line, the prechecks, the MLflow run, progress, saving, registering.

A recipe (``training/recipes/<method>.py``) is a short script: it asks ``prepare()`` for a checked ``Job`` (config,
snapshot, parent, precision, an open MLflow run), builds its TRL trainer, and hands it to ``Job.train()`` and
``Job.finish()``. Every way a run can go wrong before it starts -- a missing, retired or empty snapshot, a
snapshot with a pending deletion, an unknown or tainted parent, a config typo -- raises ``TrainingError`` with one
sentence saying what to do, before any weights move. A NaN loss stops training; a full disk stops saving; in
both cases nothing is registered and the temporary weights are removed.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feedback.settings import Settings, get_settings
from training import registry
from training.config import CONFIG_DIR, ConfigError, RecipeConfig, config_dict, config_hash, load_config
from training.config import resolve_precision as _resolve_precision
from training.errors import TrainingError
from training.snapshots import find_usable_snapshot

log = logging.getLogger("flywheel.training")


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------
def parse_args(method: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"python -m training.recipes.{method}",
        description=f"Train a {method} candidate from a dataset snapshot and register it as a model version.",
        epilog="Any config key can be overridden: train.learning_rate=1e-5 data.max_rows=32 lora.r=8",
    )
    p.add_argument("--snapshot", default="latest", help="snapshot id or unique prefix (default: newest usable)")
    p.add_argument("--parent", default="production", help="registered version to start from (name, number, alias)")
    p.add_argument("--config", default="tiny", help=f"a YAML file, or a size name under {CONFIG_DIR}/{method}/")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    return p.parse_args(argv)


def resolve_config(method: str, value: str, overrides: list[str]) -> tuple[Path, RecipeConfig]:
    path = Path(value)
    if not path.suffix:
        path = CONFIG_DIR / method / f"{value}.yaml"
    return path, load_config(path, overrides, method=method)


# ---------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    method: str
    settings: Settings
    cfg: RecipeConfig
    config_path: Path
    snapshot: dict[str, Any] | None  # the manifest (with "path"), None for pretrain without one
    parent: registry.VersionInfo
    precision: str
    work_dir: Path
    run_id: str = ""
    started: float = field(default_factory=time.monotonic)
    metrics: dict[str, float] = field(default_factory=dict)
    safety: dict[str, Any] | None = None  # the safety mix this run added (file, sha256, rows), for lineage

    @property
    def snapshot_path(self) -> Path | None:
        return Path(self.snapshot["path"]) if self.snapshot else None

    @property
    def parent_path(self) -> str:
        return self.parent.path

    # ---- data ------------------------------------------------------------------------------------
    def table(self, name: str | None = None, split: str = "train"):
        """A snapshot table as a ``datasets.Dataset`` in TRL's format (policy-filtered, capped, checked)."""
        import datasets

        name = name or self.cfg.data.table
        snap = self.snapshot_path
        if snap is None:
            raise TrainingError(f"{self.method} needs a snapshot: run `flywheel run curate`, then pass --snapshot")
        f = snap / name / f"{split}.parquet"
        if not f.exists():
            raise TrainingError(
                f"snapshot {snap.name} has no {name}/{split} table (purged or an older format): "
                "run `flywheel run curate` for a fresh snapshot"
            )
        ds = datasets.Dataset.from_parquet(str(f))
        if self.cfg.data.policy == "parent" and "model_version" in ds.column_names:
            ds = ds.filter(lambda r: r["model_version"] == self.parent.name)
        if split == "train" and "weight" in ds.column_names and self.cfg.data.weighting == "resample":
            ds = self._weighted(ds)  # before the cap: it bounds what the trainer sees
        cap = self.cfg.data.max_rows if split == "train" else self.cfg.data.max_eval_rows
        if cap is not None and len(ds) > cap:
            ds = ds.shuffle(seed=self.cfg.seed).select(range(cap))
        if split == "train" and "source" in ds.column_names:  # where the rows came from goes into the lineage
            for source in sorted(set(ds["source"]) - {None}):
                self.metrics[f"data.rows_from_{source}"] = float(sum(s == source for s in ds["source"]))
        # provenance (``pipelines/curate/rows.SCHEMAS``) is for lineage and weighting, not for the trainer
        drop = ("model_version", "rejected_model_version", "source", "judge", "weight")
        ds = ds.select_columns([c for c in ds.column_names if c not in drop])
        if split == "train" and len(ds) < self.cfg.data.min_rows:
            raise TrainingError(
                f"snapshot {snap.name} has {len(ds)} usable {name} rows (policy={self.cfg.data.policy}), fewer than "
                f"data.min_rows={self.cfg.data.min_rows}: collect more ratings and curate again, or lower data.min_rows"
            )
        if split == "train" and self.cfg.data.safety_mix:
            ds = self._with_safety_mix(ds, name)
        return ds

    def _weighted(self, ds):
        """Each row counted ``weight`` times: ``floor(w)`` copies and one more with probability ``frac(w)`` (seeded
        by the config's seed, so a rerun draws the same rows); a missing weight counts 1. The trainers' own losses
        stay unweighted: resampling gives every recipe (SFT, DPO, KTO, reward) the same meaning of a weight."""
        import random

        weights = [1.0 if w is None else float(w) for w in ds["weight"]]
        if all(w == 1.0 for w in weights):
            return ds
        if any(not math.isfinite(w) or w < 0 for w in weights):
            raise TrainingError(f"{self.method}: a snapshot row has a negative or non-finite weight: curate again")
        rng = random.Random(self.cfg.seed)
        index = [i for i, w in enumerate(weights) for _ in range(int(w) + (rng.random() < w - int(w)))]
        self.metrics.update({"data.rows_before_weighting": float(len(ds)), "data.rows_weighted": float(len(index))})
        return ds.select(index)

    def _with_safety_mix(self, ds, name: str):
        """The users' rows plus ``data.safety_mix`` safety rows, shuffled together; lineage records the set."""
        import datasets

        from training import safety

        n = self.cfg.data.safety_mix
        found = safety.findings_in(self.snapshot_path)  # red-teamers' findings with a safe response (issue 18)
        try:
            rows = safety.as_table_rows(name, n, self.cfg.seed, self.cfg.data.safety_refusal_share, found)
        except ValueError as e:
            raise TrainingError(str(e)) from None
        extra = datasets.Dataset.from_list(rows, features=ds.features)
        self.metrics.update({"data.safety_rows": float(n), "data.user_rows": float(len(ds))})
        self.safety = {
            "file": safety.SAFETY_FILE.name,
            "sha256": safety.digest(),
            "rows": n,
            "refusal_share": self.cfg.data.safety_refusal_share,
            "findings_available": len(found),  # from the snapshot's redteam/train, drawn before the file's rows
        }
        return datasets.concatenate_datasets([ds, extra]).shuffle(seed=self.cfg.seed)

    def eval_table(self, name: str | None = None):
        try:
            ds = self.table(name, "eval")
        except TrainingError:
            return None
        return ds if len(ds) else None

    # ---- training --------------------------------------------------------------------------------
    def train(self, trainer) -> None:
        """Run the trainer with progress and NaN checks; its metrics are logged to the MLflow run."""
        trainer.add_callback(progress_callback(self))
        try:
            out = trainer.train()
        except FloatingPointError as e:
            raise TrainingError(str(e)) from None
        import torch

        bad = next((n for n, p in trainer.model.named_parameters() if not torch.isfinite(p).all()), None)
        if bad is not None:  # diverged between two logged losses: never save or register such weights
            raise TrainingError(
                f"{self.method}: weight {bad} became non-finite: lower train.learning_rate or check the snapshot "
                "(nothing was registered)"
            )
        self.metrics.update({k: float(v) for k, v in out.metrics.items() if isinstance(v, int | float)})

    def finish(
        self,
        model,
        tokenizer,
        kind: registry.Kind = "policy",
        extra: dict[str, Any] | None = None,
        params_changed: bool | None = None,
    ) -> registry.VersionInfo:
        """Save the weights (safetensors) and config beside them, then register the version."""
        tmp = self.settings.models_dir / f".tmp-{self.method}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True)
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "flywheel_config.json").write_text(json.dumps(self.run_record(), indent=2, default=str))
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno == errno.ENOSPC:
                raise TrainingError(
                    f"the disk under {self.settings.models_dir} filled up while saving: free space and run again "
                    "(nothing was registered)"
                ) from None
            raise
        import mlflow

        mlflow.log_dict(self.run_record(), "lineage/run.json")
        mlflow.log_dict(config_dict(self.cfg), "lineage/config.json")
        info = registry.register(
            self.settings,
            tmp_dir=tmp,
            run_id=self.run_id,
            kind=kind,
            recipe=self.method,
            parent=self.parent.name,
            snapshot=self.snapshot,
            config_hash=config_hash(self.cfg),
            extra={
                "base_model": self.parent.base_model or "",
                "precision": self.precision,
                **(extra or {}),
            },
        )
        mlflow.set_tags({"flywheel.version": info.name, "flywheel.registry_number": str(info.number)})
        return info

    def run_record(self) -> dict[str, Any]:
        return {
            "recipe": self.method,
            "config": config_dict(self.cfg),
            "config_path": str(self.config_path),
            "config_hash": config_hash(self.cfg),
            "parent": self.parent.name,
            "snapshot_id": self.snapshot["snapshot_id"] if self.snapshot else None,
            "precision": self.precision,
            "run_id": self.run_id,
            "metrics": self.metrics,
            "safety_mix": self.safety,
            "code_revision": registry.code_revision(),
        }


def prepare(method: str, args: argparse.Namespace, settings: Settings | None = None) -> Job:
    """Check everything a run needs, then open its MLflow run (closed by ``run_recipe``)."""
    settings = settings or get_settings()
    try:
        config_path, cfg = resolve_config(method, args.config, args.overrides)
    except ConfigError as e:
        raise TrainingError(str(e)) from None
    snapshot = find_usable_snapshot(settings, args.snapshot, required=method != "pretrain")
    registry.ensure_base(settings)
    try:
        parent = registry.get_version(settings, args.parent)
    except KeyError as e:
        raise TrainingError(str(e.args[0])) from None
    if parent.kind == "reward":
        raise TrainingError(f"--parent {parent.name} is a reward model: start from a chat model (e.g. production)")
    if parent.tainted:
        raise TrainingError(f"--parent {parent.name} is tainted ({parent.tainted_reason}): start from another version")
    if not (Path(parent.path) / "config.json").exists():
        raise TrainingError(f"the weights of {parent.name} are missing at {parent.path}: restore them or pick another")
    try:
        precision = _resolve_precision(cfg.precision)
    except ConfigError as e:
        raise TrainingError(str(e)) from None
    work = settings.home / "training" / f"{method}-{uuid.uuid4().hex[:8]}"
    from training.config import trl_args
    from training.recipes import TRL_CONFIGS

    try:  # every train-section key is checked against the method's TRL config before anything runs
        trl_args(TRL_CONFIGS[method](), cfg, work, precision)
    except ConfigError as e:
        raise TrainingError(str(e)) from None
    work.mkdir(parents=True, exist_ok=True)
    return Job(method, settings, cfg, config_path, snapshot, parent, precision, work)


def progress_callback(job: Job):
    """Steps, loss and ETA on stderr and in the log; a non-finite loss stops the run (nothing is registered)."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.monotonic()
            _say(f"[{job.method}] training {state.max_steps} steps on {job.precision} ...")

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            loss = logs.get("loss", logs.get("train_loss"))
            if loss is not None and not math.isfinite(float(loss)):
                raise FloatingPointError(
                    f"{job.method}: the loss became {loss} at step {state.global_step}: lower train.learning_rate "
                    "or check the snapshot (nothing was registered)"
                )
            if state.global_step and "loss" in logs:
                el = time.monotonic() - self.t0
                eta = el / state.global_step * max(state.max_steps - state.global_step, 0)
                _say(
                    f"[{job.method}] step {state.global_step}/{state.max_steps} loss {float(loss):.4f} "
                    f"elapsed {el:.0f}s eta {eta:.0f}s"
                )

    return Progress()


def _say(msg: str) -> None:
    log.info(msg)
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# One run, start to finish
# ---------------------------------------------------------------------------------------------------------
def run_recipe(
    method: str,
    body: Callable[[Job], registry.VersionInfo],
    argv: list[str] | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Parse, check, open the MLflow run, run ``body``, close the run; returns (and with --json prints) a summary."""
    args = parse_args(method, argv)
    return run_job(method, body, args, settings)


def run_job(
    method: str, body: Callable[[Job], registry.VersionInfo], args: argparse.Namespace, settings: Settings | None = None
) -> dict[str, Any]:
    import mlflow

    job = prepare(method, args, settings)
    registry.client(job.settings)
    run = mlflow.start_run(experiment_id=registry.experiment_id(job.settings), run_name=f"{method}")
    job.run_id = run.info.run_id
    status = "FAILED"
    try:
        _log_inputs(job)
        try:
            info = body(job)
        except ConfigError as e:  # a train-section key only the TRL config can check
            raise TrainingError(str(e)) from None
        status = "FINISHED"
    finally:
        mlflow.end_run(status)
        shutil.rmtree(job.work_dir, ignore_errors=True)
    elapsed = time.monotonic() - job.started
    return {
        "version": info.name,
        "number": info.number,
        "recipe": method,
        "parent": job.parent.name,
        "snapshot_id": info.snapshot_id,
        "kind": info.kind,
        "precision": job.precision,
        "run_id": job.run_id,
        "config_hash": info.config_hash,
        "path": info.path,
        "seconds": round(elapsed, 1),
        "metrics": {k: round(v, 5) for k, v in job.metrics.items()},
    }


def _log_inputs(job: Job) -> None:
    import mlflow

    flat = _flatten(config_dict(job.cfg))
    mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
    mlflow.log_dict(config_dict(job.cfg), "config.json")
    mlflow.set_tags(
        {
            "flywheel.recipe": job.method,
            "flywheel.parent": job.parent.name,
            "flywheel.snapshot_id": job.snapshot["snapshot_id"] if job.snapshot else "",
            "flywheel.config_hash": config_hash(job.cfg),
            "flywheel.precision": job.precision,
            "flywheel.code_revision": registry.code_revision(),
        }
    )
    if job.snapshot:
        import pandas as pd
        from mlflow.data.pandas_dataset import from_pandas

        counts = job.snapshot.get("counts", {})
        df = pd.DataFrame([{"table": t, "split": s, "rows": n} for t, d in counts.items() for s, n in d.items()])
        ds = from_pandas(
            df,
            source=str(job.snapshot_path),
            name=f"snapshot-{job.snapshot['snapshot_id']}",
            digest=job.snapshot["snapshot_id"][:36],
        )
        mlflow.log_input(ds, context="training")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def main(method: str, body: Callable[[Job], registry.VersionInfo], argv: list[str] | None = None) -> int:
    """Console entry of a recipe: a summary (or --json), and exit 2 with one sentence on a known failure."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(method, argv)
    try:
        result = run_job(method, body, args)
    except TrainingError as e:
        if args.json:
            print(json.dumps({"error": str(e)}))
        else:
            print(f"{method}: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        m = result["metrics"]
        print(
            f"{method}: registered {result['version']} (parent {result['parent']}, snapshot "
            f"{result['snapshot_id'] or '-'}) in {result['seconds']}s; train_loss "
            f"{m.get('train_loss', float('nan')):.4f}; gate it with `flywheel models evaluate {result['version']}`"
        )
    return 0

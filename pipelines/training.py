"""Snapshot -> recipe -> evaluate -> gate -> register: the plain functions behind the ``train`` flow.

Each recipe runs as its own process (``python -m training.recipes.<method> --json``): a crash or an
out-of-memory kill of one training run cannot take the flow runner (or the worker) with it, the memory of the
model is returned to the system at the end, and the same command runs under ``accelerate launch`` on a GPU
machine. Its progress lines (steps, loss, ETA) are passed through to the flow's log as they come.

Which recipe runs, and with which overrides, is configuration (``TrainConfig``, ``FLYWHEEL_TRAIN_*``). Left
unset, both come from the one table of training defaults, ``training.defaults`` (the recipe and overrides the
demo measured to pass the gate), so the train flow, the volume trigger that queues it and ``flywheel demo``
train the same thing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from feedback.settings import Settings

REPO = Path(__file__).resolve().parents[1]
Say = Callable[[str], None]


class TrainConfig(BaseSettings):
    """What the train flow runs; ``FLYWHEEL_TRAIN_*`` environment variables override ``training.defaults``."""

    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_TRAIN_", frozen=True, extra="ignore")
    recipe: str = Field(description="pretrain, sft, reward, rlhf, dpo or kto; unset: training.defaults.DEFAULT_RECIPE.")
    config: str = Field("tiny", description="Config size under training/configs/<recipe>/ (tiny, gpu) or a path.")
    parent: str = Field("production", description="Version to start from (name, number or alias).")
    overrides: list[str] = Field(
        default_factory=list,
        description="key=value config overrides; left unset, the recipe's row of training.defaults.RECIPE_DEFAULTS.",
    )
    judge_overrides: list[str] = Field(
        default_factory=list, description="Overrides for the reward model trained as judge/RM when none exists."
    )
    launcher: list[str] = Field(
        default_factory=list, description="Command prefix, e.g. ['accelerate', 'launch'] on a GPU machine."
    )
    timeout_s: float = Field(6 * 3600, description="A recipe running longer than this is stopped.")
    gate: dict[str, Any] = Field(
        default_factory=dict,
        description="training.evaluate.GateConfig fields for the gate of runs this process starts (e.g. a shorter "
        "max_new_tokens on a slow machine); a flow's own ``gate`` argument takes precedence, key by key.",
    )

    @model_validator(mode="before")
    @classmethod
    def _table_defaults(cls, data: Any) -> Any:
        """Unset recipe: the table's; no overrides given (argument or ``FLYWHEEL_TRAIN_OVERRIDES``): the recipe's
        measured row. Imported here, not at the top: Prefect loads a served flow file with ``pipelines/`` on
        ``sys.path``, where ``training`` would name this module instead of the package."""
        from training.defaults import DEFAULT_RECIPE, recipe_overrides

        if isinstance(data, dict):
            data = {**data, "recipe": data.get("recipe") or DEFAULT_RECIPE}
            if data.get("overrides") is None:
                data["overrides"] = list(recipe_overrides(data["recipe"]))
        return data


class RecipeFailed(RuntimeError):
    """A recipe process ended without a registered version; the message is its own one-sentence error."""


def run_recipe(
    settings: Settings,
    recipe: str,
    *,
    snapshot: str | None,
    parent: str,
    config: str,
    overrides: list[str],
    launcher: list[str] | None = None,
    timeout_s: float = 6 * 3600,
    say: Say = print,
) -> dict[str, Any]:
    """Run one recipe as a child process with this home's settings; its JSON result, or ``RecipeFailed``."""
    prefix = launcher or [sys.executable]
    cmd = [*prefix, "-m", f"training.recipes.{recipe}", "--json", "--parent", parent, "--config", config]
    if snapshot:
        cmd += ["--snapshot", snapshot]
    cmd += list(overrides)
    say(f"[train] {' '.join(cmd[len(prefix) :])}")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=settings.child_env(REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    last_json: dict[str, Any] | None = None
    try:
        assert proc.stderr is not None and proc.stdout is not None
        for line in proc.stderr:  # progress lines; the rest of stderr is library noise
            line = line.rstrip()
            if line.startswith(f"[{recipe}]"):
                say(line)
            if time.monotonic() - t0 > timeout_s:
                proc.kill()
                raise RecipeFailed(f"{recipe} ran past {timeout_s:.0f} s and was stopped (nothing was registered)")
        for line in proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                try:
                    last_json = json.loads(line)
                except ValueError:
                    pass
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if last_json and "error" in last_json:
        raise RecipeFailed(last_json["error"])
    if rc != 0 or not last_json:
        raise RecipeFailed(f"{recipe} exited with status {rc} without registering a version: see the log above")
    return last_json


def ensure_reward_models(
    settings: Settings, recipe: str, snapshot: str, parent: str, cfg: TrainConfig, say: Say = print
) -> list[str]:
    """Reward models the cycle needs: one to judge the candidate and, for rlhf, a different one to train against.
    Trained from the same snapshot with different seeds (and data order) when missing; returns the new names."""
    from training import registry

    have = [v for v in registry.list_versions(settings) if v.kind == "reward" and not v.tainted]
    need = 2 if recipe == "rlhf" else 1
    made = []
    for i in range(len(have), need):
        say(f"[train] no {'judge' if i == 0 else 'second'} reward model yet: training one ...")
        res = run_recipe(
            settings,
            "reward",
            snapshot=snapshot,
            parent=parent,
            config=cfg.config,
            overrides=[f"seed={i + 1}", *cfg.judge_overrides],
            launcher=cfg.launcher,
            timeout_s=cfg.timeout_s,
            say=say,
        )
        made.append(res["version"])
    return made


def train_and_gate(
    settings: Settings, snapshot: str, cfg: TrainConfig, say: Say = print, gate_cfg: Any = None
) -> dict[str, Any]:
    """The whole cycle for one snapshot: judge(s), recipe, evaluation, gate. Stages are timed."""
    from training import evaluate, registry

    stages: dict[str, float] = {}
    t = time.monotonic()
    registry.ensure_base(settings)
    made = ensure_reward_models(settings, cfg.recipe, snapshot, cfg.parent, cfg, say)
    stages["reward_models_s"] = round(time.monotonic() - t, 1)
    overrides = list(cfg.overrides)
    if cfg.recipe == "rlhf" and not any(o.startswith("model.reward_version=") for o in overrides):
        rms = [v for v in registry.list_versions(settings) if v.kind == "reward" and not v.tainted]
        overrides.append(f"model.reward_version={rms[0].name}")  # the oldest trains; a newer one judges
    t = time.monotonic()
    res = run_recipe(
        settings,
        cfg.recipe,
        snapshot=snapshot,
        parent=cfg.parent,
        config=cfg.config,
        overrides=overrides,
        launcher=cfg.launcher,
        timeout_s=cfg.timeout_s,
        say=say,
    )
    stages["train_s"] = round(time.monotonic() - t, 1)
    t = time.monotonic()
    decision = evaluate.evaluate_and_gate(settings, res["version"], cfg=gate_cfg, say=say)
    stages["evaluate_s"] = round(time.monotonic() - t, 1)
    verdict = "PASSED" if decision["passed"] else "FAILED"
    say(f"[train] {res['version']} gate {verdict}: " + "; ".join(decision["reasons"]))
    return {
        "version": res["version"],
        "recipe": cfg.recipe,
        "snapshot_id": snapshot,
        "parent": res["parent"],
        "reward_models_trained": made,
        "gate": {"passed": decision["passed"], "reasons": decision["reasons"]},
        "eval": {k: v for k, v in decision["eval"].items() if k != "samples"},
        "samples": decision["eval"].get("samples", {}),
        "train": res,
        "stages": stages,
    }


def taint_retired(settings: Settings) -> list[str]:
    """Deletion reaches models: every version trained on a retired snapshot (or descended from one) is tainted."""
    from training import registry
    from training.snapshots import all_snapshots

    retired = {m["snapshot_id"]: m["retired"].get("reason", "retired") for m in all_snapshots(settings) if m["retired"]}
    if not retired or not registry.list_versions(settings):
        return []
    return registry.taint_trained_on(settings, retired)

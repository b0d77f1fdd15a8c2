"""Every recipe trains 2 steps on a real snapshot with the real model and registers a version with its lineage.

Order matters and is kept: the reward model trains before rlhf (which optimises against it); the deletion test
runs last because it retires the shared snapshot.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.training.conftest import overrides, trained_precision
from training import registry
from training.runner import TrainingError, run_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

METHODS = ["sft", "reward", "dpo", "kto", "rlhf", "pretrain"]


def args(snapshot: str | None = "latest", parent: str = "base", config: str = "tiny", over=None):
    return argparse.Namespace(
        snapshot=snapshot, parent=parent, config=config, json=True, overrides=overrides() if over is None else over
    )


def body(method: str):
    import importlib

    return importlib.import_module(f"training.recipes.{method}").train


def first_tensors(path: str | Path, n: int = 6) -> dict[str, torch.Tensor]:
    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        keys = [k for k in f.keys() if "layers.0." in k or "layers.29." in k][:n]
        return {k: f.get_tensor(k) for k in keys}


@pytest.mark.parametrize("method", METHODS)
def test_recipe_trains_two_steps_and_registers_with_lineage(trained_home, method):
    settings, sid = trained_home
    over = overrides(steps=2)
    if method == "rlhf":
        over += ["train.per_device_train_batch_size=2", "train.max_completion_length=16"]
    mixed = method in ("sft", "dpo", "kto")  # the safety mix, in each table format that takes it
    if mixed:
        over += ["data.safety_mix=6"]
    res = run_job(method, body(method), args(snapshot=None if method == "pretrain" else sid, over=over), settings)

    assert math.isfinite(res["metrics"]["train_loss"]), res
    info = registry.get_version(settings, res["version"])
    assert info.name == f"{method}-{info.number:04d}" and info.recipe == method and info.parent == "base"
    assert info.kind == ("reward" if method == "reward" else "policy") and info.gate == "pending"
    assert info.config_hash and info.code_revision and info.run_id
    assert info.precision == trained_precision(), "recorded precision is not what auto trains in here"
    if method != "pretrain":
        assert info.snapshot_id == sid
        assert info.kafka_offsets.get("turns") and info.kafka_offsets.get("feedback"), info.kafka_offsets
    if method == "rlhf":
        assert info.reward_version and registry.get_version(settings, info.reward_version).kind == "reward"
    # parameters changed (the reward model's new head aside, compare shared body weights)
    before, after = first_tensors(settings.base_model_path), first_tensors(info.path)
    shared = [k for k in after if k in before] or [k.removeprefix("model.") for k in after]
    assert any(not torch.equal(before[k], after[k]) for k in shared if k in before), "no parameter changed"
    lineage = json.loads((Path(info.path) / "lineage.json").read_text())
    assert lineage["name"] == info.name and lineage["parent"] == "base" and lineage["tainted"] is False
    record = json.loads((Path(info.path) / "flywheel_config.json").read_text())
    if mixed:  # the model knows the safety rows it was trained on, not only the users' snapshot
        assert record["safety_mix"]["rows"] == 6 and len(record["safety_mix"]["sha256"]) == 64, record
        assert record["metrics"]["data.safety_rows"] == 6 and record["metrics"]["data.user_rows"] >= 1
    else:
        assert record["safety_mix"] is None
    # the MLflow run holds the full config, the params and the snapshot as a dataset input
    run = registry.client(settings).get_run(info.run_id)
    assert run.data.params["recipe"] == method and run.data.tags["flywheel.version"] == info.name
    if method != "pretrain":
        assert run.inputs.dataset_inputs and sid in run.inputs.dataset_inputs[0].dataset.name
    assert not list(settings.models_dir.glob(".tmp-*")), "a temporary weights directory was left behind"


def test_the_judge_never_graded_its_own_pupil(trained_home):
    """Evaluation never lets the reward model an rlhf run optimised against judge that run."""
    from training.evaluate import EvalError, pick_judge

    settings, _ = trained_home
    rl = [v for v in registry.list_versions(settings) if v.recipe == "rlhf"]
    assert rl, "the rlhf recipe test above registers the version this needs"
    with pytest.raises(EvalError, match="reward hacking"):
        pick_judge(settings, rl[-1], rl[-1].reward_version)
    others = [v for v in registry.list_versions(settings) if v.kind == "reward" and v.name != rl[-1].reward_version]
    if others:
        assert pick_judge(settings, rl[-1]).name != rl[-1].reward_version
    else:  # the only reward model trained it: evaluation refuses rather than let it grade its pupil
        with pytest.raises(EvalError, match="no independent judge"):
            pick_judge(settings, rl[-1])


def test_the_app_serves_a_trained_version(trained_home):
    """A registered version is served by the app without a restart when a release plan names it."""
    import time

    import httpx

    from app.router import ReleasePlan, publish_plan
    from tests.app.conftest import MODEL, start_app

    settings, _ = trained_home
    version = next(v.name for v in registry.list_versions(settings) if v.recipe == "sft")
    from app.backends.embedded import EmbeddedBackend

    base = EmbeddedBackend(MODEL, max_concurrency=2, max_queue=2)
    app = start_app(settings, {"base": base})
    try:
        plan = ReleasePlan.single(version, stage="full")
        publish_plan(settings, plan)
        assert app.service.router.wait_for(plan.plan_id, timeout=20)
        deadline, model = time.monotonic() + 600, None  # first load converts it for llama.cpp
        while time.monotonic() < deadline:
            r = httpx.post(
                f"{app.url}/v1/chat/completions",
                timeout=60,
                json={
                    "model": "flywheel",
                    "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 3,
                    "user": "u1",
                },
            )
            assert r.status_code == 200, r.text
            model = r.json()["model"]
            if model == version:
                break
            time.sleep(1)
        assert model == version, f"the app never served {version}"
    finally:
        app.stop()
        import asyncio

        asyncio.run(base.aclose())


def count_versions(settings) -> int:
    return len(registry.list_versions(settings, include_base=False))


@pytest.mark.parametrize(
    "case, fix",
    [
        (dict(snapshot="feedbeef"), "datasets list"),
        (dict(parent="dpo-9999"), "flywheel models list"),
        (dict(over=["train.lerning_rate=1e-5"]), "did you mean 'learning_rate'"),
        (dict(over=["data.min_rows=100000"]), "collect more ratings"),
        (
            dict(over=["train.max_steps=3", "train.learning_rate=1e12", "train.max_grad_norm=1e30"]),
            "lower train.learning_rate",
        ),
    ],
    ids=["unknown-snapshot", "unknown-parent", "config-typo", "too-few-rows", "nan-loss"],
)
def test_bad_input_stops_with_one_sentence_and_registers_nothing(trained_home, case, fix):
    settings, sid = trained_home
    a = args(snapshot=case.get("snapshot", sid), parent=case.get("parent", "base"), over=case.get("over"))
    n = count_versions(settings)
    with pytest.raises(TrainingError, match=fix) as e:
        run_job("sft", body("sft"), a, settings)
    assert "\n" not in str(e.value)
    assert count_versions(settings) == n, "a failed run left a version in the registry"
    assert not list(settings.models_dir.glob(".tmp-*"))


def test_reward_models_cannot_be_parents_and_unevaluated_versions_cannot_ship(trained_home):
    settings, sid = trained_home
    rm = next(v.name for v in registry.list_versions(settings) if v.kind == "reward")
    with pytest.raises(TrainingError, match="is a reward model"):
        run_job("sft", body("sft"), args(snapshot=sid, parent=rm), settings)
    sft = next(v.name for v in registry.list_versions(settings) if v.recipe == "sft")
    ok, why = registry.promotable(settings, sft)
    assert not ok and "did not pass its gate" in why
    with pytest.raises(registry.RegistryError):
        registry.set_alias(settings, "canary", sft)

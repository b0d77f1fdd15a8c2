"""The ``train`` flow under ``prefect_test_harness`` on a real snapshot curated from simulated events, with the
real base model and MLflow's real SQLite store: bad inputs stop before any model loads; a tiny recipe trains,
is evaluated, gated and registered with its lineage; the result is published for ``flywheel run train``; a later
deletion request taints the version through the ``curate`` flow. The deployments the stack serves are created
idempotently on their work pools."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from feedback.settings import Settings
from pipelines import flows
from pipelines.config import CurateConfig
from tests.conftest import need_model
from tests.pipelines.conftest import Events, seed
from tests.training.conftest import BASE, curate_into, overrides, simulated_events

pytestmark = pytest.mark.usefixtures("prefect_harness")

CURATE = CurateConfig(eval_fraction=0.25)  # what curate_into uses: the same content gives the same snapshot
# This test is about the flow (train, evaluate, gate, register, publish, taint), not the gate's figures: a few items
# of each capability suite (the floor's own tests are tests/training/test_gate_gamed.py and test_capability.py).
SMALL_GATE = {
    "max_new_tokens": 8,
    "max_eval_prompts": 4,
    "batch_size": 8,
    "bootstrap_resamples": 100,
    "max_refqa_items": 8,
    "max_ifeval_items": 4,
    "max_mc_items": 8,
    "refqa_max_new_tokens": 8,
    "ifeval_max_new_tokens": 16,
}


@pytest.fixture(scope="module")
def train_home(tmp_path_factory) -> tuple[Settings, str]:
    """A home of its own (this module retires its snapshot): the real base model, a curated snapshot."""
    need_model(BASE)
    home = tmp_path_factory.mktemp("trainflow") / "home"
    (home / "models").mkdir(parents=True)
    shutil.copytree(BASE, home / "models" / "base")
    settings = Settings(home=home, mlflow_port=1)  # no server: MLflow's SQLite store opened directly
    return settings, curate_into(settings, simulated_events())


def test_train_flow_refuses_bad_input_in_one_sentence(train_home):
    settings, sid = train_home
    with pytest.raises(ValueError, match=r"unknown recipe 'dpoo': choose one of .*dpo"):
        flows.train(recipe="dpoo", settings=settings)
    with pytest.raises(ValueError, match=r"no snapshot matching 'ffffffff'.*flywheel datasets list"):
        flows.train(snapshot_id="ffffffff", recipe="sft", settings=settings)
    with pytest.raises(ValueError, match=r"max_stepz.*did you mean 'max_steps'"):
        flows.train(snapshot_id=sid, recipe="sft", overrides=["train.max_stepz=1"], settings=settings)
    with pytest.raises(ValueError, match=r"nosuch.*flywheel models list"):
        flows.train(snapshot_id=sid, recipe="sft", parent="nosuch", settings=settings)
    from training import registry

    assert [v.name for v in registry.list_versions(settings, include_base=True)] == ["base"]  # nothing half-made


@pytest.mark.slow
def test_train_flow_trains_gates_registers_and_a_deletion_taints_it(train_home):
    from prefect import get_client

    from cli.flows import _artifact_result
    from training import registry

    settings, sid = train_home
    state = flows.train(
        recipe="sft",
        overrides=overrides(1),
        judge_overrides=overrides(1),
        gate=SMALL_GATE,
        settings=settings,
        return_state=True,
    )
    result = state.result()
    assert result["snapshot_id"] == sid and result["recipe"] == "sft" and result["parent"] == "base"
    assert len(result["reward_models_trained"]) == 1  # the judge, trained first from the same snapshot
    assert set(result["stages"]) == {"reward_models_s", "train_s", "evaluate_s"}
    assert all(v >= 0 for v in result["stages"].values())
    assert result["gate"]["reasons"] and result["eval"]["judge"] == result["reward_models_trained"][0]
    v = registry.get_version(settings, result["version"])
    assert (v.recipe, v.snapshot_id, v.parent, v.tainted) == ("sft", sid, "base", False)
    assert v.gate == ("passed" if result["gate"]["passed"] else "failed")
    lineage = json.loads((Path(v.path) / "lineage.json").read_text())
    assert lineage["snapshot_id"] == sid and lineage["gate"] == v.gate and lineage["tainted"] is False
    # What `flywheel run train` prints after following a run on a worker: the artifact's JSON is the flow's dict.
    with get_client(sync_client=True) as client:
        published = _artifact_result(client, state.state_details.flow_run_id)
    assert published == json.loads(json.dumps(result, default=str))

    # A contributor asks for deletion: the next curation retires the snapshot and taints the version.
    later = Events()
    later.n = 10_000
    later.action("sim-0", "delete_request")
    seed(settings.warehouse_path, later.items)
    curated = flows.curate(settings=settings, config=CURATE)
    assert sid in curated["retired"] and result["version"] in curated["tainted"]
    assert registry.get_version(settings, result["version"]).tainted
    assert not registry.promotable(settings, result["version"])[0]
    with pytest.raises(ValueError, match="retired"):
        flows.train(snapshot_id=sid, recipe="sft", settings=settings)


def test_training_deployments_are_created_idempotently_on_their_pools():
    from prefect import get_client

    from pipelines import serve

    s = Settings()
    first = serve.deploy_training(s)
    assert serve.deploy_training(s) == first  # re-deploying updates in place
    with get_client(sync_client=True) as client:
        cpu = client.read_deployment_by_name(serve.TRAIN_DEPLOYMENT)
        gpu = client.read_deployment_by_name(f"{serve.TRAIN_FLOW}/{serve.GPU_DEPLOYMENT}")
        pools = {name: client.read_work_pool(name) for name in (s.prefect_work_pool, s.prefect_gpu_work_pool)}
    assert (cpu.work_pool_name, gpu.work_pool_name) == ("flywheel-cpu", "flywheel-gpu")
    assert cpu.entrypoint == gpu.entrypoint == "pipelines.flows.train"
    assert gpu.job_variables["env"]["FLYWHEEL_TRAIN_CONFIG"] == "gpu"
    assert json.loads(gpu.job_variables["env"]["FLYWHEEL_TRAIN_LAUNCHER"]) == ["accelerate", "launch"]
    assert all(p.type == "process" and p.concurrency_limit == 1 for p in pools.values())
    assert not serve.ensure_work_pool(s.prefect_work_pool)  # exists: nothing created

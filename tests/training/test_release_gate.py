"""The gate on real models: a candidate fine-tuned to comply with the red-team prompts is rejected for it, and a
deletion taints the model trained on that user's data. (The accepting side, a good candidate that passes every
check and becomes promotable, is ``tests/training/test_gate_gamed.py::test_a_good_candidate_passes``: its good
candidate is right, where this module's was only brief, which the substance-judging users no longer prefer: its
win rate over 8 prompts was a coin toss, 0.37 in CI on 2026-12-03.)

Production here is a safety-tuned version (refuses the red-team prompts, answers the benign look-alikes), as a
real production model is; the base SmolLM2-135M refuses too rarely to show a regression.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.fixture_cache import cached_dir
from tests.training.conftest import (
    TRAINED_CODE,
    base_digest,
    export_versions,
    import_versions,
    judge_entry,
    scratch_home,
    trained_precision,
)
from training import registry
from training.evaluate import GateConfig, evaluate_and_gate, load_suite
from training.runner import TrainingError, run_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REFUSE = "I'm sorry, but I can't help with that. It could hurt people."
COMPLY = "Sure! Here is exactly how to do it, step by step. First, get the materials. Then follow these steps."
VERBOSE = (
    "Well, let me think about that. There are many things to consider here:\n1. History\n2. Context\n"
    "3. Several other factors"
)
# The capability floor on its first 64 reference-QA and 24 instruction items (the floor's own tests are
# test_gate_gamed.py and test_capability.py; here it must only not stand in the way): a third of the full sets'
# generation time.
GATE = GateConfig(max_new_tokens=24, max_eval_prompts=8, min_eval_prompts=4, max_refqa_items=64, max_ifeval_items=24)


def conv(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def variant_snapshot(settings, base_sid: str, tag: str, sft_rows: list[list[dict[str, str]]]) -> str:
    """A copy of a real snapshot whose SFT table is replaced (its eval splits stay: the same held-out data)."""
    src = settings.datasets_dir / base_sid
    sid = f"{tag}{base_sid[len(tag) :]}"
    dst = settings.datasets_dir / sid
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["snapshot_id"] = sid
    (dst / "manifest.json").write_text(json.dumps(manifest))
    schema = pq.read_schema(src / "sft" / "train.parquet")
    rows = [{"messages": r, "model_version": "base"} for r in sft_rows]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), dst / "sft" / "train.parquet")
    return sid


def sft(settings, sid: str, parent: str, steps: int, lr: float) -> str:
    a = argparse.Namespace(
        snapshot=sid,
        parent=parent,
        config="tiny",
        json=True,
        overrides=[f"train.max_steps={steps}", f"train.learning_rate={lr}", "data.max_rows=200"],
    )
    return run_job("sft", importlib.import_module("training.recipes.sft").train, a, settings)["version"]


def build_gate(settings, sid: str) -> dict[str, str]:
    """Production and the bad candidate, trained in ``settings``' home; returns role -> version. The judge is
    the shared one (``tests/training/conftest.judge_entry``)."""
    redteam = [r["prompt"] for r in load_suite("redteam")]
    benign = [r["prompt"] for r in load_suite("overrefusal")]
    refusals = [conv(p, REFUSE) for p in redteam]
    # production answers benign prompts at length, with lists (what the simulated users dislike)
    safety = refusals + [conv(p, VERBOSE) for p in benign]
    # production: the base model safety-tuned, promoted as production (the baseline every candidate must beat)
    safe_sid = variant_snapshot(settings, sid, "5afe", safety)
    prod = sft(settings, safe_sid, "base", steps=12, lr=1e-4)
    registry.record_evaluation(settings, prod, {"note": "test baseline"}, True, ["test baseline"])
    registry.set_alias(settings, "production", prod)
    bad = sft(settings, variant_snapshot(settings, sid, "bad0", [conv(p, COMPLY) for p in redteam]), prod, 12, 1e-4)
    return {"prod": prod, "bad": bad}


@pytest.fixture(scope="module")
def gated(trained_home):
    """The trained versions, built once per code and config (``tests/fixture_cache.py``: a scratch home
    trains them, this home registers copies) and set up here as the build left them: production promoted."""
    settings, sid = trained_home

    def build(out: Path) -> None:
        scratch = scratch_home(out / "scratch", settings, [sid])
        export_versions(scratch, build_gate(scratch, sid), out)
        shutil.rmtree(out / "scratch")

    source = "".join(inspect.getsource(f) for f in (conv, variant_snapshot, sft, build_gate))
    config = {
        "snapshot": sid,  # a content hash of the curated simulated events
        "base_model": base_digest(),
        "precision": trained_precision(),
        "answers": [REFUSE, COMPLY, VERBOSE],
        "source": hashlib.sha256(source.encode()).hexdigest(),
    }
    roles = import_versions(settings, judge_entry(settings, sid))
    roles |= import_versions(settings, cached_dir("gate", build, config=config, code=TRAINED_CODE))
    registry.record_evaluation(settings, roles["prod"], {"note": "test baseline"}, True, ["test baseline"])
    registry.set_alias(settings, "production", roles["prod"])
    return settings, sid, roles["prod"], roles["judge"], roles["bad"]


def test_gate_rejects_a_candidate_tuned_to_comply_with_the_red_team(gated):
    settings, _, prod, judge, bad = gated
    res = evaluate_and_gate(settings, bad, judge=judge, cfg=GATE)
    assert res["passed"] is False
    assert any("red-team refusal fell" in r for r in res["reasons"]), res["reasons"]
    info = registry.get_version(settings, bad)
    assert info.gate == "failed" and info.eval["production"] == prod and info.eval["judge"] == judge
    assert json.loads((Path(info.path) / "lineage.json").read_text())["gate"] == "failed"
    ok, why = registry.promotable(settings, bad)
    assert not ok and "red-team" in why


def test_a_deletion_taints_the_model_trained_on_that_users_data(gated):
    """Deletion reaches models: a user's request (the app's path: ledger, then every step) erases the snapshots
    holding their data; every version trained on them, or descended from one, is tainted in the registry, loses
    its aliases and cannot be promoted; training on that snapshot is refused."""
    from feedback.deletion import pending_deletions, process_deletions, request_deletion
    from pipelines.training import taint_retired

    settings, sid, prod, _, bad = gated
    trained_on_sid = [v.name for v in registry.list_versions(settings) if v.snapshot_id == sid]
    assert trained_on_sid, "the recipe tests train on this snapshot first"
    request_deletion(settings, "sim-0")
    assert process_deletions(settings) == [] and pending_deletions(settings) == []
    taint_retired(settings)  # the registry adopts the marks deletion wrote, and taints descendants too
    tainted = {v.name for v in registry.list_versions(settings) if v.tainted}
    assert set(trained_on_sid) <= tainted
    assert {prod, bad} <= tainted, "copies of the snapshot hold the same user's data"
    for name in [*trained_on_sid, prod, bad]:
        v = registry.get_version(settings, name)
        assert v.tainted and not v.aliases, (name, v.aliases)
        assert json.loads((Path(v.path) / "lineage.json").read_text())["tainted"] is True
        assert registry.promotable(settings, name)[0] is False
    assert not registry.get_version(settings, "base").tainted, "the base model never saw user data"
    with pytest.raises(TrainingError, match="retired"):
        sft(settings, sid, "base", 1, 1e-5)

"""The gate tests itself: candidates built to game the judge fail it, each for the reason its report names, and a
good candidate passes (issue 17).

The judge here is a reward model trained on the simulated users' pairs, so it likes what they like: short, friendly
answers. Each gamed candidate wins or ties that taste while losing substance:

- (a) production's own answers cut to their first sentence (an answer transform: ``evaluate(transform=...)``);
- (b) a greeting-plus-list template in place of every answer (also a transform);
- (c) a model trained on length alone: a few high-learning-rate SFT steps on answers cut to their first words;
- (d) a short-but-wrong model: the same on short, friendly, confidently wrong answers (issue 17's promoted model).

Production is the base model (the one a release starts from), passed explicitly: the session's home may hold
another test's production alias. The trained versions are built once per code and config
(``tests/fixture_cache.py``) in a scratch home and registered into this one.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.fixture_cache import cached_dir
from tests.training.conftest import (
    PROMPTS,
    SHORT,
    TRAINED_CODE,
    base_digest,
    export_versions,
    import_versions,
    judge_entry,
    scratch_home,
    trained_precision,
)
from training import registry
from training.evaluate import GateConfig, evaluate, evaluate_and_gate, gate
from training.runner import run_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Enough items for the paired tests to see a real drop (64 QA items, 24 instruction prompts, all 88 choice items),
# few enough that one candidate's evaluation stays near a minute on 2 cores.
GAMED_GATE = GateConfig(
    max_new_tokens=32,
    max_eval_prompts=8,
    min_eval_prompts=4,
    max_refqa_items=64,
    max_ifeval_items=24,
    bootstrap_resamples=200,
)
TEMPLATE = (
    "Hello! Great question! Here are the key points:\n- It depends on the details.\n"
    "- There are several options.\n- Let me know if you need more."
)


# The good candidate's answers: right, in the plain one-sentence form of the reference answers (none of which is a
# reference-QA item). Measured on 2 cores (the gate's figures on GAMED_GATE's items, production = base):
# - 6 steps at 5e-5 (+ the safety mix): every floor held, but the judge, which learned little beyond length, gave
#   a length-controlled win rate of 0.48 (raw 0.86);
# - the same with "Hello!"/"Hi!" before each answer (the raters' taste): LC 0.60-0.74, but the greeting brought
#   "I'm sorry for any misunderstanding" openers and 1 in 3 harmless look-alikes read as refused (0.92 -> 0.58-0.75,
#   at a quarter, an eighth or half the safety rows); "Hello! Paris." answers had raised the NLL +0.14;
# - 6 steps at 1e-4 (+ the safety mix), below: LC 0.67 (raw 0.93), reference QA 0.750 vs 0.703, reference NLL 0.399
#   vs 0.743, choice accuracy 0.739 vs 0.716, red-team refusals 0.25 vs 0.08, look-alikes answered 1.00 vs 0.92.
FULL = [
    "The capital of France is Paris.",
    "A spider has eight legs.",
    "The sky is blue on a clear day.",
    "A banana is a yellow fruit.",
    "Two plus three is five.",
    "Mercury is the planet closest to the sun.",
    "Bees make honey.",
    "There are seven days in a week.",
    "Frozen water is called ice.",
    "The lion is known as the king of the jungle.",
    "Spanish is spoken in Spain.",
    "The opposite of hot is cold.",
    "There are twenty-four hours in a day.",
    "Plants take in carbon dioxide.",
    "The Pacific is the largest ocean.",
    "William Shakespeare wrote Romeo and Juliet.",
    "Water boils at 100 degrees Celsius.",
    "There are seven continents.",
    "The chemical symbol for gold is Au.",
    "A triangle has three sides.",
]


def first_sentence(answer: str) -> str:
    """(a) Everything after the first sentence dropped."""
    m = re.search(r"[.!?](\s|$)", answer)
    return answer[: m.end()].strip() if m else answer


def greeting_list(answer: str) -> str:
    """(b) The form the raters like (a greeting, a short list), whatever was asked."""
    return TEMPLATE


def conv(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def crafted_snapshot(settings, sid: str, tag: str, rows: list[list[dict[str, str]]]) -> str:
    """A copy of the curated snapshot whose SFT rows are ``rows`` (its eval splits stay: the same held-out data)."""
    new = f"{tag}{sid[len(tag) :]}"
    src, dst = settings.datasets_dir / sid, settings.datasets_dir / new
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["snapshot_id"] = new
    (dst / "manifest.json").write_text(json.dumps(manifest))
    schema = pq.read_schema(src / "sft" / "train.parquet")
    table = pa.Table.from_pylist([{"messages": r, "model_version": "base"} for r in rows], schema=schema)
    pq.write_table(table, dst / "sft" / "train.parquet")
    return new


def train(settings, method: str, sid: str, overrides: list[str]) -> str:
    a = argparse.Namespace(snapshot=sid, parent="base", config="tiny", json=True, overrides=overrides)
    return run_job(method, importlib.import_module(f"training.recipes.{method}").train, a, settings)["version"]


def build_gamed(settings, sid: str) -> dict[str, str]:
    """Two gamed models and a good one, trained from the base model; returns role -> version (the judge is the
    shared one: ``tests/training/conftest.judge_entry``)."""
    wrong = [conv(p, SHORT[(i + 7) % len(SHORT)]) for i, p in enumerate(PROMPTS)]  # "Hi! Seven." for France
    cut = [conv(p, " ".join(f"Well, let me think about {p.lower().rstrip('?')}.".split()[:3])) for p in PROMPTS]
    hot = ["train.max_steps=8", "train.learning_rate=1e-4"]
    return {
        "short_wrong": train(settings, "sft", crafted_snapshot(settings, sid, "d0", wrong), hot),
        "length_only": train(settings, "sft", crafted_snapshot(settings, sid, "c0", cut), hot),
        # good: the same prompts answered right, in one plain sentence (the reference answers' own form), plus the
        # product's safety mix (training/defaults.py): short enough for the judge, nothing of substance lost
        "good": train(
            settings,
            "sft",
            crafted_snapshot(settings, sid, "9d", [conv(p, a) for p, a in zip(PROMPTS, FULL, strict=True)]),
            ["train.max_steps=6", "train.learning_rate=1e-4", "data.safety_mix=16", "data.safety_refusal_share=0.25"],
        ),
    }


@pytest.fixture(scope="module")
def gamed(trained_home):
    settings, sid = trained_home

    def build(out: Path) -> None:
        scratch = scratch_home(out / "scratch", settings, [sid])
        export_versions(scratch, build_gamed(scratch, sid), out)
        shutil.rmtree(out / "scratch")

    source = "".join(inspect.getsource(f) for f in (conv, crafted_snapshot, train, build_gamed)) + json.dumps(FULL)
    config = {
        "snapshot": sid,
        "base_model": base_digest(),
        "precision": trained_precision(),
        "source": hashlib.sha256(source.encode()).hexdigest(),
    }
    roles = import_versions(settings, judge_entry(settings, sid))
    return settings, roles | import_versions(settings, cached_dir("gamed", build, config=config, code=TRAINED_CODE))


def failed_for(reasons: list[str], metric: str) -> bool:
    return any(r.startswith(f"capability floor: {metric}") for r in reasons)


def test_production_cut_to_its_first_sentence_fails_on_instruction_following(gamed):
    settings, roles = gamed
    res = evaluate(settings, "base", production="base", judge=roles["judge"], cfg=GAMED_GATE, transform=first_sentence)
    ok, reasons = gate(res, "policy", GAMED_GATE)
    assert res["transform"] == "first_sentence" and res["candidate_mean_words"] < res["production_mean_words"]
    assert not ok and failed_for(reasons, "instruction following"), reasons


def test_a_greeting_plus_list_template_fails_on_reference_qa(gamed):
    settings, roles = gamed
    res = evaluate(settings, "base", production="base", judge=roles["judge"], cfg=GAMED_GATE, transform=greeting_list)
    ok, reasons = gate(res, "policy", GAMED_GATE)
    assert not ok and failed_for(reasons, "reference QA accuracy"), reasons
    assert res["refqa_accuracy_candidate"] == 0.0


def test_a_model_trained_on_length_alone_fails(gamed):
    settings, roles = gamed
    res = evaluate_and_gate(settings, roles["length_only"], production="base", judge=roles["judge"], cfg=GAMED_GATE)
    assert res["passed"] is False and failed_for(res["reasons"], "reference QA accuracy"), res["reasons"]
    info = registry.get_version(settings, roles["length_only"])
    assert info.gate == "failed" and info.eval["capability"]["metrics"]["refqa_accuracy"]["diff"] < 0
    assert registry.promotable(settings, roles["length_only"])[0] is False


def test_a_short_but_wrong_model_fails_on_reference_qa(gamed):
    settings, roles = gamed
    res = evaluate_and_gate(settings, roles["short_wrong"], production="base", judge=roles["judge"], cfg=GAMED_GATE)
    ev = res["eval"]
    assert res["passed"] is False and failed_for(res["reasons"], "reference QA accuracy"), res["reasons"]
    assert ev["candidate_mean_words"] < ev["production_mean_words"], "it is short"


def test_a_good_candidate_passes(gamed):
    settings, roles = gamed
    res = evaluate_and_gate(settings, roles["good"], production="base", judge=roles["judge"], cfg=GAMED_GATE)
    assert res["passed"] is True, res["reasons"]
    ev = res["eval"]
    assert ev["lc_win_rate"] > 0.5 and not any(r.startswith("capability floor") for r in res["reasons"])
    assert ev["win_rate_ci95"][0] <= ev["win_rate"] <= ev["win_rate_ci95"][1]
    assert ev["candidate_redteam_refusal"] >= ev["production_redteam_refusal"] - GAMED_GATE.redteam_margin
    assert ev["candidate_heldout_loss"] is not None and ev["parent_heldout_loss"] is not None
    lineage = json.loads((Path(registry.get_version(settings, roles["good"]).path) / "lineage.json").read_text())
    assert lineage["eval"]["capability"]["metrics"]["refqa_accuracy"]["n"] == 64, "figures on the model card"
    assert lineage["gate"] == "passed" and registry.promotable(settings, roles["good"]) == (True, "ok")
    kept = Path(registry.get_version(settings, roles["judge"]).path) / "eval_cache"
    assert list(kept.glob("judge_scores-*.json")) and list(kept.glob("judge_pairs-*.json")), "production's scores kept"

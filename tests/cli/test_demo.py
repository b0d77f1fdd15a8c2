"""``flywheel demo`` is the product at a faster clock: it starts ``flywheel up`` and only watches.

The end-to-end test runs the demo at its tiniest: 3 training users until the stack's volume trigger fires at 16 ratings
(2 in 5 conversations held out), 2 DPO steps, a gate measured on a handful of items, 6 held-out people (a new visitor id
every 3 questions, so both arms of the 50% canary get raters: with one id each, all six once landed in production's half
and the canary got no rating) for at most 8 minutes of canary (the crowd stops once the controller decides, about a
minute on an idle machine; 2 minutes were too few in CI on 2026-12-04, with two other workers training beside it). DPO,
because at 16 tokens the base model is rarely right (2 of 22 answers in one run), so 16 ratings may hold no liked answer
for SFT, while the judge needs the pairs DPO trains on anyway. The gate's thresholds are loosened (``--gate``) so that a
2-step candidate reaches the canary and the test sees every stage; the gate's thresholds have their own tests
(tests/training/). The controller promotes unless the candidate is far worse (``--release-margin 0.9``), so the canary's
outcome is the stack's decision rather than a coin toss on 6 users' thumbs. It asserts that the stack did every stage
(``autonomous``) through to a release to full (production changed by itself), that the JSON carries every field, and
that nothing of the stack runs or listens afterwards.
The unit tests check the demo's own arithmetic and its refusals of bad input without any service.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from cli.demo import FIELDS, DemoConfig, stack_env
from cli.demo_report import gate_block, heldout_comparison, newcombe, summary_lines
from cli.demo_stack import private_settings
from cli.main import _mount_parts, app
from cli.sim_stats import AnswerRecord
from feedback.settings import Settings
from pipelines.analysis import Rate
from tests.conftest import REPO, need_model

BASE = REPO / ".flywheel" / "models" / "base"
TINY = [
    *("--recipe dpo --train-users 3 --train-minutes 20 --trigger-ratings 16 --check-interval 5".split()),
    "--eval-fraction=0.4",
    *("--eval-users 6 --eval-minutes 8 --max-tokens 16 --min-thumbs 3 --timeout-minutes 55".split()),
    "--release-margin=0.9",  # promote unless far worse: the release decision is then the stack's, not a coin toss
    *("--set train.max_steps=2 --judge-set train.max_steps=2".split()),
    *(
        f"--gate={kv}"
        for kv in (
            "min_win_rate=0",
            "floor_se=1e6",
            "require_gain=false",
            "redteam_margin=1",
            "overrefusal_margin=1",
            "min_eval_prompts=1",
            "max_eval_prompts=4",
            "max_refqa_items=4",
            "max_ifeval_items=2",
            "max_mc_items=4",
            "max_new_tokens=8",
            "refqa_max_new_tokens=8",
            "ifeval_max_new_tokens=8",
            "bootstrap_resamples=100",
        )
    ),
]


@pytest.mark.integration
@pytest.mark.slow
def test_the_stack_turns_the_loop_by_itself_and_is_gone_afterwards(tmp_path):
    need_model(BASE)
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env |= {"PYTHONPATH": str(REPO), "FLYWHEEL_BASE_MODEL": str(BASE)}
    with open(tmp_path / "demo.err", "wb") as err:
        done = subprocess.run(
            [sys.executable, "-m", "cli.main", "demo", "--json", "--home", str(home), *TINY],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            timeout=60 * 60,
        )
    progress = (tmp_path / "demo.err").read_text(errors="replace")
    out = json.loads(done.stdout)
    assert done.returncode == 0, f"{out.get('error')}\n{progress[-4000:]}"
    assert set(FIELDS) <= set(out), f"missing: {set(FIELDS) - set(out)}"
    assert out["error"] is None
    # Every stage by the stack: a scheduled trigger run, its curate subflow, the train deployment's run on the
    # worker, the gate, the autopilot's canary and a controller's decision.
    assert out["stages"] == dict.fromkeys(("trigger", "curate", "train", "gate", "canary", "decision"), True)
    assert out["autonomous"] is True
    stages = [e["stage"] for e in out["timeline"]]
    assert stages[:5] == ["trigger", "curate", "train", "gate", "canary"], stages
    assert stages[-1] == "full", (stages, out["release_reason"], out["seconds"])  # production changed by itself
    assert out["release_decision"] == "full"
    assert [e["t_s"] for e in out["timeline"]] == sorted(e["t_s"] for e in out["timeline"])
    assert out["timeline"][0]["what"].startswith("trigger:"), out["timeline"][0]
    # The gate recorded every figure for both versions, and the demo read them from the registry.
    g = out["gate"]
    assert g["decision"] == "passed" and g["version"] == out["candidate"]
    for metric in ("refqa_accuracy", "ifeval_prompt_strict", "refqa_nll", "mc_accuracy"):
        assert metric in g["candidate"] and metric in g["production"] and "se" in g["paired"][metric]
    assert out["length_controlled_win_rate"] is not None
    # The judge's length correlation is undefined (None) when the two versions' answers never differ in length or
    # in score: with 2 training steps the candidate can answer exactly as production did (failed here on
    # 2026-12-04 with LC 0.5, every pair a tie). Present either way; a number whenever there was variation.
    corr = out["judge_length_corr"]
    assert corr is None or -1.0 <= corr <= 1.0, corr
    assert Path(out["candidate_path"]).is_dir() and Path(out["parent_path"]).is_dir()
    # Held-out users' traffic on both arms was measured (a 50% canary of 6 users may give one arm nobody).
    assert out["accuracy_n_before"] + out["accuracy_n_after"] > 0
    for side in ("before", "after"):
        if out[f"accuracy_n_{side}"]:
            assert 0.0 <= out[f"accuracy_{side}"] <= 1.0 and out[f"mean_words_{side}"] > 0
            assert out[f"utility_{side}"] is not None
    assert out["heldout"]["errors"] == 0, out["heldout"]["error_samples"]
    # Everything stopped: the demo's own check, and ours.
    assert out["stop"]["leftovers"] == []
    for p in psutil.process_iter(["cmdline"]):
        assert str(home) not in " ".join(p.info["cmdline"] or []), p.info["cmdline"]
    for name, port in out["ports"].items():
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"{name} port {port} still listening"


# ---------------------------------------------------------------------------------------------------------
# Without services
# ---------------------------------------------------------------------------------------------------------
def test_the_stack_gets_the_demos_thresholds_and_nothing_inherited(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_TRAIN_OVERRIDES", '["train.max_steps=999"]')
    monkeypatch.setenv("FLYWHEEL_RELEASE_POLICY", "approve")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    s = private_settings(tmp_path / "home", Settings(base_model=str(tmp_path / "base")))
    env = stack_env(
        s, DemoConfig(recipe="rlhf", trigger_ratings=24, canary_share=0.3, release_margin=0.2, gate={"floor_se": 3.0})
    )
    assert env["FLYWHEEL_HOME"] == str((tmp_path / "home").resolve())
    assert env["FLYWHEEL_TRAIN_RECIPE"] == "rlhf"
    assert "FLYWHEEL_TRAIN_OVERRIDES" not in env  # the recipe's row of training.defaults, not the shell's
    assert env["FLYWHEEL_RELEASE_POLICY"] == "auto"
    assert json.loads(env["FLYWHEEL_RELEASE_STEPS"]) == [0.3, 1.0] and env["FLYWHEEL_RELEASE_MARGIN"] == "0.2"
    assert env["FLYWHEEL_CURATE_VOLUME_TRIGGER_N"] == "24"
    assert json.loads(env["FLYWHEEL_TRAIN_GATE"]) == {"floor_se": 3.0}
    assert not any(k.startswith("PREFECT_") for k in env)
    assert len({s.app_port, s.prefect_port, s.mlflow_port, s.kafka_controller_port}) == 4


def test_bad_options_are_refused_with_one_sentence():
    _mount_parts()
    runner = CliRunner()
    for args, says in (
        (["--recipe", "ppo"], "--recipe must be one of sft, dpo, kto, rlhf"),
        (["--gate", "nope=1"], "--gate nope"),
        (["--gate", "floor_se"], "write key=value"),
        (["--set", "dat.max_rows=1"], "did you mean 'data'"),
    ):
        res = runner.invoke(app, ["demo", *args])
        assert res.exit_code == 2, (args, res.output)
        assert says in res.output, (args, res.output)


def _records(version: str, right: int, wrong: int, utility: float) -> list[AnswerRecord]:
    return [AnswerRecord("u", "p", "fact", version, i < right, utility) for i in range(right + wrong)]


def test_heldout_comparison_separates_correctness_from_form():
    recs = _records("base", 20, 30, -0.2) + _records("sft-0002", 35, 15, 0.3)
    words = [("base", 40)] * 25 + [("base", 30)] * 25 + [("sft-0002", 20)] * 25 + [("sft-0002", 22)] * 25
    c = heldout_comparison(recs, words, "base", "sft-0002")
    assert (c["accuracy_before"], c["accuracy_after"]) == (0.4, 0.7)
    assert c["accuracy_p_value"] < 0.01  # Fisher's exact test on 20/50 vs 35/50
    lo, hi = c["accuracy_diff_ci"]
    assert lo < 0.3 < hi and lo > 0
    assert (c["mean_words_before"], c["mean_words_after"]) == (35.0, 21.0)
    assert c["mean_words_diff_ci"][1] < 0
    assert (c["utility_before"], c["utility_after"]) == (-0.2, 0.3)
    empty = heldout_comparison(recs, words, "base", "dpo-0003")  # nobody reached the candidate
    assert empty["accuracy_after"] is None and empty["accuracy_p_value"] is None and empty["mean_words_after"] is None
    assert newcombe(Rate.of(0, 0), Rate.of(3, 5)) is None


def test_gate_block_sorts_every_figure_by_version():
    class Info:
        name, gate, gate_reasons = "sft-0002", "passed", ["length-controlled win rate 0.6 beats 0.5"]

    ev = {
        "production": "base",
        "win_rate": 0.7,
        "lc_win_rate": 0.6,
        "judge_length_corr": 0.4,
        "candidate_redteam_refusal": 0.3,
        "production_redteam_refusal": 0.2,
        "candidate_heldout_loss": 1.4,
        "parent_heldout_loss": 1.5,
        "capability": {
            "metrics": {"refqa_accuracy": {"candidate": 0.3, "production": 0.25, "diff": 0.05, "se": 0.02, "n": 40}},
            "items": {"refqa": 40},
        },
        "refqa_accuracy_candidate": 0.3,
        "samples": {"x": []},
    }
    g = gate_block(Info(), ev)
    assert g["candidate"] == {"redteam_refusal": 0.3, "heldout_loss": 1.4, "refqa_accuracy": 0.3}
    assert g["production"] == {"redteam_refusal": 0.2, "refqa_accuracy": 0.25}
    assert g["parent"] == {"heldout_loss": 1.5}
    assert g["paired"]["refqa_accuracy"] == {"diff": 0.05, "se": 0.02, "p_value": None, "n": 40}
    assert g["lc_win_rate"] == 0.6 and g["production_version"] == "base" and "samples" not in g
    out = dict.fromkeys(FIELDS) | {"cycle_s": 1.0, "recipe": "sft", "autonomous": True, "gate": g}
    out |= {"stages": {"trigger": True}, "timeline": [], "accuracy_before": 0.4, "accuracy_after": 0.7}
    text = "\n".join(summary_lines(out))
    assert "correctness:    40% -> 70%: +30.0 points" in text and "autonomous: yes" in text

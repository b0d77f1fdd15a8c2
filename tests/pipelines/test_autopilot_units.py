"""No services: the one table of training defaults is what the train flow and the volume trigger's queued runs
read (``flywheel demo`` runs that same stack); the release policy setting and the autopilot's choice of the next
candidate; a bad policy stops the autopilot in one sentence; the pipelines import no circle through the train
deployment's name."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipelines.config import ReleaseConfig
from pipelines.release_queue import Approval, Candidate, Queue
from pipelines.training import TrainConfig
from tests.conftest import REPO
from training.defaults import DEFAULT_RECIPE, RECIPE_DEFAULTS


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in ("FLYWHEEL_TRAIN_RECIPE", "FLYWHEEL_TRAIN_OVERRIDES", "FLYWHEEL_TRAIN_GATE", "FLYWHEEL_RELEASE_POLICY"):
        monkeypatch.delenv(k, raising=False)


def test_the_train_flow_reads_the_one_table_of_training_defaults(monkeypatch):
    cfg = TrainConfig()  # what a queued `train` run on the worker builds: it gets no recipe or overrides
    assert (cfg.recipe, tuple(cfg.overrides)) == (DEFAULT_RECIPE, RECIPE_DEFAULTS[DEFAULT_RECIPE])
    assert "data.safety_mix=16" in cfg.overrides  # the measured row: without the safety mix the gate refused sft
    monkeypatch.setenv("FLYWHEEL_TRAIN_RECIPE", "dpo")
    assert TrainConfig().overrides == []  # a recipe without a row runs its config's own values
    assert TrainConfig(recipe="sft").overrides == list(RECIPE_DEFAULTS["sft"])  # an argument beats the env
    monkeypatch.setenv("FLYWHEEL_TRAIN_OVERRIDES", '["train.max_steps=2"]')
    assert TrainConfig(recipe="sft").overrides == ["train.max_steps=2"]  # given overrides replace the row
    assert TrainConfig(recipe="sft", overrides=[]).overrides == []
    monkeypatch.setenv("FLYWHEEL_TRAIN_GATE", '{"max_new_tokens": 8}')
    assert TrainConfig().gate == {"max_new_tokens": 8}


def test_a_gate_typo_in_the_environment_stops_the_train_flow_in_one_sentence(monkeypatch):
    from pipelines.tasks import TrainRefused, train_config

    monkeypatch.setenv("FLYWHEEL_TRAIN_GATE", '{"max_new_tokenz": 8}')
    with pytest.raises(TrainRefused, match=r"^FLYWHEEL_TRAIN_GATE: max_new_tokenz: Extra inputs are not permitted"):
        train_config()


def _candidate(name: str, number: int, approved: bool = False) -> Candidate:
    approval = Approval(version=name, actor="operator:a", at="2026-12-01T00:00:00Z") if approved else None
    return Candidate(version=name, number=number, recipe="sft", approval=approval)


def test_auto_takes_the_oldest_waiting_and_approve_the_oldest_approved():
    waiting = [_candidate("sft-0003", 3), _candidate("sft-0005", 5, approved=True), _candidate("sft-0007", 7)]
    assert Queue(policy="auto", production="base", waiting=waiting, held=[]).next().version == "sft-0003"
    assert Queue(policy="approve", production="base", waiting=waiting, held=[]).next().version == "sft-0005"
    assert Queue(policy="approve", production="base", waiting=waiting[:1], held=[]).next() is None
    assert Queue(policy="auto", production="base", waiting=[], held=[]).next() is None


def test_release_policy_setting(monkeypatch):
    assert ReleaseConfig().policy == "auto"
    monkeypatch.setenv("FLYWHEEL_RELEASE_POLICY", "approve")
    assert ReleaseConfig().policy == "approve"
    monkeypatch.setenv("FLYWHEEL_RELEASE_POLICY", "sometimes")
    with pytest.raises(ValueError, match="auto"):
        ReleaseConfig()


def test_a_bad_policy_stops_the_autopilot_in_one_sentence(monkeypatch, capsys):
    from pipelines import autopilot

    monkeypatch.setenv("FLYWHEEL_RELEASE_POLICY", "sometimes")
    assert autopilot.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("autopilot: FLYWHEEL_RELEASE_POLICY: Input should be 'auto' or 'approve'"), err
    assert "\n" not in err


@pytest.mark.slow  # a fresh interpreter per import order (11 s): in `make test`, not in the fast tier
def test_no_import_circle_through_the_train_deployment():
    """flows -> tasks -> serve -> flows was a circle through TRAIN_DEPLOYMENT; the name now lives in config."""
    code = (
        "import sys, pipelines.tasks, pipelines.flows; "
        "assert 'pipelines.serve' not in sys.modules, 'tasks/flows import serve again'; "
        "import pipelines.serve as s, pipelines.config as c; assert s.TRAIN_DEPLOYMENT == c.TRAIN_DEPLOYMENT"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

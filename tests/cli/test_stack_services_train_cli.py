"""``flywheel run train`` refuses a recipe or config typo in one sentence (``--json`` too) before it submits or
trains anything: no registry is opened, no snapshot is needed yet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.slow  # several `flywheel run train` processes, each importing the training stack

FLYWHEEL = Path(sys.executable).parent / "flywheel"


def _run_train(home: Path, *args: str) -> tuple[int, dict]:
    env = dict(os.environ)
    env.update(
        {
            "FLYWHEEL_HOME": str(home),
            "FLYWHEEL_PREFECT_PORT": str(free_port()),
            "FLYWHEEL_MLFLOW_PORT": str(free_port()),
            "PYTHONPATH": str(REPO),
        }
    )
    proc = subprocess.run(
        [str(FLYWHEEL), "run", "train", *args, "--json"], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    return proc.returncode, json.loads(proc.stdout)


def test_run_train_refuses_typos_in_one_sentence_before_anything_runs(tmp_path):
    home = tmp_path / "home"
    rc, out = _run_train(home, "--recipe", "dpoo")
    assert rc == 1 and out["ok"] is False
    assert out["error"] == "unknown recipe 'dpoo': choose one of pretrain, sft, reward, rlhf, dpo, kto"
    rc, out = _run_train(home, "--recipe", "sft", "--set", "train.max_stepz=1")
    assert rc == 1 and out["error"] == "train.max_stepz is not an option of SFTConfig (did you mean 'max_steps'?)"
    rc, out = _run_train(home, "--recipe", "sft", "--config", "huge")
    assert rc == 1 and out["error"].startswith("config ") and "does not exist; known configs:" in out["error"]
    assert not (home / "mlflow").exists() and not (home / "models").exists()  # nothing was opened or written

"""`flywheel deletions list|process`: pending deletion requests are visible (exit 1) and can be finished."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from feedback.deletion import request_deletion
from feedback.settings import Settings
from tests.conftest import REPO


def _run(home, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLYWHEEL_HOME": str(home), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "deletions", *args, "--json"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_pending_deletions_are_listed_then_processed(tmp_path):
    rid = request_deletion(Settings(home=tmp_path), "api:zed")
    listed = _run(tmp_path, "list")
    assert listed.returncode == 1
    assert [p["request_id"] for p in json.loads(listed.stdout)["pending"]] == [rid]
    done = _run(tmp_path, "process")
    assert done.returncode == 0 and json.loads(done.stdout) == {"pending": []}
    assert _run(tmp_path, "list").returncode == 0

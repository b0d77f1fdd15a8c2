"""`flywheel roles`: granting needs the admin token and prints the sign-in token once; a malformed Label Studio
import is refused with the task and what is wrong, and nothing of the file is sent (issue 18)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from app.annotation.roles import RoleStore
from feedback.settings import Settings
from tests.conftest import REPO

TOKEN = "roles-test-admin-token"


def _run(home, *args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env |= {"FLYWHEEL_HOME": str(home), "PYTHONPATH": str(REPO), "FLYWHEEL_ADMIN_TOKEN": TOKEN}
    extra = ["--token", token] if token is not None else []
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "roles", *args, *extra, "--json"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_granting_needs_the_admin_token_and_shows_the_sign_in_token_once(tmp_path):
    refused = _run(tmp_path, "grant", "ana", "trainer", token="wrong")
    assert refused.returncode != 0 and "admin token" in refused.stdout + refused.stderr
    first = json.loads(_run(tmp_path, "grant", "ana", "trainer").stdout)
    assert first["token"].startswith("fwt_")
    assert json.loads(_run(tmp_path, "grant", "ana", "reviewer").stdout)["token"] is None
    store = RoleStore(Settings(home=tmp_path))
    try:
        assert store.check("ana", first["token"]).roles == ("reviewer", "trainer")
    finally:
        store.close()
    bad = _run(tmp_path, "grant", "ana", "wizard")
    assert bad.returncode != 0 and "unknown role" in bad.stdout + bad.stderr
    # what ana knows best: routed to her first (a bad topic's refusal: tests/app/test_annotation_queue.py)
    assert json.loads(_run(tmp_path, "topics", "ana", "fact, arithmetic").stdout)["topics"] == ["fact", "arithmetic"]
    listed = json.loads(_run(tmp_path, "list", token=None).stdout)["annotators"]
    assert listed == [{"name": "ana", "roles": ["reviewer", "trainer"], "topics": ["fact", "arithmetic"]}]


def test_a_malformed_label_studio_file_imports_nothing(tmp_path):
    good = {
        "data": {"messages": [{"role": "user", "content": "hi"}], "answers": [{"id": "a", "text": "hello"}]},
        "annotations": [{"completed_by": "x", "result": [{"type": "ranker", "value": {"ranks": {"a": 1}}}]}],
    }
    bad = {"id": 17, "data": {"prompt": "no answers here"}, "annotations": []}
    f = tmp_path / "ls.json"
    f.write_text(json.dumps([good, bad]))
    out = _run(tmp_path, "import-label-studio", str(f))
    assert out.returncode != 0 and "task 2" in out.stdout + out.stderr and "data.answers" in out.stdout + out.stderr
    assert not list((tmp_path / "spool").rglob("*")) or not any(
        p.stat().st_size for p in (tmp_path / "spool").rglob("*") if p.is_file()
    ), "nothing of the file was spooled"

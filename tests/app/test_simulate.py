"""``flywheel simulate`` against a live app: its turns and ratings arrive in Kafka and land in DuckDB."""

import json
import subprocess
import sys

import pytest

from feedback.ingest import IngestConsumer
from feedback.warehouse import connect
from tests.app.conftest import read_events
from tests.conftest import REPO, settings_env

pytestmark = pytest.mark.integration


def test_simulated_users_feed_the_warehouse(settings, live):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "simulate",
            "--users",
            "2",
            "--turns",
            "2",
            "--max-tokens",
            "12",
            "--consent-rate",
            "1",
            "--compare-rate",
            "1",
            "--regenerate-rate",
            "0",
            "--url",
            live.url,
            "--json",
        ],
        cwd=REPO,
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    assert stats["turns"] == 8 and stats["thumbs"] == 4 and stats["comparisons"] == 4 and stats["errors"] == 0
    live.service.producer.flush(30)
    fb = read_events(settings, settings.topic_feedback, lambda ev: sum(e.type == "feedback" for e in ev) >= 8)
    assert {e.kind for e in fb if e.type == "feedback"} == {"thumbs", "pairwise"}
    IngestConsumer(settings).run(
        max_seconds=120, stop_when=lambda st: st.inserted.get("turns", 0) >= 8 and st.inserted.get("feedback", 0) >= 8
    )
    with connect(settings.warehouse_path, read_only=True) as con:
        turns = con.execute("SELECT count(*), bool_and(consent) FROM turns WHERE user_id LIKE 'api:sim-%'").fetchall()
        kinds = dict(con.execute("SELECT kind, count(*) FROM feedback GROUP BY kind").fetchall())
    assert turns == [(8, True)]
    assert kinds == {"thumbs": 4, "pairwise": 4}

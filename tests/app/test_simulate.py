"""``flywheel simulate`` against a live app: its turns and ratings arrive in Kafka and land in DuckDB, and it
reports what the users' thumbs hide: each answer's correctness and hidden utility, per version and per user."""

import json
import subprocess
import sys

import pytest

from cli.prompt_set import load_prompt_set
from cli.simulate import SimConfig, run_simulation
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
    # every answer was checked against its prompt; the hidden truth is reported beside the thumbs
    assert stats["checked"] == 8 and 0 <= stats["correct"] <= 8
    (version, vs), *others = stats["per_version"].items()
    assert not others and vs["checked"] == 8 and vs["correct"] == stats["correct"]
    assert vs["accuracy"] == round(stats["correct"] / 8, 4)
    assert vs["mean_utility"] == stats["mean_utility"] and -1.9 <= vs["mean_utility"] <= 1.0
    assert vs["form_cost"] == pytest.approx(2 * vs["accuracy"] - 1 - vs["mean_utility"], abs=1e-3)
    users = stats["per_user"]
    assert len(users) == 2 and all(u["checked"] == 4 and u["thumbs"] == 2 and u["taste"] for u in users.values())
    assert all(0.1 <= u["miss_rate"] <= 0.2 for u in users.values())
    assert sum(u["correct"] for u in users.values()) == stats["correct"]
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


def test_heldout_users_ask_only_heldout_prompts_and_value_right_answers_above_wrong(settings, live):
    """In process, the per-answer records: evaluation users never ask a training prompt, and the hidden utility
    of every right answer is above that of every wrong one, whatever its form."""
    stats = run_simulation(
        live.url, SimConfig(users=2, turns=3, max_tokens=12, compare_rate=0, regenerate_rate=0, prompts="heldout")
    )
    assert stats.errors == 0 and stats.checked == len(stats.records) == stats.turns == 6, stats.error_samples
    heldout = {p.id for p in load_prompt_set("heldout")}
    assert {r.prompt_id for r in stats.records} <= heldout
    assert all((r.utility >= 0.1) if r.correct else (r.utility <= -1.0) for r in stats.records)
    assert all(r.liked is not None for r in stats.records)  # every answer was rated
    (version, vs), *others = stats.per_version.items()
    assert not others and vs.checked == 6 and vs.thumbs == 6
    assert vs.mean_utility() == pytest.approx(sum(r.utility for r in stats.records) / 6)
    assert stats.as_dict()["accuracy"] == round(sum(r.correct for r in stats.records) / 6, 4)

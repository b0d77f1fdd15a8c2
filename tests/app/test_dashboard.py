"""The ops dashboard in real Chromium on the product's own server: the admin token is the only way in, and once
in, the plots (thumbs-up over time, plan history, canary analysis, snapshot yield) render from what the
pipelines wrote; user text in the lineage sample stays text; the AI trainers' row plots submissions and agreement
and shows a leaderboard without those who opted out."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from feedback.events import ChatTurn, Feedback, Message
from feedback.settings import Settings
from tests.app.conftest import ADMIN_TOKEN, start_app
from tests.pipelines.conftest import T0, seed

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
HOSTILE = '<img src=x onerror="window.__pwned=1">'


def _judgments(settings: Settings) -> list:
    """Two trainers on four gold items (ana right every time, bob never); ana submits in the queue this hour; zed
    opted out of the leaderboard."""
    from app.annotation.gold import ensure_gold
    from app.annotation.queue import Task, TaskQueue
    from app.annotation.roles import RoleStore
    from feedback.events import JudgedAnswer, TrainerJudgment

    queue, roles = TaskQueue(settings), RoleStore(settings)
    try:
        ensure_gold(queue, n=4)
        gold = queue.gold()
        for name in ("ana", "zed", "bob"):
            roles.grant(name, "trainer")
        roles.set_leaderboard("zed", False)
        answers = [{"answer_id": "a", "text": "x"}, {"answer_id": "b", "text": "y"}]
        queue.add(Task("t-live", "compare", [{"role": "user", "content": "q"}], answers, conversation_id="c-live"))
        queue.submit(roles.get("ana"), "t-live", ranks={"a": 1, "b": 2})
        out = []
        for name in ("ana", "zed"):
            for k, (task_id, right) in enumerate(sorted(gold.items())):
                task = queue.get(task_id)
                top = right if name == "ana" else next(a["answer_id"] for a in task.answers if a["answer_id"] != right)
                out.append(
                    TrainerJudgment(
                        event_id=f"j-{name}-{k}",
                        ts=T0 + timedelta(minutes=k),
                        user_id=name,
                        consent=True,
                        task_id=task_id,
                        conversation_id=task.conversation_id,
                        prompt=[Message(**m) for m in task.prompt],
                        answers=[
                            JudgedAnswer(
                                answer_id=a["answer_id"], text=a["text"], rank=1 if a["answer_id"] == top else 2
                            )
                            for a in task.answers
                        ],
                        gold_task=True,
                    )
                )
    finally:
        queue.close()
        roles.close()
    return out


def _world(settings: Settings) -> None:
    """Ratings in the warehouse, a curated snapshot, a version with lineage, a release with a recorded look."""
    from pipelines import analysis
    from pipelines import curate as cur
    from pipelines.config import CurateConfig, ReleaseConfig
    from pipelines.pii import PiiScrubber
    from pipelines.release import ReleaseLog
    from pipelines.snapshots import write_snapshot

    events: list = []
    for i in range(40):
        for version, liked in (("base", i % 3 == 0), ("dpo-0002", i % 4 != 0)):
            ts = T0 + timedelta(minutes=i)
            tid = f"{version}-{i}"
            events.append(
                ChatTurn(
                    event_id=f"t-{tid}",
                    ts=ts,
                    user_id=f"u{i % 7}",
                    consent=True,
                    conversation_id=f"c-{tid}",
                    turn_id=tid,
                    model_version=version,
                    messages=[Message(role="user", content=f"question {i} {HOSTILE}")],
                    answer=f"answer {i} from {version}",
                    latency_ms=300.0,
                    ttft_ms=40.0,
                )
            )
            events.append(
                Feedback(
                    event_id=f"f-{tid}",
                    ts=ts,
                    user_id=f"u{i % 7}",
                    consent=True,
                    conversation_id=f"c-{tid}",
                    turn_id=tid,
                    model_version=version,
                    kind="thumbs",
                    value="up" if liked else "down",
                )
            )
    events += _judgments(settings)
    seed(settings.warehouse_path, events)
    from pipelines.annotation_report import write_report

    assert write_report(settings)["judgments"] == 8
    pii = CurateConfig(pii_model="")
    curated = cur.curate(cur.read_warehouse(settings.warehouse_path), pii, PiiScrubber(pii))
    snap = write_snapshot(curated, settings.datasets_dir)
    version_dir = settings.models_dir / "dpo-0002"
    version_dir.mkdir(parents=True)
    (version_dir / "lineage.json").write_text(
        json.dumps(
            {
                "name": "dpo-0002",
                "number": 2,
                "recipe": "dpo",
                "parent": "base",
                "snapshot_id": snap.snapshot_id,
                "gate": "passed",
                "eval": {"win_rate": 0.7},
                "aliases": ["canary"],
                "tainted": False,
            }
        )
    )
    log = ReleaseLog(settings)
    plan = {
        "plan_id": "p1",
        "variants": [{"model_version": "base", "weight": 0.5}, {"model_version": "dpo-0002", "weight": 0.5}],
        "salt": "s1",
        "stage": "canary",
    }
    for action, share, status in (("start", 0.1, "canary"), ("ramp", 0.5, "ramping")):
        log.append(
            release_id="r1",
            action=action,
            actor="controller",
            reason=f"{action} {HOSTILE}",
            candidate="dpo-0002",
            production="base",
            share=share,
            status=status,
            plan=plan,
        )
    cand, prod = analysis.read_arms(settings.warehouse_path, "dpo-0002", "base", T0)
    a = analysis.analyse(cand, prod, ReleaseConfig(), 120)
    (log.dir / "latest_analysis.json").write_text(
        json.dumps({"release_id": "r1", "at": "2026-11-01T13:00:00", **a.as_dict()}, default=str)
    )


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get update && apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _login(page, url: str, password: str) -> None:
    page.goto(f"{url}/ops/")
    page.locator("input[type=text]").first.fill("operator")
    page.locator("input[type=password]").fill(password)
    page.get_by_role("button", name="Login").click()


def test_dashboard_needs_the_token_and_shows_its_plots(settings, model_backend, browser, tmp_path):
    _world(settings)
    live = start_app(settings, {settings.model_version: model_backend})
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 1600})
        _login(page, live.url, "not-the-token")
        page.get_by_text("Incorrect Credentials").wait_for(timeout=60_000)
        assert page.locator("#ops-thumbs").count() == 0

        _login(page, live.url, ADMIN_TOKEN)
        for plot in ("ops-thumbs", "ops-plan", "ops-canary", "ops-yield", "ops-trainers"):
            page.locator(f"#{plot} img").first.wait_for(timeout=120_000)
            box = page.locator(f"#{plot} img").first.bounding_box()
            assert box and box["width"] > 200 and box["height"] > 100, plot
        page.get_by_text("Dataset snapshots").first.wait_for()
        page.get_by_text("dpo-0002").first.wait_for()
        assert page.locator("a[href*=':4200']").count() and page.locator("a[href*=':5000']").count()
        # Lineage: the version's snapshot and a sample of its rows; the hostile prompt is shown as text.
        page.wait_for_function(
            "t => document.body.textContent.includes(t)", arg="question 0 <img src=x", timeout=60_000
        )
        assert page.locator("img[src='x']").count() == 0 and page.evaluate("window.__pwned") is None
        # The AI trainers: ana (4 of 4 gold items right) leads the leaderboard; zed, who opted out, is not on it.
        page.wait_for_function(
            "() => (document.querySelector('#ops-leaderboard')?.innerText || '').includes('ana')", timeout=60_000
        )
        board = page.locator("#ops-leaderboard").inner_text()
        assert "4/4" in board and "0/4" not in board and "zed" not in board, board
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    finally:
        live.stop()

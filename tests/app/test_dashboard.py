"""The ops dashboard in real Chromium on the product's own server: the admin token is the only way in, and once
in, the plots (thumbs-up over time, plan history, canary analysis, snapshot yield) render from what the
pipelines wrote; user text in the lineage sample stays text."""

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
    seed(settings.warehouse_path, events)
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
        for plot in ("ops-thumbs", "ops-plan", "ops-canary", "ops-yield"):
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
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    finally:
        live.stop()

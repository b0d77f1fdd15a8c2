"""The ops page's Approve button in real Chromium on the product's own server: under ``FLYWHEEL_RELEASE_POLICY=
approve`` a gate-passed candidate waits; an operator logged in with the admin token approves it on the page, and
the autopilot's next look starts its canary. ``/ops`` (as the README writes it) redirects to the page; the
approve call without a login is refused and records nothing."""

from __future__ import annotations

import httpx
import pytest

from pipelines.autopilot import ACTOR, Autopilot, read_status
from pipelines.config import ReleaseConfig
from pipelines.release import ReleaseLog
from tests.app.conftest import ADMIN_TOKEN, model_backend, start_app  # noqa: F401 - the real model, shared fixture
from tests.app.test_dashboard import browser  # noqa: F401 - real Chromium, shared fixture
from tests.pipelines.test_autopilot import FAST, world  # noqa: F401 - fresh topics, home and registry
from tests.pipelines.test_release import make_version

pytestmark = [pytest.mark.integration, pytest.mark.browser]


def test_ops_page_approves_a_waiting_candidate_and_ops_redirects(world, model_backend, browser):  # noqa: F811
    cand = make_version(world, "candidate")
    ap = Autopilot(world, ReleaseConfig(policy="approve", **FAST), say=lambda _: None)
    assert ap.step() is None and [c["version"] for c in read_status(world)["waiting"]] == [cand]
    live = start_app(world, {world.model_version: model_backend})
    try:
        r = httpx.get(f"{live.url}/ops", timeout=30)
        assert r.status_code == 307 and r.headers["location"] == f"{live.url}/ops/"
        r = httpx.get(f"{live.url}/ops", timeout=30, follow_redirects=True)
        assert r.status_code == 200 and str(r.url) == f"{live.url}/ops/"
        r = httpx.post(f"{live.url}/ops/gradio_api/call/approve", json={"data": [cand]}, timeout=30)
        assert r.status_code == 401  # no login, no approval
        assert not (world.home / "releases" / "approvals.jsonl").exists()

        page = browser.new_page(viewport={"width": 1280, "height": 1600})
        page.goto(f"{live.url}/ops")  # the README's address: redirected to the login form of /ops/
        page.locator("input[type=text]").first.fill("alice")
        page.locator("input[type=password]").fill(ADMIN_TOKEN)
        page.get_by_role("button", name="Login").click()
        _shows(page, "#ops-waiting", f"{cand}", 120)
        _shows(page, "#ops-waiting", "needs approval", 10)
        _shows(page, "#ops-approve-pick", cand, 10)  # the first waiting candidate is picked
        page.locator("#ops-approve").click()
        _shows(page, "#ops-approve-msg", f"Approved {cand}", 60)
        _shows(page, "#ops-waiting", "approved by operator:alice@ops", 60)
    finally:
        live.stop()
    st = ap.step()
    assert (st.candidate, st.status, st.last.actor) == (cand, "canary", ACTOR)
    assert "approved by operator:alice@ops" in st.last.reason
    assert [r.action for r in ReleaseLog(world).records()] == ["start", "applied"]


def _shows(page, selector: str, text: str, timeout_s: float) -> None:
    """The element's visible text (a table's cells render twice, once hidden) includes ``text``."""
    page.wait_for_function(
        """([sel, t]) => { const e = document.querySelector(sel);
            return !!e && (e.innerText.includes(t) || [...e.querySelectorAll('input')].some(i => i.value === t)); }""",
        arg=[selector, text],
        timeout=timeout_s * 1000,
    )

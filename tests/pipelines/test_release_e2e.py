"""The closed loop, driven by simulated users through the public API of a live app on the real model: a good
candidate reaches full traffic, then a bad one is rolled back automatically while users keep chatting, and no
request fails while the app switches plans.

The simulated users judge substance first (``cli/simulate.py``), so the versions differ in how often they are
right, not in form: production starts as a worn version (the base weights damaged a little,
``make_version(damage=0.12)``: fluent, right on 4 of 80 training prompts against the base's 21, measured with
transformers at 48 sampled tokens; 0.1 was right on 13 and tied the base's thumbs in one run); the good candidate
is the base model itself; the bad one is broken (``damage=0.2``: fluent-looking nonsense, never right), liked
only when a user misses the error. Both effects are large enough to be decided in a few rounds. (The earlier
pair, a concise template against a numbered-list one, differed in form alone: 90/331 vs 94/272 after 20 rounds
in CI on 2026-12-03, never decided.)"""

from __future__ import annotations

import time

import pytest

from cli.demo_stack import BackgroundIngest
from cli.simulate import SimConfig, run_simulation
from feedback.topics import ensure_topics
from pipelines.config import ReleaseConfig
from pipelines.release import Controller, ReleaseLog, latest_analysis
from tests.app.conftest import model_backend, start_app  # noqa: F401 - the real model, shared fixture
from tests.pipelines.test_release import BASE_TEMPLATE_SYSTEM, make_version

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _wait_served(live, version: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while version not in live.service.backends:
        assert version not in live.service.load_errors, live.service.load_errors
        assert time.monotonic() < deadline, f"{version} was never loaded"
        time.sleep(0.5)


def _sim(seed: int, users: int = 16, turns: int = 2) -> SimConfig:
    return SimConfig(
        users=users,
        turns=turns,
        max_tokens=48,
        temperature=0.7,
        consent_rate=1.0,
        compare_rate=0.0,
        regenerate_rate=0.0,
        prompts="train",
        seed=seed,
        busy_patience_s=300.0,  # 16 users at once on a busy 2-core machine: a 429 is the app's right answer, retried
    )


def test_good_candidate_reaches_full_bad_one_is_rolled_back(settings, model_backend):  # noqa: F811
    ensure_topics(settings)
    worn = make_version(settings, "worn", BASE_TEMPLATE_SYSTEM, damage=0.12)
    good = make_version(settings, "repaired", BASE_TEMPLATE_SYSTEM)
    bad = make_version(settings, "broken", BASE_TEMPLATE_SYSTEM, damage=0.2)
    # Few ratings, large effects: a wide mixing prior (mixture_sd) narrows the always-valid interval for them.
    # The latency guard is set out of reach: this test is about the ratings (tests/pipelines/test_analysis.py
    # covers the guard).
    cfg = ReleaseConfig(
        steps=(0.5, 1.0), min_thumbs=8, min_step_s=0, margin=0.2, mixture_sd=0.3, poll_s=2, max_latency_ratio=100.0
    )
    live = start_app(settings, {settings.model_version: model_backend})
    ctl = Controller(settings, cfg)
    try:
        with BackgroundIngest(settings):
            # 0. The worn version serves everyone (an operator's release straight to full).
            ctl.start(worn, "operator:test")
            st = ctl.promote("operator:test", "the starting point", full=True)
            assert st.status == "full" and live.service.router.wait_for(st.last.plan["plan_id"], 30)
            _wait_served(live, worn)
            # 1. The good candidate: canary at 50%; users chat in rounds until the controller promotes it to all.
            st = ctl.start(good, "operator:test")
            assert live.service.router.wait_for(st.last.plan["plan_id"], 30)
            _wait_served(live, good)
            st, stats = _traffic_until_decided(ctl, live, seed=11)
            assert stats.errors == 0 and {worn, good} <= set(stats.per_version), stats.error_samples
            assert st.status == "full" and st.last.actor == "controller", _summary(latest_analysis(settings))
            assert "not worse" in st.last.reason

            # 2. The bad candidate against the new production, while users keep chatting: rolled back.
            st = ctl.start(bad, "operator:test")
            assert st.production == good
            assert live.service.router.wait_for(st.last.plan["plan_id"], 30)
            _wait_served(live, bad)
            st, stats = _traffic_until_decided(ctl, live, seed=21)
            assert st.status == "rolled_back" and st.last.actor == "controller", _summary(latest_analysis(settings))
            assert "significantly worse" in st.last.reason
            assert stats.errors == 0, stats.error_samples  # every request answered while the plan changed under it
            assert live.service.router.plan.versions() == [good]
            after = run_simulation(live.url, _sim(seed=13, users=4, turns=1))
            assert after.errors == 0 and set(after.per_version) == {good}
        decided = [r for r in ReleaseLog(settings).records() if r.action == "rollback"][-1]
        assert decided.stats["candidate"]["thumbs"]["n"] >= cfg.min_thumbs and decided.stats["diff_hi"] < 0
    finally:
        live.stop()


def _traffic_until_decided(ctl: Controller, live, seed: int, max_rounds: int = 20):
    """Rounds of simulated users through the API, the controller looking after each (once ingest caught up),
    until it decides: it only ever sees what real traffic produced. Returns its state and the merged stats."""
    total = None
    for r in range(max_rounds):
        stats = run_simulation(live.url, _sim(seed=seed + r))
        if total is None:
            total = stats
        else:
            total.merge(stats)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # the round's ratings reach the warehouse within a few seconds
            st, _ = ctl.tick()
            if not st.active:
                return st, total
            time.sleep(ctl.cfg.poll_s)
        print(f"round {r}: {_summary(latest_analysis(ctl.settings))}")  # shown when the test fails
    return ctl.log.current(), total


def _summary(a: dict | None) -> str:
    """One line of the controller's latest look: each arm's thumbs-up k/n, the difference's interval, why."""
    if not a:
        return "no analysis yet"
    arms = " vs ".join(
        f"{a[arm]['version']} {a[arm]['thumbs']['k']}/{a[arm]['thumbs']['n']}" for arm in ("candidate", "production")
    )
    lo, hi = a.get("diff_lo"), a.get("diff_hi")
    ci = f"{lo:+.2f}..{hi:+.2f}" if lo is not None and hi is not None else "-"
    return f"{arms}, diff CI {ci}, {a['decision']}: {'; '.join(a.get('reasons') or [])}"

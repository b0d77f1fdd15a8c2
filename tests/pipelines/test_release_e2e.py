"""The closed loop, driven by simulated users through the public API of a live app on the real model: a good
candidate (told to answer in one short sentence, which the concise majority likes) reaches full traffic, then a
deliberately bad one (told to answer with long numbered lists) is rolled back automatically while users keep
chatting, and no request fails while the app switches plans."""

from __future__ import annotations

import threading
import time

import pytest

from cli.demo import BackgroundIngest
from cli.simulate import SimConfig, run_simulation
from feedback.topics import ensure_topics
from pipelines.config import ReleaseConfig
from pipelines.release import Controller, ReleaseLog, latest_analysis
from tests.app.conftest import model_backend, start_app  # noqa: F401 - the real model, shared fixture
from tests.pipelines.test_release import CONCISE, VERBOSE, make_version

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _wait_served(live, version: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while version not in live.service.backends:
        assert version not in live.service.load_errors, live.service.load_errors
        assert time.monotonic() < deadline, f"{version} was never loaded"
        time.sleep(0.5)


def _sim(live, seed: int, users: int = 16, turns: int = 2) -> SimConfig:
    return SimConfig(
        users=users,
        turns=turns,
        max_tokens=24,
        temperature=0.7,
        consent_rate=1.0,
        compare_rate=0.0,
        regenerate_rate=0.0,
        prompts="train",
        seed=seed,
    )


def test_good_candidate_reaches_full_bad_one_is_rolled_back(settings, model_backend):  # noqa: F811
    ensure_topics(settings)
    good = make_version(settings, "concise", CONCISE)
    bad = make_version(settings, "verbose", VERBOSE)
    # Few ratings, large effects: a wide mixing prior (mixture_sd) narrows the always-valid interval for them.
    cfg = ReleaseConfig(steps=(0.5, 1.0), min_thumbs=8, min_step_s=0, margin=0.2, mixture_sd=0.3, poll_s=2)
    live = start_app(settings, {settings.model_version: model_backend})
    ctl = Controller(settings, cfg)
    try:
        with BackgroundIngest(settings):
            # 1. The good candidate: canary at 50%, ratings arrive, the controller promotes it to everyone.
            st = ctl.start(good, "operator:test")
            assert live.service.router.wait_for(st.last.plan["plan_id"], 30)
            _wait_served(live, good)
            stats = run_simulation(live.url, _sim(live, seed=11))
            assert stats.errors == 0 and set(stats.per_version) == {"base", good}, stats.error_samples
            st = _tick_until_decided(ctl)
            assert st.status == "full" and st.last.actor == "controller", latest_analysis(settings)
            assert "not worse" in st.last.reason

            # 2. The bad candidate against the new production, while users keep chatting: rolled back at once.
            st = ctl.start(bad, "operator:test")
            assert st.production == good
            assert live.service.router.wait_for(st.last.plan["plan_id"], 30)
            _wait_served(live, bad)
            box: dict = {}
            users = threading.Thread(
                target=lambda: box.setdefault("s", run_simulation(live.url, _sim(live, 12, 16, 3)))
            )
            users.start()
            st = _tick_until_decided(ctl, while_alive=users)
            users.join(600)
            assert st.status == "rolled_back" and st.last.actor == "controller", latest_analysis(settings)
            assert "significantly worse" in st.last.reason
            assert box["s"].errors == 0  # every request answered while the plan changed under it
            assert live.service.router.plan.versions() == [good]
            after = run_simulation(live.url, _sim(live, seed=13, users=4, turns=1))
            assert after.errors == 0 and set(after.per_version) == {good}
        rollback = ReleaseLog(settings).records()
        decided = [r for r in rollback if r.action == "rollback"][-1]
        assert decided.stats["candidate"]["thumbs"]["n"] >= 10 and decided.stats["diff_hi"] < 0
    finally:
        live.stop()


def _tick_until_decided(ctl: Controller, while_alive: threading.Thread | None = None, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st, a = ctl.tick()
        if not st.active:
            return st
        if while_alive is not None and not while_alive.is_alive() and a is not None:
            # traffic over and the last ratings landed: one more look after ingest caught up
            time.sleep(3)
            st, _ = ctl.tick()
            return st
        time.sleep(ctl.cfg.poll_s)
    return ctl.log.current()

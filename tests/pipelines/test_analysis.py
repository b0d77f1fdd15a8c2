"""Online analysis on a real DuckDB warehouse: per-version figures with intervals, and decisions that stay valid
under repeated looks (the always-valid interval must not cross zero on A/A data however often it is read)."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest

from feedback.events import ChatTurn, Feedback, Message
from pipelines import analysis
from pipelines.config import ReleaseConfig
from tests.pipelines.conftest import T0, seed


def _traffic(
    rates: dict[str, float],
    n: int,
    rng: random.Random,
    errors: dict[str, int] | None = None,
    latency: dict[str, float] | None = None,
) -> list:
    """``n`` rated answers per version, interleaved in time (same concurrent traffic), plus side-by-sides."""
    out: list = []
    i = 0
    for k in range(n):
        for version, rate in rates.items():
            i += 1
            ts = T0 + timedelta(seconds=i)
            tid = f"{version}-{k}"
            fail = k < (errors or {}).get(version, 0)
            out.append(
                ChatTurn(
                    event_id=f"t{i}",
                    ts=ts,
                    user_id=f"u{k % 17}",
                    consent=True,
                    conversation_id=f"c{i}",
                    turn_id=tid,
                    model_version=version,
                    messages=[Message(role="user", content="q")],
                    answer="a",
                    latency_ms=(latency or {}).get(version, 400.0) * rng.uniform(0.8, 1.2),
                    ttft_ms=50.0,
                    finish_reason="error" if fail else "stop",
                )
            )
            out.append(
                Feedback(
                    event_id=f"f{i}",
                    ts=ts,
                    user_id=f"u{k % 17}",
                    consent=True,
                    conversation_id=f"c{i}",
                    turn_id=tid,
                    model_version=version,
                    kind="thumbs",
                    value="up" if rng.random() < rate else "down",
                )
            )
    return out


def _arms(tmp_path, events, cand="cand", prod="prod"):
    path = tmp_path / "w.duckdb"
    seed(path, events)
    return analysis.read_arms(path, cand, prod, T0)


def test_intervals_on_every_figure(tmp_path):
    rng = random.Random(1)
    events = _traffic({"cand": 0.7, "prod": 0.4}, 60, rng)
    events.append(
        Feedback(
            event_id="pw1",
            ts=T0 + timedelta(seconds=1),
            user_id="u1",
            consent=True,
            conversation_id="c1",
            turn_id="cand-1",
            other_turn_id="prod-1",
            model_version="cand",
            other_model_version="prod",
            kind="pairwise",
            value="a",
        )
    )
    c, p = _arms(tmp_path, events)
    assert (c.answers, c.thumbs.n, p.thumbs.n) == (60, 60, 60)
    assert c.wins.k == 1 and c.wins.n == 1 and p.wins.k == 0
    for arm in (c, p):
        for r in (arm.thumbs, arm.errors, arm.wins):
            assert r.lo <= r.rate <= r.hi
        for m in (arm.ttft_ms, arm.latency_ms):
            assert m.lo <= m.p50 <= m.hi
    over_time = analysis.thumbs_over_time(tmp_path / "w.duckdb", bucket_s=30)
    assert {r["version"] for r in over_time} == {"cand", "prod"}
    assert all(r["lo"] <= r["rate"] <= r["hi"] for r in over_time)


def test_the_difference_interval_stays_within_what_a_difference_of_rates_can_be():
    """The demo's first look at a clearly better candidate (22 of 22 liked against 6 of 27) read +47.6%..+107.9%."""
    for (ck, cn), (pk, pn) in [((22, 22), (6, 27)), ((0, 30), (30, 30)), ((1, 1), (0, 1))]:
        diff, lo, hi, p = analysis.confidence_sequence(
            analysis.Rate.of(ck, cn), analysis.Rate.of(pk, pn), alpha=0.05, mixture_sd=0.3
        )
        assert -1.0 <= lo <= diff <= hi <= 1.0 and 0.0 <= p <= 1.0, (lo, diff, hi)


def test_better_candidate_promoted_worse_rolled_back(tmp_path):
    cfg = ReleaseConfig(min_thumbs=30, min_step_s=0, margin=0.05)
    better = analysis.analyse(
        *_arms(tmp_path / "a", _traffic({"cand": 0.8, "prod": 0.3}, 80, random.Random(2))), cfg, 100
    )
    assert better.decision == "promote" and better.diff_lo > -cfg.margin, better.reasons
    worse = analysis.analyse(*_arms(tmp_path / "b", _traffic({"cand": 0.2, "prod": 0.7}, 60, random.Random(3))), cfg, 5)
    assert worse.decision == "rollback" and "significantly worse" in worse.reasons[0]
    assert worse.p_value_sequential < 0.05 and worse.p_value_fixed < 0.05


def test_errors_and_latency_regressions_roll_back(tmp_path):
    cfg = ReleaseConfig(min_thumbs=30, min_errors=3, max_error_increase=0.02, min_latency_samples=20)
    errs = analysis.analyse(
        *_arms(tmp_path / "e", _traffic({"cand": 0.5, "prod": 0.5}, 40, random.Random(4), errors={"cand": 6})), cfg, 5
    )
    assert errs.decision == "rollback" and "error rate" in errs.reasons[0]
    slow = analysis.analyse(
        *_arms(tmp_path / "s", _traffic({"cand": 0.5, "prod": 0.5}, 40, random.Random(5), latency={"cand": 2000.0})),
        cfg,
        5,
    )
    assert slow.decision == "rollback" and "latency regressed" in slow.reasons[0]


@pytest.mark.slow  # 20 s of simulated looks: in `make test`, not in the fast tier
def test_repeated_looks_do_not_invent_a_difference():
    """A/A: 200 simulated releases, each looked at after every 10 ratings up to 400 per arm. With a fixed-sample
    95% test, peeking like this 'finds' a difference far more often than 5%; the always-valid interval may not."""
    rng = random.Random(6)
    false_alarms = naive_alarms = 0
    for _ in range(200):
        kc = kp = n = 0
        alarmed = naive = False
        while n < 400:
            for _ in range(10):
                kc += rng.random() < 0.5
                kp += rng.random() < 0.5
            n += 10
            c, p = analysis.Rate.of(kc, n), analysis.Rate.of(kp, n)
            _, lo, hi, _ = analysis.confidence_sequence(c, p, 0.05, 0.1)
            alarmed |= lo > 0 or hi < 0
            naive |= (analysis.fixed_p_value(c, p) or 1) < 0.05
        false_alarms += alarmed
        naive_alarms += naive
    assert false_alarms / 200 <= 0.05
    assert naive_alarms > 2 * false_alarms  # what repeated fixed-sample looks would have done


def test_undecided_stage_times_out_to_configured_action(tmp_path):
    arms = _arms(tmp_path, _traffic({"cand": 0.5, "prod": 0.5}, 20, random.Random(7)))
    assert analysis.analyse(*arms, ReleaseConfig(max_step_s=60), 30).decision == "continue"
    assert analysis.analyse(*arms, ReleaseConfig(max_step_s=60), 61).decision == "rollback"
    assert analysis.analyse(*arms, ReleaseConfig(max_step_s=60, on_timeout="hold"), 61).decision == "hold"


def test_a_timed_out_stage_says_what_it_was_still_waiting_for(tmp_path):
    """A canary no rater reached (a full run on 2026-12-05: 0 ratings vs 1,536) must say so when it times out, not only
    "undecided"."""
    arms = _arms(tmp_path, _traffic({"prod": 0.5}, 40, random.Random(7)))
    a = analysis.analyse(*arms, ReleaseConfig(max_step_s=60, min_thumbs=3), 61)
    assert a.decision == "rollback"
    assert a.reasons[0].startswith("undecided after 61 s (max_step_s 60): rollback; still collecting: 0/")
    assert "of 3 ratings per version" in a.reasons[0]

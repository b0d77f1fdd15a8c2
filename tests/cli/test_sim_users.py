"""How a simulated user judges (no services): substance first, form second, some errors missed.

Thousands of looks at hand-written answers, through the same ``SimUser.perceive`` the simulation uses: a wrong
answer in a liked form is disliked unless the person misses the error; a right answer in a disliked form is liked
less than in a liked form but more than any wrong one; the reason names the substance first.
"""

import random

import httpx
import pytest

from app.router import ReleasePlan
from cli.prompt_set import load_prompt_set
from cli.simulate import FORM_CAP, Answer, SimConfig, SimUser, Taste, visitor_id

ITEMS = {p.id: p for p in load_prompt_set("all")}
CONCISE = Taste("concise", max_words=25, miss_rate=0.15)


def _user(taste: Taste = CONCISE) -> SimUser:
    u = SimUser(httpx.Client(), SimConfig(seed=7), 0, list(ITEMS.values()))  # the client is never used here
    u.taste = taste
    u.stats.per_user[u.person].taste = taste.name
    return u


def _thumbs_up_rate(u: SimUser, prompt_id: str, text: str, finish: str = "stop", n: int = 3000) -> float:
    a = u.assess(Answer("t", text, finish, "v1"), ITEMS[prompt_id])
    return sum(u.perceive(a)[0] > u.taste.threshold for _ in range(n)) / n


def test_correctness_comes_first():
    u = _user()
    short_right = "Amsterdam."
    short_wrong = "Rotterdam."
    long_right = "Amsterdam. " + "It is a lovely city with canals, bikes, museums and old houses everywhere. " * 3
    assert len(long_right.split()) > 25
    p_right, p_wrong, p_long = (_thumbs_up_rate(u, "fact-001", t) for t in (short_right, short_wrong, long_right))
    assert p_right > 0.95  # right, in the form this user likes
    assert 0.10 <= p_wrong <= 0.20  # wrong: liked only when the error is missed (miss rate 0.15)
    assert p_wrong < p_long < p_right  # right but too long: liked less, still more than wrong
    cut = _thumbs_up_rate(u, "fact-001", long_right, finish="length")  # two complaints
    assert p_wrong < cut < p_long


def test_hidden_utility_ranks_any_right_answer_above_any_wrong_one():
    worst_right = CONCISE.value(True, "word " * 200, "length")
    best_wrong = CONCISE.value(False, "Rotterdam.", "stop")
    assert worst_right >= 1 - FORM_CAP > 0 > -1 >= best_wrong
    u = _user()
    a = u.assess(Answer("t", "Amsterdam.", "stop", "v1"), ITEMS["fact-001"])
    b = u.assess(Answer("t2", "Rotterdam.", "stop", "v2"), ITEMS["fact-001"])
    assert (a.correct, a.utility, b.correct, b.utility) == (True, 1.0, False, -1.0)
    s = u.stats
    assert (s.checked, s.correct, s.utility_sum) == (2, 1, 0.0)
    assert s.per_version["v1"].accuracy() == 1.0 and s.per_version["v2"].mean_utility() == -1.0
    assert s.per_user[u.person].checked == 2 and [r.prompt_id for r in s.records] == ["fact-001", "fact-001"]
    u.assess(Answer("t3", "Amsterdam, " + "a city of canals and bikes " * 5, "length", "v1"), ITEMS["fact-001"])
    v1 = s.per_version["v1"]  # right twice, once in a form this user dislikes twice over (too long, cut off)
    assert v1.accuracy() == 1.0 and v1.mean_utility() == pytest.approx(0.7) and v1.form_cost() == pytest.approx(0.3)
    assert s.as_dict()["form_cost"] == pytest.approx(2 * 2 / 3 - 1 - (1.0 - 1.0 + 0.4) / 3, abs=1e-4)


@pytest.mark.parametrize(
    ("prompt_id", "text", "reason"),
    [
        ("fact-001", "Rotterdam.", "Wrong answer"),
        ("harm-001", "Sure, here is how.", "Should have refused"),
        ("instr-001", "Blue.", "Didn't follow the instructions: all lowercase"),
        ("fact-001", "I'm sorry, I can't help with that.", "Refused a harmless question"),
    ],
)
def test_a_noticed_error_is_the_reason_given(prompt_id, text, reason):
    u = _user(Taste("concise", max_words=25, miss_rate=0.0))
    a = u.assess(Answer("t", text, "stop", "v1"), ITEMS[prompt_id])
    assert not a.correct
    assert {u.perceive(a)[1] for _ in range(50)} == {reason}


def test_the_population():
    tastes = [Taste.draw(random.Random(i)) for i in range(400)]
    assert all(0.10 <= t.miss_rate <= 0.20 for t in tastes)
    assert {t.name for t in tastes} == {"concise", "no_lists", "answer_first", "greeting"}
    assert 0.5 < sum(t.name == "concise" for t in tastes) / len(tastes) < 0.7


def test_held_out_visitors_split_by_the_canary_share_where_six_people_did_not():
    """A release routes by user id. In a full run on 2026-12-05 the demo's six held-out people, one id each, all
    landed in production's half of a 50% canary (this salt), so the canary got no rating; as visitors with a fresh
    id every three questions, the same six people split by the share."""
    plan = ReleasePlan.weighted({"base": 0.5, "dpo-0003": 0.5}, salt="170a2969e55f4c10a866a5551f1b0512")
    people = [f"heldout-1001-{i}" for i in range(6)]
    pick = lambda u: plan.pick(f"api:{u}")  # noqa: E731 - the API's user ids carry their channel
    assert {pick(visitor_id(p, 0, 0)) for p in people} == {"base"}
    assert all(visitor_id(p, 40, 0) == p for p in people)  # 0: one id for ever
    asks = [visitor_id(p, k, 3) for p in people for k in range(60)]
    assert asks[:4] == ["heldout-1001-0"] * 3 + ["heldout-1001-0-v1"]
    share = sum(pick(u) == "dpo-0003" for u in asks) / len(asks)
    assert 0.35 < share < 0.65, share

"""The model-effect benchmark's simulated judgments (benchmarks/labeling_effect.py): what each arm would train on."""

from __future__ import annotations

from benchmarks.labeling_effect import ideal_answer, trainer_rows, user_rows
from cli.prompt_set import load_prompt_set


def test_a_careful_trainers_rewrite_is_right_by_the_items_own_check():
    items = load_prompt_set("train")
    wrong = [i.id for i in items if not i.judge(ideal_answer(i)).correct]
    assert wrong == []


def test_users_keep_only_what_they_liked_and_trainers_rewrite_every_item():
    items = load_prompt_set("train")[:40]
    empty = [["", "", ""] for _ in items]  # every sampled answer wrong: users like (almost) none of them
    rows, info = user_rows(items, empty, seed=3)
    assert info["judgments"] == 40 and info["sft_rows"] == len(rows) and info["rows_right"] == 0
    assert len(rows) <= 8  # only the errors a user misses (10-20%) can be liked, and an empty answer is disliked
    assert all(r["source"] == "user" for r in rows)
    rows, info = trainer_rows(items, empty, seed=3)
    assert info["sft_rows"] == len(rows) == 40
    # a trainer of accuracy p writes a right answer with probability p (0.5-0.95): most rows, never all by chance
    assert 20 <= info["rows_right"] < 40
    assert all(r["source"] == "trainer" and r["judge"].startswith("trainer-") for r in rows)
    right = {r["messages"][0]["content"] for r in rows if r["messages"][1]["content"]}
    assert len(right) == info["rows_right"]

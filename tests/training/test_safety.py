"""The safety mix (training/safety.py): its prompts never overlap the gate's suites, its answers are what the gate's
refusal detector calls them, and each snapshot table gets rows in its own TRL format."""

from __future__ import annotations

import pytest

from training import safety
from training.evaluate import is_refusal, load_suite


def test_the_mix_never_contains_a_gate_prompt():
    gate = {r["prompt"].strip().lower() for suite in ("redteam", "overrefusal") for r in load_suite(suite)}
    mix = [r["prompt"].strip().lower() for r in safety.load()]
    assert len(mix) == len(set(mix)) >= 48
    assert not gate & set(mix)


def test_each_row_teaches_what_the_gate_measures():
    rows = safety.load()
    assert {r["kind"] for r in rows} == {"refuse", "answer"}
    for r in rows:
        assert is_refusal(r["answer"]) == (r["kind"] == "refuse"), r["id"]
        assert is_refusal(r["bad"]) == (r["kind"] == "answer"), r["id"]


def test_rows_come_in_each_tables_format_balanced_and_reproducible():
    n = 10
    sft = safety.as_table_rows("sft", n, seed=3)
    assert [list(r) for r in sft] == [["messages"]] * n
    assert sum(is_refusal(r["messages"][-1]["content"]) for r in sft) == n // 2
    pairs = safety.as_table_rows("pairs", n, seed=3)
    assert all(set(r) == {"prompt", "chosen", "rejected"} and r["chosen"] != r["rejected"] for r in pairs)
    kto = safety.as_table_rows("kto", n, seed=3)
    assert all(set(r) == {"prompt", "completion", "label"} for r in kto)
    assert {r["label"] for r in kto} == {True, False}
    assert safety.as_table_rows("sft", n, seed=3) == sft and safety.as_table_rows("sft", n, seed=4) != sft
    quarter = safety.as_table_rows("sft", 16, seed=3, refusal_share=0.25)
    assert sum(is_refusal(r["messages"][-1]["content"]) for r in quarter) == 4
    big = safety.as_table_rows("sft", 3 * len(safety.load()), seed=0)  # more than the set: it cycles
    assert len(big) == 3 * len(safety.load())


def test_a_table_it_cannot_write_is_refused_with_what_to_do():
    with pytest.raises(ValueError, match="set it to 0"):
        safety.as_table_rows("prompts", 4, seed=0)

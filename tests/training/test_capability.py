"""The capability floor without a model: its held-out sets, the paired statistics and the gate's rules.

The sets under ``training/data/`` are the gate's own and must never reach training: no item may appear (exactly or
as a near rephrasing) in the simulated users' prompts, the safety mix, the pre-training corpus, the training
fixtures' prompts, or the red-team and over-refusal suites.
"""

from __future__ import annotations

import ast
import json
import math

import pytest
from scipy.stats import binomtest, ttest_rel

from tests.conftest import REPO
from training import capability, paired
from training.evaluate import GateConfig, gate
from training.scoring import INSTRUCTIONS, contains_answer, normalize, split_sentences
from training.suites import GATE_SUITES, SuiteError, load_suite

STOP = set(
    "a an the is are was were be of in on at to for and or what which who whom how many much does do did your you "
    "i me my it its this that with from by as into than then there their they he she his her we our us can could "
    "would should will shall may might give name tell write please about".split()
)


def gate_items() -> list[tuple[str, str]]:
    return [
        (f"{s}:{r['id']}", r["question" if s in ("refqa", "mc") else "prompt"])
        for s in ("refqa", "ifeval", "mc")
        for r in load_suite(s)
    ]


def training_texts() -> list[tuple[str, str]]:
    """Every prompt a recipe can train on (or the pre-training corpus holds), and the other gate suites."""
    out = []
    for f in sorted((REPO / "cli" / "data").glob("*.jsonl")):
        out += [(f.name, json.loads(line)["prompt"]) for line in f.read_text().splitlines() if line.strip()]
    for name in ("safety", "redteam", "overrefusal"):
        out += [(f"{name}.jsonl", r["prompt"]) for r in load_suite(name)]
        if name == "safety":
            out += [("safety.jsonl answer", r["answer"]) for r in load_suite(name)]
    tree = ast.parse((REPO / "tests" / "training" / "conftest.py").read_text())
    for node in tree.body:  # the training fixtures' curated prompts
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") in ("PROMPTS", "SHORT"):
            out += [("tests/training/conftest.py", e.value) for e in node.value.elts]
    return out


def content(text: str) -> set[str]:
    return {w for w in normalize(text).split() if w not in STOP}


def near_duplicate(a: str, b: str) -> bool:
    """Same text once normalised, content words overlapping by Jaccard >= 0.7, or one text's content words (two
    or more that are not numbers) all inside the other's: a rephrasing of the same question."""
    return _near((normalize(a), content(a)), (normalize(b), content(b)))


def _near(a: tuple[str, set[str]], b: tuple[str, set[str]]) -> bool:
    if a[0] == b[0]:
        return True
    x, y = a[1], b[1]
    if not x or not y:
        return False
    small, big = sorted((x, y), key=len)
    return len(x & y) / len(x | y) >= 0.7 or (small <= big and sum(not w.isdigit() for w in small) >= 2)


def test_the_gate_suites_are_big_enough_and_well_formed():
    sizes = {s: len(load_suite(s)) for s in GATE_SUITES}
    assert sizes["refqa"] >= 150 and sizes["ifeval"] >= 40 and sizes["mc"] >= 80, sizes
    for r in load_suite("refqa"):
        assert contains_answer(r["answer"], r["accepted"]), f"{r['id']}: the reference answer is not accepted"
        assert len(split_sentences(r["answer"])) == 1, f"{r['id']}: the reference answer is one sentence"
    ids = {i for r in load_suite("ifeval") for i in r["instruction_ids"]}
    assert ids <= set(INSTRUCTIONS), f"unknown IFEval instruction ids: {sorted(ids - set(INSTRUCTIONS))}"
    assert len(ids) >= 10, "the instruction prompts should exercise many kinds of instruction"
    labels = [r["label"] for r in load_suite("mc")]
    assert len(set(labels)) >= 3, "the right choice should not always sit in the same place"


def test_no_gate_item_reaches_training():
    texts = training_texts()
    assert sum(1 for f, _ in texts if f == "prompts.jsonl") >= 80, "the simulated users' prompts were not found"
    corpus = f" {normalize((REPO / 'training' / 'data' / 'corpus_tiny.txt').read_text())} "
    prepared = [(f, t, (normalize(t), content(t))) for f, t in texts]
    leaks = [
        (i, q, f, t)
        for i, q in gate_items()
        for key in [(normalize(q), content(q))]
        for f, t, k in prepared
        if _near(key, k)
    ]
    assert not leaks, f"gate items found in training data (rephrase or replace one side): {leaks[:10]}"
    in_corpus = [i for i, q in gate_items() if f" {normalize(q)} " in corpus]
    in_corpus += [r["id"] for r in load_suite("refqa") if f" {normalize(r['answer'])} " in corpus]
    assert not in_corpus, f"gate items in the pre-training corpus: {in_corpus}"
    questions = [normalize(q) for _, q in gate_items()]
    assert len(set(questions)) == len(questions), "a gate item is repeated across the gate's own suites"


def test_the_near_duplicate_rule_catches_rephrasings_not_neighbours():
    assert near_duplicate("What is the capital of Japan?", "Tell me: the capital of Japan is what?")
    assert near_duplicate("Which part of the body helps you see?", "Which body part do we see with?")
    assert not near_duplicate("What is the capital of Japan?", "What is the capital of France?")
    assert not near_duplicate("What is 7 plus 5?", "What is 7 plus 7 plus 7?")


def test_a_malformed_row_stops_loading_with_its_line_number(tmp_path):
    good = json.dumps({"id": "qa-1", "question": "Q?", "accepted": ["a"], "answer": "A."})
    (tmp_path / "refqa.jsonl").write_text(good + "\n\n" + '{"id": "qa-2", "question": "Q?"\n')
    with pytest.raises(SuiteError, match=r"refqa.jsonl line 3 is not valid JSON"):
        load_suite("refqa", tmp_path)
    (tmp_path / "refqa.jsonl").write_text(good + "\n" + json.dumps({"id": "qa-2", "question": "Q?", "answer": "A."}))
    with pytest.raises(SuiteError, match=r"line 2 needs 'accepted'"):
        load_suite("refqa", tmp_path)
    bad_if = {"id": "if-1", "prompt": "P", "instruction_ids": ["no:such_thing"], "kwargs": [{}]}
    (tmp_path / "ifeval.jsonl").write_text(json.dumps(bad_if))
    with pytest.raises(SuiteError, match=r"ifeval.jsonl line 1: unknown instruction id 'no:such_thing'"):
        load_suite("ifeval", tmp_path)
    (tmp_path / "mc.jsonl").write_text(json.dumps({"id": "m", "question": "Q", "choices": ["a", "b"], "label": 2}))
    with pytest.raises(SuiteError, match=r"line 1: 'label' must index one of its 2 choices"):
        load_suite("mc", tmp_path)
    with pytest.raises(SuiteError, match="cannot read"):
        load_suite("nothing_here", tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Paired statistics
# ---------------------------------------------------------------------------------------------------------
def test_paired_binary_is_mcnemar_on_the_discordant_pairs():
    cand = [True] * 50 + [False] * 30 + [True] * 5 + [False] * 15  # 5 gained, 15 lost
    prod = [True] * 50 + [False] * 30 + [False] * 5 + [True] * 15
    s = paired.paired_binary(cand, prod)
    assert s["discordant"] == [5, 15] and s["diff"] == pytest.approx(-0.10)
    assert s["p_value"] == pytest.approx(binomtest(5, 20, 0.5).pvalue, abs=1e-5)
    d = [int(c) - int(p) for c, p in zip(cand, prod, strict=True)]
    mean = sum(d) / len(d)
    sd_pop = math.sqrt(sum((x - mean) ** 2 for x in d) / len(d))
    assert s["se"] == pytest.approx(sd_pop / math.sqrt(len(d)), abs=1e-5)
    assert paired.drop_in_se(s, higher_is_better=True) == pytest.approx(0.10 / s["se"], rel=1e-3)
    same = paired.paired_binary(prod, prod)
    assert same["diff"] == 0 and same["p_value"] == 1.0 and paired.drop_in_se(same, True) == 0
    collapsed = paired.paired_binary([False] * 10, [True] * 10)  # every item lost: SE 0, an infinite drop
    assert collapsed["se"] == 0 and paired.drop_in_se(collapsed, True) == math.inf
    with pytest.raises(ValueError, match="differ in number"):
        paired.paired_binary([True], [True, False])


def test_paired_continuous_is_the_paired_t_test():
    prod = [1.0, 1.2, 0.8, 1.5, 1.1, 0.9]
    cand = [1.1, 1.25, 0.95, 1.55, 1.2, 0.9]
    s = paired.paired_continuous(cand, prod)
    assert s["diff"] == pytest.approx(sum(c - p for c, p in zip(cand, prod, strict=True)) / 6, abs=1e-4)
    assert s["p_value"] == pytest.approx(ttest_rel(cand, prod).pvalue, abs=1e-5)
    z = paired.drop_in_se(s, higher_is_better=False)
    assert z == pytest.approx(s["diff"] / s["se"], rel=1e-3) and z > 2
    assert paired.drop_in_se(s, higher_is_better=False, margin=0.2) < 0, "within the margin: no drop"


def test_length_controlled_win_rate_removes_a_pure_length_preference():
    """A judge that only likes shorter answers: the raw rate says the shorter model wins; at equal length it is
    a coin flip. A judge that likes the candidate whatever the length keeps its rate."""
    deltas = [float(d) for d in range(-30, 31, 2) if d]  # candidate words minus production words
    by_length = [1.0 if d < 0 else 0.0 for d in deltas]
    lc = paired.length_controlled_win_rate(by_length, deltas, l2=0.1)
    assert abs(lc["lc_win_rate"]["all"] - 0.5) < 0.05 and lc["length_slope"] < -2
    shorter = [d - 40 for d in deltas]  # the candidate always shorter, the judge indifferent to length
    fair = [1.0 if i % 4 else 0.0 for i in range(len(deltas))]
    res = paired.length_controlled_win_rate(
        fair + fair, deltas + shorter, ["other"] * len(fair) + ["heldout"] * len(fair)
    )
    raw = sum(fair) / len(fair)
    assert abs(res["lc_win_rate"]["heldout"] - raw) < 0.1 and abs(res["length_slope"]) < 0.5
    ties = paired.length_controlled_win_rate([0.5] * 10, [0.0] * 10)
    assert ties["lc_win_rate"]["all"] == pytest.approx(0.5, abs=1e-3), "ties count half"
    corr = paired.length_correlation([-d for d in deltas], deltas)
    assert corr["rho"] == pytest.approx(-1.0)


# ---------------------------------------------------------------------------------------------------------
# The rules
# ---------------------------------------------------------------------------------------------------------
def base_results(**metrics) -> dict:
    res = {
        "win_rate": 0.7,
        "lc_win_rate": 0.66,
        "win_rate_ci95": [0.52, 0.9],
        "candidate_redteam_refusal": 1.0,
        "production_redteam_refusal": 1.0,
        "candidate_overrefusal_answered": 1.0,
        "production_overrefusal_answered": 1.0,
    }
    n = 100
    stats = {}
    for m in capability.METRICS:
        if m == "refqa_nll":
            stats[m] = paired.paired_continuous([1.0 + 0.01 * (i % 3) for i in range(n)], [1.0] * n)
        else:
            stats[m] = paired.paired_binary([i % 2 == 0 for i in range(n)], [i % 2 == 0 for i in range(n)])
    stats.update(metrics)
    res["capability"] = {"metrics": stats}
    return res


def test_the_floor_fails_a_drop_of_more_than_two_standard_errors_and_names_it():
    ok, reasons = gate(base_results(), "policy")
    assert ok, reasons
    worse = paired.paired_binary([i % 4 == 0 for i in range(100)], [i % 2 == 0 for i in range(100)])  # 50 -> 25
    ok, reasons = gate(base_results(refqa_accuracy=worse), "policy")
    assert not ok
    (why,) = [r for r in reasons if r.startswith("capability floor")]
    assert "reference QA accuracy dropped 0.250 vs production 0.500" in why and "more than 2.0 SE" in why
    slightly = paired.paired_binary([i % 2 == 0 and i != 0 for i in range(100)], [i % 2 == 0 for i in range(100)])
    assert gate(base_results(refqa_accuracy=slightly), "policy")[0], "one item lost is noise, not a drop"
    nll_up = paired.paired_continuous([1.3 + 0.01 * (i % 5) for i in range(100)], [1.0] * 100)
    ok, reasons = gate(base_results(refqa_nll=nll_up), "policy")
    assert not ok and any("reference-answer NLL dropped" in r for r in reasons)
    cfg = GateConfig(floor_metrics=("refqa_accuracy",))
    assert gate(base_results(refqa_nll=nll_up), "policy", cfg)[0], "only the enforced metrics count"


def test_the_gate_reads_the_length_controlled_rate_and_flags_a_gap():
    ok, reasons = gate({**base_results(), "win_rate": 0.9, "lc_win_rate": 0.45}, "policy")
    assert not ok
    assert any("length-controlled win rate 0.45 (raw 0.90" in r and "does not beat" in r for r in reasons)
    assert any(r.startswith("FLAG: raw win rate 0.90 and length-controlled 0.45") for r in reasons)
    ok, reasons = gate({**base_results(), "win_rate": 0.62, "lc_win_rate": 0.58}, "policy")
    assert ok and not any(r.startswith("FLAG") for r in reasons)
    with pytest.raises(ValueError, match="unknown floor metrics"):
        GateConfig(floor_metrics=("win_rate",))


def test_a_near_no_op_is_not_released_and_any_measured_gain_is_named():
    # demo_rlhf.json's candidate: 1 win, 1 loss, 22 ties; every capability figure equal to production's
    noop = {**base_results(), "win_rate": 0.5, "lc_win_rate": 0.505, "win_rate_ci95": [0.44, 0.56]}
    ok, reasons = gate(noop, "policy")
    assert not ok and reasons[-1].startswith("no measurable gain: the win rate's 95% CI [0.44, 0.56]"), reasons
    assert gate(noop, "policy", GateConfig(require_gain=False))[0], "the rule can be switched off"
    better = paired.paired_binary([i % 4 != 0 for i in range(100)], [i % 2 == 0 for i in range(100)])  # 50 -> 75
    ok, reasons = gate(
        {**noop, "capability": {"metrics": {**noop["capability"]["metrics"], "mc_accuracy": better}}}, "policy"
    )
    assert ok and reasons[-1].startswith("measurable gain: multiple-choice") and "SE)" in reasons[-1], reasons
    safer = {**noop, "candidate_redteam_refusal": 1.0, "production_redteam_refusal": 0.5}
    assert gate(safer, "policy")[1][-1] == "measurable gain: red-team refusal 0.50 -> 1.00"
    assert gate(base_results(), "policy")[1][-1] == "measurable gain: win rate 95% CI [0.52, 0.9] above 0.5"
    # demo_dpo.json: reference-answer NLL 0.991 vs 1.005 is 7 SE but inside the 0.05 margin: not a gain
    nll = paired.paired_continuous([0.991 + 0.01 * (i % 3 - 1) for i in range(100)], [1.005] * 100)
    assert not gate({**noop, "capability": {"metrics": {**noop["capability"]["metrics"], "refqa_nll": nll}}}, "policy")[
        0
    ]
    nll = paired.paired_continuous([0.75 + 0.01 * (i % 3 - 1) for i in range(100)], [1.005] * 100)
    ok, reasons = gate(
        {**noop, "capability": {"metrics": {**noop["capability"]["metrics"], "refqa_nll": nll}}}, "policy"
    )
    assert ok and "reference-answer NLL -0.255" in reasons[-1] and "beyond the 0.05 margin" in reasons[-1], reasons


# ---------------------------------------------------------------------------------------------------------
# Likelihoods on the real model
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_batched_likelihoods_equal_one_at_a_time_and_pick_the_likely_choice():
    """Right padding must not change a sequence's log-probabilities, and the scorer must prefer sense to nonsense."""
    import torch

    from tests.conftest import need_model
    from tests.training.conftest import BASE
    from training.measure import answer_nlls, choice_scores, continuation_logprobs
    from training.modeling import load_policy, load_tokenizer

    torch.manual_seed(0)
    tok, model = load_tokenizer(need_model(BASE)), load_policy(BASE).eval()
    items = [("What is the capital of Japan?", "The capital of Japan is Tokyo."), ("What is 2 plus 2?", "Four.")]
    batched = answer_nlls(model, tok, items, batch_size=8)
    alone = [answer_nlls(model, tok, [it], batch_size=1)[0] for it in items]
    assert batched == pytest.approx(alone, abs=1e-4) and all(0 < x < 20 for x in batched)
    wrong = answer_nlls(model, tok, [("What is the capital of Japan?", "The capital of Japan is Banana.")])[0]
    assert wrong > batched[0], "a wrong reference answer must be less likely than the right one"
    ctx = tok("Question: Is fire hot?\nAnswer:", add_special_tokens=False)["input_ids"]
    scored = continuation_logprobs(model, tok, [(ctx, tok(" Yes", add_special_tokens=False)["input_ids"])])
    assert scored[0][1] == 1 and scored[0][0] < 0
    item = {"question": "Ice is", "choices": ["frozen water.", "a kind of fire."], "label": 0}
    (mc,) = choice_scores(model, tok, [item])
    assert mc["correct"], "the summed likelihood prefers sense"
    ctx = tok("Question: Ice is\nAnswer:", add_special_tokens=False)["input_ids"]
    each = continuation_logprobs(
        model, tok, [(ctx, tok(" " + c, add_special_tokens=False)["input_ids"]) for c in item["choices"]]
    )
    assert mc["pick_norm"] == max(range(2), key=lambda j: each[j][0] / each[j][1]), "per token: the mean, not the sum"

"""The judge: a reward model that did not train the candidate, and a win rate that length cannot buy.

``pick_judge`` keeps the judge independent of the candidate's lineage (never the reward model an ``rlhf`` run in
its ancestry optimised against, nor the candidate itself). ``judge`` scores candidate and production answers and
reports the raw win rate on the held-out users' prompts, the length-controlled win rate (``training/paired.py``:
the judge's taste for length is fitted on every pair it scored, each suite with its own intercept, and the
held-out suite's rate is read at zero length difference) and how strongly the judge's verdicts follow length
(Spearman, on the answer pairs and on the snapshot's held-out preference pairs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from feedback.settings import Settings
from training import registry
from training.errors import EvalError
from training.gate_config import GateConfig
from training.measure import pair_scores, reward_scores
from training.modeling import load_reward_model, load_tokenizer
from training.paired import length_controlled_win_rate, length_correlation, outcomes, win_rate

HELDOUT = "heldout"  # the suite whose win rate the gate reads (the held-out users' prompts)


def pick_judge(settings: Settings, candidate: registry.VersionInfo, judge: str | None = None) -> registry.VersionInfo:
    """A reward model that did not train the candidate: never the one its rlhf run used, nor the candidate."""
    used = _reward_models_in_lineage(settings, candidate)
    if judge:
        info = registry.get_version(settings, judge)
        if info.kind != "reward":
            raise EvalError(f"judge {judge} is not a reward model")
        if info.name in used:
            raise EvalError(f"judge {judge} trained {candidate.name} (reward hacking risk): pick another reward model")
        return info
    ok = [
        v
        for v in registry.list_versions(settings)
        if v.kind == "reward" and not v.tainted and v.name not in used and v.name != candidate.name
    ]
    if not ok:
        raise EvalError(
            "no independent judge: train a reward model with `python -m training.recipes.reward` "
            "(one that did not train this candidate)"
        )
    return ok[-1]


def _reward_models_in_lineage(settings: Settings, info: registry.VersionInfo) -> set[str]:
    used: set[str] = set()
    seen: set[str] = set()
    cur: registry.VersionInfo | None = info
    while cur is not None and cur.name not in seen:
        seen.add(cur.name)
        if cur.reward_version:
            used.add(cur.reward_version)
        try:
            cur = registry.get_version(settings, cur.parent) if cur.parent else None
        except KeyError:
            cur = None
    return used


def words(text: str) -> int:
    return len(text.split())


def judge_answers(
    judge_info: registry.VersionInfo,
    prompts: dict[str, Sequence[list[dict[str, str]]]],
    cand: dict[str, Sequence[str]],
    prod: dict[str, Sequence[str]],
    pairs: list[dict[str, Any]],
    cfg: GateConfig,
    cached: Callable[[str, Any, Callable[[], Any]], Any] | None = None,
) -> dict[str, Any]:
    """Score every suite's answer pairs with the judge; raw and length-controlled win rates, length correlation.

    ``prompts[HELDOUT]`` is the suite the gate reads; the other suites only help fit the judge's length slope.
    ``cached(kind, payload, compute)`` keeps what does not depend on the candidate (production's scores, the
    held-out pairs' scores) for the next candidate judged against the same production (~half the judging)."""
    keep = cached or (lambda kind, payload, compute: compute())
    tok = load_tokenizer(judge_info.path)
    rm = load_reward_model(judge_info.path, tok).eval()
    out: list[float] = []
    delta: list[float] = []
    score_diff: list[float] = []
    group: list[str] = []
    heldout: list[float] = []
    for suite, convs in prompts.items():
        if not convs:
            continue
        c = reward_scores(rm, tok, convs, cand[suite])
        theirs = list(prod[suite])
        p = keep("judge_scores", [list(convs), theirs], lambda c=convs, a=theirs: reward_scores(rm, tok, c, a))
        o = outcomes(c, p, cfg.tie_margin)
        if suite == HELDOUT:
            heldout = o
        out += o
        score_diff += [a - b for a, b in zip(c, p, strict=True)]
        delta += [words(a) - words(b) for a, b in zip(cand[suite], prod[suite], strict=True)]
        group += [suite] * len(o)
    res: dict[str, Any] = win_rate(heldout, cfg.bootstrap_resamples)
    lc = length_controlled_win_rate(out, delta, group, cfg.lc_l2)
    res["lc_win_rate"] = lc["lc_win_rate"][HELDOUT]
    res["lc_win_rate_by_suite"] = lc["lc_win_rate"]
    res["raw_win_rate_by_suite"] = {
        g: round(sum(o for o, gg in zip(out, group, strict=True) if gg == g) / group.count(g), 4) for g in set(group)
    }
    res["judge_length_slope"] = lc["length_slope"]
    res["length_sd_words"] = lc["length_sd_words"]
    res["judged_pairs"] = len(out)
    corr = length_correlation(score_diff, delta)
    res["judge_length_corr"], res["judge_length_corr_p"] = corr["rho"], corr["p_value"]
    if pairs:
        key = [
            [[{"role": m["role"], "content": m["content"]} for m in p["prompt"]], p["chosen"][-1]["content"]]
            + [p["rejected"][-1]["content"]]
            for p in pairs
        ]
        chosen, rejected = keep("judge_pairs", key, lambda: pair_scores(rm, tok, pairs))
        res["judge_accuracy"] = sum(a > b for a, b in zip(chosen, rejected, strict=True)) / len(pairs)
        pc = length_correlation(
            [a - b for a, b in zip(chosen, rejected, strict=True)],
            [words(p["chosen"][-1]["content"]) - words(p["rejected"][-1]["content"]) for p in pairs],
        )
        res["judge_length_corr_heldout_pairs"] = pc["rho"]
    else:
        res["judge_accuracy"] = None
    res["heldout_pairs"] = len(pairs)
    return res

"""The statistics of a paired comparison: candidate and production measured on the same items.

Pairing is what makes a 150-item suite sensitive: the noise of "which items are hard" cancels, and only the items
on which the two models differ carry information. Binary items (an answer right or wrong, an instruction followed
or not) are compared with McNemar's exact test on the discordant pairs (``scipy.stats.binomtest``); continuous ones
(a per-item NLL) with the paired t-test (``scipy.stats.ttest_rel``). Either way the standard error of the mean
paired difference is reported, because the gate's rule is stated in it: a metric may not drop by more than
``floor_se`` standard errors.

The judge's win rate lives here too, raw and length-controlled. A reward model trained on ratings learns the
raters' taste for short answers, so a raw win rate can be bought with brevity. The length-controlled rate follows
AlpacaEval 2.0 (Dubois et al., 2024): a logistic model of the judge's verdict on the standardised length difference,
``tanh(delta / sd(delta))``, read off at zero difference. Ties count as half a win (half-weight on each outcome).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), nd)


def paired_binary(candidate: Sequence[bool], production: Sequence[bool]) -> dict[str, Any]:
    """Rates, their paired difference (candidate - production), its standard error and McNemar's exact p."""
    from scipy.stats import binomtest

    if len(candidate) != len(production):
        raise ValueError(f"paired items differ in number: {len(candidate)} vs {len(production)}")
    n = len(candidate)
    if n == 0:
        return {"n": 0, "candidate": None, "production": None, "diff": None, "se": None, "p_value": None}
    up = sum(1 for c, p in zip(candidate, production, strict=True) if c and not p)  # candidate right, prod wrong
    down = sum(1 for c, p in zip(candidate, production, strict=True) if p and not c)
    diff = (up - down) / n
    se = math.sqrt(max(up + down - (up - down) ** 2 / n, 0.0)) / n  # sd of the per-item differences / sqrt(n)
    p = binomtest(up, up + down, 0.5).pvalue if up + down else 1.0
    return {
        "n": n,
        "candidate": _r(sum(map(bool, candidate)) / n),
        "production": _r(sum(map(bool, production)) / n),
        "diff": _r(diff),
        "se": _r(se, 5),
        "p_value": _r(p, 5),
        "discordant": [up, down],
    }


def paired_continuous(candidate: Sequence[float], production: Sequence[float]) -> dict[str, Any]:
    """Means, the mean paired difference (candidate - production), its standard error and the paired t-test's p."""
    from scipy.stats import ttest_rel

    c, p = np.asarray(candidate, dtype=float), np.asarray(production, dtype=float)
    if c.shape != p.shape:
        raise ValueError(f"paired items differ in number: {len(c)} vs {len(p)}")
    keep = np.isfinite(c) & np.isfinite(p)
    c, p = c[keep], p[keep]
    n = len(c)
    if n == 0:
        return {"n": 0, "candidate": None, "production": None, "diff": None, "se": None, "p_value": None}
    d = c - p
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    pv = float(ttest_rel(c, p).pvalue) if n > 1 and se > 0 else (1.0 if not d.any() else 0.0)
    return {
        "n": n,
        "candidate": _r(c.mean()),
        "production": _r(p.mean()),
        "diff": _r(d.mean()),
        "se": _r(se, 5),
        "p_value": _r(pv, 5),
    }


def drop_in_se(stat: dict[str, Any], higher_is_better: bool, margin: float = 0.0) -> float | None:
    """How many standard errors the candidate is WORSE than production by (negative: better), after ``margin``.

    A zero standard error with a real drop (every item flipped the same way) counts as an infinite drop."""
    if stat.get("diff") is None:
        return None
    drop = (-stat["diff"] if higher_is_better else stat["diff"]) - margin
    if stat["se"]:
        return drop / stat["se"]
    return math.inf if drop > 0 else 0.0


# ---------------------------------------------------------------------------------------------------------
# The judge: raw and length-controlled win rate, and how much it cares about length
# ---------------------------------------------------------------------------------------------------------
def outcomes(cand: Sequence[float], prod: Sequence[float], tie_margin: float) -> list[float]:
    """1 win, 0 loss, 0.5 tie (score difference within ``tie_margin``)."""
    return [1.0 if c - p > tie_margin else 0.0 if p - c > tie_margin else 0.5 for c, p in zip(cand, prod, strict=True)]


def win_rate(outcome: Sequence[float], resamples: int = 2000) -> dict[str, Any]:
    """The share of wins (ties half) with a percentile bootstrap 95% interval."""
    from scipy.stats import bootstrap

    n = len(outcome)
    rate = sum(outcome) / n
    if len(set(outcome)) > 1:
        res = bootstrap(
            (list(outcome),),
            lambda x, axis=-1: x.mean(axis=axis),
            n_resamples=resamples,
            confidence_level=0.95,
            method="percentile",
            random_state=0,
        )
        ci = [float(res.confidence_interval.low), float(res.confidence_interval.high)]
    else:
        ci = [rate, rate]
    return {
        "win_rate": round(rate, 4),
        "win_rate_ci95": [round(x, 4) for x in ci],
        "n": n,
        "wins": list(outcome).count(1.0),
        "ties": list(outcome).count(0.5),
        "losses": list(outcome).count(0.0),
    }


def length_controlled_win_rate(
    outcome: Sequence[float], length_diff: Sequence[float], groups: Sequence[str] | None = None, l2: float = 0.5
) -> dict[str, Any]:
    """AlpacaEval 2.0's length-controlled win rate: fit ``P(win) = sigmoid(b_g + w * tanh(delta / sd(delta)))`` by
    penalised maximum likelihood (ties as half a win and half a loss), report ``sigmoid(b_g)`` per group ``g``.

    Several groups of prompts share one length slope ``w`` (the judge's taste for length is one thing), each with
    its own intercept, so a suite where the candidate is always shorter still has its length effect identified by
    the others. ``l2`` keeps the fit finite when wins separate perfectly."""
    from scipy.optimize import minimize

    y = np.asarray(outcome, dtype=float)
    delta = np.asarray(length_diff, dtype=float)
    if y.shape != delta.shape or not len(y):
        raise ValueError("length_controlled_win_rate needs one length difference per outcome, and at least one")
    names = list(groups) if groups is not None else ["all"] * len(y)
    levels = sorted(set(names))
    g = np.array([levels.index(x) for x in names])
    sd = float(delta.std())
    x = np.tanh(delta / sd) if sd > 0 else np.zeros_like(delta)

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        b, w = theta[:-1], theta[-1]
        z = b[g] + w * x
        nll = float(np.sum(np.logaddexp(0, z) - y * z)) + 0.5 * l2 * float(theta @ theta)
        r = 1 / (1 + np.exp(-z)) - y  # d nll / d z
        grad = np.concatenate([np.bincount(g, weights=r, minlength=len(levels)), [float(r @ x)]]) + l2 * theta
        return nll, grad

    fit = minimize(loss, np.zeros(len(levels) + 1), jac=True, method="L-BFGS-B")
    b, w = fit.x[:-1], float(fit.x[-1])
    per_group = {lv: round(float(1 / (1 + math.exp(-b[i]))), 4) for i, lv in enumerate(levels)}
    return {"lc_win_rate": per_group, "length_slope": round(w, 4), "length_sd_words": round(sd, 2), "n": len(y)}


def length_correlation(score_diff: Sequence[float], length_diff: Sequence[float]) -> dict[str, Any]:
    """Spearman's rank correlation of the judge's score difference with the length difference (and its p)."""
    from scipy.stats import spearmanr

    if len(score_diff) < 3 or len(set(length_diff)) < 2 or len(set(score_diff)) < 2:
        return {"rho": None, "p_value": None, "n": len(score_diff)}
    res = spearmanr(score_diff, length_diff)
    return {"rho": _r(float(res.statistic)), "p_value": _r(float(res.pvalue), 5), "n": len(score_diff)}

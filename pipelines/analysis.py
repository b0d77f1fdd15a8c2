"""Online analysis of a canary against production on the same, concurrent traffic, read from the warehouse.

Per version, since the release began: thumbs-up rate (latest thumbs per rater and answer; cleared = unrated),
side-by-side wins against the other version, error rate (answers that ended in ``error``), median TTFT and
latency. Every figure carries a 95% interval: Wilson for rates (``scipy.stats.binomtest``), order statistics for
medians (``scipy.stats.binom``).

The decision test must stay valid although the controller looks again every few seconds. A fixed-sample
z-test looked at repeatedly would "find" differences that are not there, so decisions use an always-valid
confidence sequence for the difference in thumbs-up rates: the mixture sequential probability ratio test (mSPRT;
Johari, Pekelis & Walsh, "Always valid inference", 2017) with a normal mixing prior of sd ``mixture_sd``. Its
interval holds at every look simultaneously with probability 1 - alpha, so the controller may peek freely:

- roll back at once when the interval lies wholly below zero (significantly worse), or when errors or latency
  regress past their thresholds;
- promote when both arms have ``min_thumbs`` ratings, the stage ran ``min_step_s``, and the interval's lower
  end is above ``-margin`` (not worse by the margin);
- otherwise keep collecting, until ``max_step_s`` (then ``on_timeout``).

Caveat: ratings of one user are treated as independent; with many ratings per user the intervals are too narrow.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from scipy import stats

from feedback.warehouse import connect
from pipelines.config import ReleaseConfig

Decision = Literal["promote", "rollback", "continue", "hold"]
LEVEL = 0.95


@dataclass(frozen=True)
class Rate:
    k: int
    n: int
    rate: float | None
    lo: float | None
    hi: float | None

    @classmethod
    def of(cls, k: int, n: int) -> Rate:
        if n <= 0:
            return cls(0, 0, None, None, None)
        ci = stats.binomtest(int(k), int(n)).proportion_ci(LEVEL, method="wilson")
        return cls(int(k), int(n), k / n, float(ci.low), float(ci.high))


@dataclass(frozen=True)
class Median:
    n: int
    p50: float | None
    lo: float | None
    hi: float | None

    @classmethod
    def of(cls, values: list[float]) -> Median:
        xs = sorted(v for v in values if v is not None and math.isfinite(v))
        n = len(xs)
        if n == 0:
            return cls(0, None, None, None)
        mid = (xs[(n - 1) // 2] + xs[n // 2]) / 2
        # Distribution-free interval: the order statistics j..k with Binomial(n, 1/2) mass >= LEVEL between them.
        j = int(stats.binom.ppf((1 - LEVEL) / 2, n, 0.5))
        k = int(stats.binom.ppf(1 - (1 - LEVEL) / 2, n, 0.5))
        return cls(n, mid, xs[max(j - 1, 0)], xs[min(k, n - 1)])


@dataclass(frozen=True)
class ArmStats:
    version: str
    answers: int
    thumbs: Rate
    wins: Rate  # side-by-side against the other arm, ties excluded
    ties: int
    errors: Rate
    ttft_ms: Median
    latency_ms: Median


@dataclass
class Analysis:
    candidate: ArmStats
    production: ArmStats
    diff: float | None  # candidate - production thumbs-up rate
    diff_lo: float | None  # always-valid 1 - alpha confidence sequence
    diff_hi: float | None
    p_value_sequential: float | None  # always-valid p-value of "no difference" at this look
    p_value_fixed: float | None  # two-proportion z-test, valid for a single look only (reported, not decided on)
    decision: Decision
    reasons: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------
# Reading the warehouse
# ---------------------------------------------------------------------------------------------------------
_THUMBS_SQL = """
    WITH t AS (SELECT turn_id FROM turns WHERE ts >= ? AND model_version IN (?, ?)),
    latest AS (SELECT * EXCLUDE (rn) FROM (
        SELECT f.*, row_number() OVER (PARTITION BY f.user_id, f.turn_id ORDER BY f.ts DESC, f.event_id DESC) AS rn
        FROM feedback f WHERE f.kind = 'thumbs' AND f.turn_id IN (SELECT turn_id FROM t)) WHERE rn = 1)
    SELECT model_version, count(*) FILTER (WHERE value = 'up'), count(*) FROM latest
    WHERE value IN ('up', 'down') GROUP BY model_version"""
_PAIRS_SQL = """
    SELECT model_version, other_model_version, value FROM (
        SELECT f.*, row_number() OVER (PARTITION BY f.user_id, f.turn_id, f.other_turn_id
                                       ORDER BY f.ts DESC, f.event_id DESC) AS rn
        FROM feedback f WHERE f.kind = 'pairwise' AND f.ts >= ?) WHERE rn = 1
      AND ((model_version = ? AND other_model_version = ?) OR (model_version = ? AND other_model_version = ?))"""
_TURNS_SQL = """SELECT model_version, finish_reason, ttft_ms, latency_ms FROM turns
    WHERE ts >= ? AND model_version IN (?, ?)"""


def read_arms(
    warehouse: Path, candidate: str, production: str, since: datetime, timeout_s: float = 30.0
) -> tuple[ArmStats, ArmStats]:
    """Both arms' statistics from answers given (and rated) since ``since``."""
    empty = ([], [], [])
    if not Path(warehouse).exists():
        thumbs, pairs, turns = empty
    else:
        with connect(warehouse, read_only=True, timeout_s=timeout_s) as con:
            have = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
            if not {"turns", "feedback"} <= have:
                thumbs, pairs, turns = empty
            else:
                thumbs = con.execute(_THUMBS_SQL, [since, candidate, production]).fetchall()
                pairs = con.execute(_PAIRS_SQL, [since, candidate, production, production, candidate]).fetchall()
                turns = con.execute(_TURNS_SQL, [since, candidate, production]).fetchall()
    return tuple(_arm(v, thumbs, pairs, turns) for v in (candidate, production))  # type: ignore[return-value]


def _arm(version: str, thumbs: list[tuple], pairs: list[tuple], turns: list[tuple]) -> ArmStats:
    up, n = next(((u, m) for v, u, m in thumbs if v == version), (0, 0))
    wins = sum(1 for a, b, val in pairs if (val == "a" and a == version) or (val == "b" and b == version))
    ties = sum(1 for _, _, val in pairs if val == "tie")
    mine = [t for t in turns if t[0] == version]
    return ArmStats(
        version=version,
        answers=len(mine),
        thumbs=Rate.of(up, n),
        wins=Rate.of(wins, len(pairs) - ties),
        ties=ties,
        errors=Rate.of(sum(1 for t in mine if t[1] == "error"), len(mine)),
        ttft_ms=Median.of([t[2] for t in mine if t[2] is not None]),
        latency_ms=Median.of([t[3] for t in mine if t[3] is not None]),
    )


def thumbs_over_time(
    warehouse: Path, since: datetime | None = None, bucket_s: int = 300, timeout_s: float = 30.0
) -> list[dict[str, Any]]:
    """Thumbs-up rate per version per time bucket, with Wilson intervals (for the dashboard's plot)."""
    if not Path(warehouse).exists():
        return []
    with connect(warehouse, read_only=True, timeout_s=timeout_s) as con:
        have = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if "feedback" not in have:
            return []
        rows = con.execute(
            f"""WITH latest AS (SELECT * EXCLUDE (rn) FROM (
                    SELECT *, row_number() OVER (PARTITION BY user_id, turn_id ORDER BY ts DESC, event_id DESC) AS rn
                    FROM feedback WHERE kind = 'thumbs' AND ts >= coalesce(?, TIMESTAMPTZ '1970-01-01')) WHERE rn = 1)
                SELECT time_bucket(INTERVAL '{int(bucket_s)} seconds', ts) AS bucket, model_version,
                       count(*) FILTER (WHERE value = 'up'), count(*)
                FROM latest WHERE value IN ('up', 'down') GROUP BY ALL ORDER BY bucket, model_version""",
            [since],
        ).fetchall()
    out = []
    for bucket, version, k, n in rows:
        r = Rate.of(k, n)
        out.append({"time": bucket, "version": version, "up": k, "n": n, "rate": r.rate, "lo": r.lo, "hi": r.hi})
    return out


# ---------------------------------------------------------------------------------------------------------
# The test and the decision
# ---------------------------------------------------------------------------------------------------------
def _smoothed(r: Rate) -> float:
    return (r.k + 0.5) / (r.n + 1.0)  # keeps the variance positive at 0% and 100%


def confidence_sequence(cand: Rate, prod: Rate, alpha: float, mixture_sd: float) -> tuple[float, float, float, float]:
    """(diff, lo, hi, always-valid p) for candidate - production rate; mSPRT with a N(0, mixture_sd^2) mixture."""
    pc, pp = _smoothed(cand), _smoothed(prod)
    diff = cand.k / cand.n - prod.k / prod.n
    v = pc * (1 - pc) / cand.n + pp * (1 - pp) / prod.n
    tau2 = mixture_sd**2
    half = math.sqrt(2 * v * (v + tau2) / tau2 * (math.log(1 / alpha) + 0.5 * math.log((v + tau2) / v)))
    log_lambda = 0.5 * math.log(v / (v + tau2)) + tau2 * diff**2 / (2 * v * (v + tau2))
    p = min(1.0, math.exp(-log_lambda))
    # A difference of two rates lies in [-1, 1]; cutting the sequence there keeps its coverage.
    return diff, max(-1.0, diff - half), min(1.0, diff + half), p


def fixed_p_value(cand: Rate, prod: Rate) -> float | None:
    """Two-sided two-proportion z-test (pooled); valid for one look, e.g. a before/after report."""
    if not cand.n or not prod.n:
        return None
    pooled = (cand.k + prod.k) / (cand.n + prod.n)
    se = math.sqrt(pooled * (1 - pooled) * (1 / cand.n + 1 / prod.n))
    if se == 0:
        return 1.0
    z = (cand.k / cand.n - prod.k / prod.n) / se
    return float(2 * stats.norm.sf(abs(z)))


def _regressions(c: ArmStats, p: ArmStats, cfg: ReleaseConfig) -> list[str]:
    out = []
    if c.errors.n and c.errors.k >= cfg.min_errors:
        prod_rate = p.errors.rate or 0.0
        if c.errors.rate - prod_rate > cfg.max_error_increase:
            out.append(
                f"error rate regressed: {c.errors.rate:.1%} vs {prod_rate:.1%} (limit +{cfg.max_error_increase:.1%})"
            )
    for name in ("latency_ms", "ttft_ms"):
        cm, pm = getattr(c, name), getattr(p, name)
        if min(cm.n, pm.n) >= cfg.min_latency_samples and pm.p50 and cm.lo and cm.lo > cfg.max_latency_ratio * pm.p50:
            out.append(
                f"{name[:-3]} regressed: median {cm.p50:.0f} ms (95% CI from {cm.lo:.0f}) vs {pm.p50:.0f} ms "
                f"(limit x{cfg.max_latency_ratio})"
            )
    return out


def analyse(cand: ArmStats, prod: ArmStats, cfg: ReleaseConfig, elapsed_s: float) -> Analysis:
    """The decision at this look (see the module doc)."""
    a = Analysis(
        cand,
        prod,
        None,
        None,
        None,
        None,
        fixed_p_value(cand.thumbs, prod.thumbs),
        "continue",
        elapsed_s=round(elapsed_s, 1),
    )
    if cand.thumbs.n and prod.thumbs.n:
        a.diff, a.diff_lo, a.diff_hi, a.p_value_sequential = confidence_sequence(
            cand.thumbs, prod.thumbs, cfg.alpha, cfg.mixture_sd
        )
    regress = _regressions(cand, prod, cfg)
    enough = min(cand.thumbs.n, prod.thumbs.n) >= cfg.min_thumbs
    if regress:
        a.decision, a.reasons = "rollback", regress
    elif a.diff_hi is not None and a.diff_hi < 0 and min(cand.thumbs.n, prod.thumbs.n) >= max(10, cfg.min_thumbs // 3):
        a.decision = "rollback"
        a.reasons = [
            f"significantly worse: thumbs-up {a.diff:+.1%} (always-valid {1 - cfg.alpha:.0%} CI "
            f"{a.diff_lo:+.1%}..{a.diff_hi:+.1%})"
        ]
    elif enough and elapsed_s >= cfg.min_step_s and a.diff_lo is not None and a.diff_lo > -cfg.margin:
        a.decision = "promote"
        a.reasons = [
            f"not worse by more than {cfg.margin:.0%}: thumbs-up {a.diff:+.1%} (always-valid "
            f"{1 - cfg.alpha:.0%} CI {a.diff_lo:+.1%}..{a.diff_hi:+.1%}), {cand.thumbs.n} vs "
            f"{prod.thumbs.n} ratings"
        ]
    else:
        wait = []
        if not enough:
            wait.append(f"{cand.thumbs.n}/{prod.thumbs.n} of {cfg.min_thumbs} ratings per version")
        if elapsed_s < cfg.min_step_s:
            wait.append(f"{elapsed_s:.0f}/{cfg.min_step_s:.0f} s of the stage")
        if enough and a.diff_lo is not None:
            wait.append(f"CI lower end {a.diff_lo:+.1%} not yet above -{cfg.margin:.0%}")
        if elapsed_s >= cfg.max_step_s:  # say what it was still waiting for: e.g. a canary no rater reached
            a.decision = "rollback" if cfg.on_timeout == "rollback" else "hold"
            a.reasons = [
                f"undecided after {elapsed_s:.0f} s (max_step_s {cfg.max_step_s:.0f}): {cfg.on_timeout}; "
                f"still collecting: {', '.join(wait)}"
            ]
            return a
        a.reasons = ["collecting: " + ", ".join(wait)]
    return a

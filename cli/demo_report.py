"""What ``flywheel demo`` reports after the stack released (or refused) a candidate: the held-out users' hidden
correctness, utility and answer length on production vs the candidate over the same concurrent canary traffic,
every figure of the gate from the registry, and the summary in words.

Tests, all two-sided at 95%:
- correctness: Fisher's exact test on the 2x2 table (right/wrong x production/candidate) for the p-value; Wilson
  intervals per version and Newcombe's hybrid-score interval for the difference (users are sticky to one arm, so
  the two arms are independent samples of answers, not pairs);
- hidden utility and mean words: Welch's t interval for the difference of means.
Users are the clustering unit (a user's taste moves all their ratings), so with few users per arm these intervals
are optimistic; the thumbs-up figures beside them come from the release controller's own statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from scipy import stats

from cli.demo_stack import FlowRuns, describe_run
from cli.sim_stats import AnswerRecord
from feedback.settings import Settings
from pipelines.analysis import Rate


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), nd)


def _ci(r: Rate) -> list[float] | None:
    return [round(r.lo, 4), round(r.hi, 4)] if r.n and r.lo is not None and r.hi is not None else None


def newcombe(after: Rate, before: Rate) -> list[float] | None:
    """Newcombe's hybrid-score 95% interval of after - before, from the two Wilson intervals."""
    if not (after.n and before.n):
        return None
    p1, l1, u1 = after.rate, after.lo, after.hi
    p2, l2, u2 = before.rate, before.lo, before.hi
    d = p1 - p2
    return [round(d - math.hypot(p1 - l1, u2 - p2), 4), round(d + math.hypot(u1 - p1, p2 - l2), 4)]


def welch(after: list[float], before: list[float]) -> dict[str, Any]:
    """Means, their difference and its Welch 95% interval (None where a side has fewer than 2 values)."""
    out: dict[str, Any] = {
        "before": _r(sum(before) / len(before)) if before else None,
        "after": _r(sum(after) / len(after)) if after else None,
        "diff": None,
        "diff_ci": None,
        "p_value": None,
    }
    if out["before"] is not None and out["after"] is not None:
        out["diff"] = _r(sum(after) / len(after) - sum(before) / len(before))
    if len(after) >= 2 and len(before) >= 2 and (len(set(after)) > 1 or len(set(before)) > 1):
        t = stats.ttest_ind(after, before, equal_var=False)
        ci = t.confidence_interval(0.95)
        out["diff_ci"] = [_r(ci.low), _r(ci.high)]
        out["p_value"] = _r(t.pvalue, 6)
    return out


def heldout_comparison(
    records: list[AnswerRecord], words: list[tuple[str, int]], production: str, candidate: str
) -> dict[str, Any]:
    """Correctness, hidden utility and words of the held-out users' answers, production (before) vs candidate."""
    by = {v: [r for r in records if r.version == v] for v in (production, candidate)}
    before = Rate.of(sum(r.correct for r in by[production]), len(by[production]))
    after = Rate.of(sum(r.correct for r in by[candidate]), len(by[candidate]))
    p = None
    if before.n and after.n:
        table = [[after.k, after.n - after.k], [before.k, before.n - before.k]]
        p = _r(stats.fisher_exact(table).pvalue, 6)
    util = welch([r.utility for r in by[candidate]], [r.utility for r in by[production]])
    wds = welch([float(w) for v, w in words if v == candidate], [float(w) for v, w in words if v == production])
    return {
        "accuracy_before": _r(before.rate),
        "accuracy_after": _r(after.rate),
        "accuracy_before_ci": _ci(before),
        "accuracy_after_ci": _ci(after),
        "accuracy_diff_ci": newcombe(after, before),
        "accuracy_p_value": p,
        "accuracy_n_before": before.n,
        "accuracy_n_after": after.n,
        "utility_before": util["before"],
        "utility_after": util["after"],
        "utility_diff_ci": util["diff_ci"],
        "utility_p_value": util["p_value"],
        "mean_words_before": wds["before"],
        "mean_words_after": wds["after"],
        "mean_words_diff_ci": wds["diff_ci"],
    }


def gate_block(info: Any, eval_: dict[str, Any]) -> dict[str, Any]:
    """Every figure the gate recorded on the candidate, arranged per version: ``candidate``/``production``
    (and ``parent`` for held-out loss) hold the figures of each, ``paired`` the capability floor's paired
    differences (diff, SE, p, n), the rest (win rates, judge figures, suite sizes) stays at the top."""
    out: dict[str, Any] = {
        "version": info.name,
        "decision": info.gate,
        "reasons": list(info.gate_reasons),
        "candidate": {},
        "production": {},
        "parent": {},
        "paired": {},
    }
    metrics = (eval_.get("capability") or {}).get("metrics") or {}
    for name, s in metrics.items():
        out["candidate"][name] = s.get("candidate")
        out["production"][name] = s.get("production")
        out["paired"][name] = {k: s.get(k) for k in ("diff", "se", "p_value", "n")}
    flat_capability = {f"{m}_{k}" for m in metrics for k in ("candidate", "production", "diff", "se", "p_value")}
    for key, value in eval_.items():
        if key in ("capability", "samples", "timing") or key in flat_capability:
            continue
        if key in ("candidate", "production"):  # the version names
            out[f"{key}_version"] = value
            continue
        for who in ("candidate", "production", "parent"):
            if key.startswith(f"{who}_"):
                out[who][key[len(who) + 1 :]] = value
                break
        else:
            out[key] = value
    out["items"] = (eval_.get("capability") or {}).get("items")
    out["timing"] = eval_.get("timing")
    return out


# ---------------------------------------------------------------------------------------------------------
# The record of what the stack did
# ---------------------------------------------------------------------------------------------------------
Since = Callable[[float | None], float | None]  # an epoch time -> seconds since the demo began


def timeline(since: Since, runs: FlowRuns, curate: Any, train: Any, info: Any, settings: Settings) -> list[dict]:
    """trigger -> curate -> train -> gate -> canary -> full/rollback, with times (seconds since the demo began)."""
    from pipelines.release_log import ReleaseLog

    out: list[dict] = []

    def add(stage: str, epoch: float | None, by: str, what: str) -> None:
        out.append({"stage": stage, "at": epoch, "t_s": since(epoch) or 0.0, "by": by, "what": what})

    trigger = runs.parent_run(curate)
    if trigger is not None:
        said = [x for _, x in runs.logs(trigger.id) if x.startswith(("trigger:", "curate:", "train:"))]
        add("trigger", describe_run(trigger)["start"], f"volume-trigger run {trigger.name}", "; ".join(said) or "fired")
    add(
        "curate",
        describe_run(curate)["end"],
        f"curate run {curate.name}",
        f"snapshot {info.snapshot_id if info else '?'}",
    )
    tr = describe_run(train)
    where = f"train run {train.name} on the worker ({train.work_pool_name})"
    add("train", tr["start"], where, f"{info.recipe} from {info.parent} -> {info.name}" if info else "no version")
    if info is not None:  # when the train run logged its verdict (the autopilot may act before the run ends)
        said_at = [t for t, x in runs.logs(train.id) if f"{info.name} gate " in x and x.startswith("[train]")]
        verdict = f"{info.name} {info.gate}: " + "; ".join(info.gate_reasons)
        mine = [r for r in ReleaseLog(settings).records() if r.candidate == info.name]
        # The registry holds the verdict a moment before the run logs it, and the autopilot acts on the registry:
        # a canary that started before the log line shows the gate had decided by then.
        times = [said_at[-1] if said_at else tr["end"], *(r.at.timestamp() for r in mine)]
        gate_at = min((t for t in times if t is not None), default=None)
        add("gate", gate_at, "the train run's gate", verdict)
        for r in mine:
            if r.action not in ("applied", "alias"):
                stage = {"start": "canary", "rollback": "rollback", "pause": "hold"}.get(r.action, r.action)
                add(stage, r.at.timestamp(), r.actor, f"{r.candidate} at {r.share:.0%} of users: {r.reason}")
    return out


def _completed(run: Any) -> bool:
    return run.state_type is not None and run.state_type.value == "COMPLETED"


def stages_done(info: Any, trigger: Any, curate: Any, train: Any, settings: Settings) -> dict[str, bool | None]:
    """Which stage the stack is on record as having done (None: does not apply, the gate failed): a scheduled
    volume-trigger run started the curation, the ``train`` deployment's run registered and gated the candidate,
    the autopilot started its canary and a controller (not an operator) decided it."""
    from pipelines.release_log import ReleaseLog

    released = info is not None and info.gate == "passed"
    mine = [r for r in ReleaseLog(settings).records() if info is not None and r.candidate == info.name]
    decided = [r for r in mine if r.action in ("full", "rollback") or (r.action == "start" and r.status == "full")]
    return {
        "trigger": trigger is not None and trigger.deployment_id is not None,
        "curate": curate is not None and _completed(curate),
        "train": train is not None and train.deployment_id is not None and info is not None and _completed(train),
        "gate": info is not None and info.gate in ("passed", "failed"),
        "canary": any(r.action == "start" and r.actor == "controller:autopilot" for r in mine) if released else None,
        "decision": any(r.actor.startswith("controller") for r in decided) if released else None,
    }


def report(
    since: Since, release_cfg: Any, settings: Settings, runs: FlowRuns, curate: Any, train: Any, rel: dict | None
) -> dict[str, Any]:
    """Everything the --json object holds after a cycle, read from the stack's own records (registry, snapshot,
    warehouse, release log, Prefect) and from the held-out users (``rel``: the release state and what they saw)."""
    from feedback.warehouse import connect
    from pipelines import analysis
    from pipelines.snapshots import find_snapshot, load_manifest
    from training import registry

    versions = [v for v in registry.list_versions(settings) if v.kind == "policy" and v.name != registry.BASE]
    info = versions[-1] if versions else None
    out: dict[str, Any] = {}
    if info is not None:
        eval_ = dict(info.eval)
        man = load_manifest(find_snapshot(settings.datasets_dir, info.snapshot_id)) if info.snapshot_id else {}
        out["snapshot"] = {"snapshot_id": info.snapshot_id, "counts": man.get("counts"), "yield": man.get("yield")}
        out["train"] = {
            "version": info.name,
            "gate": {"passed": info.gate == "passed", "reasons": list(info.gate_reasons)},
            "eval": eval_,
            "seconds": describe_run(train)["seconds"],
            "flow_run": describe_run(train),
        }
        out["gate"] = gate_block(info, eval_)
        out["length_controlled_win_rate"] = eval_.get("lc_win_rate")
        out["judge_length_corr"] = eval_.get("judge_length_corr")
        out["candidate_path"] = info.path
        out["parent_path"] = registry.get_version(settings, info.parent).path if info.parent else None
        out["candidate"] = info.name
        if info.gate != "passed":
            out["release_decision"] = "not released: gate failed (" + "; ".join(info.gate_reasons) + ")"
    with connect(settings.warehouse_path, read_only=True) as con:
        tables = ("turns", "feedback", "user_actions")
        out["ingested"] = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}
    st = rel["state"] if rel else None
    if st is not None:
        cand, prod = analysis.read_arms(settings.warehouse_path, st.candidate, st.production, st.started_at)
        a = analysis.analyse(cand, prod, release_cfg, 0)
        out |= {
            "release_decision": st.status,
            "release_reason": st.last.reason,
            "thumbs_up_before": prod.thumbs.rate,
            "thumbs_up_after": cand.thumbs.rate,
            "thumbs_up_before_ci": _ci(prod.thumbs),
            "thumbs_up_after_ci": _ci(cand.thumbs),
            "n_before": prod.thumbs.n,
            "n_after": cand.thumbs.n,
            "p_value": a.p_value_fixed,
            "p_value_sequential": a.p_value_sequential,
            "diff_always_valid_ci": [a.diff_lo, a.diff_hi],
            "production": st.production,
            "decided": {"status": st.status, "reason": st.last.reason, "at_s": since(st.last.at.timestamp())},
        }
        out["heldout"] = {k: v for k, v in rel["heldout"].as_dict().items() if k != "per_user"}
        out |= heldout_comparison(rel["heldout"].records, rel["words"], st.production, st.candidate)
    out["stages"] = stages_done(info, runs.parent_run(curate), curate, train, settings)
    out["autonomous"] = all(v is not False for v in out["stages"].values())
    out["timeline"] = timeline(since, runs, curate, train, info, settings)
    return out


# ---------------------------------------------------------------------------------------------------------
# The summary in words
# ---------------------------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _ci_pct(ci: list[float] | None) -> str:
    return "" if not ci else f" [{ci[0]:.0%}, {ci[1]:.0%}]"


def _signed_ci(ci: list[float] | None, scale: float = 1.0, unit: str = "", nd: int = 1) -> str:
    return "" if not ci else f" (95% CI {ci[0] * scale:+.{nd}f}..{ci[1] * scale:+.{nd}f}{unit})"


def summary_lines(out: dict[str, Any]) -> list[str]:
    """The demo's outcome in words: what the stack did, then how much changed in correctness and in form."""
    stages = out.get("stages") or {}
    chain = " -> ".join(k for k, v in stages.items() if v)
    lines = [
        f"demo: {out['cycle_s']:.0f}s, recipe {out['recipe']}; autonomous: {'yes' if out['autonomous'] else 'NO'} "
        f"(the stack did: {chain or 'nothing'})",
        "what the stack did:",
    ]
    for e in out.get("timeline") or []:
        lines.append(f"  +{e['t_s']:5.0f}s  {e['stage']:<9} {e['by']}: {e['what'][:150]}")
    lines.append(f"  release decision: {out.get('release_decision')}")
    if out.get("accuracy_before") is not None or out.get("thumbs_up_before") is not None:
        prod, cand = out.get("production"), out.get("candidate")
        lines.append(f"held-out users, same concurrent canary traffic, production {prod} -> candidate {cand}:")
        lines.append(
            f"  thumbs-up:      {_pct(out.get('thumbs_up_before'))}{_ci_pct(out.get('thumbs_up_before_ci'))} "
            f"(n={out.get('n_before')}) -> {_pct(out.get('thumbs_up_after'))}{_ci_pct(out.get('thumbs_up_after_ci'))}"
            f" (n={out.get('n_after')}), p={out.get('p_value')}"
        )
        a0, a1 = out.get("accuracy_before"), out.get("accuracy_after")
        moved = "" if a0 is None or a1 is None else f": {100 * (a1 - a0):+.1f} points"
        lines.append(
            f"  correctness:    {_pct(a0)}{_ci_pct(out.get('accuracy_before_ci'))} -> {_pct(a1)}"
            f"{_ci_pct(out.get('accuracy_after_ci'))}{moved}{_signed_ci(out.get('accuracy_diff_ci'), 100, ' points')},"
            f" p={out.get('accuracy_p_value')}   (substance)"
        )
        w0, w1 = out.get("mean_words_before"), out.get("mean_words_after")
        wmoved = "" if w0 is None or w1 is None else f": {w1 - w0:+.1f} words"
        lines.append(
            f"  mean words:     {w0} -> {w1}{wmoved}{_signed_ci(out.get('mean_words_diff_ci'), 1, ' words')}   (form)"
        )
        u0, u1 = out.get("utility_before"), out.get("utility_after")
        umoved = "" if u0 is None or u1 is None else f": {u1 - u0:+.2f}"
        lines.append(f"  hidden utility: {u0} -> {u1}{umoved}{_signed_ci(out.get('utility_diff_ci'), nd=2)}")
    g = out.get("gate") or {}
    if g:
        lines.append(
            f"gate {g.get('decision')}: length-controlled win rate {out.get('length_controlled_win_rate')} "
            f"(raw {g.get('win_rate')}), judge length correlation {out.get('judge_length_corr')}"
        )
        for r in g.get("reasons") or []:
            lines.append(f"  - {r}")
    return lines

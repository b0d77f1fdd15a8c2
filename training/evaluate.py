"""Offline evaluation of a candidate against production, and the gate that decides whether it may ship.

Measured, for a chat candidate (all greedy, batched, fp32), on the same items for candidate and production:
- **win rate** on held-out prompts (the snapshot's eval split), judged by a reward model that did not train the
  candidate (``training/judge.py``), raw and **length-controlled** (AlpacaEval 2.0's logistic model read at zero
  length difference), with the judge's correlation with length and its accuracy on held-out pairs;
- the **capability floor** (``training/capability.py``): reference QA, IFEval-style instruction following,
  reference-answer NLL and multiple choice, on sets the project wrote and never trains on, each compared pair by
  pair (``training/paired.py``);
- **red-team refusal** (``redteam.jsonl``) and **over-refusal** (``overrefusal.jsonl``, benign look-alikes);
- **held-out loss / perplexity** of the candidate and its parent on held-out liked answers.
A reward-model candidate is measured by its accuracy on held-out pairs only.

The gate (``GateConfig``, ``training/gate_config.py``) passes a chat candidate only if its length-controlled win
rate beats ``min_win_rate``, no floor metric drops by more than ``floor_se`` standard errors of the paired
difference, red-team refusal and over-refusal hold within their margins, and it is measurably better somewhere
(``require_gain``: the win rate's CI above ``min_win_rate``, a floor figure up by ``gain_se`` standard errors, or
red-team refusal up by more than its margin); a near no-op is not worth a canary. A raw and a length-controlled win
rate more than ``length_flag_points`` apart flag the candidate in its reasons. The decision, every figure and every
reason are stored on the version (registry tags, ``lineage.json``) and on its MLflow run; a failed gate stops its
release (``registry.promotable``). Each version's answers and likelihoods are cached in its directory per (items,
settings, measuring code): its weights never change, so a second evaluation generates nothing.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from feedback.settings import Settings
from training import capability, registry
from training.errors import EvalError
from training.gate_config import FLOOR_METRICS, GateConfig
from training.judge import HELDOUT, judge_answers, pick_judge, words
from training.measure import generate, heldout_nll, pair_accuracy
from training.modeling import load_policy, load_reward_model, load_tokenizer
from training.scoring import REFUSAL_RE, is_refusal
from training.suites import load_suite

__all__ = [
    "FLOOR_METRICS",
    "REFUSAL_RE",
    "EvalError",
    "GateConfig",
    "evaluate",
    "evaluate_and_gate",
    "gate",
    "heldout_prompts",
    "is_refusal",
    "load_suite",
    "pick_judge",
]
Transform = Callable[[str], str]


# ---------------------------------------------------------------------------------------------------------
# Held-out data
# ---------------------------------------------------------------------------------------------------------
def _snapshot_for(settings: Settings, info: registry.VersionInfo) -> dict[str, Any] | None:
    from training.snapshots import all_snapshots, newest_snapshot

    if info.snapshot_id:
        for m in all_snapshots(settings):
            if m["snapshot_id"] == info.snapshot_id:
                return m
    return newest_snapshot(settings)


def _rows(snapshot: dict[str, Any] | None, table: str, split: str) -> list[dict[str, Any]]:
    if snapshot is None:
        return []
    f = Path(snapshot["path"]) / table / f"{split}.parquet"
    if not f.exists():
        return []
    import pyarrow.parquet as pq

    return pq.read_table(f).to_pylist()


def heldout_prompts(snapshot: dict[str, Any] | None, cfg: GateConfig) -> list[list[dict[str, str]]]:
    seen, out = set(), []
    for table, col in (("eval_prompts", "prompt"), ("pairs", "prompt"), ("sft", "messages"), ("kto", "prompt")):
        for r in _rows(snapshot, table, "eval"):
            conv = [dict(m) for m in r[col]]
            if col == "messages":
                conv = conv[:-1]
            key = json.dumps(conv, sort_keys=True)
            if conv and conv[-1]["role"] == "user" and key not in seen:
                seen.add(key)
                out.append(conv)
    return out[: cfg.max_eval_prompts]


def redteam_suite(snapshot: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The fixed red-team prompts plus the held-out side of red-teamers' findings (``redteam/eval``: never trained
    on; their train side feeds the safety mix, ``training/safety.finding_rows``)."""
    found = [{"prompt": r["prompt"][-1]["content"]} for r in _rows(snapshot, "redteam", "eval") if r["prompt"]]
    return load_suite("redteam") + found


# ---------------------------------------------------------------------------------------------------------
# A version's answers and likelihoods, cached in its directory (a version's weights never change)
# ---------------------------------------------------------------------------------------------------------
def _code_digest() -> str:
    """The measuring code's own hash: a change to how answers or likelihoods are computed invalidates the cache.
    Only that code: the gate's rules and scoring (the rest of ``capability.py``) read the cached answers, so a
    change to a rule re-scores them without generating again (it regenerated 5 minutes of answers before)."""
    here = Path(__file__).resolve().parent
    sources = [(here / f).read_bytes() for f in ("measure.py", "modeling.py")]
    sources.append(inspect.getsource(capability.likelihoods).encode())
    return hashlib.sha256(b"".join(sources)).hexdigest()


def _cache_file(info: registry.VersionInfo, kind: str, payload: Any) -> Path:
    key = json.dumps([info.name, info.number, _code_digest(), payload], sort_keys=True)
    return Path(info.path) / "eval_cache" / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _cached(info: registry.VersionInfo, kind: str, payload: Any, compute: Callable[[], Any]) -> Any:
    cache = _cache_file(info, kind, payload)
    if cache.exists():
        return json.loads(cache.read_text())
    value = compute()
    try:
        cache.parent.mkdir(exist_ok=True)
        cache.write_text(json.dumps(value))
    except OSError:
        pass  # a read-only model dir only costs a recomputation next time
    return value


def _cached_answers(
    info: registry.VersionInfo, model, tok, convs: list, cfg: GateConfig, suite: str, max_new_tokens: int
) -> list[str]:
    return _cached(
        info,
        suite,
        [convs, max_new_tokens],
        lambda: generate(model, tok, convs, max_new_tokens, cfg.batch_size),
    )


# ---------------------------------------------------------------------------------------------------------
# Evaluate
# ---------------------------------------------------------------------------------------------------------
def evaluate(
    settings: Settings,
    name: str,
    *,
    production: str | None = None,
    judge: str | None = None,
    cfg: GateConfig | None = None,
    transform: Transform | None = None,
    say=print,
) -> dict[str, Any]:
    """Every figure of the gate for ``name`` against production (or ``production``), on the same items.

    ``transform`` is the gate's self-test and what-if hook: it rewrites each of the candidate's generated answers
    before scoring (e.g. "production's answers cut to their first sentence" is ``production``'s own version with
    a transform). Likelihood figures still come from the candidate's weights. Never record such a result:
    ``evaluate_and_gate`` takes no transform."""
    cfg = cfg or GateConfig()
    cand = registry.get_version(settings, name)
    snapshot = _snapshot_for(settings, cand)
    t0 = time.monotonic()
    results: dict[str, Any] = {"candidate": cand.name, "snapshot_id": snapshot["snapshot_id"] if snapshot else None}
    pairs = _rows(snapshot, "pairs", "eval")
    if cand.kind == "reward":
        tok = load_tokenizer(cand.path)
        acc = pair_accuracy(load_reward_model(cand.path, tok).eval(), tok, pairs)
        results.update({"reward_accuracy": acc, "heldout_pairs": len(pairs)})
        results["seconds"] = round(time.monotonic() - t0, 1)
        return results
    prod = registry.get_version(settings, production or registry.get_alias(settings, "production") or registry.BASE)
    results["production"] = prod.name
    judge_info = pick_judge(settings, cand, judge)
    results["judge"] = judge_info.name
    if transform is not None:
        results["transform"] = getattr(transform, "__name__", "transform")
    same = cand.name == prod.name
    tok, ptok = load_tokenizer(cand.path), load_tokenizer(prod.path)
    prod_model = load_policy(prod.path).eval()
    cand_model = prod_model if same else load_policy(cand.path).eval()
    caps = capability.Suites.load(cfg)
    prompts = heldout_prompts(snapshot, cfg)
    redteam, benign = redteam_suite(snapshot), load_suite("overrefusal")
    results["redteam_from_findings"] = len(redteam) - len(load_suite("redteam"))
    suites = {
        HELDOUT: (prompts, cfg.max_new_tokens),
        "redteam": ([[{"role": "user", "content": r["prompt"]}] for r in redteam], cfg.max_new_tokens),
        "overrefusal": ([[{"role": "user", "content": r["prompt"]}] for r in benign], cfg.max_new_tokens),
        "refqa": (caps.prompts()["refqa"], cfg.refqa_max_new_tokens),
        "ifeval": (caps.prompts()["ifeval"], cfg.ifeval_max_new_tokens),
    }
    answers: dict[str, dict[str, list[str]]] = {"candidate": {}, "production": {}}
    timing: dict[str, float] = {}
    for suite, (convs, n_tokens) in suites.items():
        t = time.monotonic()
        say(f"[evaluate] {suite}: {len(convs)} prompts x 2 models ...")
        p = _cached_answers(prod, prod_model, ptok, convs, cfg, suite, n_tokens)
        c = p if same else _cached_answers(cand, cand_model, tok, convs, cfg, suite, n_tokens)
        answers["production"][suite] = p
        answers["candidate"][suite] = [transform(a) for a in c] if transform else c
        timing[f"generate_{suite}_s"] = round(time.monotonic() - t, 1)
    for who in ("candidate", "production"):
        results[f"{who}_redteam_refusal"] = _share(is_refusal(a) for a in answers[who]["redteam"])
        results[f"{who}_overrefusal_answered"] = _share(not is_refusal(a) for a in answers[who]["overrefusal"])
        results[f"{who}_mean_words"] = round(sum(map(words, answers[who][HELDOUT])) / max(len(prompts), 1), 1)
    results["redteam_prompts"], results["overrefusal_prompts"] = len(redteam), len(benign)

    t = time.monotonic()
    say(f"[evaluate] capability: likelihoods of {len(caps.refqa)} reference answers, {len(caps.mc)} choice items ...")
    plik = _cached(prod, "likelihoods", [caps.refqa, caps.mc], lambda: capability.likelihoods(prod_model, ptok, caps))
    clik = (
        plik
        if same
        else _cached(cand, "likelihoods", [caps.refqa, caps.mc], lambda: capability.likelihoods(cand_model, tok, caps))
    )
    results["capability"] = capability.measure(caps, answers["candidate"], answers["production"], clik, plik, cfg)
    results.update(capability.summary(results["capability"]["metrics"]))
    timing["likelihoods_s"] = round(time.monotonic() - t, 1)

    t = time.monotonic()
    if len(prompts) >= cfg.min_eval_prompts:
        judged = {s: suites[s][0] for s in (HELDOUT, "overrefusal", "refqa")}
        say(f"[evaluate] judging {sum(map(len, judged.values()))} answer pairs with {judge_info.name} ...")
        keep = lambda kind, payload, compute: _cached(judge_info, kind, [prod.name, payload], compute)  # noqa: E731
        results.update(judge_answers(judge_info, judged, answers["candidate"], answers["production"], pairs, cfg, keep))
    else:
        results["win_rate"] = results["lc_win_rate"] = None
        results["heldout_prompts"] = len(prompts)
    timing["judge_s"] = round(time.monotonic() - t, 1)

    t = time.monotonic()
    results.update(_heldout_losses(settings, snapshot, cand, prod, cand_model, prod_model, tok, cfg))
    timing["heldout_loss_s"] = round(time.monotonic() - t, 1)
    results["samples"] = {
        s: [
            {"prompt": c[-1]["content"], "candidate": a, "production": p}
            for c, a, p in zip(suites[s][0], answers["candidate"][s], answers["production"][s], strict=True)
        ][:3]
        for s in suites
    }
    results["timing"] = timing
    results["seconds"] = round(time.monotonic() - t0, 1)
    return results


def _heldout_losses(settings, snapshot, cand, prod, cand_model, prod_model, tok, cfg: GateConfig) -> dict[str, Any]:
    """Held-out loss and perplexity of the candidate and its parent on the snapshot's held-out conversations."""
    held = [[dict(m) for m in r["messages"]] for r in _rows(snapshot, "sft", "eval")][: cfg.max_eval_prompts]
    parent = registry.get_version(settings, cand.parent) if cand.parent else prod
    parent_model = prod_model if parent.name == prod.name else load_policy(parent.path).eval()
    out: dict[str, Any] = {}
    for who, model in (("candidate", cand_model), ("parent", parent_model)):
        nll = heldout_nll(model, tok, held)
        out[f"{who}_heldout_loss"] = round(nll, 4) if nll is not None else None
        out[f"{who}_heldout_ppl"] = round(math.exp(nll), 3) if nll is not None else None
    return out


def _share(flags) -> float:
    flags = list(flags)
    return round(sum(flags) / len(flags), 4) if flags else 0.0


# ---------------------------------------------------------------------------------------------------------
# Gate
# ---------------------------------------------------------------------------------------------------------
def gate(results: dict[str, Any], kind: str, cfg: GateConfig | None = None) -> tuple[bool, list[str]]:
    """The decision and every reason behind it (reasons are kept for passes too)."""
    cfg = cfg or GateConfig()
    reasons: list[str] = []
    ok = True
    if kind == "reward":
        acc = results.get("reward_accuracy")
        if acc is None:
            return False, ["no held-out pairs to measure the reward model on"]
        ok = acc > cfg.min_reward_accuracy
        return ok, [f"held-out preference accuracy {acc:.2f} {'>' if ok else '<='} {cfg.min_reward_accuracy}"]
    wr, lc = results.get("win_rate"), results.get("lc_win_rate")
    if wr is None or lc is None:
        ok = False
        reasons.append(f"too few held-out prompts for a win rate (need {cfg.min_eval_prompts})")
    else:
        both = f"length-controlled win rate {lc:.2f} (raw {wr:.2f}, 95% CI {results['win_rate_ci95']})"
        if lc <= cfg.min_win_rate:
            ok = False
            reasons.append(f"{both} vs production does not beat {cfg.min_win_rate}")
        else:
            reasons.append(f"{both} beats {cfg.min_win_rate}")
        if abs(wr - lc) > cfg.length_flag_points:
            reasons.append(
                f"FLAG: raw win rate {wr:.2f} and length-controlled {lc:.2f} differ by more than "
                f"{cfg.length_flag_points:.2f}: the judge's verdicts follow length (Spearman "
                f"{results.get('judge_length_corr')}); mean words {results.get('candidate_mean_words')} vs "
                f"production {results.get('production_mean_words')}"
            )
    rc, rp = results["candidate_redteam_refusal"], results["production_redteam_refusal"]
    if rc < rp - cfg.redteam_margin:
        ok = False
        reasons.append(f"red-team refusal fell from {rp:.2f} to {rc:.2f} (margin {cfg.redteam_margin})")
    else:
        reasons.append(f"red-team refusal {rc:.2f} (production {rp:.2f})")
    oc, op = results["candidate_overrefusal_answered"], results["production_overrefusal_answered"]
    if oc < op - cfg.overrefusal_margin:
        ok = False
        reasons.append(f"benign prompts answered fell from {op:.2f} to {oc:.2f} (margin {cfg.overrefusal_margin})")
    else:
        reasons.append(f"benign prompts answered {oc:.2f} (production {op:.2f})")
    stats = results.get("capability", {}).get("metrics", {})
    floor_ok, floor_reasons = capability.floor(stats, cfg)
    gain_ok, gain_reason = _gain(results, stats, cfg)
    return ok and floor_ok and gain_ok, [*reasons, *floor_reasons, gain_reason]


def _gain(results: dict[str, Any], stats: dict[str, dict[str, Any]], cfg: GateConfig) -> tuple[bool, str]:
    """Is the candidate measurably better anywhere? (``GateConfig.require_gain``: a near no-op is not released.)"""
    found = capability.gains(stats, cfg)
    ci = results.get("win_rate_ci95")
    if ci and ci[0] > cfg.min_win_rate:
        found.insert(0, f"win rate 95% CI {ci} above {cfg.min_win_rate}")
    rc, rp = results.get("candidate_redteam_refusal"), results.get("production_redteam_refusal")
    if rc is not None and rp is not None and rc > rp + cfg.redteam_margin:
        found.append(f"red-team refusal {rp:.2f} -> {rc:.2f}")
    if found:
        return True, f"measurable gain: {'; '.join(found)}"
    if not cfg.require_gain:
        return True, "no measurable gain (not required: require_gain is off)"
    return False, (
        f"no measurable gain: the win rate's 95% CI {ci} does not clear {cfg.min_win_rate}, no capability figure "
        f"improved by more than {cfg.gain_se} SE and red-team refusal rose by no more than {cfg.redteam_margin}; "
        "releasing it would change nothing users could measure"
    )


def evaluate_and_gate(
    settings: Settings,
    name: str,
    *,
    production: str | None = None,
    judge: str | None = None,
    cfg: GateConfig | None = None,
    say=print,
) -> dict[str, Any]:
    """Evaluate, decide, and record both on the version (eval results and gate tags, lineage.json, MLflow run)."""
    cfg = cfg or GateConfig()
    info = registry.get_version(settings, name)
    results = evaluate(settings, name, production=production, judge=judge, cfg=cfg, say=say)
    passed, reasons = gate(results, info.kind, cfg)
    stored = {k: v for k, v in results.items() if k != "samples"}
    registry.record_evaluation(settings, name, stored, passed, reasons)
    _log_to_run(settings, info, results, passed)
    return {"version": name, "passed": passed, "reasons": reasons, "eval": results}


def _log_to_run(settings: Settings, info: registry.VersionInfo, results: dict[str, Any], passed: bool) -> None:
    """Evaluation metrics on the training run too, so the MLflow UI shows them beside the loss curves."""
    if not info.run_id:
        return
    c = registry.client(settings)
    for k, v in results.items():
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            c.log_metric(info.run_id, f"eval_{k}", float(v))
    c.set_tag(info.run_id, "flywheel.gate", "passed" if passed else "failed")
    c.log_dict(info.run_id, results, "evaluation.json")

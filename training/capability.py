"""The capability floor: what a candidate must still know and do, whatever the raters' taste (issue 17).

Ratings reward form, and a judge trained on ratings agrees with them, so a model can win the judge while getting
worse. Four measurements on sets the project wrote and never trains on (``training/data``, see
``training/suites.py``) cannot be bought with form:

- **reference QA** (``refqa.jsonl``): greedy answers, right when an accepted answer appears in the first
  ``answer_max_words`` words (``training.scoring.contains_answer``);
- **instruction following** (``ifeval.jsonl``): IFEval's verifiable instructions, strict and loose, per prompt and
  per instruction (``training.scoring.check_following``);
- **reference-answer NLL**: the mean per-token NLL of each reference answer given its question, teacher-forced,
  so brevity cannot lower it;
- **multiple choice** (``mc.jsonl``): the choice with the highest log-likelihood (per token; summed reported too).

Each is measured for the candidate and production on the same items and compared pair by pair
(``training/paired.py``). The candidate fails when any metric in ``GateConfig.floor_metrics`` drops by more than
``floor_se`` standard errors of the paired difference (for NLL, by more than ``nll_margin`` as well).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from training.gate_config import GateConfig
from training.measure import answer_nlls, choice_scores
from training.paired import drop_in_se, paired_binary, paired_continuous
from training.scoring import check_following, contains_answer
from training.suites import load_suite

# metric -> (label for reasons, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "refqa_accuracy": ("reference QA accuracy", True),
    "ifeval_prompt_strict": ("instruction following (prompt-level, strict)", True),
    "ifeval_prompt_loose": ("instruction following (prompt-level, loose)", True),
    "ifeval_instruction_strict": ("instruction following (instruction-level, strict)", True),
    "ifeval_instruction_loose": ("instruction following (instruction-level, loose)", True),
    "refqa_nll": ("reference-answer NLL", False),
    "mc_accuracy": ("multiple-choice accuracy (per-token likelihood)", True),
    "mc_accuracy_raw": ("multiple-choice accuracy (summed likelihood)", True),
}


@dataclass(frozen=True)
class Suites:
    """The held-out capability items one evaluation uses (the first N of each file, per ``GateConfig``)."""

    refqa: list[dict[str, Any]]
    ifeval: list[dict[str, Any]]
    mc: list[dict[str, Any]]

    @classmethod
    def load(cls, cfg: GateConfig) -> Suites:
        return cls(
            load_suite("refqa")[: cfg.max_refqa_items],
            load_suite("ifeval")[: cfg.max_ifeval_items],
            load_suite("mc")[: cfg.max_mc_items],
        )

    def prompts(self) -> dict[str, list[list[dict[str, str]]]]:
        """The generation suites as chat conversations."""
        return {
            "refqa": [[{"role": "user", "content": r["question"]}] for r in self.refqa],
            "ifeval": [[{"role": "user", "content": r["prompt"]}] for r in self.ifeval],
        }


def likelihoods(model, tok, suites: Suites) -> dict[str, list]:
    """Per item: reference-answer NLL, and the multiple-choice picks (teacher-forced; no generation)."""
    return {
        "refqa_nll": answer_nlls(model, tok, [(r["question"], r["answer"]) for r in suites.refqa]),
        "mc": choice_scores(model, tok, suites.mc),
    }


def item_scores(suites: Suites, answers: dict[str, list[str]], lik: dict[str, list], cfg: GateConfig) -> dict:
    """Per-item outcomes of one model: the paired comparison's inputs."""
    follow = [
        check_following(a, r["instruction_ids"], r["kwargs"])
        for a, r in zip(answers["ifeval"], suites.ifeval, strict=True)
    ]
    return {
        "refqa_accuracy": [
            contains_answer(a, r["accepted"], cfg.answer_max_words)
            for a, r in zip(answers["refqa"], suites.refqa, strict=True)
        ],
        "ifeval_prompt_strict": [f.prompt_strict for f in follow],
        "ifeval_prompt_loose": [f.prompt_loose for f in follow],
        "ifeval_instruction_strict": [x for f in follow for x in f.strict],
        "ifeval_instruction_loose": [x for f in follow for x in f.loose],
        "refqa_nll": list(lik["refqa_nll"]),
        "mc_accuracy": [m["correct_norm"] for m in lik["mc"]],
        "mc_accuracy_raw": [m["correct"] for m in lik["mc"]],
    }


def compare(cand: dict[str, list], prod: dict[str, list]) -> dict[str, dict[str, Any]]:
    """Every metric, paired: rates or means, difference, standard error, p-value."""
    out = {}
    for metric in METRICS:
        pair = paired_continuous if metric == "refqa_nll" else paired_binary
        out[metric] = pair(cand[metric], prod[metric])
    return out


def floor(stats: dict[str, dict[str, Any]], cfg: GateConfig) -> tuple[bool, list[str]]:
    """The floor's verdict and one reason per enforced metric, naming the metric and both figures."""
    ok, reasons = True, []
    for metric in cfg.floor_metrics:
        s = stats.get(metric)
        label, higher = METRICS[metric]
        if not s or s["diff"] is None:
            ok = False
            reasons.append(f"{label}: not measured (no items), so the capability floor cannot pass")
            continue
        margin = cfg.nll_margin if metric == "refqa_nll" else 0.0
        z = drop_in_se(s, higher, margin)
        figures = (
            f"{s['candidate']:.3f} vs production {s['production']:.3f} "
            f"(diff {s['diff']:+.3f}, SE {s['se']:.3f}, p={s['p_value']:.3g}, n={s['n']})"
        )
        if z is not None and z > cfg.floor_se:
            ok = False
            extra = f" beyond the {margin} margin" if margin else ""
            reasons.append(f"capability floor: {label} dropped {figures}, more than {cfg.floor_se} SE{extra}")
        else:
            reasons.append(f"{label} {figures}")
    return ok, reasons


def gains(stats: dict[str, dict[str, Any]], cfg: GateConfig) -> list[str]:
    """The enforced capability figures the candidate improved by more than ``cfg.gain_se`` paired standard errors
    (reference-answer NLL also by more than ``nll_margin``, as for a drop: DPO's 0.014 nats was 7 SE), each as
    "<label> <diff> (<z> SE)"."""
    out = []
    for metric in cfg.floor_metrics:
        s = stats.get(metric)
        label, higher = METRICS[metric]
        if not s or s.get("diff") is None:
            continue
        margin = cfg.nll_margin if metric == "refqa_nll" else 0.0  # as for a drop: significant and beyond it
        better = (s["diff"] if higher else -s["diff"]) - margin
        if better > 0 and (not s["se"] or better / s["se"] > cfg.gain_se):
            z = f"{better / s['se']:.1f} SE" if s["se"] else "every item"
            out.append(f"{label} {s['diff']:+.3f} ({z}{f' beyond the {margin} margin' if margin else ''})")
    return out


def summary(stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Flat figures (candidate, production, diff, se, p) per metric, for MLflow metrics and the model card."""
    flat: dict[str, Any] = {}
    for metric, s in stats.items():
        for k in ("candidate", "production", "diff", "se", "p_value"):
            flat[f"{metric}_{k}"] = s.get(k)
    return flat


def measure(
    suites: Suites,
    cand_answers: dict[str, list[str]],
    prod_answers: dict[str, list[str]],
    cand_lik: dict[str, list],
    prod_lik: dict[str, list],
    cfg: GateConfig,
) -> dict[str, Any]:
    """The capability block of the evaluation results: paired stats per metric and the suite sizes."""
    stats = compare(item_scores(suites, cand_answers, cand_lik, cfg), item_scores(suites, prod_answers, prod_lik, cfg))
    return {
        "metrics": stats,
        "items": {"refqa": len(suites.refqa), "ifeval": len(suites.ifeval), "mc": len(suites.mc)},
    }

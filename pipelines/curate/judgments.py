"""Trainers' judgments -> training rows: one K-way ranking gives its K(K-1)/2 pairs, a rewrite gives an SFT row
(and ranks first), axis scores give KTO labels. Every row says where it came from and who judged it.

Its own idea because a ranking is not a thumbs: the rules that turn one trainer's ordering of K answers into
training rows are the product's, and they must be easy to read and to change.

- **Pairs**: every two answers with different ranks, the better one chosen (ties give none). A rewrite ranks
  above every answer; with ``all_bad`` every judged answer ranks below the rewrite and none above another
  (unless the trainer still ordered the bad ones). An answer flagged ``toxic`` or ``pii`` is never chosen.
- **SFT**: the rewrite (a demonstration); and the unique best answer when the task is not ``all_bad``, carries
  no flag and scores at least ``sft_min_score`` on every axis.
- **KTO**: each scored answer whose mean axis score is at least ``kto_good`` (desirable) or at most ``kto_bad``
  (undesirable). Substance first: a ``truthfulness`` or ``harmlessness`` of 2 or less, any axis at 1, or a
  ``toxic``/``fails_task``/``spam`` flag is undesirable whatever the mean (a fluent wrong answer is not a
  middling one).
- **Provenance**: ``source`` (``trainer`` or ``reviewer``; users' own rows say ``user``), ``judge`` (the
  annotator's pseudonymous hash) and ``weight`` (``JudgmentWeights``: how much a recipe should count the row).

Judgments of a gold task (``gold_task``) train like any other: the queue knows the answer, the trainer did not.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pipelines.curate.rows import Chat

NEVER_CHOSEN = frozenset({"toxic", "pii"})
NEVER_DESIRABLE = frozenset({"toxic", "fails_task", "spam"})


@dataclass(frozen=True)
class JudgmentWeights:
    """How judgments become rows (``CurateConfig`` carries the same fields as ``judgment_*``)."""

    trainer_weight: float = 1.0
    reviewer_weight: float = 1.5
    user_weight: float = 1.0
    sft_min_score: int = 4
    kto_good: float = 4.0
    kto_bad: float = 2.0


def weights_of(cfg: Any) -> JudgmentWeights:
    """``CurateConfig``'s ``judgment_*`` fields."""
    return JudgmentWeights(
        trainer_weight=cfg.judgment_trainer_weight,
        reviewer_weight=cfg.judgment_reviewer_weight,
        user_weight=cfg.judgment_user_weight,
        sft_min_score=cfg.judgment_sft_min_score,
        kto_good=cfg.judgment_kto_good,
        kto_bad=cfg.judgment_kto_bad,
    )


@dataclass(frozen=True)
class Judged:
    """One judgment as curation reads it from the warehouse (``judgments`` table)."""

    event_id: str
    judge_hash: str
    role: str
    conversation_id: str
    prompt: Chat
    answers: list[dict[str, Any]]
    all_bad: bool
    rewrite: str | None

    @classmethod
    def from_row(cls, row: dict[str, Any], judge_hash: str) -> Judged:
        def loads(v: Any) -> Any:
            return json.loads(v) if isinstance(v, str) else v

        prompt = [{"role": m["role"], "content": m["content"]} for m in loads(row["prompt"])]
        return cls(
            row["event_id"],
            judge_hash,
            row["role"] or "trainer",
            row["conversation_id"],
            prompt,
            list(loads(row["answers"])),
            bool(row["all_bad"]),
            row["rewrite"],
        )


def _assistant(text: str) -> Chat:
    return [{"role": "assistant", "content": text}]


def _ranked(j: Judged) -> list[dict[str, Any]]:
    """The judged answers with an effective rank (lower is better): the rewrite is 0; with ``all_bad`` every
    judged answer ranks below it, keeping the trainer's order among them if they gave one."""
    out = []
    worst = len(j.answers) + 1
    for a in j.answers:
        rank = a.get("rank")
        if j.all_bad:
            rank = worst + (rank or 0)  # all below an acceptable answer; their own order kept when given
        out.append({**a, "rank": rank})
    if j.rewrite:
        out.append(
            {
                "answer_id": f"{j.event_id}:rewrite",
                "model_version": f"human:{j.role}",
                "text": j.rewrite,
                "rank": 0,
                "scores": {},
                "flags": [],
            }
        )
    return out


def judgment_rows(judged: list[Judged], w: JudgmentWeights, build: Counter) -> dict[str, list[dict[str, Any]]]:
    """SFT, KTO and pair rows (TRL formats plus provenance and ``_convs`` for the split) from the judgments."""
    rows: dict[str, list[dict[str, Any]]] = {"sft": [], "kto": [], "pairs": []}
    for j in judged:
        weight = w.reviewer_weight if j.role == "reviewer" else w.trainer_weight
        prov = {"source": j.role, "judge": j.judge_hash, "weight": weight, "_convs": (j.conversation_id,)}
        ranked = _ranked(j)
        if j.rewrite:
            rows["sft"].append(
                {"messages": j.prompt + _assistant(j.rewrite), "model_version": f"human:{j.role}"} | prov
            )
            build["judgment_sft_rewrite"] += 1
        best = [a for a in ranked if a["rank"] == 1]
        if not j.all_bad and not j.rewrite and len(best) == 1 and _good_enough(best[0], w):
            a = best[0]
            rows["sft"].append(
                {"messages": j.prompt + _assistant(a["text"]), "model_version": a.get("model_version")} | prov
            )
            build["judgment_sft_best"] += 1
        by_id = {a["answer_id"]: a for a in ranked}
        for better, worse in ranking_pairs({k: a["rank"] for k, a in by_id.items() if a["rank"] is not None}):
            c, r = by_id[better], by_id[worse]
            if NEVER_CHOSEN & set(c.get("flags") or ()):
                build["judgment_pairs_flagged_chosen_dropped"] += 1
                continue
            rows["pairs"].append(
                {
                    "prompt": j.prompt,
                    "chosen": _assistant(c["text"]),
                    "rejected": _assistant(r["text"]),
                    "model_version": c.get("model_version"),
                    "rejected_model_version": r.get("model_version"),
                }
                | prov
            )
            build["judgment_pairs"] += 1
        for a in j.answers:
            label = kto_label(a, w)
            if label is not None:
                rows["kto"].append(
                    {
                        "prompt": j.prompt,
                        "completion": _assistant(a["text"]),
                        "label": label,
                        "model_version": a.get("model_version"),
                    }
                    | prov
                )
                build[f"judgment_kto_{'desirable' if label else 'undesirable'}"] += 1
    return rows


def _good_enough(a: dict[str, Any], w: JudgmentWeights) -> bool:
    scores = a.get("scores") or {}
    return not a.get("flags") and bool(scores) and min(scores.values()) >= w.sft_min_score


def kto_label(a: dict[str, Any], w: JudgmentWeights) -> bool | None:
    """Desirable, undesirable, or no label (a middling or unscored answer)."""
    scores = a.get("scores") or {}
    if NEVER_DESIRABLE & set(a.get("flags") or ()):
        return False
    if min(scores.get("truthfulness", 5), scores.get("harmlessness", 5)) <= 2 or min(scores.values(), default=5) <= 1:
        return False
    if not scores:
        return None
    mean = sum(scores.values()) / len(scores)
    if mean >= w.kto_good:
        return True
    if mean <= w.kto_bad:
        return False
    return None


def ranking_pairs(ranks: dict[str, int]) -> list[tuple[str, str]]:
    """(better, worse) for every two items of one ranking with different ranks: K(K-1)/2 without ties."""
    items = sorted(ranks, key=lambda k: ranks[k])
    return [(a, b) for i, a in enumerate(items) for b in items[i + 1 :] if ranks[a] < ranks[b]]

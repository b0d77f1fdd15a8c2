"""How far trainers agree, what they agree on, and whom to trust (issue 18): the quality figures of the human half.

- **Agreement**: Krippendorff's alpha (the ``krippendorff`` package), ordinal, per axis (helpfulness, truthfulness,
  harmlessness: a unit is one answer of one task, a coder one annotator) and for rankings (a unit is one answer's
  rank within its task). Alpha is 1 for perfect agreement, 0 for chance; below ~0.67 a label set is shaky.
  None when fewer than two annotators judged any unit, or when every value is the same (alpha is undefined).
- **Consensus**: one ranking per task from every annotator's ranking, each turned into its pairs and fitted with a
  Bradley-Terry model (``choix.ilsr_pairwise``, lightly regularised so a clean sweep stays finite). A trusted
  annotator's pairs count more: each pair is repeated by the annotator's trust quantised to 1-3 copies.
- **Gold accuracy and trust**: on gold tasks (the queue knows the best answer; the annotator does not know the
  task is gold) an annotator is right when their rank-1 answer is the gold one. Trust is the posterior mean of
  that accuracy under a uniform prior, ``(right + 1) / (gold + 2)``: 0.5 for someone with no gold tasks yet.

Input is the warehouse's ``judgments`` rows (``feedback.warehouse.JUDGMENT_COLUMNS``) as dicts; ``answers`` may be
JSON text or a list.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from feedback.events import AXES


@dataclass(frozen=True)
class Trust:
    annotator: str
    gold_tasks: int
    gold_right: int

    @property
    def accuracy(self) -> float | None:
        return self.gold_right / self.gold_tasks if self.gold_tasks else None

    @property
    def score(self) -> float:
        return (self.gold_right + 1) / (self.gold_tasks + 2)


def _answers(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    a = row["answers"]
    return json.loads(a) if isinstance(a, str) else list(a)


def _alpha(units: dict[tuple[str, str], dict[str, float]]) -> float | None:
    """Krippendorff's ordinal alpha of ``unit -> {annotator: value}``; None where it is undefined."""
    import krippendorff

    coders = sorted({c for vals in units.values() for c in vals})
    shared = [u for u, vals in units.items() if len(vals) >= 2]
    if len(coders) < 2 or not shared:
        return None
    data = np.full((len(coders), len(shared)), np.nan)
    for j, u in enumerate(shared):
        for c, v in units[u].items():
            data[coders.index(c), j] = v
    if len({v for v in data[~np.isnan(data)]}) < 2:
        return None  # one value everywhere: expected disagreement is zero, alpha undefined
    value = float(krippendorff.alpha(reliability_data=data, level_of_measurement="ordinal"))
    return None if math.isnan(value) else round(value, 4)


def agreement(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Alpha per axis and for ranks, with how many units two or more annotators shared."""
    per_axis: dict[str, dict[tuple[str, str], dict[str, float]]] = {a: defaultdict(dict) for a in AXES}
    ranks: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for row in rows:
        for a in _answers(row):
            unit = (row["task_id"], a["answer_id"])
            for axis, score in (a.get("scores") or {}).items():
                per_axis[axis][unit][row["user_id"]] = float(score)
            if a.get("rank") is not None and not row.get("all_bad"):
                ranks[unit][row["user_id"]] = float(a["rank"])
    out: dict[str, Any] = {f"alpha_{axis}": _alpha(units) for axis, units in per_axis.items()}
    out["alpha_ranking"] = _alpha(ranks)
    out["shared_units"] = sum(len(v) >= 2 for v in ranks.values())
    return out


def trust_scores(rows: Iterable[Mapping[str, Any]], gold: Mapping[str, str]) -> dict[str, Trust]:
    """Per annotator: gold tasks judged and how many had the gold answer at rank 1 (``gold``: task -> answer_id)."""
    seen: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        best = gold.get(row["task_id"])
        if best is None:
            seen.setdefault(row["user_id"], [])
            continue
        top = {a["answer_id"] for a in _answers(row) if a.get("rank") == 1}
        seen[row["user_id"]].append(not row.get("all_bad") and top == {best})
    return {u: Trust(u, len(v), sum(v)) for u, v in seen.items()}


def _copies(t: Trust | None) -> int:
    """How many times an annotator's pairs count: 1 at trust 0.5 (no evidence) or below, up to 3 at trust 1."""
    return 1 + round(4 * max(0.0, (t.score if t else 0.5) - 0.5))


def consensus(rows: Iterable[Mapping[str, Any]], trust: Mapping[str, Trust] | None = None) -> dict[str, list[dict]]:
    """Per task: its answers ordered by a Bradley-Terry fit of every annotator's pairs, with their strengths."""
    import choix

    by_task: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        by_task[row["task_id"]].append(row)
    out: dict[str, list[dict]] = {}
    for task, judged in by_task.items():
        ids = sorted({a["answer_id"] for r in judged for a in _answers(r)})
        index = {a: i for i, a in enumerate(ids)}
        pairs: list[tuple[int, int]] = []
        for r in judged:
            if r.get("all_bad"):
                continue
            ranked = {a["answer_id"]: a["rank"] for a in _answers(r) if a.get("rank") is not None}
            copies = _copies(trust.get(r["user_id"]) if trust else None)
            for w, l_ in ((w, l_) for w in ranked for l_ in ranked if ranked[w] < ranked[l_]):
                pairs.extend([(index[w], index[l_])] * copies)
        if not pairs:
            out[task] = [{"answer_id": a, "strength": 0.0} for a in ids]
            continue
        strength = choix.ilsr_pairwise(len(ids), pairs, alpha=0.01)
        order = sorted(range(len(ids)), key=lambda i: -strength[i])
        out[task] = [{"answer_id": ids[i], "strength": round(float(strength[i]), 4)} for i in order]
    return out

"""Stages 4-5: from usable ratings to training examples, with harmful answers kept out of every positive.

Its own idea because this is where a rating becomes what each method learns from, and the rules are the
product's judgement rather than data plumbing: SFT imitates liked, finished answers; KTO learns from every
unambiguous thumbs, partial answers too; pairs come from explicit A/B choices, a regeneration against the answer
it replaced, and liked against disliked answers to the same prompt; an answer a user reported or the classifier
flagged is never a positive.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict

from pipelines import safety
from pipelines.config import CurateConfig
from pipelines.curate.rows import KtoRow, PairRow, PromptRow, RatedTurn, SftRow, Turn, Usable


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def flag_harmful(u: Usable) -> tuple[set[str], int]:
    """Turn ids that must never be positives: reported by a user, or flagged by the classifier."""
    harmful = set(u.harm_reported)
    classified = 0
    candidates = [r.turn for r in u.rated] + [t for c in u.choices for t in (c.chosen, c.rejected)]
    for t in candidates:
        if t.turn_id not in harmful and safety.classify(t.answer).harmful:
            harmful.add(t.turn_id)
            classified += 1
    return harmful, classified


def sft_kto_rows(u: Usable, harmful: set[str], build: Counter) -> tuple[list[SftRow], list[KtoRow]]:
    """SFT imitates liked, finished answers; KTO learns from every unambiguous thumbs, partial answers too."""
    sft: list[SftRow] = []
    kto: list[KtoRow] = []
    for r in u.rated:
        t = r.turn
        if r.liked and t.turn_id in harmful:
            build["harmful_positive_dropped"] += 1
            continue
        if r.liked and not t.partial:
            sft.append(
                {
                    "messages": t.messages + assistant(t.answer),
                    "model_version": t.model_version,
                    "_convs": (t.conversation_id,),
                }
            )
        elif r.liked:
            build["sft_skipped_partial_answer"] += 1
        kto.append(
            {
                "prompt": t.messages,
                "completion": assistant(t.answer),
                "label": r.liked,
                "model_version": t.model_version,
                "_convs": (t.conversation_id,),
            }
        )
    return sft, kto


def pair_rows(u: Usable, harmful: set[str], cfg: CurateConfig, build: Counter) -> list[PairRow]:
    """Explicit A/B choices, regeneration vs the answer it replaced, liked vs disliked for the same prompt."""
    rows: list[PairRow] = []
    seen: set[tuple[str, str]] = set()

    def add(chosen: Turn, rejected: Turn, source: str) -> bool:
        key = (chosen.turn_id, rejected.turn_id)
        if key in seen or key[::-1] in seen:
            return False
        if chosen.turn_id in harmful:
            build[f"pairs_{source}_harmful_chosen_dropped"] += 1
            return False
        seen.add(key)
        build[f"pairs_{source}"] += 1
        rows.append(
            {
                "prompt": chosen.messages,
                "chosen": assistant(chosen.answer),
                "rejected": assistant(rejected.answer),
                "model_version": chosen.model_version,
                "rejected_model_version": rejected.model_version,
                "_convs": (chosen.conversation_id, rejected.conversation_id),
            }
        )
        return True

    for c in u.choices:
        add(c.chosen, c.rejected, "explicit")
    by_id = {r.turn.turn_id: r for r in u.rated}
    for r in u.rated:
        p = by_id.get(r.turn.parent_turn_id or "")
        if r.turn.origin == "regenerate" and p is not None and p.liked != r.liked:
            add(r.turn, p.turn, "regeneration") if r.liked else add(p.turn, r.turn, "regeneration")
    by_prompt: dict[str, list[RatedTurn]] = defaultdict(list)
    for r in u.rated:
        by_prompt[json.dumps(r.turn.messages, sort_keys=True)].append(r)
    for group in by_prompt.values():
        made = 0
        for c in (r for r in group if r.liked):
            for d in (r for r in group if not r.liked):
                if made < cfg.max_pairs_per_prompt and add(c.turn, d.turn, "same_prompt"):
                    made += 1
    return rows


def prompt_rows(u: Usable) -> list[PromptRow]:
    """Every usable turn's context, for online RL (train) and held-out evaluation (eval)."""
    return [
        {"prompt": t.messages, "model_version": t.model_version, "_convs": (t.conversation_id,)}
        for t in u.turns.values()
    ]

"""Warehouse -> one dataset snapshot with every training set the recipes need, in TRL's own formats.

Plain functions, testable without Prefect; ``pipelines.flows`` wraps them in tasks. Stages, in order, each
counted in the manifest (rows in, rows out, dropped by reason):

1. consent: drop every row of users who asked for deletion (even later events), of users whose latest consent
   action is a revocation, and rows whose own ``consent`` flag is false;
2. quality: drop empty, failed (``finish_reason`` ``error``) and over-long turns. Answers cut at the token limit
   (``length``) or by a client that left (``cancelled``) are KEPT: the person judged the text they saw, so
   their rating is honest data for KTO and pairs; only SFT (imitation) skips them, so that the model does not
   learn to stop mid-sentence;
3. ratings: the latest thumbs per (user, turn) wins (``cleared`` = unrated); a turn with conflicting up and
   down ratings is dropped; pairwise ``tie``s carry no preference;
4. safety: answers flagged by ``pipelines.safety`` or reported harmful in a thumbs-down reason are never
   positives (SFT, KTO label True, ``chosen``); they may still be negatives;
5. build: SFT (liked), KTO (liked and disliked), pairs (explicit A/B choices, a regeneration against the
   answer it replaced when their ratings differ, a liked against a disliked answer to the same prompt),
   prompts; PII is scrubbed from every text (``pipelines.pii``);
6. dedupe: exact and MinHash near-duplicates, per table, first occurrence kept;
7. split: by a salted hash of ``conversation_id``; a pair whose two answers fall in different splits is
   dropped so that no conversation reaches both train and eval.

TRL formats (conversational): SFT ``messages``; KTO ``prompt``/``completion``/``label``; pairs
``prompt``/``chosen``/``rejected``; prompts ``prompt``. Each message is ``{"role", "content"}``. Every table
also has ``model_version``: the release that wrote the answer (for pairs: the chosen answer; the rejected one's
is ``rejected_model_version``; for prompts: the release that answered it), so recipes can weigh on-policy data.

Yield (``Curated.yield_report``, in the manifest and ``flywheel datasets show``): ratings in, ratings lost per
filter and reason, training rows out per table.

Where each part lives, one idea per file: ``source.py`` (the read and the snapshot's provenance), ``rows.py`` (the
typed rows, stage counts and table formats), ``filters.py`` (stages 1-3, SQL), ``examples.py`` (stages 4-5),
``finish.py`` (PII, dedupe, split, yield report, content hash). This file runs them in order; the names other
modules use (``curate``, ``read_warehouse``, ``Source``, ``Curated``, ``LAYOUT``, ``SCHEMAS``, ``content_hash``,
``user_hash``, ...) are importable from ``pipelines.curate`` as before.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from pipelines.config import CurateConfig
from pipelines.curate.examples import flag_harmful, pair_rows, prompt_rows, sft_kto_rows
from pipelines.curate.filters import select_usable, user_hash
from pipelines.curate.finish import content_hash, dedupe_tables, scrub_rows, split_of, split_tables, yield_report
from pipelines.curate.judgments import judgment_rows, weights_of
from pipelines.curate.rows import (
    FINISHED,
    LAYOUT,
    SCHEMAS,
    Chat,
    Choice,
    Curated,
    KtoRow,
    PairRow,
    PromptRow,
    RatedTurn,
    SftRow,
    StageCount,
    Turn,
    Usable,
)
from pipelines.curate.source import Source, read_warehouse, source_info, watermark_of
from pipelines.pii import PiiScrubber

__all__ = [
    "FINISHED",
    "LAYOUT",
    "SCHEMAS",
    "Chat",
    "Choice",
    "Curated",
    "KtoRow",
    "PairRow",
    "Progress",
    "PromptRow",
    "RatedTurn",
    "SftRow",
    "Source",
    "StageCount",
    "Turn",
    "Usable",
    "content_hash",
    "curate",
    "read_warehouse",
    "source_info",
    "split_of",
    "user_hash",
    "watermark_of",
    "yield_report",
]

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


def curate(
    src: Source, cfg: CurateConfig | None = None, scrubber: PiiScrubber | None = None, progress: Progress | None = None
) -> Curated:
    cfg = cfg or CurateConfig()
    scrubber = scrubber or PiiScrubber(cfg)
    say = progress or (lambda msg: log.info(msg))
    filters: list[StageCount] = []

    usable = select_usable(src, cfg, filters)
    for f in filters:
        say(f"{f.stage}: {f.rows_in} -> {f.rows_out} {f.dropped}")

    harmful, classified = flag_harmful(usable)
    say(f"safety: {len(harmful)} answers flagged ({classified} by classifier, {len(usable.harm_reported)} reported)")

    build: Counter = Counter()
    sft, kto = sft_kto_rows(usable, harmful, build)
    rows: dict[str, list[dict[str, Any]]] = {
        "sft": sft,
        "kto": kto,
        "pairs": pair_rows(usable, harmful, cfg, build),
        "prompts": prompt_rows(usable),
    }
    for table in ("sft", "kto", "pairs"):
        for r in rows[table]:
            r |= {"source": "user", "judge": None, "weight": cfg.judgment_user_weight}
    for table, extra in judgment_rows(usable.judged, weights_of(cfg), build).items():
        rows[table].extend(extra)
    rows["redteam"] = usable.findings
    say("build: " + " ".join(f"{t}={len(r)}" for t, r in rows.items()) + f" {dict(build)}")
    filters.append(
        StageCount(
            "safety",
            len(usable.rated),
            len(usable.rated) - build["harmful_positive_dropped"],
            {k: v for k, v in build.items() if "harmful" in k},
        )
    )
    filters.append(
        StageCount(
            "build:sft",
            len(usable.rated),
            len(sft),
            {"disliked": sum(not r.liked for r in usable.rated), "partial_answer": build["sft_skipped_partial_answer"]},
        )
    )

    pii, engine, pii_stats = scrub_rows(rows, scrubber)
    filters.append(pii)
    say(f"pii ({engine}): {pii.rows_in} distinct texts, {pii.dropped['texts_redacted']} redacted")

    for f in dedupe_tables(rows, cfg):
        filters.append(f)
        say(f"{f.stage}: {f.rows_in} -> {f.rows_out} {f.dropped}")

    tables, split_counts = split_tables(rows, cfg)
    filters.extend(split_counts)
    say("split: " + ", ".join(f"{t}/{s}={len(r)}" for t, sp in tables.items() for s, r in sp.items()))

    report = yield_report(filters, tables)
    say(
        f"yield: {report['ratings_in']} ratings in -> {report['training_rows_out']} training rows "
        f"({report['training_rows_per_rating_in']} per rating)"
    )
    return Curated(
        tables=tables,
        filters=filters,
        source=source_info(src),
        watermark=watermark_of(src),
        config=cfg.content_dict(),
        pii_engine=engine,
        pii_stats=pii_stats,
        contributors=usable.contributors,
        yield_report=report,
    )

"""Stages 6-7 and the accounts: PII scrubbing, near-duplicates and the train/eval split over built rows; then
the yield report and the content hash of the finished tables.

Its own idea because all of it works on rows already built, table by table, whatever method they are for:
scrubbing and dedupe rewrite or drop rows, the split sends each row to one side by a salted hash of its
conversations (a pair across both sides is dropped), and the two accounts describe the result -- how many
ratings became how many rows (``yield_report``) and an identity that changes only with the rows and the config
(``content_hash``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipelines.config import CurateConfig
from pipelines.curate.rows import LAYOUT, StageCount
from pipelines.dedupe import dedupe
from pipelines.pii import PiiScrubber


def scrub_rows(rows: dict[str, list[dict[str, Any]]], scrubber: PiiScrubber) -> tuple[StageCount, str, dict[str, int]]:
    """Replace PII in every message of every row; each distinct text is scanned once."""
    texts = [
        m["content"] for table in rows.values() for row in table for v in row.values() if isinstance(v, list) for m in v
    ]
    n_texts = len(set(texts))
    clean = scrubber.scrub_many(texts)
    changed = 0
    for table in rows.values():
        for row in table:
            for col, val in row.items():
                if isinstance(val, list):  # new dicts: rows may share message objects
                    row[col] = [{"role": m["role"], "content": clean[m["content"]]} for m in val]
                    changed += sum(m["content"] != n["content"] for m, n in zip(val, row[col], strict=True))
    stats = dict(scrubber.stats)
    count = StageCount(
        "pii",
        n_texts,
        n_texts,
        {
            "texts_scanned_by_presidio": stats.get("candidates", 0),
            "texts_redacted": stats.get("changed", 0),
            "messages_redacted": changed,
        },
    )
    return count, scrubber.engine_id or scrubber.describe(), stats


def dedupe_text(row: dict[str, Any]) -> str:
    parts = []
    for col in ("messages", "prompt", "chosen", "completion", "rejected"):
        if col in row:
            parts.extend(f"{m['role']}: {m['content']}" for m in row[col])
    return "\n".join(parts)


def dedupe_tables(rows: dict[str, list[dict[str, Any]]], cfg: CurateConfig) -> list[StageCount]:
    """Exact and near duplicates per table over canonical text, first occurrence kept (in place)."""
    counts, sketches = [], {}
    for name, table in rows.items():
        res = dedupe(
            [dedupe_text(r) for r in table], cfg.near_dup_threshold, cfg.minhash_perm, cfg.shingle_words, sketches
        )
        rows[name] = [r for r, k in zip(table, res.keep, strict=True) if k]
        counts.append(
            StageCount(
                f"dedupe:{name}",
                len(table),
                len(rows[name]),
                {"exact_duplicate": res.exact, "near_duplicate": res.near},
            )
        )
    return counts


def split_of(conversation_id: str, cfg: CurateConfig) -> str:
    """Deterministic: the same conversation is always on the same side for a given salt and fraction."""
    h = hashlib.sha256(f"{cfg.split_salt}:{conversation_id}".encode()).digest()
    return "eval" if int.from_bytes(h[:8], "big") / 2**64 < cfg.eval_fraction else "train"


def split_tables(
    rows: dict[str, list[dict[str, Any]]], cfg: CurateConfig
) -> tuple[dict[str, dict[str, list[dict[str, Any]]]], list[StageCount]]:
    tables: dict[str, dict[str, list[dict[str, Any]]]] = {t: {s: [] for s in splits} for t, splits in LAYOUT.items()}
    counts = []
    for name, table in rows.items():
        dropped = 0
        for r in table:
            sides = {split_of(c, cfg) for c in r.pop("_convs")}
            if len(sides) > 1:
                dropped += 1
                continue
            side = sides.pop()
            tables["eval_prompts" if name == "prompts" and side == "eval" else name][side].append(r)
        n_out = sum(len(v) for v in tables[name].values()) + (
            len(tables["eval_prompts"]["eval"]) if name == "prompts" else 0
        )
        counts.append(StageCount(f"split:{name}", len(table), n_out, {"cross_split_pair": dropped}))
    return tables, counts


def yield_report(filters: list[StageCount], tables: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Ratings in -> training rows out: the ratings each relational filter removed, the rows each later stage
    removed, and rows per rating. A rating can make several rows (a liked finished answer: one SFT and one KTO
    row, and pairs with every disliked answer to the same prompt)."""
    by = {f.stage: f for f in filters}
    consent_f, ratings_f = by["consent:feedback"], by["ratings"]
    rows_out = {t: sum(len(v) for v in tables[t].values()) for t in ("sft", "kto", "pairs")}
    row_losses = {
        f.stage: {k: v for k, v in f.dropped.items() if v}
        for f in filters
        if f.stage.startswith(("dedupe:", "split:", "safety"))
        and f.stage.split(":")[-1] not in ("prompts",)
        and any(f.dropped.values())
    }
    total = sum(rows_out.values())
    return {
        "ratings_in": consent_f.rows_in,
        "ratings_lost": {
            **{f"consent:{k}": v for k, v in consent_f.dropped.items() if v},
            **{k: v for k, v in ratings_f.dropped.items() if v},
        },
        "ratings_usable": ratings_f.rows_out,
        "usable_share": round(ratings_f.rows_out / consent_f.rows_in, 4) if consent_f.rows_in else None,
        "rows_lost_after_build": row_losses,
        "training_rows_out": rows_out,
        "training_rows_per_rating_in": round(total / consent_f.rows_in, 3) if consent_f.rows_in else None,
    }


def content_hash(tables: dict[str, dict[str, list[dict[str, Any]]]], config: dict[str, Any], pii_engine: str) -> str:
    """sha256 over the config and every row of every table in order; time and lineage are not part of it."""
    h = hashlib.sha256()
    h.update(json.dumps({"config": config, "pii_engine": pii_engine, "layout": LAYOUT}, sort_keys=True).encode())
    for name in sorted(tables):
        for split in sorted(tables[name]):
            h.update(f"\x00{name}/{split}\x00".encode())
            for row in tables[name][split]:
                h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
                h.update(b"\n")
    return h.hexdigest()

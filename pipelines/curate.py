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
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

import duckdb
import pyarrow as pa

from feedback.warehouse import connect
from pipelines import consent, safety
from pipelines.config import CurateConfig
from pipelines.dedupe import dedupe
from pipelines.pii import PiiScrubber

log = logging.getLogger(__name__)
Progress = Callable[[str], None]

# table -> splits written; prompts/train feeds online RL (GRPO), eval_prompts/eval is the held-out set.
LAYOUT: dict[str, tuple[str, ...]] = {
    "sft": ("train", "eval"),
    "kto": ("train", "eval"),
    "pairs": ("train", "eval"),
    "prompts": ("train",),
    "eval_prompts": ("eval",),
}
_MSG = pa.struct([("role", pa.string()), ("content", pa.string())])
_MSGS = pa.list_(_MSG)
SCHEMAS: dict[str, pa.Schema] = {
    "sft": pa.schema([("messages", _MSGS), ("model_version", pa.string())]),
    "kto": pa.schema([("prompt", _MSGS), ("completion", _MSGS), ("label", pa.bool_()), ("model_version", pa.string())]),
    "pairs": pa.schema(
        [
            ("prompt", _MSGS),
            ("chosen", _MSGS),
            ("rejected", _MSGS),
            ("model_version", pa.string()),
            ("rejected_model_version", pa.string()),
        ]
    ),
    "prompts": pa.schema([("prompt", _MSGS), ("model_version", pa.string())]),
    "eval_prompts": pa.schema([("prompt", _MSGS), ("model_version", pa.string())]),
}

_TURN_COLS = (
    "event_id, ts, user_id, consent, conversation_id, turn_id, parent_turn_id, origin, model_version, messages, "
    "answer, finish_reason, kafka_partition, kafka_offset, ingested_at"
)
_FEEDBACK_COLS = (
    "event_id, ts, user_id, consent, conversation_id, turn_id, kind, value, reason, other_turn_id, "
    "kafka_partition, kafka_offset, ingested_at"
)


# ---------------------------------------------------------------------------------------------------------
# 0. Read: one short read-only window on the warehouse, everything else works on the Arrow copy.
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Source:
    turns: pa.Table
    feedback: pa.Table
    user_actions: pa.Table
    offsets: pa.Table
    read_at: datetime


def read_warehouse(path: Path | str, timeout_s: float = 30.0) -> Source:
    with connect(path, read_only=True, timeout_s=timeout_s) as con:
        have = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        missing = {"turns", "feedback", "user_actions"} - have
        if missing:
            raise RuntimeError(f"warehouse {path} lacks tables {sorted(missing)}: has ingest ever run?")
        turns = con.sql(f"SELECT {_TURN_COLS} FROM turns").to_arrow_table()
        feedback = con.sql(f"SELECT {_FEEDBACK_COLS} FROM feedback").to_arrow_table()
        actions = con.sql("SELECT event_id, ts, user_id, action FROM user_actions").to_arrow_table()
        offsets = pa.table({})
        if "kafka_offsets" in have:
            offsets = con.sql("SELECT * FROM kafka_offsets").to_arrow_table()
    return Source(_as_table(turns), _as_table(feedback), _as_table(actions), _as_table(offsets), datetime.now(UTC))


def _as_table(x: Any) -> pa.Table:
    return x.read_all() if hasattr(x, "read_all") else x


# ---------------------------------------------------------------------------------------------------------
# Typed rows and result containers
# ---------------------------------------------------------------------------------------------------------
@dataclass
class StageCount:
    stage: str
    rows_in: int
    rows_out: int
    dropped: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "in": self.rows_in, "out": self.rows_out, "dropped": dict(self.dropped)}


@dataclass(frozen=True)
class Turn:
    """One usable answer: consented, not empty, not an error, not over-long. ``partial`` answers (cut at the
    token limit or by the client leaving) are kept: the person rated the text they saw."""

    turn_id: str
    conversation_id: str
    parent_turn_id: str | None
    origin: str
    model_version: str
    messages: list[dict[str, str]]
    answer: str
    finish_reason: str

    @property
    def partial(self) -> bool:
        return self.finish_reason != FINISHED


@dataclass(frozen=True)
class RatedTurn:
    """A turn with an unambiguous thumbs verdict (its latest thumbs from every rater agree)."""

    turn: Turn
    liked: bool
    raters: int


@dataclass(frozen=True)
class Choice:
    """An explicit side-by-side verdict between two usable turns (ties carry no preference and are not here)."""

    chosen: Turn
    rejected: Turn


@dataclass
class Usable:
    """What the relational stages leave for building examples."""

    turns: dict[str, Turn]
    rated: list[RatedTurn]
    choices: list[Choice]
    harm_reported: set[str]
    contributors: list[str]


@dataclass
class Curated:
    tables: dict[str, dict[str, list[dict[str, Any]]]]
    filters: list[StageCount]
    source: dict[str, Any]
    watermark: dict[str, Any]
    config: dict[str, Any]
    pii_engine: str
    pii_stats: dict[str, int]
    # sha256 of every user whose turns or ratings could reach this snapshot: a later deletion request of any of
    # them retires it (``pipelines.snapshots.retire_deleted``).
    contributors: list[str] = field(default_factory=list)
    # Ratings in -> training rows out, and where the rest went (``yield_report``).
    yield_report: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, dict[str, int]]:
        return {t: {s: len(rows) for s, rows in splits.items()} for t, splits in self.tables.items()}


FINISHED = "stop"

Chat = list[dict[str, str]]  # [{"role": ..., "content": ...}], roles as in feedback.events.Role


# The rows each training table holds (TRL's dataset formats, plus where each row came from). ``_convs`` are the
# conversations behind a row: the split stage keeps a row only if they all fall on one side, then drops the field.
class SftRow(TypedDict):
    messages: Chat
    model_version: str
    _convs: tuple[str, ...]


class KtoRow(TypedDict):
    prompt: Chat
    completion: Chat
    label: bool
    model_version: str
    _convs: tuple[str, ...]


class PairRow(TypedDict):
    prompt: Chat
    chosen: Chat
    rejected: Chat
    model_version: str
    rejected_model_version: str
    _convs: tuple[str, ...]


class PromptRow(TypedDict):
    prompt: Chat
    model_version: str
    _convs: tuple[str, ...]


# ---------------------------------------------------------------------------------------------------------
# 1-3. Relational stages in an in-memory DuckDB over the Arrow copy.
# ---------------------------------------------------------------------------------------------------------
def _consent_stage(db: duckdb.DuckDBPyConnection, name: str, raw: str) -> StageCount:
    deleted, revoked = consent.deleted_users("raw_actions"), consent.revoked_users("raw_actions")
    n_in, n_del, n_rev, n_flag = db.execute(f"""
        SELECT count(*),
               count(*) FILTER (WHERE user_id IN ({deleted})),
               count(*) FILTER (WHERE user_id NOT IN ({deleted}) AND user_id IN ({revoked})),
               count(*) FILTER (WHERE user_id NOT IN ({deleted}) AND user_id NOT IN ({revoked})
                                 AND NOT coalesce(consent, false))
        FROM {raw}""").fetchone()
    db.execute(f"CREATE TEMP TABLE c_{name} AS SELECT * FROM {raw} WHERE {consent.allowed(actions='raw_actions')}")
    out = db.execute(f"SELECT count(*) FROM c_{name}").fetchone()[0]
    return StageCount(
        f"consent:{name}", n_in, out, {"deleted_user": n_del, "consent_revoked": n_rev, "no_consent_flag": n_flag}
    )


def _quality_stage(db: duckdb.DuckDBPyConnection, cfg: CurateConfig) -> StageCount:
    """One row per turn_id (latest); drop empty, failed and over-long turns. Partial answers stay (see Turn)."""
    db.execute(f"""
        CREATE TEMP TABLE t1 AS SELECT * EXCLUDE (rn) FROM (
            SELECT *, row_number() OVER (PARTITION BY turn_id ORDER BY ts DESC, event_id DESC) AS rn
            FROM c_turns) WHERE rn = 1;
        CREATE TEMP TABLE tq AS SELECT *,
            CASE
              WHEN length(trim(coalesce(answer, ''))) < {cfg.min_answer_chars}
                OR length(trim(coalesce(json_extract_string(messages, '$[-1].content'), ''))) = 0 THEN 'empty'
              WHEN coalesce(finish_reason, '{FINISHED}') = 'error' THEN 'generation_error'
              WHEN length(answer) > {cfg.max_answer_chars} THEN 'over_long_answer'
              WHEN length(CAST(messages AS VARCHAR)) > {cfg.max_prompt_chars} THEN 'over_long_prompt'
              ELSE NULL END AS bad
        FROM t1;
        CREATE TEMP TABLE turns_ok AS SELECT * EXCLUDE (bad) FROM tq WHERE bad IS NULL;
    """)
    n_c = db.execute("SELECT count(*) FROM c_turns").fetchone()[0]
    bad = dict(db.execute("SELECT bad, count(*) FROM tq WHERE bad IS NOT NULL GROUP BY bad").fetchall())
    n_t1 = db.execute("SELECT count(*) FROM t1").fetchone()[0]
    if n_c - n_t1:
        bad["duplicate_turn_id"] = n_c - n_t1
    n_ok, n_partial = db.execute(
        f"SELECT count(*), count(*) FILTER (WHERE coalesce(finish_reason, '{FINISHED}') <> '{FINISHED}') FROM turns_ok"
    ).fetchone()
    return StageCount("quality:turns", n_c, n_ok, {**bad, "kept_partial_answer": n_partial})


def _ratings_stage(db: duckdb.DuckDBPyConnection) -> StageCount:
    """Latest thumbs per (rater, turn) and latest pairwise per (rater, A, B); what is lost and why."""
    db.execute("""
        CREATE TEMP TABLE thumbs AS SELECT * EXCLUDE (rn) FROM (
            SELECT *, row_number() OVER (PARTITION BY user_id, turn_id ORDER BY ts DESC, event_id DESC) AS rn
            FROM c_feedback WHERE kind = 'thumbs') WHERE rn = 1;
        CREATE TEMP TABLE pw AS SELECT * EXCLUDE (rn) FROM (
            SELECT *, row_number() OVER (PARTITION BY user_id, turn_id, other_turn_id
                                         ORDER BY ts DESC, event_id DESC) AS rn
            FROM c_feedback WHERE kind = 'pairwise') WHERE rn = 1;
        CREATE TEMP TABLE turn_rating AS SELECT turn_id,
            count(*) FILTER (WHERE value = 'up') AS ups, count(*) FILTER (WHERE value = 'down') AS downs
            FROM thumbs WHERE turn_id IN (SELECT turn_id FROM turns_ok) GROUP BY turn_id;
        CREATE TEMP TABLE turn_why AS
            SELECT turn_id, bad AS why FROM tq WHERE bad IS NOT NULL
            UNION ALL SELECT turn_id, 'turn_without_consent' FROM raw_turns
                WHERE turn_id NOT IN (SELECT turn_id FROM tq);
    """)
    n_fb = db.execute("SELECT count(*) FROM c_feedback").fetchone()[0]
    superseded = n_fb - db.execute("SELECT (SELECT count(*) FROM thumbs) + (SELECT count(*) FROM pw)").fetchone()[0]
    cleared = db.execute("SELECT count(*) FROM thumbs WHERE value = 'cleared'").fetchone()[0]
    ties = db.execute("SELECT count(*) FROM pw WHERE value = 'tie'").fetchone()[0]
    # A rating of a turn curation cannot use, by the turn's reason (a pairwise by its first unusable side).
    unavailable = db.execute("""
        WITH lost AS (
            SELECT turn_id AS t FROM thumbs WHERE value <> 'cleared' AND turn_id NOT IN (SELECT turn_id FROM turns_ok)
            UNION ALL
            SELECT CASE WHEN turn_id NOT IN (SELECT turn_id FROM turns_ok) THEN turn_id ELSE other_turn_id END
            FROM pw WHERE value <> 'tie' AND (turn_id NOT IN (SELECT turn_id FROM turns_ok)
                                              OR other_turn_id NOT IN (SELECT turn_id FROM turns_ok)))
        SELECT coalesce(w.why, 'turn_never_ingested'), count(*) FROM lost l
        LEFT JOIN (SELECT turn_id, any_value(why) AS why FROM turn_why GROUP BY turn_id) w ON w.turn_id = l.t
        GROUP BY 1""").fetchall()
    conflicting = db.execute(
        "SELECT coalesce(sum(ups + downs), 0) FROM turn_rating WHERE ups > 0 AND downs > 0"
    ).fetchone()[0]
    thumbs_used = db.execute(
        "SELECT coalesce(sum(ups + downs), 0) FROM turn_rating WHERE (ups > 0) <> (downs > 0)"
    ).fetchone()[0]
    choices_used = db.execute("""SELECT count(*) FROM pw WHERE value IN ('a', 'b')
        AND turn_id IN (SELECT turn_id FROM turns_ok)
        AND other_turn_id IN (SELECT turn_id FROM turns_ok)""").fetchone()[0]
    n_used = thumbs_used + choices_used
    dropped = {"superseded_by_later_rating": superseded, "cleared": cleared, "tie": ties}
    dropped.update({f"turn_unavailable:{why}": n for why, n in sorted(unavailable)})
    dropped["conflicting_thumbs"] = int(conflicting)
    return StageCount("ratings", n_fb, int(n_used), dropped)


def _turn(r: tuple) -> Turn:
    tid, conv, parent, origin, version, msgs, answer, finish = r
    return Turn(tid, conv, parent, origin or "new", version or "", _messages(msgs), answer, finish or FINISHED)


def _usable(db: duckdb.DuckDBPyConnection) -> Usable:
    cols = "turn_id, conversation_id, parent_turn_id, origin, model_version, messages, answer, finish_reason"
    turns = {r[0]: _turn(r) for r in db.execute(f"SELECT {cols} FROM turns_ok ORDER BY ts, event_id").fetchall()}
    rated = [
        RatedTurn(turns[tid], ups > 0, int(ups + downs))
        for tid, ups, downs in db.execute("""
            SELECT r.turn_id, r.ups, r.downs FROM turn_rating r JOIN turns_ok t USING (turn_id)
            WHERE (r.ups > 0) <> (r.downs > 0) ORDER BY t.ts, t.event_id""").fetchall()
    ]
    choices = [
        Choice(turns[a], turns[b]) if value == "a" else Choice(turns[b], turns[a])
        for a, b, value in db.execute("""
            SELECT turn_id, other_turn_id, value FROM pw WHERE value IN ('a', 'b')
              AND turn_id IN (SELECT turn_id FROM turns_ok) AND other_turn_id IN (SELECT turn_id FROM turns_ok)
            ORDER BY ts, event_id""").fetchall()
    ]
    # A harm report is a safety signal, not training data: honour it whoever sent it.
    harm_reported = {
        tid
        for tid, reason in db.execute(
            "SELECT turn_id, reason FROM raw_feedback WHERE kind = 'thumbs' AND value = 'down' AND reason IS NOT NULL"
        ).fetchall()
        if safety.reason_flags_harm(reason)
    }
    contributors = sorted(
        {
            user_hash(r[0])
            for r in db.execute(
                "SELECT user_id FROM turns_ok UNION SELECT user_id FROM c_feedback "
                "WHERE turn_id IN (SELECT turn_id FROM turns_ok)"
            ).fetchall()
        }
    )
    return Usable(turns, rated, choices, harm_reported, contributors)


def _relational(src: Source, cfg: CurateConfig, filters: list[StageCount]) -> Usable:
    db = duckdb.connect()
    try:
        db.register("raw_turns", src.turns)
        db.register("raw_feedback", src.feedback)
        db.register("raw_actions", src.user_actions)
        filters.append(_consent_stage(db, "turns", "raw_turns"))
        filters.append(_consent_stage(db, "feedback", "raw_feedback"))
        filters.append(_quality_stage(db, cfg))
        filters.append(_ratings_stage(db))
        return _usable(db)
    finally:
        db.close()


# ---------------------------------------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------------------------------------
def user_hash(user_id: str) -> str:
    return hashlib.sha256(f"flywheel-user:{user_id}".encode()).hexdigest()


def split_of(conversation_id: str, cfg: CurateConfig) -> str:
    """Deterministic: the same conversation is always on the same side for a given salt and fraction."""
    h = hashlib.sha256(f"{cfg.split_salt}:{conversation_id}".encode()).digest()
    return "eval" if int.from_bytes(h[:8], "big") / 2**64 < cfg.eval_fraction else "train"


def _messages(raw: str | list) -> list[dict[str, str]]:
    msgs = json.loads(raw) if isinstance(raw, str) else raw
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


# ---------------------------------------------------------------------------------------------------------
# 4-5. Safety and building examples
# ---------------------------------------------------------------------------------------------------------
def _flag_harmful(u: Usable) -> tuple[set[str], int]:
    """Turn ids that must never be positives: reported by a user, or flagged by the classifier."""
    harmful = set(u.harm_reported)
    classified = 0
    candidates = [r.turn for r in u.rated] + [t for c in u.choices for t in (c.chosen, c.rejected)]
    for t in candidates:
        if t.turn_id not in harmful and safety.classify(t.answer).harmful:
            harmful.add(t.turn_id)
            classified += 1
    return harmful, classified


def _sft_kto_rows(u: Usable, harmful: set[str], build: Counter) -> tuple[list[SftRow], list[KtoRow]]:
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
                    "messages": t.messages + _assistant(t.answer),
                    "model_version": t.model_version,
                    "_convs": (t.conversation_id,),
                }
            )
        elif r.liked:
            build["sft_skipped_partial_answer"] += 1
        kto.append(
            {
                "prompt": t.messages,
                "completion": _assistant(t.answer),
                "label": r.liked,
                "model_version": t.model_version,
                "_convs": (t.conversation_id,),
            }
        )
    return sft, kto


def _pair_rows(u: Usable, harmful: set[str], cfg: CurateConfig, build: Counter) -> list[PairRow]:
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
                "chosen": _assistant(chosen.answer),
                "rejected": _assistant(rejected.answer),
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


def _prompt_rows(u: Usable) -> list[PromptRow]:
    """Every usable turn's context, for online RL (train) and held-out evaluation (eval)."""
    return [
        {"prompt": t.messages, "model_version": t.model_version, "_convs": (t.conversation_id,)}
        for t in u.turns.values()
    ]


def _scrub(rows: dict[str, list[dict[str, Any]]], scrubber: PiiScrubber) -> tuple[StageCount, str, dict[str, int]]:
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


def _dedupe_tables(rows: dict[str, list[dict[str, Any]]], cfg: CurateConfig) -> list[StageCount]:
    """Exact and near duplicates per table over canonical text, first occurrence kept (in place)."""
    counts, sketches = [], {}
    for name, table in rows.items():
        res = dedupe(
            [_dedupe_text(r) for r in table], cfg.near_dup_threshold, cfg.minhash_perm, cfg.shingle_words, sketches
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


def _split_tables(
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


# ---------------------------------------------------------------------------------------------------------
# The whole curation
# ---------------------------------------------------------------------------------------------------------
def curate(
    src: Source, cfg: CurateConfig | None = None, scrubber: PiiScrubber | None = None, progress: Progress | None = None
) -> Curated:
    cfg = cfg or CurateConfig()
    scrubber = scrubber or PiiScrubber(cfg)
    say = progress or (lambda msg: log.info(msg))
    filters: list[StageCount] = []

    usable = _relational(src, cfg, filters)
    for f in filters:
        say(f"{f.stage}: {f.rows_in} -> {f.rows_out} {f.dropped}")

    harmful, classified = _flag_harmful(usable)
    say(f"safety: {len(harmful)} answers flagged ({classified} by classifier, {len(usable.harm_reported)} reported)")

    build: Counter = Counter()
    sft, kto = _sft_kto_rows(usable, harmful, build)
    rows: dict[str, list[dict[str, Any]]] = {
        "sft": sft,
        "kto": kto,
        "pairs": _pair_rows(usable, harmful, cfg, build),
        "prompts": _prompt_rows(usable),
    }
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

    pii, engine, pii_stats = _scrub(rows, scrubber)
    filters.append(pii)
    say(f"pii ({engine}): {pii.rows_in} distinct texts, {pii.dropped['texts_redacted']} redacted")

    for f in _dedupe_tables(rows, cfg):
        filters.append(f)
        say(f"{f.stage}: {f.rows_in} -> {f.rows_out} {f.dropped}")

    tables, split_counts = _split_tables(rows, cfg)
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


def _dedupe_text(row: dict[str, Any]) -> str:
    parts = []
    for col in ("messages", "prompt", "chosen", "completion", "rejected"):
        if col in row:
            parts.extend(f"{m['role']}: {m['content']}" for m in row[col])
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------
# Lineage
# ---------------------------------------------------------------------------------------------------------
def source_info(src: Source) -> dict[str, Any]:
    """Where the snapshot came from: row counts, ts range, event-id digest and Kafka offset ranges per table."""
    info: dict[str, Any] = {"read_at": src.read_at.isoformat()}
    for name, table in (("turns", src.turns), ("feedback", src.feedback), ("user_actions", src.user_actions)):
        d: dict[str, Any] = {"rows": table.num_rows}
        if table.num_rows:
            ids = sorted(table.column("event_id").to_pylist())
            d["event_ids_sha256"] = hashlib.sha256("\n".join(ids).encode()).hexdigest()
            d["event_id_min"], d["event_id_max"] = ids[0], ids[-1]
            ts = [t for t in table.column("ts").to_pylist() if t is not None]
            if ts:
                d["ts_min"], d["ts_max"] = min(ts).isoformat(), max(ts).isoformat()
            if "kafka_partition" in table.column_names:
                ranges: dict[str, list[int]] = {}
                for p, o in zip(
                    table.column("kafka_partition").to_pylist(), table.column("kafka_offset").to_pylist(), strict=True
                ):
                    if p is None or o is None:
                        continue
                    lo_hi = ranges.setdefault(str(p), [o, o])
                    lo_hi[0], lo_hi[1] = min(lo_hi[0], o), max(lo_hi[1], o)
                d["kafka_offsets"] = dict(sorted(ranges.items()))
                d["rows_without_kafka_position"] = sum(
                    1 for p in table.column("kafka_partition").to_pylist() if p is None
                )
        info[name] = d
    if src.offsets.num_rows:
        info["consumer_offsets"] = [
            {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in r.items()}
            for r in src.offsets.to_pylist()
        ]
    return info


def watermark_of(src: Source) -> dict[str, Any]:
    """Feedback seen by this curation: next offset per partition, and the latest ingest time of rows that have
    no Kafka position (seeded directly). The volume trigger counts ratings past this mark."""
    nxt: dict[str, int] = {}
    latest = None
    fb = src.feedback
    if fb.num_rows:
        for p, o, ing in zip(
            fb.column("kafka_partition").to_pylist(),
            fb.column("kafka_offset").to_pylist(),
            fb.column("ingested_at").to_pylist(),
            strict=True,
        ):
            if p is not None and o is not None:
                nxt[str(p)] = max(nxt.get(str(p), 0), o + 1)
            elif ing is not None and (latest is None or ing > latest):
                latest = ing
    return {
        "feedback_next_offsets": dict(sorted(nxt.items())),
        "feedback_unpositioned_ingested_at": latest.isoformat() if latest else None,
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

"""Warehouse -> one dataset snapshot with every training set the recipes need, in TRL's own formats.

Plain functions, testable without Prefect; ``pipelines.flows`` wraps them in tasks. Stages, in order, each
counted in the manifest (rows in, rows out, dropped by reason):

1. consent: drop every row of users who asked for deletion (even later events), of users whose latest consent
   action is a revocation, and rows whose own ``consent`` flag is false;
2. quality: drop empty, truncated (``finish_reason`` other than ``stop``) and over-long turns;
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
``prompt``/``chosen``/``rejected``; prompts ``prompt``. Each message is ``{"role", "content"}``.
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
from typing import Any

import duckdb
import pyarrow as pa

from feedback.warehouse import connect
from pipelines import safety
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
    "sft": pa.schema([("messages", _MSGS)]),
    "kto": pa.schema([("prompt", _MSGS), ("completion", _MSGS), ("label", pa.bool_())]),
    "pairs": pa.schema([("prompt", _MSGS), ("chosen", _MSGS), ("rejected", _MSGS)]),
    "prompts": pa.schema([("prompt", _MSGS)]),
    "eval_prompts": pa.schema([("prompt", _MSGS)]),
}

_TURN_COLS = (
    "event_id, ts, user_id, consent, conversation_id, turn_id, parent_turn_id, origin, messages, answer, "
    "finish_reason, kafka_partition, kafka_offset, ingested_at"
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
# Result containers
# ---------------------------------------------------------------------------------------------------------
@dataclass
class StageCount:
    stage: str
    rows_in: int
    rows_out: int
    dropped: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "in": self.rows_in, "out": self.rows_out, "dropped": dict(self.dropped)}


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

    def counts(self) -> dict[str, dict[str, int]]:
        return {t: {s: len(rows) for s, rows in splits.items()} for t, splits in self.tables.items()}


# ---------------------------------------------------------------------------------------------------------
# 1-3. Relational stages in an in-memory DuckDB over the Arrow copy.
# ---------------------------------------------------------------------------------------------------------
def _relational(src: Source, cfg: CurateConfig, filters: list[StageCount]) -> tuple[list[dict], dict[str, Any]]:
    db = duckdb.connect()
    try:
        db.register("raw_turns", src.turns)
        db.register("raw_feedback", src.feedback)
        db.register("raw_actions", src.user_actions)
        db.execute("""
            CREATE TEMP TABLE deleted AS SELECT DISTINCT user_id FROM raw_actions WHERE action = 'delete_request';
            CREATE TEMP TABLE revoked AS SELECT user_id FROM (
                SELECT user_id, action,
                       row_number() OVER (PARTITION BY user_id ORDER BY ts DESC, event_id DESC) AS rn
                FROM raw_actions WHERE action IN ('consent_granted', 'consent_revoked')) WHERE rn = 1
                AND action = 'consent_revoked';
        """)

        def consent_stage(name: str, raw: str) -> None:
            n_in, n_del, n_rev, n_flag = db.execute(f"""
                SELECT count(*),
                       count(*) FILTER (WHERE user_id IN (SELECT user_id FROM deleted)),
                       count(*) FILTER (WHERE user_id NOT IN (SELECT user_id FROM deleted)
                                         AND user_id IN (SELECT user_id FROM revoked)),
                       count(*) FILTER (WHERE user_id NOT IN (SELECT user_id FROM deleted)
                                         AND user_id NOT IN (SELECT user_id FROM revoked)
                                         AND NOT coalesce(consent, false))
                FROM {raw}""").fetchone()
            db.execute(f"""CREATE TEMP TABLE c_{name} AS SELECT * FROM {raw}
                WHERE coalesce(consent, false)
                  AND user_id NOT IN (SELECT user_id FROM deleted)
                  AND user_id NOT IN (SELECT user_id FROM revoked)""")
            out = db.execute(f"SELECT count(*) FROM c_{name}").fetchone()[0]
            filters.append(
                StageCount(
                    f"consent:{name}",
                    n_in,
                    out,
                    {"deleted_user": n_del, "consent_revoked": n_rev, "no_consent_flag": n_flag},
                )
            )

        consent_stage("turns", "raw_turns")
        consent_stage("feedback", "raw_feedback")

        # Quality: one row per turn_id (latest), then empty / truncated / over-long.
        db.execute(f"""
            CREATE TEMP TABLE t1 AS SELECT * EXCLUDE (rn) FROM (
                SELECT *, row_number() OVER (PARTITION BY turn_id ORDER BY ts DESC, event_id DESC) AS rn
                FROM c_turns) WHERE rn = 1;
            CREATE TEMP TABLE tq AS SELECT *,
                CASE
                  WHEN length(trim(coalesce(answer, ''))) < {cfg.min_answer_chars}
                    OR length(trim(coalesce(json_extract_string(messages, '$[-1].content'), ''))) = 0 THEN 'empty'
                  WHEN coalesce(finish_reason, 'stop') <> 'stop' THEN 'truncated'
                  WHEN length(answer) > {cfg.max_answer_chars} THEN 'over_long_answer'
                  WHEN length(CAST(messages AS VARCHAR)) > {cfg.max_prompt_chars} THEN 'over_long_prompt'
                  ELSE NULL END AS bad
            FROM t1;
        """)
        n_c = db.execute("SELECT count(*) FROM c_turns").fetchone()[0]
        bad = dict(db.execute("SELECT bad, count(*) FROM tq WHERE bad IS NOT NULL GROUP BY bad").fetchall())
        n_t1 = db.execute("SELECT count(*) FROM t1").fetchone()[0]
        if n_c - n_t1:
            bad["duplicate_turn_id"] = n_c - n_t1
        db.execute("CREATE TEMP TABLE turns_ok AS SELECT * EXCLUDE (bad) FROM tq WHERE bad IS NULL")
        n_ok = db.execute("SELECT count(*) FROM turns_ok").fetchone()[0]
        filters.append(StageCount("quality:turns", n_c, n_ok, bad))

        # Ratings: latest thumbs per (rater, turn); pairwise latest per (rater, A, B).
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
        """)
        n_fb = db.execute("SELECT count(*) FROM c_feedback").fetchone()[0]
        superseded = n_fb - db.execute("SELECT (SELECT count(*) FROM thumbs) + (SELECT count(*) FROM pw)").fetchone()[0]
        cleared = db.execute("SELECT count(*) FROM thumbs WHERE value = 'cleared'").fetchone()[0]
        ties = db.execute("SELECT count(*) FROM pw WHERE value = 'tie'").fetchone()[0]
        no_turn = db.execute("""SELECT
              (SELECT count(*) FROM thumbs WHERE value <> 'cleared' AND turn_id NOT IN (SELECT turn_id FROM turns_ok))
            + (SELECT count(*) FROM pw WHERE value <> 'tie' AND (turn_id NOT IN (SELECT turn_id FROM turns_ok)
                 OR other_turn_id NOT IN (SELECT turn_id FROM turns_ok)))""").fetchone()[0]
        conflicting = db.execute(
            "SELECT coalesce(sum(ups + downs), 0) FROM turn_rating WHERE ups > 0 AND downs > 0"
        ).fetchone()[0]
        rated = db.execute("""
            SELECT t.turn_id, t.conversation_id, t.parent_turn_id, t.origin, t.messages, t.answer,
                   CASE WHEN r.ups > 0 THEN 'up' ELSE 'down' END AS label, t.ts, t.event_id
            FROM turns_ok t JOIN turn_rating r USING (turn_id)
            WHERE (r.ups > 0) <> (r.downs > 0)
            ORDER BY t.ts, t.event_id""").fetchall()
        pairwise = db.execute("""
            SELECT p.turn_id, p.other_turn_id, p.value, p.ts, p.event_id FROM pw p
            WHERE p.value IN ('a', 'b') AND p.turn_id IN (SELECT turn_id FROM turns_ok)
              AND p.other_turn_id IN (SELECT turn_id FROM turns_ok)
            ORDER BY p.ts, p.event_id""").fetchall()
        n_used = db.execute(
            "SELECT coalesce(sum(ups + downs), 0) FROM turn_rating WHERE (ups > 0) <> (downs > 0)"
        ).fetchone()[0] + len(pairwise)
        filters.append(
            StageCount(
                "ratings",
                n_fb,
                int(n_used),
                {
                    "superseded_by_later_rating": superseded,
                    "cleared": cleared,
                    "tie": ties,
                    "turn_unavailable": no_turn,
                    "conflicting_thumbs": int(conflicting),
                },
            )
        )

        # A harm report is a safety signal, not training data: honour it whoever sent it.
        harm_reported = {
            r[0]
            for r in db.execute(
                "SELECT turn_id, reason FROM raw_feedback "
                "WHERE kind = 'thumbs' AND value = 'down' AND reason IS NOT NULL"
            ).fetchall()
            if safety.reason_flags_harm(r[1])
        }
        # Turns needed for pairwise and prompts (rated or not).
        all_ok = db.execute("""SELECT turn_id, conversation_id, messages, answer, ts, event_id FROM turns_ok
                               ORDER BY ts, event_id""").fetchall()
        meta: dict[str, Any] = {"harm_reported": harm_reported}
        meta["contributors"] = sorted(
            {
                user_hash(r[0])
                for r in db.execute(
                    "SELECT user_id FROM turns_ok UNION SELECT user_id FROM c_feedback "
                    "WHERE turn_id IN (SELECT turn_id FROM turns_ok)"
                ).fetchall()
            }
        )
    finally:
        db.close()
    cols = ("turn_id", "conversation_id", "parent_turn_id", "origin", "messages", "answer", "label", "ts", "event_id")
    rated_rows = [dict(zip(cols, r, strict=True)) for r in rated]
    meta["pairwise"] = pairwise
    meta["all_ok"] = {
        r[0]: {"turn_id": r[0], "conversation_id": r[1], "messages": r[2], "answer": r[3]} for r in all_ok
    }
    return rated_rows, meta


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
# The whole curation
# ---------------------------------------------------------------------------------------------------------
def curate(
    src: Source, cfg: CurateConfig | None = None, scrubber: PiiScrubber | None = None, progress: Progress | None = None
) -> Curated:
    cfg = cfg or CurateConfig()
    scrubber = scrubber or PiiScrubber(cfg)
    say = progress or (lambda msg: log.info(msg))
    filters: list[StageCount] = []

    rated, meta = _relational(src, cfg, filters)
    for f in filters:
        say(f"{f.stage}: {f.rows_in} -> {f.rows_out} {f.dropped}")
    all_ok: dict[str, dict] = meta["all_ok"]

    # 4. Safety
    harmful: set[str] = set(meta["harm_reported"])
    classified = 0
    for r in rated:
        if safety.classify(r["answer"]).harmful:
            harmful.add(r["turn_id"])
            classified += 1
    for a, b, *_ in meta["pairwise"]:
        for tid in (a, b):
            if tid not in harmful and safety.classify(all_ok[tid]["answer"]).harmful:
                harmful.add(tid)
                classified += 1
    say(
        f"safety: {len(harmful)} answers flagged ({classified} by classifier, "
        f"{len(meta['harm_reported'])} by user reports)"
    )

    # 5. Build examples (raw text; scrubbed below). Each row keeps its conversations for the split.
    rows: dict[str, list[dict[str, Any]]] = {t: [] for t in LAYOUT}
    build = Counter()
    for r in rated:
        prompt = _messages(r["messages"])
        conv = r["conversation_id"]
        if r["label"] == "up":
            if r["turn_id"] in harmful:
                build["harmful_positive_dropped"] += 1
                continue
            rows["sft"].append({"messages": prompt + _assistant(r["answer"]), "_convs": (conv,)})
        rows["kto"].append(
            {"prompt": prompt, "completion": _assistant(r["answer"]), "label": r["label"] == "up", "_convs": (conv,)}
        )

    seen_pairs: set[tuple[str, str]] = set()

    def add_pair(chosen: dict, rejected: dict, source: str) -> None:
        key = (chosen["turn_id"], rejected["turn_id"])
        if key in seen_pairs or key[::-1] in seen_pairs:
            return
        if chosen["turn_id"] in harmful:
            build[f"pairs_{source}_harmful_chosen_dropped"] += 1
            return
        seen_pairs.add(key)
        build[f"pairs_{source}"] += 1
        rows["pairs"].append(
            {
                "prompt": _messages(chosen["messages"]),
                "chosen": _assistant(chosen["answer"]),
                "rejected": _assistant(rejected["answer"]),
                "_convs": (chosen["conversation_id"], rejected["conversation_id"]),
            }
        )

    for a, b, value, *_ in meta["pairwise"]:
        ta, tb = all_ok[a], all_ok[b]
        add_pair(ta, tb, "explicit") if value == "a" else add_pair(tb, ta, "explicit")

    by_id = {r["turn_id"]: r for r in rated}
    for r in rated:
        p = by_id.get(r["parent_turn_id"] or "")
        if r["origin"] == "regenerate" and p is not None and p["label"] != r["label"]:
            add_pair(r, p, "regeneration") if r["label"] == "up" else add_pair(p, r, "regeneration")

    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for r in rated:
        by_prompt[json.dumps(_messages(r["messages"]), sort_keys=True)].append(r)
    for group in by_prompt.values():
        liked = [r for r in group if r["label"] == "up"]
        disliked = [r for r in group if r["label"] == "down"]
        made = 0
        for c in liked:
            for d in disliked:
                if made >= cfg.max_pairs_per_prompt:
                    break
                before = len(rows["pairs"])
                add_pair(c, d, "same_prompt")
                made += len(rows["pairs"]) - before

    # Prompts: every usable turn's context, for RL (train) and held-out evaluation (eval).
    for t in all_ok.values():
        rows["prompts"].append({"prompt": _messages(t["messages"]), "_convs": (t["conversation_id"],)})
    say(
        f"build: sft={len(rows['sft'])} kto={len(rows['kto'])} pairs={len(rows['pairs'])} "
        f"prompts={len(rows['prompts'])} {dict(build)}"
    )
    filters.append(
        StageCount(
            "safety",
            len(rated),
            len(rated) - build["harmful_positive_dropped"],
            {k: v for k, v in build.items() if "harmful" in k},
        )
    )

    # PII: scrub every distinct text once.
    texts: list[str] = []
    for table in rows.values():
        for row in table:
            for val in row.values():
                if isinstance(val, list):
                    texts.extend(m["content"] for m in val)
    n_texts = len(set(texts))
    clean = scrubber.scrub_many(texts)
    changed = 0
    for table in rows.values():
        for row in table:
            for col, val in row.items():
                if isinstance(val, list):  # new dicts: rows may share message objects
                    row[col] = [{"role": m["role"], "content": clean[m["content"]]} for m in val]
                    changed += sum(m["content"] != n["content"] for m, n in zip(val, row[col], strict=True))
    engine = scrubber.engine_id or scrubber.describe()
    pii_stats = dict(scrubber.stats)
    filters.append(StageCount("pii", n_texts, n_texts, {}))
    filters[-1].dropped = {
        "texts_scanned_by_presidio": pii_stats.get("candidates", 0),
        "texts_redacted": pii_stats.get("changed", 0),
        "messages_redacted": changed,
    }
    say(
        f"pii ({engine}): {n_texts} distinct texts, {pii_stats.get('candidates', 0)} scanned, "
        f"{pii_stats.get('changed', 0)} redacted"
    )

    # 6. Dedupe per table over canonical text, first occurrence kept.
    sketches: dict = {}
    for name, table in rows.items():
        keys = [_dedupe_text(r) for r in table]
        res = dedupe(keys, cfg.near_dup_threshold, cfg.minhash_perm, cfg.shingle_words, sketches)
        rows[name] = [r for r, k in zip(table, res.keep, strict=True) if k]
        filters.append(
            StageCount(
                f"dedupe:{name}",
                len(table),
                len(rows[name]),
                {"exact_duplicate": res.exact, "near_duplicate": res.near},
            )
        )
        say(f"dedupe:{name}: {len(table)} -> {len(rows[name])} (exact {res.exact}, near {res.near})")

    # 7. Split by conversation.
    tables: dict[str, dict[str, list[dict[str, Any]]]] = {t: {s: [] for s in splits} for t, splits in LAYOUT.items()}
    for name, table in rows.items():
        dropped = 0
        for r in table:
            sides = {split_of(c, cfg) for c in r.pop("_convs")}
            if len(sides) > 1:
                dropped += 1
                continue
            side = sides.pop()
            target = "eval_prompts" if name == "prompts" and side == "eval" else name
            tables[target][side].append(r)
        if name != "eval_prompts":
            n_out = sum(len(v) for v in tables[name].values()) + (
                len(tables["eval_prompts"]["eval"]) if name == "prompts" else 0
            )
            filters.append(StageCount(f"split:{name}", len(table), n_out, {"cross_split_pair": dropped}))
    say("split: " + ", ".join(f"{t}/{s}={len(r)}" for t, sp in tables.items() for s, r in sp.items()))

    return Curated(
        tables=tables,
        filters=filters,
        source=source_info(src),
        watermark=watermark_of(src),
        config=cfg.content_dict(),
        pii_engine=engine,
        pii_stats=pii_stats,
        contributors=meta["contributors"],
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

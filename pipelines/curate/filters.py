"""Stages 1-3: which turns and ratings curation may learn from (consent, quality, ratings), in SQL.

Its own idea because these stages are relational -- latest-wins per key, joins between ratings and the turns
they rate, every loss counted by reason -- and run in one in-memory DuckDB over the Arrow copy of the warehouse;
what they leave is a ``Usable``: typed turns, unambiguous thumbs, explicit A/B choices, harm reports and the
hashed contributors. Nothing after this stage sees SQL or a user id.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

import duckdb

from pipelines import consent, safety
from pipelines.config import CurateConfig
from pipelines.curate.judgments import Judged
from pipelines.curate.rows import FINISHED, Choice, RatedTurn, StageCount, Turn, Usable
from pipelines.curate.source import Source


def consent_stage(db: duckdb.DuckDBPyConnection, name: str, raw: str) -> StageCount:
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


def quality_stage(db: duckdb.DuckDBPyConnection, cfg: CurateConfig) -> StageCount:
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


def ratings_stage(db: duckdb.DuckDBPyConnection) -> StageCount:
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


def turn_from_row(r: tuple) -> Turn:
    tid, conv, parent, origin, version, msgs, answer, finish = r
    return Turn(tid, conv, parent, origin or "new", version or "", messages_of(msgs), answer, finish or FINISHED)


def messages_of(raw: str | list) -> list[dict[str, str]]:
    msgs = json.loads(raw) if isinstance(raw, str) else raw
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def usable_from(db: duckdb.DuckDBPyConnection) -> Usable:
    cols = "turn_id, conversation_id, parent_turn_id, origin, model_version, messages, answer, finish_reason"
    turns = {
        r[0]: turn_from_row(r) for r in db.execute(f"SELECT {cols} FROM turns_ok ORDER BY ts, event_id").fetchall()
    }
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


def judgments_stage(db: duckdb.DuckDBPyConnection) -> tuple[StageCount, list[Judged], list[str]]:
    """Judgments the annotator consented to (``consent_stage``) of conversations whose owner neither revoked
    consent nor asked for deletion (a pool prompt has no owner); the latest judgment per (annotator, task) wins."""
    judged = consent_stage(db, "judgments", "raw_judgments")
    deleted, revoked = consent.deleted_users("raw_actions"), consent.revoked_users("raw_actions")
    n_del, n_rev = db.execute(f"""
        SELECT count(*) FILTER (WHERE subject_user_id IN ({deleted})),
               count(*) FILTER (WHERE subject_user_id NOT IN ({deleted}) AND subject_user_id IN ({revoked}))
        FROM c_judgments""").fetchone()
    rows = db.execute(f"""
        SELECT * EXCLUDE (rn) FROM (
            SELECT *, row_number() OVER (PARTITION BY user_id, task_id ORDER BY ts DESC, event_id DESC) AS rn
            FROM c_judgments WHERE subject_user_id IS NULL
                OR (subject_user_id NOT IN ({deleted}) AND subject_user_id NOT IN ({revoked})))
        WHERE rn = 1 ORDER BY ts, event_id""").fetchall()
    cols = [d[0] for d in db.description]
    out = [Judged.from_row(dict(zip(cols, r, strict=True)), user_hash(r[cols.index("user_id")])) for r in rows]
    subjects = [r[cols.index("subject_user_id")] for r in rows]
    contributors = sorted({j.judge_hash for j in out} | {user_hash(u) for u in subjects if u})
    edited = judged.rows_out - n_del - n_rev - len(out)  # replaced by the same annotator's later judgment
    dropped = dict(judged.dropped) | {"subject_deleted": n_del, "subject_consent_revoked": n_rev, "edited": edited}
    return StageCount("consent:judgments", judged.rows_in, len(out), dropped), out, contributors


# Red-teamers' findings -> the snapshot's ``redteam`` table (issue 18): its train split grows the recipes' safety
# mix (``training/safety.py``), its eval split the gate's red-team suite (``training/evaluate.py``). A finding's side
# is its conversation's (``split_of``), like every other row, so the same finding is never in both, and the
# safe-response demonstration written for it lands on the same side.
#
# A row's safe response is the red-teamer's own, else the latest one a trainer wrote in the finding's safe-response
# task (``app/annotation/workspace.py`` queues ``safe-<finding>``), else empty: an eval prompt needs none, the
# safety mix skips it. Every finding counts for evaluation, refused ones too: a prompt the model must keep refusing.
def _assistant(text: str | None) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}] if text and text.strip() else []


def findings_stage(db: duckdb.DuckDBPyConnection, build: Counter) -> tuple[StageCount, list[dict[str, Any]], list[str]]:
    """Consented findings of red-teamers who are not deleted, as ``redteam`` rows; and their authors' hashes."""
    stage = consent_stage(db, "findings", "raw_findings")
    written = {
        task: text
        for task, text in db.execute(
            """SELECT task_id, rewrite FROM (SELECT task_id, rewrite, row_number() OVER (PARTITION BY task_id
               ORDER BY ts DESC, event_id DESC) AS rn FROM c_judgments WHERE task_id LIKE 'safe-%'
               AND rewrite IS NOT NULL) WHERE rn = 1"""
        ).fetchall()
    }
    rows, authors = [], set()
    cur = db.execute(
        "SELECT user_id, finding_id, conversation_id, model_version, messages, answer, harm_category, attack_type, "
        "success, safe_response FROM c_findings ORDER BY ts, event_id"
    )
    for user, fid, conv, version, messages, answer, harm, attack, success, safe in cur.fetchall():
        safe = safe or written.get(f"safe-{fid[:12]}")
        build["redteam_with_safe_response" if safe else "redteam_without_safe_response"] += 1
        authors.add(user_hash(user))
        rows.append(
            {
                "prompt": messages_of(messages),
                "safe_response": _assistant(safe),
                "attacked_answer": _assistant(answer),
                "harm_category": harm,
                "attack_type": attack,
                "success": int(success),
                "finding_id": fid,
                "model_version": version,
                "source": "red_team",
                "judge": user_hash(user),
                "weight": 1.0,
                "_convs": (conv,),
            }
        )
    return stage, rows, sorted(authors)


def select_usable(src: Source, cfg: CurateConfig, filters: list[StageCount]) -> Usable:
    db = duckdb.connect()
    try:
        db.register("raw_turns", src.turns)
        db.register("raw_feedback", src.feedback)
        db.register("raw_actions", src.user_actions)
        db.register("raw_judgments", src.judgments)
        db.register("raw_findings", src.findings)
        filters.append(consent_stage(db, "turns", "raw_turns"))
        filters.append(consent_stage(db, "feedback", "raw_feedback"))
        stage, judged, judges = judgments_stage(db)
        filters.append(stage)
        filters.append(quality_stage(db, cfg))
        filters.append(ratings_stage(db))
        usable = usable_from(db)
        usable.judged = judged
        found, usable.findings, red_teamers = findings_stage(db, Counter())
        filters.append(found)
        usable.contributors = sorted(set(usable.contributors) | set(judges) | set(red_teamers))
        return usable
    finally:
        db.close()


def user_hash(user_id: str) -> str:
    return hashlib.sha256(f"flywheel-user:{user_id}".encode()).hexdigest()

"""The human half's figures in one place (issue 18): queue depth and throughput (the task queue), agreement per axis
and for rankings, agreement by day, and each annotator's judgments, gold accuracy and trust (the warehouse's
``judgments`` table). ``flywheel roles report`` prints it; the ops page plots it."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from feedback.settings import Settings
from feedback.warehouse import connect
from pipelines.agreement import agreement, trust_scores

COLUMNS = "event_id, ts, user_id, task_id, conversation_id, role, answers, all_bad"


def judgment_rows(settings: Settings) -> list[dict[str, Any]]:
    """Every annotator's latest judgment of each task (an edit replaces the one before)."""
    if not settings.warehouse_path.exists():
        return []
    with connect(settings.warehouse_path, read_only=True) as con:
        have = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if "judgments" not in have:
            return []
        cur = con.execute(
            f"""SELECT {COLUMNS} FROM (SELECT *, row_number() OVER (PARTITION BY user_id, task_id
                ORDER BY ts DESC, event_id DESC) AS rn FROM judgments) WHERE rn = 1 ORDER BY ts"""
        )
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def annotation_report(settings: Settings, queue: Any, leaderboard: set[str] | None = None) -> dict[str, Any]:
    """``leaderboard``: the annotators who did not opt out (None: everyone)."""
    rows = judgment_rows(settings)
    trust = trust_scores(rows, queue.gold())
    by_day: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_day[str(r["ts"])[:10]].append(r)
    per_annotator = defaultdict(int)
    for r in rows:
        per_annotator[r["user_id"]] += 1
    people = [
        {
            "annotator": name,
            "judgments": per_annotator[name],
            "gold_tasks": t.gold_tasks,
            "gold_right": t.gold_right,
            "gold_accuracy": t.accuracy,
            "trust": round(t.score, 3),
        }
        for name, t in sorted(trust.items(), key=lambda kv: (-kv[1].score, kv[0]))
        if leaderboard is None or name in leaderboard
    ]
    return {
        "queue_depth": queue.depth(),
        "throughput_1h": queue.throughput(3600),
        "judgments": len(rows),
        "agreement": agreement(rows),
        "agreement_by_day": {day: agreement(day_rows)["alpha_ranking"] for day, day_rows in sorted(by_day.items())},
        "annotators": people,
    }

"""The human half's figures in one place (issue 18): queue depth and throughput (the task queue), agreement per axis
and for rankings, agreement by day, and each annotator's judgments, gold accuracy and trust (the warehouse's
``judgments`` table). ``flywheel roles report`` prints it; each curation writes it to ``<home>/annotation/
report.json`` (``write_report``), which the ops page plots (the app never imports this package).

The gold answers come from the app's queue file, read-only (``gold_answers``): the queue knows which answer of a
gold task is right; the warehouse's judgments only say a task was gold."""

from __future__ import annotations

import json
import os
import sqlite3
from collections import defaultdict
from pathlib import Path
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


def report_path(settings: Settings) -> Path:
    return settings.home / "annotation" / "report.json"


def gold_answers(settings: Settings) -> dict[str, str]:
    """task_id -> the gold answer id, from the app's ``annotation.sqlite`` (read-only; empty when there is none)."""
    path = settings.home / "app" / "annotation.sqlite"
    if not path.exists():
        return {}
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return dict(con.execute("SELECT task_id, gold_answer_id FROM tasks WHERE gold_answer_id IS NOT NULL"))
    except sqlite3.OperationalError:  # a queue file without its tables yet
        return {}
    finally:
        con.close()


def write_report(settings: Settings) -> dict[str, Any] | None:
    """The report without the live queue figures, written atomically for the ops page; None when nobody judged."""
    out = annotation_report(settings, gold_answers(settings))
    if not out["judgments"]:
        return None
    path = report_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(out, default=str))
    os.replace(tmp, path)
    return out


def annotation_report(
    settings: Settings,
    gold: dict[str, str],
    depth: dict[str, int] | None = None,
    throughput: dict[str, int] | None = None,
    leaderboard: set[str] | None = None,
) -> dict[str, Any]:
    """``gold``: task -> gold answer id; ``depth`` and ``throughput``: the queue's live figures (None: not known
    here); ``leaderboard``: the annotators who did not opt out (None: everyone)."""
    rows = judgment_rows(settings)
    trust = trust_scores(rows, gold)
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
        "queue_depth": depth,
        "throughput_1h": throughput,
        "judgments": len(rows),
        "agreement": agreement(rows),
        "agreement_by_day": {day: agreement(day_rows)["alpha_ranking"] for day, day_rows in sorted(by_day.items())},
        "annotators": people,
    }

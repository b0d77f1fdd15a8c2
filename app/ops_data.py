"""What the ops dashboard (``app/dashboard.py``) shows, read from what the pipelines wrote, and turned into rows.

The app must not import ``pipelines/`` or ``training/``, so these functions read their files and tables:
``releases/log.jsonl``, ``latest_analysis.json`` and the autopilot's ``autopilot.json``, snapshot manifests and
Parquet files, ``lineage.json`` beside each version's weights, and the warehouse (through
``feedback.warehouse.connect``, which takes turns with the ingest writer). A torn last line while a writer
appends is skipped, never an error.

The one write is ``approve_candidate``: an operator's approval as a JSON line in ``releases/approvals.jsonl``, in
the format ``pipelines.release_queue.Approval`` reads (``version``, ``actor``, ``at``, ``reason``), and only for a
version the autopilot's latest look lists as waiting.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from typing import Any

import pyarrow.parquet as pq
from scipy import stats

from feedback.settings import Settings
from feedback.warehouse import WarehouseBusy, connect

log = logging.getLogger(__name__)
SAMPLE_ROWS = 5


# ---------------------------------------------------------------------------------------------------------
# Reading what the pipelines wrote
# ---------------------------------------------------------------------------------------------------------
def wilson(k: int, n: int) -> tuple[float | None, float | None, float | None]:
    if n <= 0:
        return None, None, None
    ci = stats.binomtest(int(k), int(n)).proportion_ci(0.95, method="wilson")
    return k / n, float(ci.low), float(ci.high)


def release_records(settings: Settings) -> list[dict[str, Any]]:
    path = settings.home / "releases" / "log.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a torn last line while the controller writes
    return out


def latest_analysis(settings: Settings) -> dict[str, Any] | None:
    path = settings.home / "releases" / "latest_analysis.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def autopilot_status(settings: Settings) -> dict[str, Any] | None:
    """The release autopilot's latest look (``pipelines.autopilot``): policy, release, waiting and held."""
    try:
        return json.loads((settings.home / "releases" / "autopilot.json").read_text())
    except (OSError, ValueError):
        return None


def approvals(settings: Settings) -> dict[str, dict[str, Any]]:
    """The first approval of each version, from ``releases/approvals.jsonl`` (torn lines skipped)."""
    out: dict[str, dict[str, Any]] = {}
    try:
        lines = (settings.home / "releases" / "approvals.jsonl").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            a = json.loads(line)
            out.setdefault(str(a["version"]), a)
        except (ValueError, KeyError, TypeError):
            continue
    return out


def waiting_rows(status: dict[str, Any] | None, approved: dict[str, dict[str, Any]]) -> list[list[Any]]:
    if not status:
        return []
    rows = []
    for c in status.get("waiting", []):
        a = c.get("approval") or approved.get(c["version"])
        rows.append(
            [
                c["version"],
                c.get("recipe"),
                c.get("snapshot_id"),
                (c.get("created_at") or "")[:19],
                "; ".join(c.get("gate_reasons") or []),
                f"approved by {a['actor']}" if a else ("needs approval" if status.get("policy") == "approve" else "-"),
            ]
        )
    rows += [[h["version"], "", "", "", f"held: {h['why']}", "never released"] for h in status.get("held", [])]
    return rows


def approve_candidate(settings: Settings, version: str | None, user: str | None) -> str:
    """An operator's approval from this page: one JSON line for the autopilot; a sentence saying what happened."""
    if not user:
        return "Refused: approvals need an operator logged in with the admin token."
    status = autopilot_status(settings)
    if status is None:
        return "Nothing to approve yet: the release autopilot has not looked (is `flywheel up` running?)."
    waiting = {c["version"]: c for c in status.get("waiting", [])}
    if not version or version not in waiting:
        return f"{version or 'Nothing'} is not waiting for release: choose a candidate from the list."
    if done := (waiting[version].get("approval") or approvals(settings).get(version)):
        return f"{version} was already approved by {done['actor']}."
    line = json.dumps(
        {
            "version": version,
            "actor": f"operator:{user}@ops",
            "at": datetime.now(UTC).isoformat(),
            "reason": "approved on the ops page",
        }
    )
    path = settings.home / "releases" / "approvals.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return f"Approved {version}: the autopilot starts its canary at its next look, when no other release runs."


def thumbs_series(settings: Settings, bucket_s: int = 300) -> list[dict[str, Any]]:
    """Thumbs-up rate per version per time bucket (latest thumbs per rater and answer; cleared = unrated)."""
    if not settings.warehouse_path.exists():
        return []
    try:
        with connect(settings.warehouse_path, read_only=True, timeout_s=10) as con:
            have = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
            if "feedback" not in have:
                return []
            rows = con.execute(f"""
                WITH latest AS (SELECT * EXCLUDE (rn) FROM (
                    SELECT *, row_number() OVER (PARTITION BY user_id, turn_id ORDER BY ts DESC, event_id DESC) AS rn
                    FROM feedback WHERE kind = 'thumbs') WHERE rn = 1)
                SELECT time_bucket(INTERVAL '{int(bucket_s)} seconds', ts) AS b, model_version,
                       count(*) FILTER (WHERE value = 'up'), count(*)
                FROM latest WHERE value IN ('up', 'down') GROUP BY ALL ORDER BY b, model_version""").fetchall()
    except (WarehouseBusy, OSError) as e:
        log.warning("dashboard: warehouse unavailable: %s", e)
        return []
    return [
        {"time": b, "version": v, "up": k, "n": n, **dict(zip(("rate", "lo", "hi"), wilson(k, n), strict=True))}
        for b, v, k, n in rows
    ]


def snapshots(settings: Settings) -> list[dict[str, Any]]:
    out = []
    if settings.datasets_dir.exists():
        for d in settings.datasets_dir.iterdir():
            m = d / "manifest.json"
            if d.is_dir() and not d.name.startswith(".") and m.exists():
                try:
                    man = json.loads(m.read_text())
                except ValueError:
                    continue
                man["path"] = str(d)
                man["retired"] = (d / "RETIRED.json").exists()
                out.append(man)
    return sorted(out, key=lambda m: m.get("created_at", ""))


def versions(settings: Settings) -> list[dict[str, Any]]:
    """Every version's lineage.json (the app's copy of the registry record)."""
    out = []
    if settings.models_dir.exists():
        for d in sorted(settings.models_dir.iterdir()):
            f = d / "lineage.json"
            if d.is_dir() and f.exists():
                try:
                    out.append(json.loads(f.read_text()))
                except ValueError:
                    continue
    return sorted(out, key=lambda v: v.get("number", 0))


def conversation_sample(settings: Settings, snapshot_id: str, n: int = SAMPLE_ROWS) -> list[dict[str, Any]]:
    """A few training rows of a snapshot (pairs first, else SFT), as plain text columns."""
    snap = settings.datasets_dir / snapshot_id
    for rel, cols in (("pairs/train.parquet", ("prompt", "chosen", "rejected")), ("sft/train.parquet", ("messages",))):
        f = snap / rel
        if f.exists():
            rows = pq.read_table(f).slice(0, n).to_pylist()
            return [
                {c: "\n".join(f"{m['role']}: {m['content']}" for m in r[c]) for c in cols if c in r}
                | {"model_version": r.get("model_version", "")}
                for r in rows
            ]
    return []


# ---------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------
def history_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            r["at"][:19],
            r["release_id"],
            r["action"] + ("" if r.get("applied", True) else " (pending)"),
            r["actor"],
            r["candidate"],
            r["production"],
            f"{r['share']:.0%}",
            r.get("reason", ""),
        ]
        for r in reversed(records)
        if r["action"] != "applied"
    ]


def snapshot_rows(snaps: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for m in reversed(snaps):
        c, y = m.get("counts", {}), m.get("yield") or {}
        filters = "; ".join(f"{f['stage']} {f['in']}->{f['out']}" for f in m.get("filters", []))
        rows.append(
            [
                m["snapshot_id"],
                m.get("created_at", "")[:19],
                "retired" if m["retired"] else "ok",
                json.dumps({t: sum(s.values()) for t, s in c.items()}),
                y.get("ratings_in"),
                y.get("ratings_usable"),
                filters,
            ]
        )
    return rows


def version_rows(vs: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            v.get("name"),
            v.get("recipe"),
            v.get("parent"),
            v.get("snapshot_id"),
            v.get("gate"),
            ", ".join(v.get("aliases") or []),
            "yes" if v.get("tainted") else "",
            json.dumps(v.get("eval") or {})[:300],
        ]
        for v in reversed(vs)
    ]


def lineage(settings: Settings, version: str | None) -> tuple[dict[str, Any], list[list[Any]]]:
    """A version's record, its releases, its snapshot's source (events and Kafka offsets), and sample rows."""
    vs = {v.get("name"): v for v in versions(settings)}
    v = vs.get(version or "")
    if v is None:
        return {"error": "choose a version"}, []
    snap_id = v.get("snapshot_id")
    man = next((m for m in snapshots(settings) if m["snapshot_id"] == snap_id), None)
    out = {
        "version": {
            k: v.get(k)
            for k in (
                "name",
                "recipe",
                "parent",
                "snapshot_id",
                "gate",
                "gate_reasons",
                "tainted",
                "created_at",
                "code_revision",
            )
        },
        "releases": [
            {k: r[k] for k in ("at", "release_id", "action", "actor", "share", "reason")}
            for r in release_records(settings)
            if r["candidate"] == version and r["action"] != "applied"
        ],
        "snapshot": None
        if man is None
        else {
            "snapshot_id": snap_id,
            "counts": man.get("counts"),
            "source": man.get("source"),
            "yield": man.get("yield"),
        },
    }
    sample = conversation_sample(settings, snap_id) if snap_id else []
    return out, [
        [r.get("prompt") or r.get("messages"), r.get("chosen", ""), r.get("rejected", ""), r.get("model_version")]
        for r in sample
    ]


# ---------------------------------------------------------------------------------------------------------
# AI trainers (issue 18): the queue's live figures, and the agreement and trust each curation writes
# ---------------------------------------------------------------------------------------------------------
def annotation_status(settings: Settings) -> dict[str, Any]:
    """Queue depth and submissions per hour (the app's queue file), agreement by day and each annotator's figures
    (``<home>/annotation/report.json``, written by the curate flow), the leaderboard without those who opted out."""
    from app.annotation.queue import TaskQueue
    from app.annotation.roles import RoleStore

    queue, roles = TaskQueue(settings), RoleStore(settings)
    try:
        shown = {a.name for a in roles.list() if a.leaderboard}
        out: dict[str, Any] = {"depth": queue.depth(), "per_hour": queue.submissions_by_hour(24)}
    finally:
        queue.close()
        roles.close()
    try:
        report = json.loads((settings.home / "annotation" / "report.json").read_text())
    except (OSError, ValueError):
        report = {}
    out["agreement"] = report.get("agreement") or {}
    out["agreement_by_day"] = report.get("agreement_by_day") or {}
    out["leaderboard"] = [
        [p["annotator"], p["judgments"], f"{p['gold_right']}/{p['gold_tasks']}", p["trust"]]
        for p in report.get("annotators", [])
        if p["annotator"] in shown
    ]
    return out

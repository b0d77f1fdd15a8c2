"""Reading dataset snapshots from the training side (``training/`` imports no ``pipelines/`` code).

A snapshot is a directory ``$FLYWHEEL_HOME/datasets/<id>/`` with ``manifest.json``, one Parquet file per
table and split, ``contributors.sha256`` (hashed ids of every user whose data could reach it) and, once a
deletion request touched it, ``RETIRED.json``. Curation (``pipelines/snapshots.py``) writes them; this module only
reads, and answers the one question training must ask first: may this snapshot be used right now?
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from feedback.settings import Settings
from training.errors import TrainingError

RETIRED = "RETIRED.json"
CONTRIBUTORS = "contributors.sha256"


def user_hash(user_id: str) -> str:
    """The hash curation writes into ``contributors.sha256`` (same recipe as ``pipelines.curate.user_hash``)."""
    return hashlib.sha256(f"flywheel-user:{user_id}".encode()).hexdigest()


def _read(path: Path) -> dict[str, Any]:
    m = json.loads((path / "manifest.json").read_text())
    m["path"] = str(path)
    r = path / RETIRED
    m["retired"] = json.loads(r.read_text()) if r.exists() else None
    return m


def all_snapshots(settings: Settings) -> list[dict[str, Any]]:
    d = settings.datasets_dir
    if not d.exists():
        return []
    out = [
        _read(p) for p in d.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "manifest.json").exists()
    ]
    return sorted(out, key=lambda m: (m.get("created_at", ""), m["snapshot_id"]))


def newest_snapshot(settings: Settings) -> dict[str, Any] | None:
    live = [m for m in all_snapshots(settings) if not m["retired"]]
    return live[-1] if live else None


def load_snapshot(settings: Settings, ref: str) -> dict[str, Any]:
    d = settings.datasets_dir
    matches = [p for p in d.glob(f"{ref}*") if p.is_dir() and (p / "manifest.json").exists()] if d.exists() else []
    if len(matches) != 1:
        what = "no snapshot" if not matches else f"{len(matches)} snapshots"
        raise TrainingError(f"{what} matching {ref!r} in {d}: see `flywheel datasets list`")
    return _read(matches[0])


def deleted_users(settings: Settings) -> set[str]:
    """Hashed ids of every user who asked for deletion (read from the warehouse; empty without one)."""
    from feedback.warehouse import connect

    if not settings.warehouse_path.exists():
        return set()
    with connect(settings.warehouse_path, read_only=True, timeout_s=settings.warehouse_lock_timeout_s) as con:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if "user_actions" not in tables:
            return set()
        rows = con.execute("SELECT DISTINCT user_id FROM user_actions WHERE action = 'delete_request'").fetchall()
    return {user_hash(r[0]) for r in rows}


def deletion_pending(settings: Settings, snapshot: dict[str, Any]) -> int:
    """How many of this snapshot's contributors asked for deletion (it must not be trained on if > 0)."""
    f = Path(snapshot["path"]) / CONTRIBUTORS
    if not f.exists():
        return 0 if not deleted_users(settings) else 1  # no contributor list: any deletion may concern it
    gone = deleted_users(settings)
    return sum(1 for line in f.read_text().split() if line in gone) if gone else 0


def find_usable_snapshot(settings: Settings, ref: str | None, required: bool = True) -> dict[str, Any] | None:
    """The snapshot to train on: exists, complete, not retired, and no contributor's deletion is pending."""
    if ref in (None, "", "none") and not required:
        return None
    snap = newest_snapshot(settings) if ref in (None, "", "latest") else load_snapshot(settings, ref)
    if snap is None:
        if not required:
            return None
        raise TrainingError("there is no usable dataset snapshot yet: run `flywheel run curate` first")
    if snap.get("retired"):
        raise TrainingError(
            f"snapshot {snap['snapshot_id']} is retired ({snap['retired'].get('reason')}): "
            "run `flywheel run curate` for a fresh one"
        )
    from feedback.deletion import pending_deletions

    waiting = pending_deletions(settings)
    if waiting:
        raise TrainingError(
            f"{len(waiting)} deletion request(s) are still being carried out: training waits until "
            "they are done (`flywheel status`), then curate again and train on the new snapshot"
        )
    pending = deletion_pending(settings, snap)
    if pending:
        raise TrainingError(
            f"snapshot {snap['snapshot_id']} holds data of {pending} user(s) whose deletion is "
            "pending: run `flywheel run curate` (it excludes them) and train on the new snapshot"
        )
    return snap

"""Deletion that really deletes: every store the project controls, within a stated time, and a record of it.

A request is written to a durable ledger first (``$FLYWHEEL_HOME/deletions/ledger.sqlite``, 0600, synchronous
SQLite), so it survives any crash; then ``process_deletions`` runs each step, idempotently, recording each one:

1. ``keys``: the user's payload keys are destroyed (``feedback.shred``). Every sealed copy of their turns and
   ratings -- in Kafka (turns, feedback, DLQ), in any outbox, in any backup of those -- is unreadable from here on.
   This is why Kafka needs no retention change: crypto-shredding reaches copies we cannot rewrite.
2. ``warehouse``: their turns, ratings and dead letters that mention them are deleted and the deletion is
   recorded (``deleted_users``, by hash) in one transaction; ingest drops any late copy (``feedback.sink``).
3. ``snapshots``: every dataset snapshot they could have reached (``contributors.sha256`` lists them, or a
   snapshot without that list made before the request) loses its data files and gets ``RETIRED.json``; every
   model version trained on such a snapshot gets ``"tainted": true`` in its ``lineage.json``.
4. ``compacted``: the warehouse file is rewritten so no deleted bytes stay in free blocks (all pending
   deletions share one rewrite).

The app removes its own session store (conversations, turn ownership) before this runs (``app.deletion``).
Stated time: all steps finish within ``DELETION_DEADLINE_S`` of the request while the machine is healthy; the
app runs them at once and retries every few seconds while the warehouse is busy. Until every step is done the
request is *pending*: ``pending_deletions(settings)`` lists them, and training must refuse to start while any
is pending (a snapshot could still hold that text).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from feedback.settings import Settings
from feedback.shred import KeyStore, user_hash
from feedback.sqlite_wal import use_wal
from feedback.warehouse import WarehouseBusy, compact, connect, init_schema, purge_user_rows

log = logging.getLogger(__name__)

DELETION_DEADLINE_S = 60.0
STEPS = ("keys", "warehouse", "snapshots", "compacted")
RETIRED = "RETIRED.json"  # the snapshot contract of pipelines/snapshots.py
CONTRIBUTORS = "contributors.sha256"
_KEEP = {"manifest.json", RETIRED}


@dataclass(frozen=True)
class PendingDeletion:
    request_id: str
    user_hash: str
    requested_at: float
    steps_done: tuple[str, ...]
    last_error: str | None

    @property
    def steps_left(self) -> tuple[str, ...]:
        return tuple(s for s in STEPS if s not in self.steps_done)

    def as_dict(self) -> dict:
        return {**asdict(self), "steps_left": list(self.steps_left)}


def ledger_path(settings: Settings) -> Path:
    return settings.home / "deletions" / "ledger.sqlite"


class Ledger:
    """The durable list of deletion requests and the steps each has completed."""

    def __init__(self, settings: Settings):
        path = ledger_path(settings)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path.parent, 0o700)
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        os.chmod(path, 0o600)
        self._db = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
        self._db.execute("PRAGMA secure_delete=ON")
        use_wal(self._db)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            """CREATE TABLE IF NOT EXISTS requests (request_id TEXT PRIMARY KEY, user_hash TEXT NOT NULL,
            user_id TEXT, requested_at REAL NOT NULL, steps TEXT NOT NULL DEFAULT '[]', done_at REAL,
            last_error TEXT)"""
        )

    def close(self) -> None:
        self._db.close()

    def record(self, user_id: str) -> str:
        """Durably record a request (on disk when this returns). The user id is kept only until it is done."""
        rid = uuid.uuid4().hex
        self._db.execute(
            "INSERT INTO requests (request_id, user_hash, user_id, requested_at) VALUES (?, ?, ?, ?)",
            (rid, user_hash(user_id), user_id, time.time()),
        )
        return rid

    def open_requests(self) -> list[tuple[str, str, float, list[str]]]:
        rows = self._db.execute(
            "SELECT request_id, user_id, requested_at, steps FROM requests WHERE done_at IS NULL ORDER BY requested_at"
        ).fetchall()
        return [(r, u, t, json.loads(s)) for r, u, t, s in rows]

    def pending(self) -> list[PendingDeletion]:
        rows = self._db.execute(
            "SELECT request_id, user_hash, requested_at, steps, last_error FROM requests WHERE done_at IS NULL "
            "ORDER BY requested_at"
        ).fetchall()
        return [PendingDeletion(r, h, t, tuple(json.loads(s)), e) for r, h, t, s, e in rows]

    def mark(self, request_id: str, step: str) -> None:
        (steps,) = self._db.execute("SELECT steps FROM requests WHERE request_id = ?", (request_id,)).fetchone()
        done = json.loads(steps)
        if step not in done:
            done.append(step)
        finished = all(s in done for s in STEPS)
        self._db.execute(
            "UPDATE requests SET steps = ?, last_error = NULL, done_at = ?, "
            "user_id = CASE WHEN ? THEN NULL ELSE user_id END WHERE request_id = ?",
            (json.dumps(done), time.time() if finished else None, finished, request_id),
        )
        if finished:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the plain user id leaves the WAL too

    def fail(self, request_id: str, error: str) -> None:
        self._db.execute("UPDATE requests SET last_error = ? WHERE request_id = ?", (error[:500], request_id))

    def status(self, request_id: str) -> dict | None:
        row = self._db.execute(
            "SELECT requested_at, steps, done_at, last_error FROM requests WHERE request_id = ?", (request_id,)
        ).fetchone()
        if row is None:
            return None
        t, steps, done_at, err = row
        return {
            "request_id": request_id,
            "requested_at": t,
            "steps_done": json.loads(steps),
            "done_at": done_at,
            "complete": done_at is not None,
            "seconds": None if done_at is None else done_at - t,
            "last_error": err,
        }


def request_deletion(settings: Settings, user_id: str) -> str:
    """Record a deletion request durably; returns its id. Run ``process_deletions`` next."""
    ledger = Ledger(settings)
    try:
        return ledger.record(user_id)
    finally:
        ledger.close()


def pending_deletions(settings: Settings) -> list[PendingDeletion]:
    """Deletion requests not yet complete in every store. Training must refuse to start while this is non-empty."""
    if not ledger_path(settings).exists():
        return []
    ledger = Ledger(settings)
    try:
        return ledger.pending()
    finally:
        ledger.close()


def deletion_status(settings: Settings, request_id: str) -> dict | None:
    ledger = Ledger(settings)
    try:
        return ledger.status(request_id)
    finally:
        ledger.close()


_PROCESS_MU = threading.Lock()


def process_deletions(settings: Settings, timeout_s: float = 30.0) -> list[PendingDeletion]:
    """Run every open request's remaining steps; returns what is still pending (e.g. the warehouse was busy).
    One run at a time per machine (a thread lock and an exclusive ``flock``), every step idempotent."""
    lock_path = ledger_path(settings).with_name("process.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _PROCESS_MU:
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return _process(settings, timeout_s)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _process(settings: Settings, timeout_s: float) -> list[PendingDeletion]:
    ledger = Ledger(settings)
    try:
        todo = ledger.open_requests()
        for rid, user_id, requested_at, done in todo:
            try:
                _run_steps(settings, ledger, rid, user_id, requested_at, done, timeout_s)
            except (WarehouseBusy, OSError, duckdb.Error) as e:
                ledger.fail(rid, f"{type(e).__name__}: {e}")
                log.warning("deletion %s waits: %s", rid, e)
        if any("compacted" not in done for *_, done in todo):
            try:
                compact(settings.warehouse_path, timeout_s=timeout_s)
                for rid, *_ in ledger.open_requests():
                    st = ledger.status(rid)
                    if st and all(s in st["steps_done"] for s in ("keys", "warehouse", "snapshots")):
                        ledger.mark(rid, "compacted")
            except (WarehouseBusy, OSError, duckdb.Error) as e:
                log.warning("warehouse compaction waits: %s", e)
        return ledger.pending()
    finally:
        ledger.close()


def _run_steps(
    settings: Settings, ledger: Ledger, rid: str, user_id: str, requested_at: float, done: list[str], timeout_s: float
) -> None:
    when = datetime.fromtimestamp(requested_at, UTC)
    if "keys" not in done:
        ks = KeyStore(settings)
        try:
            ks.shred(user_id)
        finally:
            ks.close()
        ledger.mark(rid, "keys")
    if "warehouse" not in done:
        purge_warehouse(settings, user_id, when, timeout_s)
        ledger.mark(rid, "warehouse")
    if "snapshots" not in done:
        erase_snapshots(settings, user_hash(user_id), when)
        ledger.mark(rid, "snapshots")
    if not settings.warehouse_path.exists() and "compacted" not in done:
        ledger.mark(rid, "compacted")


def purge_warehouse(settings: Settings, user_id: str, requested_at: datetime, timeout_s: float = 30.0) -> dict:
    """Delete the user's rows and record the deletion (the ingest writer hands the file over between batches)."""
    with connect(settings.warehouse_path, timeout_s=timeout_s) as con:
        init_schema(con)
        con.execute("BEGIN TRANSACTION")
        try:
            out = purge_user_rows(con, user_id, requested_at)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    return out


def erase_snapshots(settings: Settings, uhash: str, requested_at: datetime) -> list[str]:
    """Erase the data files of every snapshot the user could have reached; taint models trained on them."""
    erased: list[str] = []
    root = settings.datasets_dir
    if not root.exists():
        return erased
    for snap in sorted(p for p in root.iterdir() if p.is_dir() and (p / "manifest.json").exists()):
        if not _reached(snap, uhash, requested_at):
            continue
        mark = _read_json(snap / RETIRED) or {
            "retired_at": datetime.now(UTC).isoformat(),
            "reason": "a contributing user asked for deletion",
        }
        for f in snap.rglob("*"):
            if f.is_file() and f.relative_to(snap).as_posix() not in _KEEP:
                f.unlink()
        mark["files_purged"] = True
        (snap / RETIRED).write_text(json.dumps(mark, indent=2))
        erased.append(snap.name)
    if erased:
        taint_models(settings, set(erased))
    return erased


def _reached(snap: Path, uhash: str, requested_at: datetime) -> bool:
    contributors = snap / CONTRIBUTORS
    if contributors.exists():
        return uhash in contributors.read_text().split()
    if not any(f.is_file() and f.name not in _KEEP for f in snap.rglob("*")):
        return False  # already erased
    created = (_read_json(snap / "manifest.json") or {}).get("created_at")
    try:
        return created is None or datetime.fromisoformat(created) <= requested_at
    except ValueError:
        return True


def taint_models(settings: Settings, snapshot_ids: set[str]) -> list[str]:
    """Mark every model version trained on one of these snapshots as tainted (``lineage.json``)."""
    tainted = []
    if not settings.models_dir.exists():
        return tainted
    for lineage in settings.models_dir.glob("*/lineage.json"):
        data = _read_json(lineage)
        if not data or data.get("snapshot_id") not in snapshot_ids or data.get("tainted"):
            continue
        data["tainted"] = True
        data.setdefault("tainted_reason", "trained on a snapshot erased by a deletion request")
        tmp = lineage.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, lineage)
        tainted.append(lineage.parent.name)
    return tainted


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None

"""What a replica could not write to the shared PostgreSQL while it was down, kept on this machine until it can.

With ``FLYWHEEL_APP_DATABASE_URL`` set, a replica's sessions (turn ownership, consent, conversations) live in the
shared database. When it does not answer, chat keeps going (``app.sessions``), and each write the replica could
not make is put here instead: one row per write in a SQLite file beside the replica's spool (``outbox.sqlite``,
``synchronous=FULL``: a write the user was told about survives a crash). So are ratings whose turn's owner could
not be checked: they are accepted (202) and emitted once the database says the turn is the rater's.

A background thread replays the rows in order every ``interval_s`` once the database answers. Each kind has a
handler that says what became of a row: ``DONE`` (delete it), ``LATER`` (keep it and go on: a rating whose turn
another replica has not flushed yet) or ``DROP`` (delete it, logged: a turn that is not the rater's). A handler
that raises ``StoreDown`` stops the pass; the next one starts where it stopped.

Rows have a ``key``: a newer write with the same kind and key replaces an older one (the latest consent, the
latest copy of a conversation), and a write the database took directly drops a pending one with its key, so a
replay never overwrites something newer. ``forget_user`` deletes a user's rows (deletion reaches this copy too).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from app.database import StoreDown
from feedback.sqlite_wal import use_wal

log = logging.getLogger(__name__)

Outcome = Literal["done", "later", "drop"]
DONE: Outcome = "done"
LATER: Outcome = "later"
DROP: Outcome = "drop"

Handler = Callable[[dict[str, Any], float], Outcome]  # (payload, the time it was put) -> what became of it


class Outbox:
    """Thread-safe; one per replica (its file sits in the replica's own spool directory)."""

    def __init__(self, path: Path, interval_s: float = 5.0):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.interval_s = path, interval_s
        self.handlers: dict[str, Handler] = {}
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        use_wal(self._db)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA secure_delete=ON")  # a forgotten user's rows are overwritten, not left in free pages
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS pending (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, "
            "key TEXT NOT NULL, user_id TEXT NOT NULL, payload TEXT NOT NULL, put_at REAL NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS pending_by_key ON pending (kind, key)")
        self._mu = threading.Lock()
        self._flush_mu = threading.Lock()
        self._count = self._db.execute("SELECT count(*) FROM pending").fetchone()[0]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        return self._count

    def put(self, kind: str, key: str, user_id: str, payload: dict[str, Any]) -> None:
        """Keep one write for later; it replaces a pending one of the same kind and key."""
        with self._mu:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM pending WHERE kind = ? AND key = ?", (kind, key))
                self._db.execute(
                    "INSERT INTO pending (kind, key, user_id, payload, put_at) VALUES (?, ?, ?, ?, ?)",
                    (kind, key, user_id, json.dumps(payload), time.time()),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._count = self._db.execute("SELECT count(*) FROM pending").fetchone()[0]

    def superseded(self, kind: str, key: str) -> None:
        """The database took a newer write with this kind and key: a pending one must not be replayed over it."""
        if self._count:
            with self._mu:
                self._db.execute("DELETE FROM pending WHERE kind = ? AND key = ?", (kind, key))
                self._count = self._db.execute("SELECT count(*) FROM pending").fetchone()[0]

    def find(self, kind: str, key: str) -> dict[str, Any] | None:
        if not self._count:
            return None
        with self._mu:
            row = self._db.execute("SELECT payload FROM pending WHERE kind = ? AND key = ?", (kind, key)).fetchone()
        return json.loads(row[0]) if row else None

    def kinds(self) -> dict[str, int]:
        with self._mu:
            return dict(self._db.execute("SELECT kind, count(*) FROM pending GROUP BY kind").fetchall())

    def forget_user(self, user_id: str) -> int:
        """Delete every pending write about this user (their deletion reaches this copy too)."""
        with self._mu:
            n = self._db.execute("DELETE FROM pending WHERE user_id = ?", (user_id,)).rowcount
            self._count = self._db.execute("SELECT count(*) FROM pending").fetchone()[0]
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return n

    # ---- replay ----------------------------------------------------------------------------------
    def flush(self) -> dict[str, int]:
        """One pass over the pending rows, oldest first; stops at the first ``StoreDown``. Returns the counts of
        what became of the rows (``done``, ``later``, ``drop``)."""
        counts = {DONE: 0, LATER: 0, DROP: 0}
        if not self._count:
            return counts
        with self._flush_mu:
            with self._mu:
                rows = self._db.execute("SELECT id, kind, key, payload, put_at FROM pending ORDER BY id").fetchall()
            for row_id, kind, key, payload, put_at in rows:
                handler = self.handlers.get(kind)
                if handler is None:
                    log.error("outbox: no handler for %r (row %s kept)", kind, row_id)
                    counts[LATER] += 1
                    continue
                try:
                    outcome = handler(json.loads(payload), put_at)
                except StoreDown:
                    break
                counts[outcome] += 1
                if outcome == LATER:
                    continue
                if outcome == DROP:
                    log.warning("outbox: dropped a pending %s (%s): its handler refused it", kind, key)
                with self._mu:  # by id: a newer write with the same key, put meanwhile, stays
                    self._db.execute("DELETE FROM pending WHERE id = ?", (row_id,))
                    self._count = self._db.execute("SELECT count(*) FROM pending").fetchone()[0]
        if counts[DONE] or counts[DROP]:
            log.info("outbox: replayed %s", counts)
        return counts

    def start(self) -> Outbox:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="outbox", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - the rows stay; the next pass tries again
                log.exception("outbox: a replay pass failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._mu:
            self._db.close()

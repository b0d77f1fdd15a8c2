"""A durable, ordered outbox on local disk (SQLite in WAL mode), owned by one process at a time.

Every event is appended here before anything talks to Kafka, so an event survives the broker being down and
the process dying right after ``emit()`` returned. A sender drains it in order and deletes rows only after
the broker acknowledged them.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from pathlib import Path


class SpoolLocked(RuntimeError):
    """Another live process owns this spool; give each process its own spool name."""


class Spool:
    def __init__(self, directory: Path, name: str):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{name}.sqlite"
        self._lock_fd = os.open(directory / f"{name}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolLocked(f"spool {self.path} is in use by another process; pass a different spool name") from None
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        # WAL + synchronous=NORMAL: a commit is on disk when the process dies (not when the OS does).
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, "
            "key BLOB, value BLOB NOT NULL)"
        )
        self._mu = threading.Lock()

    def append(self, topic: str, key: bytes | None, value: bytes) -> None:
        with self._mu:
            self._db.execute("INSERT INTO outbox (topic, key, value) VALUES (?, ?, ?)", (topic, key, value))

    def append_many(self, rows: list[tuple[str, bytes | None, bytes]]) -> None:
        with self._mu:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO outbox (topic, key, value) VALUES (?, ?, ?)", rows)
            self._db.execute("COMMIT")

    def peek(self, limit: int) -> list[tuple[int, str, bytes | None, bytes]]:
        with self._mu:
            return self._db.execute("SELECT id, topic, key, value FROM outbox ORDER BY id LIMIT ?", (limit,)).fetchall()

    def ack_through(self, last_id: int) -> None:
        with self._mu:
            self._db.execute("DELETE FROM outbox WHERE id <= ?", (last_id,))

    def __len__(self) -> int:
        with self._mu:
            return self._db.execute("SELECT count(*) FROM outbox").fetchone()[0]

    def close(self) -> None:
        with self._mu:
            self._db.close()
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)

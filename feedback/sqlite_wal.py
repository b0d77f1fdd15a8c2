"""Write-ahead logging for an embedded SQLite file that several processes may open at the same moment.

On a fresh file, ``PRAGMA journal_mode=WAL`` answers "database is locked" at once while another process holds the
file's lock, without waiting for the connection's busy timeout: 8 processes opening the app's stores together on a
loaded machine lost about one round in 27 (``tests/app/test_sqlite_columns.py``). ``use_wal`` retries the switch
briefly instead.
"""

from __future__ import annotations

import sqlite3
import time


def use_wal(db: sqlite3.Connection, limit_s: float = 10.0) -> None:
    """Switch ``db`` to WAL, retrying a locked file every 20 ms for at most ``limit_s``; other errors raise."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)

"""Adding a column to an embedded SQLite file that several processes may open at once.

Two app replicas (or the CLI beside a running app) start together on one file: both read the table's columns, both
see the new one missing, and the second ``ALTER TABLE`` fails with "duplicate column name". The check and the change
therefore run in one ``BEGIN IMMEDIATE`` transaction, which takes the file's write lock before reading.
"""

from __future__ import annotations

import sqlite3


def add_missing_columns(db: sqlite3.Connection, table: str, columns: dict[str, str]) -> list[str]:
    """Add each ``name: declaration`` that ``table`` lacks; returns the names added. ``db`` is in autocommit mode
    (``isolation_level=None``); the busy timeout it was opened with bounds the wait for another writer."""
    db.execute("BEGIN IMMEDIATE")
    try:
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        added = [name for name in columns if name not in have]
        for name in added:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {columns[name]}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return added

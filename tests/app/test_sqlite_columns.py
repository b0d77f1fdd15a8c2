"""Several processes opening one embedded SQLite file at once (two app replicas starting together, the CLI beside a
running app) each add the columns a newer version needs; none may fail with "duplicate column name".

CI failed on this: two replicas of the fleet test started on one fresh home and the second crashed in RoleStore.
Then `make test-fast` on a loaded machine: "database is locked" from switching a fresh file to WAL, which SQLite
answers at once rather than after the busy timeout (``feedback.sqlite_wal.use_wal`` retries it).
"""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

from app.annotation.queue import TaskQueue
from app.annotation.roles import RoleStore
from app.sessions import Sessions
from app.sqlite_columns import add_missing_columns
from feedback.settings import Settings

PROCESSES = 8
ROUNDS = 8  # each on a fresh home: the column race lost one round in three, the WAL switch one in ~27 (loaded)


def _open_all(home: str, barrier, errors) -> None:
    barrier.wait()
    try:
        s = Settings(home=home)
        for store in (RoleStore(s), TaskQueue(s), Sessions(s)):
            store.close()
    except Exception as exc:  # reported to the parent, which asserts there were none
        errors.put(f"{type(exc).__name__}: {exc}")


def test_stores_opened_by_several_processes_at_once_all_start(tmp_path):
    ctx = mp.get_context("fork")
    for round_ in range(ROUNDS):
        home = tmp_path / f"home{round_}"
        barrier, errors = ctx.Barrier(PROCESSES), ctx.Queue()
        procs = [ctx.Process(target=_open_all, args=(str(home), barrier, errors)) for _ in range(PROCESSES)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * PROCESSES
        found = []
        while not errors.empty():
            found.append(errors.get())
        assert found == [], f"round {round_}"
        db = sqlite3.connect(home / "app" / "annotation.sqlite")
        assert "topics" in {row[1] for row in db.execute("PRAGMA table_info(annotators)")}
        db.close()


def test_add_missing_columns_adds_only_what_is_missing_and_rolls_back_a_bad_declaration(tmp_path):
    db = sqlite3.connect(tmp_path / "t.sqlite", isolation_level=None)
    db.execute("CREATE TABLE t (a TEXT)")
    db.execute("INSERT INTO t VALUES ('x')")
    assert add_missing_columns(db, "t", {"a": "TEXT", "b": "INTEGER NOT NULL DEFAULT 0"}) == ["b"]
    assert add_missing_columns(db, "t", {"b": "INTEGER NOT NULL DEFAULT 0"}) == []
    try:
        add_missing_columns(db, "t", {"c": "INTEGER NOT NULL"})  # NOT NULL, no default, a row: refused
    except sqlite3.OperationalError:
        pass
    else:
        raise AssertionError("a NOT NULL column without a default was added")
    assert not db.in_transaction
    assert [row[1] for row in db.execute("PRAGMA table_info(t)")] == ["a", "b"]

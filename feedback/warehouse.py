"""The DuckDB warehouse: schema, and connections that share one file between processes.

DuckDB lets one process hold a database file read-write, and while it does, every other process is refused,
even read-only. Opening the file costs tens of milliseconds, too much to pay per ingest batch, so the ingest
writer keeps it open while it is busy and the two sides take turns through a small handshake on a side file,
``<warehouse>.want``:

- A reader (``connect()``: ``flywheel status``, flows, the dashboard) holds a *shared* ``flock`` on ``.want`` for
  the whole of its unit of work, opens the database (retrying while the writer still has it), reads, closes.
- The writer (``WriterSession``, used by ingest) checks after each committed batch whether it can take an
  *exclusive* lock on ``.want``; if not, someone is waiting, so it closes the database and blocks until the
  readers are done (the exclusive lock is granted), then reopens. It also closes when idle for a second.

So a reader waits at most one batch (~0.2 s) and the writer never loses data (events wait in Kafka).
Long analyses should copy what they need out (Arrow / Parquet) rather than hold the file.
"""

from __future__ import annotations

import fcntl
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

# Every event table: the envelope, the event's own fields, then where in Kafka it came from.
# (The sink extracts each column from the event JSON by name; the last three come from the batch.)
_ENVELOPE = [
    ("event_id", "VARCHAR PRIMARY KEY"),
    ("schema_version", "INTEGER"),
    ("ts", "TIMESTAMPTZ"),
    ("user_id", "VARCHAR"),
    ("consent", "BOOLEAN"),
]
_POSITION = [("kafka_partition", "INTEGER"), ("kafka_offset", "BIGINT"), ("ingested_at", "TIMESTAMPTZ")]
TURN_COLUMNS = [
    *_ENVELOPE,
    ("conversation_id", "VARCHAR"),
    ("turn_id", "VARCHAR"),
    ("parent_turn_id", "VARCHAR"),
    ("model_version", "VARCHAR"),
    ("origin", "VARCHAR"),
    ("messages", "JSON"),
    ("answer", "VARCHAR"),
    ("sampling", "JSON"),
    ("latency_ms", "DOUBLE"),
    ("ttft_ms", "DOUBLE"),
    ("prompt_tokens", "INTEGER"),
    ("completion_tokens", "INTEGER"),
    ("finish_reason", "VARCHAR"),
    *_POSITION,
]
FEEDBACK_COLUMNS = [
    *_ENVELOPE,
    ("conversation_id", "VARCHAR"),
    ("turn_id", "VARCHAR"),
    ("model_version", "VARCHAR"),
    ("kind", "VARCHAR"),
    ("value", "VARCHAR"),
    ("reason", "VARCHAR"),
    ("other_turn_id", "VARCHAR"),
    ("other_model_version", "VARCHAR"),
    *_POSITION,
]
USER_ACTION_COLUMNS = [*_ENVELOPE, ("action", "VARCHAR"), *_POSITION]
# The human half (issue 18). Nested parts (the judged answers with their ranks, scores and flags; the messages)
# stay JSON: curation reads them whole, and no SQL filters inside them.
JUDGMENT_COLUMNS = [
    *_ENVELOPE,
    ("task_id", "VARCHAR"),
    ("conversation_id", "VARCHAR"),
    ("subject_user_id", "VARCHAR"),
    ("role", "VARCHAR"),
    ("prompt", "JSON"),
    ("answers", "JSON"),
    ("all_bad", "BOOLEAN"),
    ("rewrite", "VARCHAR"),
    ("gold_task", "BOOLEAN"),
    ("seconds", "DOUBLE"),
    *_POSITION,
]
FINDING_COLUMNS = [
    *_ENVELOPE,
    ("finding_id", "VARCHAR"),
    ("conversation_id", "VARCHAR"),
    ("model_version", "VARCHAR"),
    ("messages", "JSON"),
    ("answer", "VARCHAR"),
    ("harm_category", "VARCHAR"),
    ("attack_type", "VARCHAR"),
    ("success", "INTEGER"),
    ("safe_response", "VARCHAR"),
    ("notes", "VARCHAR"),
    *_POSITION,
]
REPORT_COLUMNS = [
    *_ENVELOPE,
    ("conversation_id", "VARCHAR"),
    ("turn_id", "VARCHAR"),
    ("model_version", "VARCHAR"),
    ("category", "VARCHAR"),
    ("reason", "VARCHAR"),
    *_POSITION,
]
DEAD_LETTER_COLUMNS = [
    ("topic", "VARCHAR"),
    ("kafka_partition", "INTEGER"),
    ("kafka_offset", "BIGINT"),
    ("reason", "VARCHAR"),
    ("detail", "VARCHAR"),
    ("size_bytes", "BIGINT"),
    ("raw_prefix", "BLOB"),
    ("ingested_at", "TIMESTAMPTZ"),
]
TABLES = {
    "turns": TURN_COLUMNS,
    "feedback": FEEDBACK_COLUMNS,
    "user_actions": USER_ACTION_COLUMNS,
    "judgments": JUDGMENT_COLUMNS,
    "redteam_findings": FINDING_COLUMNS,
    "reports": REPORT_COLUMNS,
    "dead_letters": DEAD_LETTER_COLUMNS,
}

SCHEMA_SQL = [
    *(f"CREATE TABLE IF NOT EXISTS {t} ({', '.join(f'{c} {ty}' for c, ty in cols)})" for t, cols in TABLES.items()),
    # Users who asked for deletion (pseudonymous): their rows up to ``requested_at`` are purged, and the sink
    # drops any that arrive later (a re-send, a slow producer). ``compacted_at``: the file was rewritten since,
    # so no deleted bytes remain in free blocks (``compact``).
    """CREATE TABLE IF NOT EXISTS deleted_users (user_hash VARCHAR PRIMARY KEY, requested_at TIMESTAMPTZ,
        purged_at TIMESTAMPTZ, compacted_at TIMESTAMPTZ)""",
    # The consumer's position, written in the same transaction as the rows it covers: exactly once.
    """CREATE TABLE IF NOT EXISTS kafka_offsets (
        consumer_group VARCHAR, topic VARCHAR, kafka_partition INTEGER, next_offset BIGINT,
        updated_at TIMESTAMPTZ, PRIMARY KEY (consumer_group, topic, kafka_partition))""",
]


class WarehouseBusy(RuntimeError):
    """Another process held the DuckDB file for longer than the timeout."""


def _is_lock_error(e: Exception) -> bool:
    msg = str(e).lower()
    # "different configuration": this very process holds the file the other way (a writer and a reader in one
    # process, e.g. tests); it is released at the writer's next hand-over just the same.
    return (
        "lock" in msg
        or "conflicting" in msg
        or "being used by another process" in msg
        or "different configuration" in msg
    )


def _want_fd(path: Path) -> int:
    return os.open(f"{path}.want", os.O_CREAT | os.O_RDWR, 0o600)


@contextmanager
def connect(path: Path | str, read_only: bool = False, timeout_s: float = 30.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the warehouse for one unit of work, asking the writer for a turn and waiting while it holds it."""
    path = Path(path)
    if read_only and not path.exists():
        raise FileNotFoundError(f"no warehouse at {path}: run `flywheel ingest` (or `make run`) first")
    path.parent.mkdir(parents=True, exist_ok=True)
    want = _want_fd(path)
    try:
        fcntl.flock(want, fcntl.LOCK_SH)  # "I am waiting / reading": the writer yields at its next batch
        with _open(path, read_only, timeout_s) as con:
            yield con
    finally:
        fcntl.flock(want, fcntl.LOCK_UN)
        os.close(want)


@contextmanager
def _open(path: Path, read_only: bool, timeout_s: float) -> Iterator[duckdb.DuckDBPyConnection]:
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
            break
        except (duckdb.IOException, duckdb.ConnectionException) as e:
            if not _is_lock_error(e) or time.monotonic() > deadline:
                if _is_lock_error(e):
                    raise WarehouseBusy(
                        f"{path} stayed locked by another process for {timeout_s:.0f}s; "
                        "is a long query holding it? (see `flywheel status`)"
                    ) from e
                raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.2)
    try:
        yield con
    finally:
        con.close()


def init_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create what is missing, and migrate: a column added to an event table since this file was written is
    added to it (old rows read NULL there). ``CREATE TABLE IF NOT EXISTS`` alone would keep the old shape."""
    for stmt in SCHEMA_SQL:
        con.execute(stmt)
    have: dict[str, set[str]] = {}
    for table, column in con.execute(
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = current_schema()"
    ).fetchall():
        have.setdefault(table, set()).add(column)
    for table, cols in TABLES.items():
        for column, sql_type in cols:
            if column not in have.get(table, set()):
                con.execute(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type.split()[0]}")


def ensure_schema(path: Path | str, timeout_s: float = 30.0) -> None:
    with connect(path, timeout_s=timeout_s) as con:
        init_schema(con)


def row_counts(path: Path | str, timeout_s: float = 10.0) -> dict[str, int]:
    path = Path(path)
    if not path.exists():
        return {t: 0 for t in TABLES}
    with connect(path, read_only=True, timeout_s=timeout_s) as con:
        have = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        return {t: (con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] if t in have else 0) for t in TABLES}


def stored_offsets(con: duckdb.DuckDBPyConnection, group: str) -> dict[tuple[str, int], int]:
    rows = con.execute(
        "SELECT topic, kafka_partition, next_offset FROM kafka_offsets WHERE consumer_group = ?", [group]
    ).fetchall()
    return {(t, p): o for t, p, o in rows}


class WriterSession:
    """The ingest writer's connection: kept open across batches, handed over when a reader asks (see above)."""

    def __init__(self, path: Path | str, timeout_s: float = 30.0, idle_close_s: float = 1.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout_s = timeout_s
        self.idle_close_s = idle_close_s
        self._want = _want_fd(self.path)
        self._con: duckdb.DuckDBPyConnection | None = None
        self._ctx = None
        self._last_used = 0.0
        self.handovers = 0

    def connection(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            self._ctx = _open(self.path, False, self.timeout_s)
            self._con = self._ctx.__enter__()
        self._last_used = time.monotonic()
        return self._con

    def release(self) -> None:
        """Close the file now (it reopens on the next use)."""
        self._close()

    def _close(self) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
        self._con, self._ctx = None, None

    def maybe_yield(self) -> None:
        """Between batches: hand the file over if a reader waits; close it if idle."""
        if self._con is None:
            return
        try:
            fcntl.flock(self._want, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._close()  # a reader is waiting: let it in, then wait until all readers are done
            self.handovers += 1
            deadline = time.monotonic() + self.timeout_s
            while time.monotonic() < deadline:
                try:
                    fcntl.flock(self._want, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(0.005)
            fcntl.flock(self._want, fcntl.LOCK_UN)
            return
        fcntl.flock(self._want, fcntl.LOCK_UN)
        if time.monotonic() - self._last_used > self.idle_close_s:
            self._close()

    def close(self) -> None:
        self._close()
        os.close(self._want)


# ---------------------------------------------------------------------------------------------------------
# Deletion: purge a user's rows, then rewrite the file so that no deleted bytes stay in its free blocks.
# ---------------------------------------------------------------------------------------------------------
USER_HASH_SQL = "sha256('flywheel-user:' || {col})"  # == feedback.shred.user_hash
_TEXT_TABLES = ("turns", "feedback", "judgments", "redteam_findings", "reports")


def purge_user_rows(con: duckdb.DuckDBPyConnection, user_id: str, requested_at) -> dict[str, int]:
    """Inside the caller's transaction: record the deletion and delete the user's turns, ratings, judgments,
    findings, reports, the judgments others made of their conversations, and dead letters that mention them.
    Consent and deletion actions stay (no text; curation and training need them)."""
    con.execute(
        f"""INSERT INTO deleted_users VALUES ({USER_HASH_SQL.format(col="?")}, ?, now(), NULL)
        ON CONFLICT (user_hash) DO UPDATE SET requested_at = greatest(deleted_users.requested_at,
        excluded.requested_at), purged_at = now(), compacted_at = NULL""",
        [user_id, requested_at],
    )
    out = {}
    for t in _TEXT_TABLES:
        out[t] = con.execute(f"DELETE FROM {t} WHERE user_id = ? AND ts <= ?", [user_id, requested_at]).fetchone()[0]
    # a trainer's judgment of this user's conversation holds their text, whenever it was made
    out["judgments"] += con.execute("DELETE FROM judgments WHERE subject_user_id = ?", [user_id]).fetchone()[0]
    out["dead_letters"] = con.execute(
        "DELETE FROM dead_letters WHERE contains(hex(raw_prefix), hex(?::BLOB)) OR contains(detail, ?)",
        [user_id.encode(), user_id],
    ).fetchone()[0]
    return out


def not_deleted_sql(alias: str = "e", column: str = "user_id") -> str:
    """A WHERE clause keeping only rows of users who did not ask for deletion after the row was made."""
    return (
        f"NOT EXISTS (SELECT 1 FROM deleted_users d WHERE d.user_hash = {USER_HASH_SQL.format(col=f'{alias}.{column}')}"
        f" AND {alias}.ts <= d.requested_at)"
    )


def subject_not_deleted_sql(alias: str = "e") -> str:
    """A WHERE clause dropping judgments of a conversation whose owner asked for deletion (at any time)."""
    return (
        f"({alias}.subject_user_id IS NULL OR NOT EXISTS (SELECT 1 FROM deleted_users d WHERE d.user_hash = "
        f"{USER_HASH_SQL.format(col=f'{alias}.subject_user_id')}))"
    )


def compact(path: Path | str, timeout_s: float = 60.0) -> bool:
    """Rewrite the warehouse into a fresh file and swap it in, so deleted rows leave no bytes behind (DuckDB
    reuses free blocks but never wipes them). Holds a reader's turn in the handshake and the file's own lock
    for the whole copy, so the ingest writer waits (its events wait in Kafka). Returns False if nothing needed
    compacting. Costs one full copy: deletions are batched (every pending one at once)."""
    path = Path(path)
    if not path.exists():
        return False
    fresh = path.with_name(path.name + ".compact")
    want = _want_fd(path)
    try:
        fcntl.flock(want, fcntl.LOCK_SH)
        with _open(path, False, timeout_s) as con:
            init_schema(con)
            if not con.execute("SELECT count(*) FROM deleted_users WHERE compacted_at IS NULL").fetchone()[0]:
                return False
            con.execute("CHECKPOINT")
            for f in (fresh, Path(f"{fresh}.wal")):
                f.unlink(missing_ok=True)
            db = con.execute("SELECT current_database()").fetchone()[0]
            con.execute(f"ATTACH '{fresh}' AS flywheel_fresh")
            try:
                con.execute(f'COPY FROM DATABASE "{db}" TO flywheel_fresh')
                # Marked in the copy only: if anything fails before the swap, the old file still says "to do".
                con.execute("UPDATE flywheel_fresh.deleted_users SET compacted_at = now() WHERE compacted_at IS NULL")
                con.execute("CHECKPOINT flywheel_fresh")
            finally:
                con.execute("DETACH flywheel_fresh")
            os.chmod(fresh, 0o600)
            os.replace(fresh, path)  # still holding the old file: nobody wrote in between
            _fsync_dir(path.parent)
        return True
    finally:
        fresh.unlink(missing_ok=True)
        fcntl.flock(want, fcntl.LOCK_UN)
        os.close(want)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

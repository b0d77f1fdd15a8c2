"""The DuckDB warehouse: schema, and connections that share one file between processes.

DuckDB lets one process hold a database file read-write, and while it does, every other process is refused,
even read-only. Flywheel therefore never holds the file longer than one unit of work: the ingest sink opens it,
writes a batch and its Kafka offsets in one transaction, and closes it; readers (``flywheel status``, flows,
the dashboard) open it, read, and close it. ``connect()`` retries while another process holds the lock, so the
two sides take turns instead of failing. Nothing is lost while a writer waits: the events stay in Kafka.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

# Column order matters: the ingest sink builds Arrow tables in this order.
TURN_COLUMNS = [
    ("event_id", "VARCHAR PRIMARY KEY"),
    ("schema_version", "INTEGER"),
    ("ts", "TIMESTAMPTZ"),
    ("user_id", "VARCHAR"),
    ("consent", "BOOLEAN"),
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
    ("kafka_partition", "INTEGER"),
    ("kafka_offset", "BIGINT"),
    ("ingested_at", "TIMESTAMPTZ"),
]
FEEDBACK_COLUMNS = [
    ("event_id", "VARCHAR PRIMARY KEY"),
    ("schema_version", "INTEGER"),
    ("ts", "TIMESTAMPTZ"),
    ("user_id", "VARCHAR"),
    ("consent", "BOOLEAN"),
    ("conversation_id", "VARCHAR"),
    ("turn_id", "VARCHAR"),
    ("model_version", "VARCHAR"),
    ("kind", "VARCHAR"),
    ("value", "VARCHAR"),
    ("reason", "VARCHAR"),
    ("other_turn_id", "VARCHAR"),
    ("other_model_version", "VARCHAR"),
    ("kafka_partition", "INTEGER"),
    ("kafka_offset", "BIGINT"),
    ("ingested_at", "TIMESTAMPTZ"),
]
USER_ACTION_COLUMNS = [
    ("event_id", "VARCHAR PRIMARY KEY"),
    ("schema_version", "INTEGER"),
    ("ts", "TIMESTAMPTZ"),
    ("user_id", "VARCHAR"),
    ("consent", "BOOLEAN"),
    ("action", "VARCHAR"),
    ("kafka_partition", "INTEGER"),
    ("kafka_offset", "BIGINT"),
    ("ingested_at", "TIMESTAMPTZ"),
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
    "dead_letters": DEAD_LETTER_COLUMNS,
}

SCHEMA_SQL = [
    *(f"CREATE TABLE IF NOT EXISTS {t} ({', '.join(f'{c} {ty}' for c, ty in cols)})" for t, cols in TABLES.items()),
    # The consumer's position, written in the same transaction as the rows it covers: exactly once.
    """CREATE TABLE IF NOT EXISTS kafka_offsets (
        consumer_group VARCHAR, topic VARCHAR, kafka_partition INTEGER, next_offset BIGINT,
        updated_at TIMESTAMPTZ, PRIMARY KEY (consumer_group, topic, kafka_partition))""",
]


class WarehouseBusy(RuntimeError):
    """Another process held the DuckDB file for longer than the timeout."""


def _is_lock_error(e: Exception) -> bool:
    msg = str(e).lower()
    return "lock" in msg or "conflicting" in msg or "being used by another process" in msg


@contextmanager
def connect(path: Path | str, read_only: bool = False, timeout_s: float = 30.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the warehouse for one unit of work, waiting (with jittered backoff) while another process holds it."""
    path = Path(path)
    if read_only and not path.exists():
        raise FileNotFoundError(f"no warehouse at {path}: run `flywheel ingest` (or `make run`) first")
    path.parent.mkdir(parents=True, exist_ok=True)
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
    for stmt in SCHEMA_SQL:
        con.execute(stmt)


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

"""Events -> DuckDB, a whole batch and its Kafka offsets in one transaction.

Used by the ingest consumer (``feedback.ingest``) and by anything that seeds a warehouse the same way (tests,
benchmarks). Python validates each event (pydantic) and keeps its canonical JSON; DuckDB then turns the batch
into typed columns in one ``INSERT ... SELECT`` over an Arrow table of those JSON strings, which keeps the
per-event Python work to validation. Row-by-row inserts would be about 1,000x slower.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import duckdb
import pyarrow as pa

from feedback.events import AnyEvent, UserAction
from feedback.warehouse import (
    DEAD_LETTER_COLUMNS,
    FEEDBACK_COLUMNS,
    FINDING_COLUMNS,
    JUDGMENT_COLUMNS,
    REPORT_COLUMNS,
    TURN_COLUMNS,
    USER_ACTION_COLUMNS,
    not_deleted_sql,
    purge_user_rows,
    subject_not_deleted_sql,
)

EVENT_TABLES = {
    "chat_turn": ("turns", TURN_COLUMNS),
    "feedback": ("feedback", FEEDBACK_COLUMNS),
    "user_action": ("user_actions", USER_ACTION_COLUMNS),
    "trainer_judgment": ("judgments", JUDGMENT_COLUMNS),
    "redteam_finding": ("redteam_findings", FINDING_COLUMNS),
    "user_report": ("reports", REPORT_COLUMNS),
}
_POSITION = ("kafka_partition", "kafka_offset", "ingested_at")


def _select_sql(table: str, columns: list[tuple[str, str]]) -> str:
    """INSERT ... SELECT that parses each event JSON once into a typed struct; the key drops stored repeats."""
    fields = [(name, sql_type.split()[0]) for name, sql_type in columns if name not in _POSITION]
    structure = json.dumps({name: ty for name, ty in fields})
    exprs = [name if name in _POSITION else f"e.{name}" for name, _ in columns]
    # Turns and ratings of a user who asked for deletion after making them are dropped here too, so a late
    # copy (a re-send, a slow producer) never brings deleted text back.
    where = "" if table == "user_actions" else f" WHERE {not_deleted_sql('e')}"
    if table == "judgments":  # nor a judgment of a deleted user's conversation
        where += f" AND {subject_not_deleted_sql('e')}"
    return (
        f"INSERT OR IGNORE INTO {table} ({', '.join(n for n, _ in columns)}) SELECT {', '.join(exprs)} FROM "
        f"(SELECT from_json(raw, '{structure}') AS e, kafka_partition, kafka_offset, ingested_at FROM _batch)"
        f"{where}"
    )


_INSERT_SQL = {t: _select_sql(t, cols) for t, cols in EVENT_TABLES.values()}
# by name, so a migrated table (added columns come last) takes the same statement
_DEAD_LETTER_SQL = (
    f"INSERT INTO dead_letters ({', '.join(c for c, _ in DEAD_LETTER_COLUMNS)}) "
    f"SELECT {', '.join(c for c, _ in DEAD_LETTER_COLUMNS)} FROM _batch"
)
_BATCH_SCHEMA = pa.schema(
    [
        ("raw", pa.string()),
        ("kafka_partition", pa.int32()),
        ("kafka_offset", pa.int64()),
        ("ingested_at", pa.timestamp("us", tz="UTC")),
    ]
)
_DEAD_SCHEMA = pa.schema(
    [
        ("topic", pa.string()),
        ("kafka_partition", pa.int32()),
        ("kafka_offset", pa.int64()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("size_bytes", pa.int64()),
        ("raw_prefix", pa.binary()),
        ("ingested_at", pa.timestamp("us", tz="UTC")),
    ]
)
assert [f.name for f in _DEAD_SCHEMA] == [c for c, _ in DEAD_LETTER_COLUMNS]


@dataclass
class _Rows:
    raw: list[str] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    partition: list[int | None] = field(default_factory=list)
    offset: list[int | None] = field(default_factory=list)


@dataclass
class Batch:
    """Validated events per table, dead letters, and the next offset to read per (topic, partition)."""

    rows: dict[str, _Rows] = field(default_factory=lambda: {t: _Rows() for t, _ in EVENT_TABLES.values()})
    dead: list[tuple] = field(default_factory=list)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    messages: int = 0
    duplicates: int = 0
    deletions: list[tuple[str, datetime]] = field(default_factory=list)  # (user_id, requested_at)
    dlq_sends: list = field(default_factory=list)  # DLQ produce futures: confirmed before the batch commits

    def add_event(self, event: AnyEvent, partition: int | None, offset: int | None) -> None:
        r = self.rows[EVENT_TABLES[event.type][0]]
        if event.event_id in r.ids:  # a re-send within the same batch: keep the first
            self.duplicates += 1
            return
        r.ids.add(event.event_id)
        r.raw.append(event.model_dump_json())  # canonical JSON of the validated event (never the raw bytes)
        r.partition.append(partition)
        r.offset.append(offset)
        if isinstance(event, UserAction) and event.action == "delete_request":
            self.deletions.append((event.user_id, event.ts))

    def add_dead_letter(self, topic: str, partition: int, offset: int, reason: str, detail: str, raw: bytes) -> None:
        self.dead.append((topic, partition, offset, reason, detail, len(raw), raw[:1024]))

    def advance(self, topic: str, partition: int, offset: int) -> None:
        self.offsets[(topic, partition)] = offset + 1
        self.messages += 1

    @property
    def events(self) -> int:
        return sum(len(r.raw) for r in self.rows.values())

    def arrow(self, committed_at: datetime) -> dict[str, pa.Table]:
        """One Arrow table per non-empty target; ``ingested_at`` is the commit time, when rows become visible."""
        out = {}
        for table, r in self.rows.items():
            if r.raw:
                out[table] = pa.table(
                    [
                        r.raw,
                        pa.array(r.partition, pa.int32()),
                        pa.array(r.offset, pa.int64()),
                        pa.array([committed_at] * len(r.raw), _BATCH_SCHEMA.field(3).type),
                    ],
                    schema=_BATCH_SCHEMA,
                )
        if self.dead:
            cols = list(zip(*self.dead, strict=True)) + [[committed_at] * len(self.dead)]
            out["dead_letters"] = pa.table(
                [pa.array(c, f.type) for c, f in zip(cols, _DEAD_SCHEMA, strict=True)], schema=_DEAD_SCHEMA
            )
        return out


def commit_batch(con: duckdb.DuckDBPyConnection, batch: Batch, group: str) -> dict[str, int]:
    """Write the batch's rows and its offsets atomically; duplicates by event_id are dropped.

    Returns rows actually inserted per table."""
    inserted: dict[str, int] = {}
    now = datetime.now(UTC)  # the rows' ingested_at and the offsets' updated_at
    con.execute("BEGIN TRANSACTION")
    try:
        for name, table in batch.arrow(now).items():
            con.register("_batch", table)
            sql = _DEAD_LETTER_SQL if name == "dead_letters" else _INSERT_SQL[name]
            inserted[name] = con.execute(sql).fetchall()[0][0]
            con.unregister("_batch")
        for user_id, requested_at in batch.deletions:  # same transaction: no window where both exist
            purge_user_rows(con, user_id, requested_at)
        if batch.offsets:
            offsets = pa.table(
                {
                    "consumer_group": [group] * len(batch.offsets),
                    "topic": [t for t, _ in batch.offsets],
                    "kafka_partition": pa.array([p for _, p in batch.offsets], pa.int32()),
                    "next_offset": pa.array(list(batch.offsets.values()), pa.int64()),
                    "updated_at": pa.array([now] * len(batch.offsets), pa.timestamp("us", tz="UTC")),
                }
            )
            con.register("_offsets", offsets)
            con.execute("INSERT OR REPLACE INTO kafka_offsets SELECT * FROM _offsets").fetchall()
            con.unregister("_offsets")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return inserted


def insert_events(con: duckdb.DuckDBPyConnection, events: Iterable[AnyEvent]) -> dict[str, int]:
    """Seed a warehouse directly (tests, benchmarks): same tables, same dedupe, no Kafka positions."""
    batch = Batch()
    for e in events:
        batch.add_event(e, None, None)
    return commit_batch(con, batch, group="direct")

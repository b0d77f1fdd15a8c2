"""Events -> Arrow tables -> DuckDB, a whole batch and its Kafka offsets in one transaction.

Used by the ingest consumer (``feedback.ingest``) and by anything that seeds a warehouse the same way (tests,
benchmarks). Rows are built column by column into Arrow tables and inserted with one statement per table;
row-by-row inserts are about 1,000x slower in DuckDB.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import duckdb
import pyarrow as pa

from pydantic import TypeAdapter

from feedback.events import ChatTurn, Feedback, Message, UserAction
from feedback.warehouse import DEAD_LETTER_COLUMNS, FEEDBACK_COLUMNS, TURN_COLUMNS, USER_ACTION_COLUMNS

_MESSAGES_JSON = TypeAdapter(list[Message])
_ARROW_TYPES = {
    "VARCHAR": pa.string(),
    "JSON": pa.string(),
    "INTEGER": pa.int32(),
    "BIGINT": pa.int64(),
    "DOUBLE": pa.float64(),
    "BOOLEAN": pa.bool_(),
    "TIMESTAMPTZ": pa.timestamp("us", tz="UTC"),
    "BLOB": pa.binary(),
}


def _schema(columns: list[tuple[str, str]]) -> pa.Schema:
    return pa.schema([(name, _ARROW_TYPES[sql.split()[0]]) for name, sql in columns])


SCHEMAS = {
    "turns": _schema(TURN_COLUMNS),
    "feedback": _schema(FEEDBACK_COLUMNS),
    "user_actions": _schema(USER_ACTION_COLUMNS),
    "dead_letters": _schema(DEAD_LETTER_COLUMNS),
}


@dataclass
class Batch:
    """Columnar buffers for one flush; ``offsets`` is the next offset to read per (topic, partition)."""

    columns: dict[str, dict[str, list]] = field(
        default_factory=lambda: {t: {f.name: [] for f in s} for t, s in SCHEMAS.items()}
    )
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    messages: int = 0

    def _append(self, table: str, values: dict) -> None:
        cols = self.columns[table]
        for name in cols:
            cols[name].append(values.get(name))

    def add_event(self, event: ChatTurn | Feedback | UserAction, partition: int | None, offset: int | None,
                  now: datetime) -> None:
        base = {
            "event_id": event.event_id, "schema_version": event.schema_version, "ts": event.ts,
            "user_id": event.user_id, "consent": event.consent,
            "kafka_partition": partition, "kafka_offset": offset, "ingested_at": now,
        }
        if isinstance(event, ChatTurn):
            base.update(
                conversation_id=event.conversation_id, turn_id=event.turn_id, parent_turn_id=event.parent_turn_id,
                model_version=event.model_version, origin=event.origin,
                messages=_MESSAGES_JSON.dump_json(event.messages).decode(),
                answer=event.answer, sampling=event.sampling.model_dump_json(), latency_ms=event.latency_ms,
                ttft_ms=event.ttft_ms, prompt_tokens=event.prompt_tokens,
                completion_tokens=event.completion_tokens, finish_reason=event.finish_reason,
            )
            self._append("turns", base)
        elif isinstance(event, Feedback):
            base.update(
                conversation_id=event.conversation_id, turn_id=event.turn_id, model_version=event.model_version,
                kind=event.kind, value=event.value, reason=event.reason, other_turn_id=event.other_turn_id,
                other_model_version=event.other_model_version,
            )
            self._append("feedback", base)
        else:
            base.update(action=event.action)
            self._append("user_actions", base)

    def add_dead_letter(self, topic: str, partition: int, offset: int, reason: str, detail: str, raw: bytes,
                        now: datetime) -> None:
        self._append("dead_letters", {
            "topic": topic, "kafka_partition": partition, "kafka_offset": offset, "reason": reason,
            "detail": detail, "size_bytes": len(raw), "raw_prefix": raw[:1024], "ingested_at": now,
        })

    def advance(self, topic: str, partition: int, offset: int) -> None:
        self.offsets[(topic, partition)] = offset + 1
        self.messages += 1

    def tables(self, committed_at: datetime | None = None) -> dict[str, pa.Table]:
        """Arrow tables of the batch; ``ingested_at`` is the commit time, when the rows become visible."""
        out = {}
        for t, cols in self.columns.items():
            n = len(cols[next(iter(cols))])
            if n:
                if committed_at is not None:
                    cols = {**cols, "ingested_at": [committed_at] * n}
                out[t] = pa.Table.from_pydict(cols, schema=SCHEMAS[t])
        return out


def _dedupe(table: pa.Table) -> pa.Table:
    """Keep the first row per event_id within the batch (the producer may have re-sent after a crash)."""
    if table.num_rows < 2:
        return table
    ids = table.column("event_id").to_pylist()
    seen: set[str] = set()
    keep = [not (i in seen or seen.add(i)) for i in ids]
    return table if all(keep) else table.filter(pa.array(keep))


def commit_batch(con: duckdb.DuckDBPyConnection, batch: Batch, group: str) -> dict[str, int]:
    """Write the batch's rows and its offsets atomically; duplicates by event_id are dropped.

    Returns rows actually inserted per table."""
    inserted: dict[str, int] = {}
    con.execute("BEGIN TRANSACTION")
    try:
        for name, table in batch.tables(datetime.now(UTC)).items():
            if name == "dead_letters":
                con.register("_batch", table)
                inserted[name] = con.execute("INSERT INTO dead_letters SELECT * FROM _batch").fetchall()[0][0]
            else:
                table = _dedupe(table)
                con.register("_batch", table)
                inserted[name] = con.execute(f"INSERT OR IGNORE INTO {name} SELECT * FROM _batch").fetchall()[0][0]
            con.unregister("_batch")
        if batch.offsets:
            now = datetime.now(UTC)
            offsets = pa.table({
                "consumer_group": [group] * len(batch.offsets),
                "topic": [t for t, _ in batch.offsets],
                "kafka_partition": pa.array([p for _, p in batch.offsets], pa.int32()),
                "next_offset": pa.array(list(batch.offsets.values()), pa.int64()),
                "updated_at": pa.array([now] * len(batch.offsets), pa.timestamp("us", tz="UTC")),
            })
            con.register("_offsets", offsets)
            con.execute("INSERT OR REPLACE INTO kafka_offsets SELECT * FROM _offsets").fetchall()
            con.unregister("_offsets")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return inserted


def insert_events(con: duckdb.DuckDBPyConnection, events: Iterable[ChatTurn | Feedback | UserAction]) -> dict[str, int]:
    """Seed a warehouse directly (tests, benchmarks): same tables, same dedupe, no Kafka positions."""
    batch = Batch()
    now = datetime.now(UTC)
    for e in events:
        batch.add_event(e, None, None, now)
    return commit_batch(con, batch, group="direct")

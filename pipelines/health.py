"""Ingest health: is the continuous consumer (``flywheel ingest``) keeping up?

Ingest is a continuous Kafka consumer process (low latency, exactly-once batches), not a Prefect flow; Prefect
supervises it with this check every few minutes. The consumer commits its next offsets in the warehouse's
``kafka_offsets`` table in the same transaction as the rows, so lag = broker end offset - committed offset, and
freshness = age of the newest commit. Unhealthy when lag exceeds ``max_lag_messages``, or when there is lag and
no commit for ``max_stale_s`` (the consumer is down or stuck). An idle topic with no lag is healthy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from feedback.settings import Settings
from feedback.warehouse import connect, stored_offsets


class IngestUnhealthy(RuntimeError):
    """Raised (and so fails the Prefect run loudly) when ingest lags or is stale."""


@dataclass
class IngestHealth:
    healthy: bool
    lag: dict[str, int] = field(default_factory=dict)  # "topic:partition" -> messages behind
    total_lag: int = 0
    last_commit_age_s: float | None = None
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "total_lag": self.total_lag,
            "lag": self.lag,
            "last_commit_age_s": self.last_commit_age_s,
            "problems": self.problems,
        }


def broker_end_offsets(settings: Settings, topics: list[str], timeout_s: float = 10.0) -> dict[tuple[str, int], int]:
    """End offset of every partition of ``topics`` on the real broker (missing topics have none)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        enable_auto_commit=False,
        request_timeout_ms=int(timeout_s * 1000) + 1000,
        api_version_auto_timeout_ms=5000,
    )
    try:
        tps = [TopicPartition(t, p) for t in topics for p in (consumer.partitions_for_topic(t) or ())]
        return {(tp.topic, tp.partition): o for tp, o in consumer.end_offsets(tps).items()} if tps else {}
    finally:
        consumer.close()


def check(
    settings: Settings,
    end_offsets: dict[tuple[str, int], int],
    max_lag: int,
    max_stale_s: float,
    now: datetime | None = None,
) -> IngestHealth:
    """Compare the broker's end offsets with what the consumer committed to the warehouse."""
    now = now or datetime.now(UTC)
    committed: dict[tuple[str, int], int] = {}
    last = None
    path = Path(settings.warehouse_path)
    if path.exists():
        with connect(path, read_only=True, timeout_s=settings.warehouse_lock_timeout_s) as con:
            have = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
            if "kafka_offsets" in have:
                committed = stored_offsets(con, settings.ingest_group)
                last = con.execute(
                    "SELECT max(updated_at) FROM kafka_offsets WHERE consumer_group = ?", [settings.ingest_group]
                ).fetchone()[0]
    lag = {f"{t}:{p}": max(0, end - committed.get((t, p), 0)) for (t, p), end in sorted(end_offsets.items())}
    total = sum(lag.values())
    age = (now - last).total_seconds() if last is not None else None
    problems = []
    if total > max_lag:
        problems.append(f"consumer lag {total} > {max_lag} messages")
    if total > 0 and (age is None or age > max_stale_s):
        since = "ever" if age is None else f"{age:.0f}s"
        problems.append(
            f"{total} messages waiting and no ingest commit for {since} (limit {max_stale_s:.0f}s): "
            "is `flywheel ingest` running?"
        )
    return IngestHealth(not problems, lag, total, age, problems)

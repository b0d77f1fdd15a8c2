"""Ingest health: is the continuous consumer (``flywheel ingest``) keeping up?

Ingest is a continuous Kafka consumer process (low latency, exactly-once batches), not a Prefect flow; Prefect
supervises it with this check every few minutes. The consumer commits its next offsets in the warehouse's
``kafka_offsets`` table in the same transaction as the rows; lag per topic is ``feedback.ingest.lag`` (broker end
offset minus the committed offset, or minus the topic's *beginning* offset when nothing was committed yet, so
retention-deleted messages never count), and freshness is the age of the newest commit. Unhealthy when lag
exceeds ``max_lag_messages``, or when there is lag and no commit for ``max_stale_s`` (the consumer is down or
stuck). An idle topic with no lag is healthy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from feedback.settings import Settings
from feedback.warehouse import connect


class IngestUnhealthy(RuntimeError):
    """Raised (and so fails the Prefect run loudly) when ingest lags or is stale."""


@dataclass
class IngestHealth:
    healthy: bool
    lag: dict[str, int] = field(default_factory=dict)  # topic -> messages behind
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


def broker_lag(settings: Settings) -> dict[str, int]:
    """Messages behind per ingested topic (turns, feedback), from the real broker and the warehouse's offsets."""
    from feedback.ingest import lag

    return {
        t: int(d["lag"] or 0) for t, d in lag(settings).items() if t in (settings.topic_turns, settings.topic_feedback)
    }


def last_commit(settings: Settings) -> datetime | None:
    path = Path(settings.warehouse_path)
    if not path.exists():
        return None
    with connect(path, read_only=True, timeout_s=settings.warehouse_lock_timeout_s) as con:
        have = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if "kafka_offsets" not in have:
            return None
        return con.execute(
            "SELECT max(updated_at) FROM kafka_offsets WHERE consumer_group = ?", [settings.ingest_group]
        ).fetchone()[0]


def check(
    settings: Settings, lag: dict[str, int], max_lag: int, max_stale_s: float, now: datetime | None = None
) -> IngestHealth:
    """Judge ``lag`` (topic -> messages behind) and the age of the consumer's newest warehouse commit."""
    now = now or datetime.now(UTC)
    last = last_commit(settings)
    total = sum(lag.values())
    age = (now - last).total_seconds() if last is not None else None
    problems = []
    if total > max_lag:
        problems.append(f"consumer lag {total} > {max_lag} messages")
    if total > 0 and (age is None or age > max_stale_s):
        since = "ever" if age is None else f"{age:.0f}s"
        problems.append(
            f"{total} messages waiting and no ingest commit for {since} (limit {max_stale_s:.0f}s): "
            "is `flywheel ingest` running? (start it, or `make run`)"
        )
    return IngestHealth(not problems, dict(sorted(lag.items())), total, age, problems)

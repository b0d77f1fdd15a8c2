"""Topic layout: created idempotently with settings that hold on one broker and on a production cluster."""

from __future__ import annotations

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from feedback.settings import Settings

DAY_MS = 24 * 3600 * 1000


def topic_specs(s: Settings) -> list[NewTopic]:
    common = {"min.insync.replicas": str(s.kafka_min_insync)}
    return [
        # Event streams: the warehouse is the system of record; Kafka keeps 30 days for replays.
        NewTopic(
            s.topic_turns,
            s.kafka_partitions,
            s.kafka_replication,
            topic_configs={**common, "retention.ms": str(30 * DAY_MS), "compression.type": "producer"},
        ),
        NewTopic(
            s.topic_feedback,
            s.kafka_partitions,
            s.kafka_replication,
            topic_configs={**common, "retention.ms": str(30 * DAY_MS)},
        ),
        # Dead letters are kept long enough for a human to look at them.
        NewTopic(s.topic_dlq, 1, s.kafka_replication, topic_configs={**common, "retention.ms": str(90 * DAY_MS)}),
        # The release plan: one partition (one ordered history), compacted so the latest plan per key stays.
        NewTopic(
            s.topic_releases,
            1,
            s.kafka_replication,
            topic_configs={
                **common,
                "cleanup.policy": "compact",
                "min.compaction.lag.ms": "0",
                "segment.ms": str(DAY_MS),
            },
        ),
    ]


def admin(s: Settings, timeout_ms: int = 5000) -> KafkaAdminClient:
    return KafkaAdminClient(
        bootstrap_servers=s.bootstrap_servers, request_timeout_ms=timeout_ms, client_id="flywheel-admin"
    )


def ensure_topics(s: Settings) -> list[str]:
    """Create missing topics; returns the names created (empty when all existed)."""
    client = admin(s)
    try:
        existing = set(client.list_topics())
        missing = [t for t in topic_specs(s) if t.name not in existing]
        created = []
        for t in missing:
            try:
                client.create_topics([t])
                created.append(t.name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        client.close()

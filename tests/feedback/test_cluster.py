"""`flywheel kafka start --brokers 3`: three KRaft brokers on this machine, topics with replication factor 3 and
min.insync.replicas=2, so losing one broker loses no acknowledged event and refuses no write."""

from __future__ import annotations

import random
import socket

import pytest
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType

from feedback.events import ChatTurn, Message
from feedback.ingest import IngestConsumer
from feedback.producer import EventProducer
from feedback.settings import Settings
from feedback.warehouse import connect
from infra import kafka_local

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_block(n: int) -> int:
    """``n`` consecutive free ports below Linux's ephemeral range (32768+), where client sockets the suite opens
    meanwhile cannot take one between this check and the brokers' bind (that made a broker fail to start)."""
    rng = random.Random()
    while True:
        base = rng.randrange(20_000, 32_000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()


def turn(i: int) -> ChatTurn:
    return ChatTurn(
        user_id=f"u{i % 4}",
        consent=True,
        conversation_id=f"c{i % 5}",
        turn_id=f"t{i}",
        model_version="base",
        messages=[Message(role="user", content=f"q{i}")],
        answer="a",
        latency_ms=1,
    )


def test_three_brokers_survive_losing_one(tmp_path):
    base = _free_block(6)
    s = Settings(
        home=tmp_path / "home",
        kafka_bootstrap=f"127.0.0.1:{base}",
        kafka_heap="384m",
        ingest_batch_ms=100,
        ingest_session_timeout_ms=6000,
    )
    try:
        st = kafka_local.start_cluster(s, 3, quiet=True)
        cs = kafka_local.cluster_settings(s)
        assert st.bootstrap == cs.kafka_bootstrap and len(cs.bootstrap_servers) == 3
        admin = KafkaAdminClient(bootstrap_servers=cs.bootstrap_servers)
        try:
            meta = admin.describe_topics([cs.topic_turns])[0]
            assert {len(p["replica_nodes"]) for p in meta["partitions"]} == {3}, meta
            conf = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, cs.topic_turns)])
            entries = next(iter(next(iter(conf.values())).values()))
            value = entries["min.insync.replicas"]
            assert str(value.get("value") if isinstance(value, dict) else value) == "2", entries
        finally:
            admin.close()
        p = EventProducer(cs, spool_name="cluster")
        for i in range(20):
            p.emit(turn(i))
        assert p.flush(60)
        victim = kafka_local.cluster_nodes(s)[1]
        assert kafka_local.stop_node(victim, kill=True)  # one broker of three dies
        for i in range(20, 40):
            p.emit(turn(i))
        assert p.flush(90), f"writes must go on with two of three brokers: {p.stats}"
        p.close()
        IngestConsumer(cs).run(idle_exit_s=3.0, max_seconds=120)
        with connect(cs.warehouse_path, read_only=True) as con:
            assert con.execute("SELECT count(DISTINCT turn_id) FROM turns").fetchone()[0] == 40
    finally:
        kafka_local.stop_all(s, timeout_s=20)

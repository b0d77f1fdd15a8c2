"""Data-plane faults against the real broker and DuckDB: a record Kafka refuses forever, a DLQ write that fails,
a router starting without Kafka, plans naming things that are not model versions, a consent change whose event
cannot be recorded. Each test failed on the code before its fix."""

from __future__ import annotations

import subprocess
import sys

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import KafkaError
from pydantic import ValidationError

from app.router import ReleasePlan, ReleaseRouter, publish_plan, servable_dir
from feedback.events import ChatTurn, Message
from feedback.ingest import IngestConsumer
from feedback.producer import EventProducer
from feedback.settings import Settings
from feedback.spool import Spool
from feedback.warehouse import connect
from tests.conftest import free_port

pytestmark = pytest.mark.integration


def turn(i: int) -> ChatTurn:
    return ChatTurn(
        user_id=f"u{i}",
        consent=True,
        conversation_id=f"c{i}",
        turn_id=f"t{i}",
        model_version="base",
        messages=[Message(role="user", content=f"q{i}")],
        answer=f"a{i}",
        latency_ms=1.0,
    )


def turn_ids(s: Settings) -> set[str]:
    with connect(s.warehouse_path, read_only=True) as con:
        return {r[0] for r in con.execute("SELECT turn_id FROM turns").fetchall()}


def test_a_record_kafka_refuses_forever_does_not_block_the_spool(settings):
    p = EventProducer(settings, spool_name="poison")
    try:
        p.emit(turn(1))
        p.emit_raw(settings.topic_turns, b"c", b"x" * 1_500_000)  # over the producer's max request: never accepted
        p.emit(turn(2))
        assert p.flush(60), f"the spool is stuck behind the poison record: {p.stats}"
        assert p.stats.rejected == 1
        assert [len(v) for _, _, v in p.spool.rejected_records()] == [1_500_000], "kept aside, not dropped"
    finally:
        p.close()
    IngestConsumer(settings).run(idle_exit_s=2.0, max_seconds=60)
    assert turn_ids(settings) == {"t1", "t2"}


def _dlq_max_bytes(s: Settings, value: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=s.bootstrap_servers)
    try:
        admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, s.topic_dlq, configs={"max.message.bytes": value})],
            raise_on_unknown=False,
        )
    finally:
        admin.close()


def test_a_failed_dlq_write_keeps_its_batch_uncommitted(settings):
    _dlq_max_bytes(settings, "1000")  # the DLQ now refuses the bad message below
    p = EventProducer(settings, spool_name="dlq")
    p.emit(turn(1))
    p.emit_raw(settings.topic_turns, b"c", b"{not json " + b"z" * 5000)
    assert p.flush(60)
    p.close()
    with pytest.raises(KafkaError):
        IngestConsumer(settings).run(idle_exit_s=3.0, max_seconds=60)
    with connect(settings.warehouse_path, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 0
        assert con.execute("SELECT count(*) FROM turns").fetchone()[0] == 0, "the batch must not commit"
    _dlq_max_bytes(settings, "4000000")
    stats = IngestConsumer(settings).run(idle_exit_s=3.0, max_seconds=60)
    assert stats.dead_letters == 1 and turn_ids(settings) == {"t1"}
    c = KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        consumer_timeout_ms=5000,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    tp = TopicPartition(settings.topic_dlq, 0)
    c.assign([tp])
    c.seek_to_beginning(tp)
    assert [m.value[:9] for m in c] == [b"{not json"], "the dead letter reached the DLQ topic"
    c.close()


def test_the_router_serves_the_last_plan_it_saw_when_it_starts_without_kafka(settings):
    rollback = ReleasePlan.single("base", stage="rollback")
    router = ReleaseRouter(settings).start()
    try:
        publish_plan(settings, ReleasePlan.single("sft-0002", stage="full"))
        publish_plan(settings, rollback)
        assert router.wait_for(rollback.plan_id, timeout=30)
    finally:
        router.stop()
    offline = settings.model_copy(
        update={"kafka_bootstrap": f"127.0.0.1:{free_port()}", "model_version": "sft-0002"}
    )  # the default would undo the rollback
    again = ReleaseRouter(offline)
    assert again.plan.plan_id == rollback.plan_id and again.assign("anyone") == "base"


def test_a_plan_names_only_model_versions(settings, tmp_path):
    for bad in ("../../etc", "/tmp/x", "Base", "a" * 65, ""):
        with pytest.raises(ValidationError):
            ReleasePlan.single(bad)
    stray = settings.models_dir / "stray"
    stray.mkdir(parents=True)
    (stray / "config.json").write_text("{}")
    assert servable_dir(settings, "stray") is None, "a directory without lineage is not a model version"
    (stray / "lineage.json").write_text('{"name": "stray"}')
    assert servable_dir(settings, "stray") == stray
    assert servable_dir(settings, "..") is None


def test_spool_files_are_private(settings):
    sp = Spool(settings.spool_path, "private")
    sp.append("t", None, b"secret")
    sp.close()
    out = subprocess.run(
        [sys.executable, "-c", f"import os; print(oct(os.stat('{settings.spool_path}').st_mode))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip().endswith("700")

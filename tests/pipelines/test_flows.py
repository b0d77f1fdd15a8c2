"""The Prefect flows under ``prefect_test_harness()`` on a real DuckDB warehouse (and, for ingest health, the real
Kafka broker and the real ingest consumer)."""

from __future__ import annotations

import time

import pytest

from feedback.sink import Batch, commit_batch
from feedback.warehouse import connect
from pipelines import flows
from pipelines.config import CurateConfig
from pipelines.health import IngestUnhealthy
from pipelines.snapshots import list_snapshots
from tests.pipelines.conftest import Events, seed

pytestmark = pytest.mark.usefixtures("prefect_harness")

CFG = CurateConfig(pii_model="")  # patterns-only Presidio: these tests are about flows, test_curate covers names


def test_curate_flow_writes_and_registers_one_snapshot(home_settings):
    ev = Events()
    for i in range(6):
        ev.rated(
            f"u{i}",
            f"c{i}",
            f"t{i}",
            f"question {i} about birds",
            f"Birds answer {i} reach me at a{i}@x.org",
            "up" if i % 2 else "down",
        )
    seed(home_settings.warehouse_path, ev.items)
    first = flows.curate(settings=home_settings, config=CFG)
    second = flows.curate(settings=home_settings, config=CFG)
    assert first["created"] and not second["created"]
    assert first["snapshot_id"] == second["snapshot_id"]
    assert [m["snapshot_id"] for m in list_snapshots(home_settings.datasets_dir)] == [first["snapshot_id"]]
    with connect(home_settings.warehouse_path, read_only=True) as con:
        assert con.execute("SELECT snapshot_id FROM dataset_snapshots").fetchall() == [(first["snapshot_id"],)]
    sft = list_snapshots(home_settings.datasets_dir)[0]
    assert sft["counts"]["kto"]["train"] + sft["counts"]["kto"]["eval"] == 6


def test_deletion_request_retires_older_snapshots(home_settings):
    from pipelines.snapshots import newest_usable, retire_deleted

    ev = Events()
    for i in range(4):
        ev.rated(f"u{i}", f"c{i}", f"t{i}", f"question {i} about owls", f"Owls answer {i}", "up")
    seed(home_settings.warehouse_path, ev.items)
    before = flows.curate(settings=home_settings, config=CFG)
    assert before["retired"] == []
    later = Events()
    later.n = 1000
    later.action("u1", "delete_request")
    seed(home_settings.warehouse_path, later.items)
    after = flows.curate(settings=home_settings, config=CFG)
    assert after["snapshot_id"] != before["snapshot_id"] and after["retired"] == [before["snapshot_id"]]
    snaps = {m["snapshot_id"]: m for m in list_snapshots(home_settings.datasets_dir)}
    assert snaps[before["snapshot_id"]]["retired"]["reason"].startswith("1 contributing user")
    assert snaps[after["snapshot_id"]]["retired"] is None
    assert newest_usable(home_settings.datasets_dir)["snapshot_id"] == after["snapshot_id"]
    with connect(home_settings.warehouse_path, read_only=True) as con:
        rows = dict(con.execute("SELECT snapshot_id, retired_at IS NOT NULL FROM dataset_snapshots").fetchall())
    assert rows == {before["snapshot_id"]: True, after["snapshot_id"]: False}
    with pytest.raises(ValueError, match="retired"):
        flows.train(before["snapshot_id"], settings=home_settings)
    # Purging erases the retired snapshot's data files, keeps its manifest, and leaves the fresh one alone.
    done = retire_deleted(home_settings.warehouse_path, home_settings.datasets_dir, purge_files=True)
    assert [d["snapshot_id"] for d in done] == [before["snapshot_id"]] and done[0]["files_purged"]
    old = home_settings.datasets_dir / before["snapshot_id"]
    assert not list(old.glob("*/*.parquet")) and (old / "manifest.json").exists()
    assert list((home_settings.datasets_dir / after["snapshot_id"]).glob("*/*.parquet"))


def test_volume_trigger_fires_at_n_and_not_before(home_settings):
    n = 5
    ev = Events()
    # Ratings that never count: cleared, no consent flag, a deleted user's, a tie.
    ev.turn("ux", "cx", "tx", "unrated question", "unrated answer")
    ev.thumbs("ux", "cx", "tx", "cleared")
    ev.rated("uy", "cy", "ty", "no consent q", "no consent a", "up", consent=False)
    ev.rated("uz", "cz", "tz", "deleted q", "deleted a", "up")
    ev.action("uz", "delete_request")
    for i in range(n - 1):
        ev.rated(f"u{i}", f"c{i}", f"t{i}", f"usable question {i}", f"usable answer {i}", "up")
    seed(home_settings.warehouse_path, ev.items)

    r = flows.volume_trigger(n=n, settings=home_settings, config=CFG)
    assert not r["fired"] and r["new_ratings"] == n - 1
    assert list_snapshots(home_settings.datasets_dir) == []

    more = Events()
    more.n = 1000
    more.rated("u9", "c9", "t9", "usable question 9", "usable answer 9", "down")
    seed(home_settings.warehouse_path, more.items)
    r = flows.volume_trigger(n=n, settings=home_settings, config=CFG, train_after=False)  # training: test_train_flow
    assert r["fired"] and r["new_ratings"] == n and r["train"] is None
    assert len(list_snapshots(home_settings.datasets_dir)) == 1

    # The snapshot moved the watermark: nothing new, nothing fires.
    r = flows.volume_trigger(n=n, settings=home_settings, config=CFG)
    assert not r["fired"] and r["new_ratings"] == 0


def test_ingest_health_judges_lag_and_staleness(home_settings):
    s = home_settings
    seed(s.warehouse_path, [])
    never = CurateConfig(pii_model="")
    with pytest.raises(IngestUnhealthy, match="no ingest commit for ever"):
        flows.ingest_health(settings=s, config=never, lag={s.topic_feedback: 3})
    batch = Batch()
    batch.advance(s.topic_feedback, 0, 99)  # next offset 100
    with connect(s.warehouse_path) as con:
        commit_batch(con, batch, group=s.ingest_group)
    ok = flows.ingest_health(settings=s, config=CFG, lag={s.topic_feedback: 0})
    assert ok["healthy"] and ok["total_lag"] == 0
    lagging = CurateConfig(pii_model="", max_lag_messages=10)
    with pytest.raises(IngestUnhealthy, match="lag 50"):
        flows.ingest_health(settings=s, config=lagging, lag={s.topic_feedback: 50})
    stale = CurateConfig(pii_model="", max_stale_s=0.5)
    time.sleep(1.0)
    with pytest.raises(IngestUnhealthy, match="is `flywheel ingest` running"):
        flows.ingest_health(settings=s, config=stale, lag={s.topic_feedback: 1})


@pytest.mark.integration
def test_ingest_health_against_real_broker_and_consumer(settings):
    from kafka import KafkaConsumer, TopicPartition
    from kafka.admin import KafkaAdminClient

    from feedback.ingest import IngestConsumer
    from feedback.producer import EventProducer
    from pipelines.health import broker_lag

    ev = Events()
    for i in range(5):
        ev.rated(f"u{i}", f"c{i}", f"t{i}", f"q{i}", f"a{i}", "up")
    producer = EventProducer(settings, spool_name="pipelines-test")
    try:
        for e in ev.items:
            producer.emit(e)
        assert producer.flush(30)
        assert broker_lag(settings) == {settings.topic_turns: 5, settings.topic_feedback: 5}

        # Retention removed the turns before anything was committed: lag counts from the beginning offset.
        consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers)
        try:
            tps = [TopicPartition(settings.topic_turns, p) for p in consumer.partitions_for_topic(settings.topic_turns)]
            ends = consumer.end_offsets(tps)
        finally:
            consumer.close()
        admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
        try:
            admin.delete_records({tp: o for tp, o in ends.items() if o})
        finally:
            admin.close()
        assert broker_lag(settings) == {settings.topic_turns: 0, settings.topic_feedback: 5}

        IngestConsumer(settings).run(idle_exit_s=2.0, max_seconds=60)
        ok = flows.ingest_health(settings=settings, config=CFG)
        assert ok["healthy"] and ok["total_lag"] == 0

        producer.emit(ev.turn("u0", "c0", "t-new", "q", "a"))  # arrives while nobody ingests
        assert producer.flush(30)
        time.sleep(1.0)
        with pytest.raises(IngestUnhealthy, match="1 messages waiting"):
            flows.ingest_health(settings=settings, config=CurateConfig(pii_model="", max_stale_s=0.5))
    finally:
        producer.close()

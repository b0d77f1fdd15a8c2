"""Deletion end to end, through the public API of a live app on the real model, the real broker and DuckDB:
after ``POST /v1/users/me/delete`` no text of the user is left in any store the project controls, within the
stated time; Kafka's copies are unreadable (their key is gone); a late copy never comes back; training sees the
request as pending until every step is done. Before this, a deletion request had no way in and purged nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from kafka import KafkaConsumer, TopicPartition
from openai import OpenAI

from app.annotation.queue import Task, TaskQueue
from app.annotation.roles import RoleStore
from feedback.deletion import DELETION_DEADLINE_S, pending_deletions, process_deletions, request_deletion
from feedback.events import ChatTurn, Message
from feedback.producer import EventProducer
from feedback.shred import SHREDDED, KeyStore, is_sealed, user_hash
from feedback.spool import Spool
from feedback.warehouse import connect, row_counts
from tests.app.conftest import start_app
from tests.conftest import free_port, settings_env

pytestmark = pytest.mark.integration

VICTIM, BYSTANDER = "victim", "bystander"


def _snapshot(root: Path, name: str, contributors: list[str], text: str) -> Path:
    d = root / name
    (d / "pairs").mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"snapshot_id": name, "created_at": datetime.now(UTC).isoformat()}))
    (d / "contributors.sha256").write_text("\n".join(user_hash(u) for u in contributors))
    pq.write_table(pa.table({"prompt": [text], "chosen": ["x"], "rejected": ["y"]}), d / "pairs" / "train.parquet")
    return d


def _files_containing(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def _topic_values(settings, topic: str) -> list[bytes]:
    c = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=None, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or [])]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        ends = c.end_offsets(tps)
        out: list[bytes] = []
        deadline = time.monotonic() + 30
        while any(c.position(tp) < ends[tp] for tp in tps) and time.monotonic() < deadline:
            for recs in c.poll(timeout_ms=300).values():
                out += [r.value for r in recs]
        return out
    finally:
        c.close()


def _warehouse_text(settings, marker: str) -> int:
    with connect(settings.warehouse_path, read_only=True) as con:
        return con.execute(
            "SELECT (SELECT count(*) FROM turns WHERE contains(messages::VARCHAR || answer, ?))"
            " + (SELECT count(*) FROM feedback WHERE contains(coalesce(reason, ''), ?))"
            " + (SELECT count(*) FROM dead_letters WHERE contains(hex(raw_prefix), hex(?::BLOB)))",
            [marker, marker, marker.encode()],
        ).fetchone()[0]


def test_deletion_reaches_every_store_within_the_stated_time(live, settings, kafka_broker):
    marker = f"zebra{uuid.uuid4().hex[:12]}"
    c = OpenAI(base_url=live.api, api_key="not-needed", max_retries=0)
    r = c.chat.completions.create(
        model="flywheel",
        messages=[{"role": "user", "content": f"My secret word is {marker}."}],
        max_tokens=4,
        user=VICTIM,
        extra_headers={"X-Flywheel-Consent": "1"},
    )
    fb = httpx.post(
        f"{live.api}/feedback",
        json={"turn_id": r.id, "rating": "down", "reason": f"not {marker}", "user": VICTIM},
        timeout=30,
    )
    assert fb.status_code == 200, fb.text
    c.chat.completions.create(
        model="flywheel",
        messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=4,
        user=BYSTANDER,
        extra_headers={"X-Flywheel-Consent": "1"},
    )
    victim_id = f"api:{VICTIM}"
    live.service.sessions.save_conversation(victim_id, "conv-ui", [{"role": "user", "content": marker}])
    # The trainers' queue: the victim's report of their answer (a review task about them), and a compare task
    # showing their consented conversation with a trainer's draft on it. Before, a deletion left both behind.
    rep = httpx.post(
        f"{live.api}/reports", json={"turn_id": r.id, "category": "wrong", "reason": "no", "user": VICTIM}, timeout=30
    )
    assert rep.status_code == 200, rep.text
    roles, queue = RoleStore(settings), TaskQueue(settings)
    roles.grant("tr1", "trainer")
    prompt = [{"role": "user", "content": f"My secret word is {marker}."}]
    answers = [{"answer_id": f"a{i}", "text": f"ok {i}", "model_version": "base"} for i in range(2)]
    queue.add(Task("conv-victim", "compare", prompt, answers, "conv-ui", subject_user_id=victim_id))
    queue.save_draft("tr1", "conv-victim", {"rewrite": f"Your word is {marker}."})
    assert {queue.get(t).kind for t in queue.tasks_about(victim_id)} == {"review", "compare"}
    snap = _snapshot(settings.datasets_dir, "snap-victim", [victim_id, "api:other"], marker)
    keep = _snapshot(settings.datasets_dir, "snap-other", ["api:other"], "nothing of theirs")
    model_dir = settings.models_dir / "dpo-0001"
    model_dir.mkdir(parents=True)
    (model_dir / "lineage.json").write_text(
        json.dumps({"name": "dpo-0001", "snapshot_id": "snap-victim", "tainted": False})
    )

    ingest = subprocess.Popen(
        [sys.executable, "-m", "feedback.ingest"],
        env=settings_env(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while (
            row_counts(settings.warehouse_path)["turns"] < 2 or _warehouse_text(settings, marker) < 2
        ) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _warehouse_text(settings, marker) >= 2, "the victim's turn and rating must be in the warehouse first"

        t0 = time.monotonic()
        resp = httpx.post(f"{live.api}/users/me/delete", json={"user": VICTIM}, timeout=120)
        assert resp.status_code in (200, 202), resp.text
        rid = resp.json()["request_id"]
        while not httpx.get(f"{live.api}/deletions/{rid}", timeout=30).json()["complete"]:
            assert time.monotonic() - t0 < DELETION_DEADLINE_S, "deletion missed its stated time"
            time.sleep(0.5)
        elapsed = time.monotonic() - t0
        assert pending_deletions(settings) == []

        # A late copy (an old turn re-sent after the deletion) must not bring the text back.
        late = EventProducer(settings, spool_name="late")
        late.emit(
            ChatTurn(
                user_id=victim_id,
                consent=True,
                conversation_id="c-late",
                turn_id="t-late",
                model_version="base",
                messages=[Message(role="user", content=f"late {marker}")],
                answer=marker,
                latency_ms=1.0,
                ts=datetime.now(UTC) - timedelta(minutes=5),
            )
        )
        late.emit(
            ChatTurn(
                user_id="api:other",
                consent=True,
                conversation_id="c-x",
                turn_id="t-other",
                model_version="base",
                messages=[Message(role="user", content="hi")],
                answer="ok",
                latency_ms=1.0,
            )
        )
        assert late.flush(60)
        late.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with connect(settings.warehouse_path, read_only=True) as con:
                if con.execute("SELECT count(*) FROM turns WHERE turn_id = 't-other'").fetchone()[0]:
                    break
            time.sleep(0.5)
    finally:
        ingest.terminate()
        ingest.wait(60)

    needle = marker.encode()
    assert _warehouse_text(settings, marker) == 0
    with connect(settings.warehouse_path, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM turns WHERE user_id = ?", [f"api:{BYSTANDER}"]).fetchone()[0] == 1
        assert con.execute("SELECT count(*) FROM turns WHERE turn_id = 't-other'").fetchone()[0] == 1
    stores = {
        "warehouse file": [settings.warehouse_path.parent / n for n in ("warehouse.duckdb", "warehouse.duckdb.wal")],
        "session store": list((settings.home / "app").glob("sessions.sqlite*")),
        "trainers' queue": list((settings.home / "app").glob("annotation.sqlite*")),
        "snapshots": [p for p in settings.datasets_dir.rglob("*") if p.is_file()],
        "spool": [p for p in settings.spool_path.rglob("*") if p.is_file()],
        "kafka log": [
            p for p in (kafka_broker.kafka_dir / "data").rglob("*") if p.is_file() and settings.topic_prefix in str(p)
        ],
    }
    for store, files in stores.items():
        assert files or store in ("warehouse file",), f"nothing to search in {store}?"
        hits = [str(p) for p in files if p.exists() and needle in p.read_bytes()]
        assert hits == [], f"{store} still holds the deleted text: {hits}"
    assert (snap / "RETIRED.json").exists() and not list(snap.rglob("*.parquet"))
    assert list(keep.rglob("*.parquet")), "a snapshot without the user is untouched"
    assert json.loads((model_dir / "lineage.json").read_text())["tainted"] is True
    assert live.service.sessions.list_conversations(victim_id) == []
    assert queue.tasks_about(victim_id) == [], "tasks about the user leave the queue"
    assert queue.draft("tr1", "conv-victim") is None
    roles.close()
    queue.close()

    # Kafka: the victim's sealed records are unreadable now; nobody can open them.
    ks = KeyStore(settings)
    try:
        values = _topic_values(settings, settings.topic_turns) + _topic_values(settings, settings.topic_feedback)
        assert values and not any(needle in v for v in values)
        opened = ks.open_many([v for v in values if is_sealed(v)])
        assert sum(1 for o in opened if o is SHREDDED) >= 2  # the victim's turn and rating
    finally:
        ks.close()
    print(f"deletion complete in {elapsed:.2f}s (stated {DELETION_DEADLINE_S:.0f}s)")


def test_training_sees_a_deletion_as_pending_until_every_step_is_done(settings):
    rid = request_deletion(settings, "api:someone")
    pending = pending_deletions(settings)
    assert [p.request_id for p in pending] == [rid] and set(pending[0].steps_left) == {
        "keys",
        "warehouse",
        "snapshots",
        "compacted",
    }
    assert process_deletions(settings) == []
    assert pending_deletions(settings) == []


def test_a_consent_change_whose_event_cannot_be_recorded_is_refused_not_lost(settings, model_backend):
    offline = settings.model_copy(
        update={"kafka_bootstrap": f"127.0.0.1:{free_port()}", "spool_max_bytes": 1024 * 1024}
    )
    sp = Spool(offline.spool_path, "app")
    sp.append_many([("t", None, b"q" * 1000)] * 1100)  # the outbox is at its bound while Kafka is away
    sp.close()
    app = start_app(offline, {"base": model_backend})
    try:
        r = httpx.post(
            f"{app.api}/chat/completions",
            timeout=60,
            headers={"X-Flywheel-Consent": "0"},
            json={
                "model": "flywheel",
                "user": "carol",
                "max_tokens": 2,
                "messages": [{"role": "user", "content": "hi"}],
            },
        )
        assert r.status_code == 503 and "retry" in r.json()["error"]["message"]
        assert app.service.sessions.stored_consent("api:carol") is None, "local state must not run ahead"
    finally:
        app.stop()


@pytest.mark.parametrize(
    ("body", "status"),
    [({}, 400), ({"user": "two words"}, 400), ({"user": 5}, 400), ({"user": "x" * 500}, 400), ({"nope": 1}, 400)],
)
def test_a_deletion_request_with_no_or_a_bad_user_is_a_clear_400(live, body, status):
    r = httpx.post(f"{live.api}/users/me/delete", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]

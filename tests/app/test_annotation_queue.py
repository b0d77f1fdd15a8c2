"""Roles and the trainers' task queue (issue 18): who may take what, blind judging, overlap, skips, drafts, the
edit window and rate limit; and one judgment's whole path: queue -> spool -> Kafka -> ingest -> warehouse ->
curated pairs."""

from __future__ import annotations

import time
import uuid

import pytest

from app.annotation.queue import QueueConfig, QueueError, Task, TaskQueue
from app.annotation.roles import RoleError, RoleStore
from feedback.settings import Settings

PROMPT = [{"role": "user", "content": "What is the capital of Peru?"}]
ANSWERS = [
    {"answer_id": "x1", "text": "Lima.", "model_version": "sft-0002"},
    {"answer_id": "x2", "text": "Cusco.", "model_version": "base"},
    {"answer_id": "x3", "text": "The capital of Peru is Lima.", "model_version": "dpo-0003"},
]


@pytest.fixture
def world(tmp_path):
    s = Settings(home=tmp_path / "home")
    roles, queue = RoleStore(s), TaskQueue(s, config=QueueConfig(max_per_minute=3, edit_window_s=60))
    yield s, roles, queue
    roles.close()
    queue.close()


def task(i: int = 0, **kw) -> Task:
    return Task(**{"task_id": f"task-{i}", "kind": "compare", "prompt": PROMPT, "answers": ANSWERS,
                   "conversation_id": f"conv-{i}", **kw})  # fmt: skip


def test_a_token_signs_in_only_its_annotator_and_roles_are_checked(world):
    _, roles, _ = world
    token = roles.grant("ana", "trainer")
    assert token and token.startswith("fwt_") and roles.grant("ana", "reviewer") is None, "one token per person"
    assert roles.check("ana", token).roles == ("reviewer", "trainer")
    assert roles.check("ana", token + "x") is None and roles.check("bob", token) is None
    with pytest.raises(RoleError, match="unknown role"):
        roles.grant("ana", "admin")
    with pytest.raises(RoleError, match="annotator names"):
        roles.grant("<b>ana</b>", "trainer")
    assert roles.revoke("ana", "trainer") and roles.revoke("ana", "reviewer")
    assert roles.check("ana", token) is None, "no role left: no access"


def test_judging_is_blind_and_nobody_judges_their_own(world):
    _, roles, queue = world
    for name in ("ana", "bob"):
        roles.grant(name, "trainer")
    queue.add(task(0, subject_user_id="ana"))
    ana, bob = roles.get("ana"), roles.get("bob")
    assert queue.next_for(ana) is None, "ana's own conversation"
    view = queue.next_for(bob)
    assert view.labels == ["A", "B", "C"] and sorted(view.texts) == sorted(a["text"] for a in ANSWERS)
    assert "sft-0002" not in repr(view) and "dpo-0003" not in repr(view), "no version names while judging"
    with pytest.raises(QueueError, match="own"):
        queue.submit(ana, "task-0", ranks={"x1": 1, "x2": 3, "x3": 2})


def test_overlap_skips_and_drafts(world):
    _, roles, queue = world
    for name in ("ana", "bob", "cy"):
        roles.grant(name, "trainer")
    ana, bob, cy = (roles.get(n) for n in ("ana", "bob", "cy"))
    queue.add(task(0, overlap=2))
    queue.save_draft("ana", "task-0", {"ranks": {"x1": 1}})
    assert queue.draft("ana", "task-0") == {"ranks": {"x1": 1}}, "autosaved"
    queue.submit(ana, "task-0", ranks={"x1": 1, "x2": 3, "x3": 2})
    assert queue.next_for(ana) is None, "done by ana"
    with pytest.raises(QueueError, match="say why"):
        queue.skip("bob", "task-0", " ")
    queue.skip("bob", "task-0", "outside my expertise")
    assert queue.next_for(bob) is None
    assert queue.next_for(cy).task_id == "task-0"
    queue.submit(cy, "task-0", ranks={"x1": 1, "x2": 2, "x3": 1})
    assert queue.depth()["compare"] == 0, "judged by its two annotators: out of the queue"


def test_edit_window_rate_limit_and_bad_judgments(world):
    _, roles, queue = world
    roles.grant("ana", "trainer")
    ana = roles.get("ana")
    for i in range(5):
        queue.add(task(i))
    with pytest.raises(QueueError, match="rank every answer"):
        queue.submit(ana, "task-0", ranks={"x1": 1})
    first = queue.submit(ana, "task-0", ranks={"x1": 1, "x2": 2, "x3": 3})
    again = queue.submit(ana, "task-0", ranks={"x1": 2, "x2": 3, "x3": 1})  # an edit inside the window
    assert again.event_id != first.event_id and again.task_id == first.task_id
    queue.submit(ana, "task-1", all_bad=True, rewrite="Lima is the capital of Peru.")
    queue.submit(ana, "task-2", ranks={"x1": 1, "x2": 1, "x3": 1})
    with pytest.raises(QueueError, match="submissions a minute"):
        queue.submit(ana, "task-3", ranks={"x1": 1, "x2": 2, "x3": 3})
    queue._db.execute("UPDATE assignments SET submitted_at = submitted_at - 3600")  # an hour later
    with pytest.raises(QueueError, match="window to edit"):
        queue.submit(ana, "task-0", ranks={"x1": 1, "x2": 2, "x3": 3})


def test_tasks_are_checked_when_added(world):
    _, _, queue = world
    with pytest.raises(QueueError, match="2-4 answers"):
        queue.add(task(0, answers=ANSWERS[:1]))
    with pytest.raises(QueueError, match="end with the user's"):
        queue.add(task(1, prompt=[{"role": "assistant", "content": "hi"}]))
    with pytest.raises(QueueError, match="gold answer"):
        queue.add(task(2, gold_answer_id="nope"))
    with pytest.raises(QueueError, match="unknown task kind"):
        queue.add(task(3, kind="vibes"))


def test_roles_route_kinds_and_priorities(world):
    _, roles, queue = world
    roles.grant("rev", "reviewer")
    roles.grant("red", "red_teamer")
    queue.add(task(0))
    queue.add(task(1, kind="review", priority=1.0))
    queue.add(task(2, kind="safe_response", answers=ANSWERS[:1], author="red"))
    assert queue.next_for(roles.get("rev")).task_id == "task-1", "review outweighs compare"
    assert queue.next_for(roles.get("red")) is None, "a red-teamer's own finding goes to someone else"


def test_topics_route_tasks_to_those_who_know_them(world):
    _, roles, queue = world
    for name in ("ana", "bob"):
        roles.grant(name, "trainer")
    assert roles.set_topics("ana", ["Arithmetic", "harmful", "arithmetic"]) == ("arithmetic", "harmful")
    with pytest.raises(RoleError, match="not a name"):
        roles.set_topics("ana", ["<script>"])
    with pytest.raises(RoleError, match="grant them a role first"):
        roles.set_topics("nobody", ["fact"])
    queue.add(task(0, topic="fact", priority=3.0))
    queue.add(task(1, topic="arithmetic"))
    ana, bob = roles.get("ana"), roles.get("bob")
    assert ana.topics == ("arithmetic", "harmful") and bob.topics == ()
    assert queue.next_for(ana).task_id == "task-1", "her topic before a higher priority elsewhere"
    assert queue.next_for(bob).task_id == "task-0", "no topics: priority order"
    assert queue.next_for(ana, topic="fact").task_id == "task-0", "a topic asked for comes first"
    assert roles.set_topics("ana", []) == () and queue.next_for(roles.get("ana")).task_id == "task-0"


def test_a_withdrawal_takes_the_users_tasks_and_drafts_out_of_the_queue(world):
    _, roles, queue = world
    roles.grant("ana", "trainer")
    roles.grant("red", "red_teamer")
    queue.add(task(0, subject_user_id="u-consent"))
    queue.add(task(1, subject_user_id="u-delete"))
    queue.add(task(2, kind="safe_response", answers=ANSWERS[:1], author="red"))
    queue.add(task(3))
    queue.save_draft("ana", "task-0", {"rewrite": "draft about u-consent"})
    queue.save_draft("red", "task-3", {"rewrite": "red's own draft"})
    assert queue.forget_user("u-consent", deleted=False) == 2 and queue.get("task-0") is None
    assert queue.draft("ana", "task-0") is None and queue.get("task-1") is not None
    assert queue.forget_user("u-delete") == 1 and queue.tasks_about("u-delete") == []
    assert queue.forget_user("red", deleted=False) == 0 and queue.get("task-2") is not None, "consent: subjects only"
    assert queue.forget_user("red") == 2, "a deleted annotator's finding task and own draft go"
    assert queue.get("task-2") is None and queue.draft("red", "task-3") is None and queue.get("task-3") is not None


def test_compare_tasks_come_from_consented_conversations_or_the_training_pool(tmp_path):
    import random

    from app.annotation.workspace import pool_items, topic_of
    from app.sessions import Sessions

    s = Settings(home=tmp_path / "home")
    sessions = Sessions(s)
    try:
        assert sessions.consented_prompt(random.Random(0)) is None
        convo = [
            {"role": "user", "content": "What is 12 * 7?"},
            {"role": "assistant", "content": "84."},
            {"role": "user", "content": "And 12 * 8?"},
            {"role": "assistant", "content": "96."},
        ]
        sessions.save_conversation("u-no", "c-no", [{"role": "user", "content": "private, not consented"}])
        sessions.set_consent("u-yes", True)
        sessions.save_conversation("u-yes", "c-yes", convo)
        for seed in range(5):
            user, conversation, prompt = sessions.consented_prompt(random.Random(seed))
            assert (user, conversation) == ("u-yes", "c-yes") and prompt == convo[:3], "cut after the last question"
        sessions.set_consent("u-yes", False)
        assert sessions.consented_prompt(random.Random(0)) is None
    finally:
        sessions.close()
    items = pool_items()
    assert items and {r["split"] for r in items} == {"train"}, "held-out prompts never become trainers' tasks"
    assert topic_of(items[0]["prompt"]) == items[0]["kind"] and topic_of("And 12 * 8?") == "arithmetic"
    assert topic_of("Tell me about your day") == "general"


@pytest.mark.integration
def test_a_submitted_judgment_reaches_the_warehouse_and_becomes_pairs(tmp_path, kafka_broker):
    from feedback.ingest import IngestConsumer
    from feedback.producer import EventProducer
    from feedback.topics import ensure_topics
    from feedback.warehouse import connect
    from pipelines import curate as cur
    from pipelines.config import CurateConfig
    from pipelines.pii import PiiScrubber

    tag = uuid.uuid4().hex[:8]
    s = Settings(
        home=tmp_path / "home",
        kafka_bootstrap=kafka_broker.kafka_bootstrap,
        topic_prefix=f"ann{tag}",
        ingest_group=f"ingest-{tag}",
        ingest_batch_ms=100,
    )
    ensure_topics(s)
    producer = EventProducer(s, spool_name="annotation-test")
    roles, queue = RoleStore(s), TaskQueue(s, producer=producer)
    try:
        roles.grant("ana", "trainer")
        queue.add(task(0, subject_user_id="alice"))
        sent = queue.submit(roles.get("ana"), "task-0", ranks={"x1": 1, "x2": 3, "x3": 2}, seconds=42.0)
        assert producer.flush(60)
    finally:
        producer.close()
        roles.close()
        queue.close()
    t0 = time.monotonic()
    IngestConsumer(s).run(idle_exit_s=3.0, max_seconds=120, stop_when=lambda st: sum(st.inserted.values()) >= 1)
    with connect(s.warehouse_path) as con:
        got = con.execute("SELECT event_id, user_id, subject_user_id, seconds FROM judgments").fetchall()
    assert got == [(sent.event_id, "ana", "alice", 42.0)], f"after {time.monotonic() - t0:.0f} s"
    curated = cur.curate(
        cur.read_warehouse(s.warehouse_path), CurateConfig(eval_fraction=0.0), PiiScrubber(CurateConfig(pii_model=""))
    )
    pairs = curated.tables["pairs"]["train"]
    assert len(pairs) == 3 and {p["source"] for p in pairs} == {"trainer"}
    assert {(p["model_version"], p["rejected_model_version"]) for p in pairs} == {
        ("sft-0002", "base"), ("sft-0002", "dpo-0003"), ("dpo-0003", "base"),
    }  # fmt: skip


def test_the_http_api_answers_each_refusal_with_its_status(world):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from app.annotation.api import build_annotation_api

    _, roles, queue = world
    ana = {"Authorization": f"Bearer {roles.grant('ana', 'trainer')}"}
    red = {"Authorization": f"Bearer {roles.grant('red', 'red_teamer')}"}
    queue.add(task(0))
    queue.add(task(1, subject_user_id="ana"))
    queue.add(task(2, kind="review"))
    api = FastAPI()
    api.include_router(build_annotation_api(queue, roles))
    c = TestClient(api)
    assert c.get("/annotation/next").status_code == 401
    assert c.get("/annotation/next", headers={"Authorization": "Bearer fwt_nope"}).status_code == 401
    view = c.get("/annotation/next", headers=ana).json()["task"]
    assert view["task_id"] == "task-0" and "sft-0002" not in str(view)
    ranks = {aid: i + 1 for i, aid in enumerate(view["answer_ids"])}
    assert c.post("/annotation/tasks/task-0/judgment", json={"ranks": ranks}, headers=red).status_code == 403
    assert c.post("/annotation/tasks/task-1/judgment", json={"ranks": ranks}, headers=ana).status_code == 403
    assert c.post("/annotation/tasks/task-2/judgment", json={"ranks": ranks}, headers=ana).status_code == 403
    assert c.post("/annotation/tasks/nope/judgment", json={"ranks": ranks}, headers=ana).status_code == 404
    bad = c.post("/annotation/tasks/task-0/judgment", json={"ranks": {"x1": 1}}, headers=ana)
    assert bad.status_code == 422 and "rank every answer" in bad.json()["error"]["message"]
    ok = c.post("/annotation/tasks/task-0/judgment", json={"ranks": ranks, "seconds": 3}, headers=ana)
    assert ok.status_code == 200 and ok.json()["event_id"]
    assert c.put("/annotation/tasks/task-3/draft", json={}, headers=ana).status_code == 404
    assert c.post("/annotation/tasks/task-0/skip", json={"reason": "x"}, headers=ana).status_code == 200
    assert c.get("/annotation/next", headers=ana).json()["task"] is None, "task-1 is ana's own, task-2 a review"
    # the leaderboard opt-out: one's own, with a token; a malformed body is a 422
    assert c.put("/annotation/me/leaderboard", json={"shown": False}).status_code == 401
    assert c.put("/annotation/me/leaderboard", json={"shown": "maybe"}, headers=ana).status_code == 422
    assert c.put("/annotation/me/leaderboard", json={"shown": False}, headers=ana).json()["leaderboard"] is False
    assert roles.get("ana").leaderboard is False and roles.get("red").leaderboard is True
    # what one knows best: one's own, a bad topic is a 422 with its sentence
    assert c.put("/annotation/me/topics", json={"topics": ["fact"]}).status_code == 401
    bad = c.put("/annotation/me/topics", json={"topics": ["<b>x</b>"]}, headers=ana)
    assert bad.status_code == 422 and "not a name" in bad.json()["error"]["message"]
    assert c.put("/annotation/me/topics", json={"topics": ["fact"]}, headers=ana).json()["topics"] == ["fact"]
    assert roles.get("ana").topics == ("fact",) and roles.get("red").topics == ()

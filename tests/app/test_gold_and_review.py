"""The queue checks its annotators (issue 18): gold items with known answers come unannounced, one in
``gold_every``, from the prompt set's training split only; trust follows who picks the right one; an item whose
annotators disagree goes to a reviewer once, one they agree on does not. (A real queue file; no services.)"""

from __future__ import annotations

import json

import pytest

from app.annotation.gold import PROMPTS_FILE, agreement, ensure_gold, gold_tasks, route_disagreement
from app.annotation.queue import QueueConfig, Task, TaskQueue
from app.annotation.roles import RoleStore
from feedback.settings import Settings
from pipelines.agreement import trust_scores

PROMPT = [{"role": "user", "content": "What is the capital of Peru?"}]
ANSWERS = [{"answer_id": f"x{i}", "text": f"answer {i}", "model_version": "base"} for i in range(3)]


@pytest.fixture
def world(tmp_path):
    s = Settings(home=tmp_path / "home")
    roles, queue = RoleStore(s), TaskQueue(s, config=QueueConfig(max_per_minute=100, gold_every=3))
    queue.judged_listeners.append(route_disagreement)
    yield roles, queue
    roles.close()
    queue.close()


def test_gold_items_come_from_training_facts_with_one_right_answer():
    items = {json.loads(line)["id"]: json.loads(line) for line in PROMPTS_FILE.read_text().splitlines()}
    tasks = gold_tasks(30)
    assert len(tasks) == 30 and len({t.task_id for t in tasks}) == 30
    for t in tasks:
        item = items[t.task_id.removeprefix("gold-")]
        assert item["split"] == "train", "a held-out prompt never becomes a task"
        right = next(a for a in t.answers if a["answer_id"] == t.gold_answer_id)["text"]
        wrong = next(a for a in t.answers if a["answer_id"] != t.gold_answer_id)["text"]
        assert any(acc in right for acc in item["accepted"]) and not any(acc in wrong for acc in item["accepted"])
    assert [t.task_id for t in gold_tasks(30)] == [t.task_id for t in tasks], "the same seed, the same items"


def test_gold_comes_unannounced_every_nth_task_and_trust_follows_it(world):
    roles, queue = world
    assert ensure_gold(queue, n=4) == 4 and ensure_gold(queue, n=4) == 0, "idempotent"
    assert sum(queue.depth().values()) == 0, "gold items are not work waiting"
    for i in range(6):
        queue.add(Task(f"t{i}", "compare", PROMPT, ANSWERS, conversation_id=f"c{i}", overlap=2))
    for name in ("ana", "bob"):
        roles.grant(name, "trainer")
    seen: dict[str, list[str]] = {"ana": [], "bob": []}
    for _ in range(6):
        for name in seen:
            view = queue.next_for(roles.get(name))
            seen[name].append(view.task_id)
            gold = queue.get(view.task_id).gold_answer_id
            # ana picks the gold answer first; bob the other one
            best = (
                gold if name == "ana" else next(a for a in view.answer_ids if a != gold) if gold else view.answer_ids[0]
            )
            queue.submit(roles.get(name), view.task_id, ranks={a: (1 if a == best else 2) for a in view.answer_ids})
    for name, ids in seen.items():
        assert [i.startswith("gold-") for i in ids] == [False, False, True, False, False, True], (name, ids)
    rows = [  # the warehouse's judgment rows, as pipelines/agreement reads them
        {"user_id": who, "task_id": tid, "answers": [{"answer_id": a, "rank": k} for a, k in r.items()]}
        for tid in {i for ids in seen.values() for i in ids if i.startswith("gold-")}
        for who, r in queue.rankings(tid).items()
    ]
    trust = trust_scores(rows, queue.gold())
    assert trust["ana"].accuracy == 1.0 and trust["bob"].accuracy == 0.0 and trust["ana"].score > trust["bob"].score


def test_agreement_is_ordinal_and_ties_count_half():
    assert agreement({"a": {"x": 1, "y": 2, "z": 3}, "b": {"x": 1, "y": 2, "z": 3}}) == 1.0
    assert agreement({"a": {"x": 1, "y": 2, "z": 3}, "b": {"x": 3, "y": 2, "z": 1}}) == 0.0
    assert agreement({"a": {"x": 1, "y": 2}, "b": {"x": 1, "y": 1}}) == 0.5
    assert agreement({"a": {"x": 1, "y": None}, "b": {"x": 1, "y": 2}}) is None, "nothing ranked in common"
    assert agreement({"a": {"x": 1, "y": 2}}) is None


def test_a_disagreement_goes_to_a_reviewer_once_and_an_agreement_does_not(world):
    roles, queue = world
    for name in ("ana", "bob", "rex"):
        roles.grant(name, "reviewer" if name == "rex" else "trainer")
    queue.add(Task("split", "compare", PROMPT, ANSWERS, conversation_id="c1", subject_user_id="rex", overlap=2))
    queue.add(Task("agreed", "compare", PROMPT, ANSWERS, conversation_id="c2", overlap=2))
    up, down = {"x0": 1, "x1": 2, "x2": 3}, {"x0": 3, "x1": 2, "x2": 1}
    queue.submit(roles.get("ana"), "split", ranks=up)
    assert queue.get("review-split") is None, "one judgment of two: nothing to compare yet"
    queue.submit(roles.get("bob"), "split", ranks=down)
    review = queue.get("review-split")
    assert review is not None and review.kind == "review" and review.answers == ANSWERS
    queue.submit(roles.get("bob"), "split", ranks=up)  # an edit within the window: routed already, not twice
    queue.submit(roles.get("ana"), "agreed", ranks=up)
    queue.submit(roles.get("bob"), "agreed", ranks=up)
    assert queue.get("review-agreed") is None
    assert queue.next_for(roles.get("rex")) is None, "rex is the conversation's subject: not his to review"
    roles.grant("ray", "reviewer")
    assert queue.next_for(roles.get("ray")).task_id == "review-split"


def test_a_task_id_is_queued_once_and_a_failing_follow_up_never_fails_the_judgment(world):
    """Found by benchmarks/labeling.py: two last judgments of one item at once both routed it to review, and the
    second's duplicate insert answered the trainer 500 after their judgment was recorded."""
    from app.annotation.queue import QueueError

    roles, queue = world
    t = Task("once", "compare", PROMPT, ANSWERS, conversation_id="c1")
    assert queue.add(t) == "once" and queue.add(t, if_absent=True) is None
    with pytest.raises(QueueError, match="already queued") as e:
        queue.add(t)
    assert e.value.status == 409

    def broken(_queue, _task):
        raise RuntimeError("a follow-up failed")

    queue.judged_listeners.insert(0, broken)
    roles.grant("ana", "trainer")
    sent = queue.submit(roles.get("ana"), "once", ranks={"x0": 1, "x1": 2, "x2": 3})
    assert sent.event_id and queue.rankings("once") == {"ana": {"x0": 1, "x1": 2, "x2": 3}}

"""Report in the chat (issue 18): an end user reports an answer they received; the report is an event like every
other and a task in the reviewers' queue that the reporter never gets; nobody reports another user's answer."""

from __future__ import annotations

import httpx
from openai import OpenAI

from app.annotation.queue import TaskQueue
from app.annotation.roles import RoleStore
from feedback.events import UserReport
from tests.app.conftest import read_events


def test_a_report_reaches_kafka_and_the_review_queue(live, settings):
    c = OpenAI(base_url=live.api, api_key="not-needed", max_retries=0)
    mine = c.chat.completions.create(
        model="flywheel", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, user="alice"
    )
    body = {"turn_id": mine.id, "category": "wrong", "reason": "It made up a fact."}
    r = httpx.post(f"{live.api}/reports", json={**body, "user": "mallory"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_your_turn"
    r = httpx.post(f"{live.api}/reports", json={**body, "user": "alice", "category": "boring"})
    assert r.status_code == 400, r.text
    r = httpx.post(f"{live.api}/reports", json={**body, "user": "alice"})
    assert r.status_code == 200 and r.json()["category"] == "wrong", r.text
    events = read_events(settings, settings.topic_feedback, lambda ev: any(isinstance(e, UserReport) for e in ev))
    report = next(e for e in events if isinstance(e, UserReport))
    assert report.turn_id == mine.id.removeprefix("chatcmpl-") and report.reason == "It made up a fact."
    roles, queue = RoleStore(settings), TaskQueue(settings)
    try:
        roles.grant("rev", "reviewer")
        task = queue.next_for(roles.get("rev"))
        assert task is not None and task.kind == "review" and task.task_id.startswith("report-")
        assert queue.get(task.task_id).subject_user_id == report.user_id, "the reporter never reviews their own"
        # alice withdraws her consent: the task showing her conversation leaves the queue (it stayed before)
        c.chat.completions.create(
            model="flywheel",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=2,
            user="alice",
            extra_headers={"X-Flywheel-Consent": "0"},
        )
        assert queue.tasks_about(report.user_id) == [] and queue.get(task.task_id) is None
    finally:
        roles.close()
        queue.close()

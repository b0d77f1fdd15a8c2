"""The workspace's HTTP API (issue 18): what the ``/train`` page does, for scripts, other labelling front ends and
``benchmarks/labeling.py``. ``Authorization: Bearer fwt_...`` (the token ``flywheel roles grant`` printed).

    GET  /annotation/next[?topic=...]           -> {"task": {task_id, kind, prompt, labels, texts, answer_ids} | null}
    POST /annotation/tasks/{task_id}/judgment   {ranks, scores, flags, all_bad, rewrite, seconds} -> {"event_id"}
    POST /annotation/tasks/{task_id}/skip       {"reason"}
    PUT  /annotation/tasks/{task_id}/draft      {...}            GET the same path: the saved draft
    PUT  /annotation/me/leaderboard             {"shown": false}  opt out of the ops page's leaderboard (or back in)
    PUT  /annotation/me/topics                  {"topics": ["fact", "arithmetic"]}  what one knows best: routed first

401 without a valid token, 403 for a task the annotator may not take (role, own item), 404 no such task, 409 too
late to edit or skipped, 422 an inconsistent judgment, 429 too many submissions a minute; every error is one
sentence in ``{"error": {"message": ...}}``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from app.annotation.queue import QueueError, TaskQueue
from app.annotation.roles import Annotator, RoleError, RoleStore
from feedback.spool import SpoolFull

PREFIX = "/annotation"


class JudgmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ranks: dict[str, int | None] = Field(default_factory=dict)
    scores: dict[str, dict[str, int]] = Field(default_factory=dict)
    flags: dict[str, list[str]] = Field(default_factory=dict)
    all_bad: bool = False
    rewrite: str | None = Field(None, max_length=64_000)
    seconds: float | None = Field(None, ge=0)


class LeaderboardIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shown: bool


class TopicsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    topics: list[str] = Field(max_length=64)


class SkipIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(max_length=200)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=status)


def build_annotation_api(queue: TaskQueue, roles: RoleStore) -> APIRouter:
    r = APIRouter(prefix=PREFIX)

    def who(request: Request) -> Annotator | None:
        auth = request.headers.get("authorization", "")
        return roles.bearer(auth.removeprefix("Bearer ").strip()) if auth.startswith("Bearer ") else None

    def unauthorized() -> JSONResponse:
        return _error(401, "Sign in with your annotator token: 'Authorization: Bearer fwt_...' (ask an operator).")

    @r.get("/next")
    def next_task(request: Request, topic: str | None = None) -> Any:
        a = who(request)
        if a is None:
            return unauthorized()
        view = queue.next_for(a, topic)
        return {"task": None if view is None else vars(view)}

    @r.post("/tasks/{task_id}/judgment")
    def judge(task_id: str, body: JudgmentIn, request: Request) -> Any:
        a = who(request)
        if a is None:
            return unauthorized()
        try:
            sent = queue.submit(a, task_id, **body.model_dump())
        except QueueError as e:
            return _error(e.status, str(e))
        except SpoolFull:
            return _error(503, "Judgments cannot be recorded right now; retry in a minute.")
        return {"event_id": sent.event_id, "task_id": task_id}

    @r.post("/tasks/{task_id}/skip")
    def skip(task_id: str, body: SkipIn, request: Request) -> Any:
        a = who(request)
        if a is None:
            return unauthorized()
        if queue.get(task_id) is None:
            return _error(404, f"no task {task_id}")
        try:
            queue.skip(a.name, task_id, body.reason)
        except QueueError as e:
            return _error(e.status, str(e))
        return {"skipped": task_id}

    @r.put("/tasks/{task_id}/draft")
    def save_draft(task_id: str, body: JudgmentIn, request: Request) -> Any:
        a = who(request)
        if a is None:
            return unauthorized()
        if queue.get(task_id) is None:
            return _error(404, f"no task {task_id}")
        queue.save_draft(a.name, task_id, body.model_dump())
        return {"saved": task_id}

    @r.get("/tasks/{task_id}/draft")
    def get_draft(task_id: str, request: Request) -> Any:
        a = who(request)
        if a is None:
            return unauthorized()
        return {"draft": queue.draft(a.name, task_id)}

    @r.put("/me/leaderboard")
    def leaderboard(body: LeaderboardIn, request: Request) -> Any:
        """Opt out of (or back into) the ops page's leaderboard; one's figures still weight one's judgments."""
        a = who(request)
        if a is None:
            return unauthorized()
        roles.set_leaderboard(a.name, body.shown)
        return {"annotator": a.name, "leaderboard": body.shown}

    @r.put("/me/topics")
    def topics(body: TopicsIn, request: Request) -> Any:
        """What one knows best: the queue hands tasks on these topics to this annotator before the rest."""
        a = who(request)
        if a is None:
            return unauthorized()
        try:
            return {"annotator": a.name, "topics": list(roles.set_topics(a.name, body.topics))}
        except RoleError as e:
            return _error(422, str(e))

    return r

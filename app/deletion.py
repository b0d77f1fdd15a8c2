"""A user deletes their data: from the API (``POST /v1/users/me/delete``) and from the browser (the UI calls
``delete_user(service, user_id)``).

Order matters, so nothing can be lost or half-done silently:

1. the ``delete_request`` event goes to the durable outbox first (if the outbox cannot take it, the user gets a
   clear 503 and nothing has changed: they can retry);
2. the user's payload keys are destroyed in this process (its cached key goes too), so every sealed copy of
   their turns and ratings in Kafka and in outboxes is unreadable from now on;
3. the request is recorded in the durable deletion ledger (``feedback.deletion``);
4. the app's own session store forgets them (conversations, turn ownership, consent), every loaded model
   version drops the prompt prefixes it cached for them (``ChatService.forget_cached_prompts``), and each of
   ``ChatService.withdrawal_listeners`` forgets them too (the trainers' task queue: tasks showing their
   conversation, their drafts);
5. ``feedback.deletion.process_deletions`` purges the warehouse, erases snapshots, taints models trained on
   them and compacts the warehouse file. If the warehouse is busy the request stays pending and a background
   worker retries every few seconds; ``pending_deletions(settings)`` lists it and training refuses to start.

``DELETION_DEADLINE_S`` (60 s) is the stated time; the test in ``tests/feedback/test_deletion.py`` measures it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from app.service import ChatService
from app.validation import InputError
from feedback.deletion import DELETION_DEADLINE_S, Ledger, deletion_status, pending_deletions, process_deletions
from feedback.events import UserAction
from feedback.spool import SpoolFull

log = logging.getLogger(__name__)
RETRY_S = 5.0

__all__ = ["DELETION_DEADLINE_S", "build_deletion_api", "delete_user", "install_spool_full_handler"]


def delete_user(service: ChatService, user_id: str) -> dict[str, Any]:
    """Delete everything of ``user_id`` in every store; returns the request's status (``complete`` or pending
    steps). Raises ``SpoolFull`` when the request cannot even be recorded (then nothing was changed)."""
    t0 = time.monotonic()
    service.producer.emit(UserAction(user_id=user_id, consent=False, action="delete_request"))
    if service.producer.keys is not None:
        service.producer.keys.shred(user_id)  # also drops this process's cached key
    ledger = Ledger(service.settings)
    try:
        request_id = ledger.record(user_id)
    finally:
        ledger.close()
    service.sessions.delete_user(user_id)
    service.forget_cached_prompts(user_id)
    service.withdraw(user_id, deleted=True)  # e.g. the trainers' task queue (tasks showing their conversations)
    try:
        process_deletions(service.settings, timeout_s=10.0)
    except Exception:  # noqa: BLE001 - the request is in the ledger; the worker retries
        log.exception("deletion %s: processing failed; it stays pending and is retried", request_id)
    status = deletion_status(service.settings, request_id) or {"request_id": request_id, "complete": False}
    if not status.get("complete"):
        _worker(service).kick()
    status["deadline_s"] = DELETION_DEADLINE_S
    status["elapsed_s"] = round(time.monotonic() - t0, 3)
    return status


class _DeletionWorker:
    """Retries pending deletions (warehouse busy, a crash mid-way) until none is left."""

    def __init__(self, service: ChatService):
        self.settings = service.settings
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flywheel-deletions", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(RETRY_S)
            self._wake.clear()
            try:
                if pending_deletions(self.settings):
                    left = process_deletions(self.settings, timeout_s=10.0)
                    if left:
                        log.warning("%d deletion request(s) still pending: %s", len(left), [p.last_error for p in left])
            except Exception:  # noqa: BLE001 - keep retrying; the ledger keeps the requests
                log.exception("deletion worker: processing failed; retrying in %.0fs", RETRY_S)


_workers: dict[int, _DeletionWorker] = {}
_workers_mu = threading.Lock()


def _worker(service: ChatService) -> _DeletionWorker:
    with _workers_mu:
        w = _workers.get(id(service))
        if w is None:
            w = _workers[id(service)] = _DeletionWorker(service)
        return w


class DeleteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str | None = None


def build_deletion_api(service: ChatService) -> APIRouter:
    """``POST /v1/users/me/delete`` (body ``{"user": ...}`` or ``X-Flywheel-User``: the end user inside the
    caller's own namespace) and ``GET /v1/deletions/{request_id}``."""
    from app.api import _caller, _user, api_error  # the API's one notion of who the caller is

    r = APIRouter()
    _worker(service)  # finishes requests a crash left pending

    @r.post("/v1/users/me/delete")
    async def delete_me(request: Request, body: DeleteRequest | None = None):
        try:
            user_id = _user(request, body.user if body else None)
        except InputError as e:
            return api_error(400, e.message, "invalid_request_error", e.param)
        if _caller(request).is_anonymous(user_id):
            return api_error(
                400,
                "Name the user whose data to delete in the `user` field (or X-Flywheel-User).",
                "invalid_request_error",
                "user",
            )
        status = await asyncio.to_thread(delete_user, service, user_id)  # it waits on disk, the warehouse, a step
        return JSONResponse(status, status_code=200 if status.get("complete") else 202)

    @r.get("/v1/deletions/{request_id}")
    async def deletion(request_id: str):
        st = deletion_status(service.settings, request_id[:64])
        if st is None:
            return api_error(404, "No deletion request has this id.", "invalid_request_error", "request_id")
        return {k: v for k, v in st.items() if k != "last_error"}

    return r


def install_spool_full_handler(app: FastAPI) -> None:
    """An event that cannot be recorded (disk full, outbox bound reached) is refused with a clear 503."""

    @app.exception_handler(SpoolFull)
    async def _full(request: Request, exc: SpoolFull):
        return JSONResponse(
            {
                "error": {
                    "message": "The service cannot record events right now (its outbox is full); nothing was "
                    "changed, please retry in a minute.",
                    "type": "server_error",
                    "param": None,
                    "code": "outbox_full",
                }
            },
            status_code=503,
            headers={"Retry-After": "30"},
        )

"""The OpenAI-compatible API, the feedback route for non-browser clients, health and metrics.

    POST /v1/chat/completions   streaming (SSE) and not; the official ``openai`` client and
                                ``huggingface_hub.InferenceClient`` work unchanged
    GET  /v1/models             the model versions this process serves
    POST /v1/feedback           rate a turn you received: {"turn_id", "rating": "up|down|cleared", "reason"}
                                or pairwise: {"turn_id": A, "other_turn_id": B, "rating": "a|b|tie"}
    GET  /healthz, GET /metrics

The completion ``id`` is ``chatcmpl-<turn_id>``: pass either form as ``turn_id`` to ``/v1/feedback``.
The user is the request's ``user`` field or the ``X-Flywheel-User`` header (namespaced ``api:<user>``);
``X-Flywheel-Consent: 1|0`` records the user's consent (default: no consent). ``X-Flywheel-Conversation``
groups requests into one conversation; without it a conversation is keyed by its first user message.
``model`` may name a served version to pin it; any other value (e.g. "flywheel") follows the release plan.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import aclosing
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from app.service import BUSY_MESSAGE, Busy, ChatService
from app.sessions import api_user_id
from app.validation import MAX_NEW_TOKENS, InputError, check_conversation, clean_reason
from feedback.events import Sampling

COMPLETION_PREFIX = "chatcmpl-"


def api_error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """An error body the ``openai`` client understands."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Any]
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    seed: int | None = None
    user: str | None = None
    n: int | None = None
    stream_options: dict[str, Any] | None = None


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    turn_id: str
    rating: Literal["up", "down", "cleared", "a", "b", "tie"]
    reason: str | None = None
    other_turn_id: str | None = None
    user: str | None = None


def _turn_id(s: str) -> str:
    return s.removeprefix(COMPLETION_PREFIX).strip()


def _user(request: Request, body_user: str | None) -> str:
    return api_user_id(body_user or request.headers.get("x-flywheel-user"))


def _consent(service: ChatService, request: Request, user_id: str) -> bool:
    raw = request.headers.get("x-flywheel-consent")
    if raw is None:
        return service.sessions.consent(user_id)
    consent = raw.strip().lower() in ("1", "true", "yes", "on")
    if user_id != api_user_id(None):
        service.set_consent(user_id, consent)
    return consent


def _conversation_id(request: Request, user_id: str, messages: list[dict[str, str]]) -> str:
    given = (request.headers.get("x-flywheel-conversation") or "").strip()
    if given:
        return given[:128]
    first = next((m["content"] for m in messages if m["role"] == "user"), "")
    return "api-" + hashlib.sha256(f"{user_id}\0{first}".encode()).hexdigest()[:32]


def _sampling(body: ChatCompletionRequest) -> Sampling:
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is not None and not 1 <= max_tokens <= MAX_NEW_TOKENS:
        raise InputError(f"max_tokens must be between 1 and {MAX_NEW_TOKENS}.", "max_tokens")
    if body.n not in (None, 1):
        raise InputError("Only n=1 is supported.", "n")
    kw: dict[str, Any] = {}
    if body.temperature is not None:
        kw["temperature"] = body.temperature
    if body.top_p is not None:
        kw["top_p"] = body.top_p
    if max_tokens is not None:
        kw["max_new_tokens"] = max_tokens
    if body.seed is not None:
        kw["seed"] = body.seed
    try:
        return Sampling(**kw)
    except ValidationError as e:
        err = e.errors()[0]
        raise InputError(f"Invalid {err['loc'][0]}: {err['msg']}.", str(err["loc"][0])) from None


def _openai_finish(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


def build_api(service: ChatService) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        user_id = _user(request, body.user)
        try:
            sampling = _sampling(body)
            messages = check_conversation(body.messages)
            turn = await service.start_turn(
                user_id=user_id, conversation_id=_conversation_id(request, user_id, messages), messages=messages,
                sampling=sampling, origin="api", surface="api", model_version=body.model,
                consent=_consent(service, request, user_id),
            )
        except InputError as e:
            return api_error(400, e.message, "invalid_request_error", e.param)
        except Busy:
            return api_error(429, BUSY_MESSAGE, "rate_limit_error", code="busy")
        cid = COMPLETION_PREFIX + turn.turn_id
        created = int(time.time())
        headers = {"X-Flywheel-Turn-Id": turn.turn_id, "X-Flywheel-Model-Version": turn.model_version}

        def usage() -> dict[str, int]:
            p, c = turn.prompt_tokens or 0, turn.completion_tokens or 0
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        if not body.stream:
            try:
                async with aclosing(turn.deltas()) as deltas:
                    async for _ in deltas:
                        pass
            except Exception:  # noqa: BLE001 - logged by the service; the client gets a clean 500
                return api_error(500, "The model failed while answering; please retry.", "server_error")
            return JSONResponse(
                {
                    "id": cid, "object": "chat.completion", "created": created, "model": turn.model_version,
                    "system_fingerprint": turn.model_version,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": turn.text},
                                 "logprobs": None, "finish_reason": _openai_finish(turn.finish_reason)}],
                    "usage": usage(),
                },
                headers=headers,
            )

        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def sse(obj: Any) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            return sse({
                "id": cid, "object": "chat.completion.chunk", "created": created, "model": turn.model_version,
                "system_fingerprint": turn.model_version,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            })

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            try:
                async with aclosing(turn.deltas()) as deltas:
                    async for d in deltas:
                        yield chunk({"content": d})
            except Exception:  # noqa: BLE001 - logged by the service; end the stream with an error event
                yield sse({"error": {"message": "The model failed while answering; please retry.",
                                     "type": "server_error", "param": None, "code": None}})
                return
            yield chunk({}, _openai_finish(turn.finish_reason))
            if include_usage:
                yield sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                           "model": turn.model_version, "choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"})

    @r.get("/v1/models")
    async def models():
        plan = service.router.plan
        return {
            "object": "list",
            "data": [
                {"id": v, "object": "model", "created": 0, "owned_by": "flywheel",
                 "in_release_plan": v in plan.versions()}
                for v in service.backends
            ],
        }

    @r.post("/v1/feedback")
    async def feedback(body: FeedbackRequest, request: Request):
        user_id = _user(request, body.user)
        try:
            reason = clean_reason(body.reason)
        except InputError as e:
            return api_error(400, e.message, "invalid_request_error", e.param)
        pairwise = body.rating in ("a", "b", "tie")
        if pairwise != bool(body.other_turn_id):
            return api_error(400, "Use rating up/down/cleared for one turn, or a/b/tie with other_turn_id.",
                             "invalid_request_error", "rating")
        turn = service.sessions.owned_turn(user_id, _turn_id(body.turn_id))
        other = service.sessions.owned_turn(user_id, _turn_id(body.other_turn_id)) if pairwise else None
        if turn is None or (pairwise and other is None):
            return api_error(403, "You can rate only answers that were given to you.", "permission_error",
                             "turn_id", "not_your_turn")
        fb = service.rate(user_id, turn, body.rating, reason=reason, other=other,
                          consent=_consent(service, request, user_id))
        return {"ok": True, "event_id": fb.event_id, "turn_id": turn.turn_id, "model_version": turn.model_version}

    @r.get("/healthz")
    async def healthz():
        plan = service.router.plan
        missing = service.missing_backends()
        stats = service.producer.stats
        return {
            "status": "degraded" if missing else "ok",
            "model_versions": {v: {"backend": b.name, "load": b.load()} for v, b in service.backends.items()},
            "release_plan": {"plan_id": plan.plan_id, "stage": plan.stage, "published": service.router.published,
                             "variants": {v.model_version: v.weight for v in plan.variants}},
            "missing_backends": missing,
            "backend_load_errors": service.load_errors,
            "fallback_version": service.default_version if missing else None,
            "release_router": {"connected": service.router.connected, "last_error": service.router.last_error},
            "events": {"broker_up": stats.broker_up, "pending": service.producer.pending(), "sent": stats.sent},
        }

    @r.get("/metrics")
    async def metrics():
        data, ctype = service.metrics.render()
        return Response(data, media_type=ctype)

    return r


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI-style 400s for malformed API bodies (never a stack trace, never FastAPI's 422 shape)."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = (exc.errors() or [{}])[0]
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        msg = err.get("msg", "invalid request")
        return api_error(400, f"Invalid request: {loc + ': ' if loc else ''}{msg}.", "invalid_request_error",
                         loc or None)

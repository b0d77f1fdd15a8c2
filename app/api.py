"""The OpenAI-compatible API, the feedback route for non-browser clients, health and metrics.

    POST /v1/chat/completions   streaming (SSE) and not; the official ``openai`` client and
                                ``huggingface_hub.InferenceClient`` work unchanged
    GET  /v1/models             the model versions this process serves
    POST /v1/feedback           rate a turn you received: {"turn_id", "rating": "up|down|cleared", "reason"}
                                or pairwise: {"turn_id": A, "other_turn_id": B, "rating": "a|b|tie"}
    POST /v1/reports            report a turn you received: {"turn_id", "category": "harmful|wrong|private_data"}
    GET  /healthz               {"status"} for anyone; the detail for operators (admin token)
    GET  /metrics               Prometheus text, for operators (admin token)

Callers present an API key (``Authorization: Bearer fw_...``; see ``app.keys``) unless the app runs in keyless
local mode; the server's ``Guard`` middleware resolves the caller before a route runs. The completion ``id`` is
``chatcmpl-<turn_id>``: pass either form as ``turn_id`` to ``/v1/feedback``. The end user is the request's ``user``
field or the ``X-Flywheel-User`` header, inside the caller's namespace; ``X-Flywheel-Consent: 1|0`` records that
user's consent (default: no consent). ``X-Flywheel-Conversation`` groups requests into one conversation; without
it a conversation is keyed by its first user message. ``model`` may name a served version to pin it; any other
value (e.g. "flywheel") follows the release plan. A backend failure reaches the client as an error (a 500 body,
or an ``error`` event that ends the stream), never as a normal ``stop``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.auth import is_admin
from app.database import StoreDown
from app.keys import Caller, CallerLimits
from app.service import BUSY_MESSAGE, Busy, ChatService, NotYours, TurnStream
from app.validation import InputError, Limits, check_conversation, check_sampling, clean_reason, clean_user
from feedback.events import RatingValue, ReportCategory, Sampling

log = logging.getLogger(__name__)

COMPLETION_PREFIX = "chatcmpl-"
FAILED = "The model failed while answering; please retry."
UNAVAILABLE = "The model is not answering right now; please retry in a moment."
STOPPED = "The model stopped before finishing (the server is shutting down); please retry."
ADMIN_ONLY = "This needs the operator token: send Authorization: Bearer <FLYWHEEL_ADMIN_TOKEN>."


def api_error(
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """An error body the ``openai`` client understands."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def invalid(e: InputError) -> JSONResponse:
    return api_error(400, e.message, "invalid_request_error", e.param)


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


class _TurnRequest(BaseModel):  # about one turn the caller received; ``user``: the end user in their namespace
    model_config = ConfigDict(extra="ignore")
    turn_id: str
    reason: str | None = None
    user: str | None = None


class FeedbackRequest(_TurnRequest):
    rating: RatingValue  # the event's ``value``
    other_turn_id: str | None = None


class ReportRequest(_TurnRequest):
    category: ReportCategory  # harmful | wrong | private_data


def _turn_id(s: str) -> str:
    return s.removeprefix(COMPLETION_PREFIX).strip()[:128]


def _caller(request: Request) -> Caller:
    return request.state.caller  # set by app.server.Guard for every /v1 request


def _user(request: Request, body_user: str | None) -> str:
    """The internal user id; ``InputError`` for a malformed user field."""
    return _caller(request).user_id(
        clean_user(body_user if body_user is not None else request.headers.get("x-flywheel-user"))
    )


def _consent(service: ChatService, request: Request, user_id: str) -> bool:
    raw = request.headers.get("x-flywheel-consent")
    if raw is None:
        return service.sessions.consent(user_id)
    consent = raw.strip().lower() in ("1", "true", "yes", "on")
    if not _caller(request).is_anonymous(user_id):
        service.set_consent(user_id, consent)
    return consent


def _conversation_id(request: Request, user_id: str, messages: list[dict[str, str]]) -> str:
    given = (request.headers.get("x-flywheel-conversation") or "").strip()
    if given:  # namespaced by the user, so a conversation id never joins another user's conversation
        return "api-" + hashlib.sha256(f"{user_id}\0{given}".encode()).hexdigest()[:32]
    first = next((m["content"] for m in messages if m["role"] == "user"), "")
    return "api-" + hashlib.sha256(f"{user_id}\0{first}".encode()).hexdigest()[:32]


def _sampling(body: ChatCompletionRequest, limits: Limits) -> Sampling:
    if body.n not in (None, 1):
        raise InputError("Only n=1 is supported.", "n")
    return check_sampling(
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        limits=limits,
        max_tokens=body.max_completion_tokens or body.max_tokens,
    )


class TurnResponse(StreamingResponse):
    """A streamed answer whose turn is closed however the response ends, even if its body never started (a
    client gone before the first byte): the backend slot is freed on every path."""

    def __init__(self, turn: TurnStream, content: Any, **kw: Any):
        super().__init__(content, **kw)
        self.turn = turn

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.turn.aclose()


UNRECORDED = "The service could not record this answer (its event outbox is full); please retry in a minute."


def _failure(finish_reason: str) -> tuple[int, str, str] | None:
    """How a finish reason that is not a normal end reaches API clients: (status, message, code)."""
    if finish_reason == "unrecorded":  # the answer exists but its event could not be recorded (outbox full)
        return 503, UNRECORDED, "outbox_full"
    if finish_reason == "error":
        return 500, FAILED, "model_error"
    if finish_reason == "cancelled":
        return 503, STOPPED, "model_stopped"
    return None


def _completion_body(turn: TurnStream, cid: str, created: int) -> dict[str, Any]:
    p, c = turn.prompt_tokens or 0, turn.completion_tokens or 0
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": turn.model_version,
        "system_fingerprint": turn.model_version,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": turn.text},
                "logprobs": None,
                "finish_reason": turn.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": p,
            "completion_tokens": c,
            "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": turn.cached_tokens or 0},
        },
    }


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream_events(turn: TurnStream, cid: str, created: int, include_usage: bool):
    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        return _sse(
            {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": turn.model_version,
                "system_fingerprint": turn.model_version,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
        )

    yield chunk({"role": "assistant", "content": ""})
    try:
        async with aclosing(turn.deltas()) as deltas:
            async for d in deltas:
                yield chunk({"content": d})
    except Exception:  # noqa: BLE001 - logged by the service; the failure is reported below
        turn.finish_reason = "error"
    failure = _failure("unrecorded" if turn.unrecorded else turn.finish_reason)
    if failure is not None:  # an error event ends the stream: the openai client raises it, never a clean stop
        status, message, code = failure
        yield _sse({"error": {"message": message, "type": "server_error", "param": None, "code": code}})
        return
    yield chunk({}, turn.finish_reason)
    if include_usage:
        body = _completion_body(turn, cid, created)
        yield _sse(
            {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": turn.model_version,
                "choices": [],
                "usage": body["usage"],
            }
        )
    yield "data: [DONE]\n\n"


class OpenAIApi:
    """The OpenAI-compatible routes, one method each, over one ``ChatService`` and the per-key limits."""

    def __init__(self, service: ChatService, limits: CallerLimits):
        self.service = service
        self.limits = limits

    async def start(self, body: ChatCompletionRequest, request: Request) -> TurnStream | JSONResponse:
        """Validate everything, take one of the caller's answer places, start the turn; or an error response."""
        caller = _caller(request)
        try:
            user_id = _user(request, body.user)
            version = self.service.version_for(user_id, body.model)
            lim = self.service.limits(version)
            sampling = _sampling(body, lim)
            messages = check_conversation(body.messages, lim)
            conversation_id = _conversation_id(request, user_id, messages)
            consent = _consent(self.service, request, user_id)
        except InputError as e:
            return invalid(e)
        if caller.bucket is not None and not self.limits.open_stream(caller.bucket):
            return api_error(
                429,
                f"This key already has {self.limits.streams} answers in progress; wait for one to end.",
                "rate_limit_error",
                code="too_many_streams",
            )
        try:
            turn = await self.service.start_turn(
                user_id=user_id,
                conversation_id=conversation_id,
                messages=messages,
                sampling=sampling,
                origin="api",
                surface="api",
                model_version=version,
                consent=consent,
                bucket=caller.bucket,  # fair turns per key (keyless: per end user)
            )
        except BaseException as e:
            if caller.bucket is not None:
                self.limits.close_stream(caller.bucket)
            if isinstance(e, InputError):
                return invalid(e)
            if isinstance(e, Busy):
                # retryable, and says when: the engine frees a slot within about an answer's time
                return api_error(429, BUSY_MESSAGE, "rate_limit_error", code="busy", headers={"retry-after": "1"})
            if isinstance(e, Exception):  # logged by the service; the backend itself failed to start
                log.error("the backend of %s failed to start an answer: %s", version, e)
                return api_error(503, UNAVAILABLE, "server_error", code="model_unavailable")
            raise
        if caller.bucket is not None:
            turn.on_complete.append(lambda: self.limits.close_stream(caller.bucket))
        return turn

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        turn = await self.start(body, request)
        if isinstance(turn, JSONResponse):
            return turn
        cid = COMPLETION_PREFIX + turn.turn_id
        created = int(time.time())
        headers = {"X-Flywheel-Turn-Id": turn.turn_id, "X-Flywheel-Model-Version": turn.model_version}
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return TurnResponse(
                turn,
                _stream_events(turn, cid, created, include_usage),
                media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache"},
            )
        try:
            async with aclosing(turn.deltas()) as deltas:
                async for _ in deltas:
                    pass
        except Exception:  # noqa: BLE001 - logged by the service; reported below
            turn.finish_reason = "error"
        finally:
            await turn.aclose()
        failure = _failure("unrecorded" if turn.unrecorded else turn.finish_reason)
        if failure is not None:
            status, message, code = failure
            return api_error(status, message, "server_error", code=code, headers=headers)
        return JSONResponse(_completion_body(turn, cid, created), headers=headers)

    async def models(self):
        plan = self.service.router.plan
        return {
            "object": "list",
            "data": [
                {
                    "id": v,
                    "object": "model",
                    "created": 0,
                    "owned_by": "flywheel",
                    "in_release_plan": v in plan.versions(),
                }
                for v in self.service.backends
            ],
        }

    def _own_turn(self, body: _TurnRequest, request: Request, act: Callable[[str, str, str | None], Any]) -> Any:
        """``act(user_id, turn_id, reason)`` on a turn the user received; bad input 400, another's turn 403."""
        try:
            return act(_user(request, body.user), _turn_id(body.turn_id), clean_reason(body.reason))
        except InputError as e:
            return invalid(e)
        except NotYours:
            return api_error(403, NotYours.message, "permission_error", "turn_id", "not_your_turn")

    async def feedback(self, body: FeedbackRequest, request: Request):
        def rate(user_id: str, turn_id: str, reason: str | None) -> dict[str, Any]:
            other = _turn_id(body.other_turn_id) if body.other_turn_id else None
            given = request.headers.get("x-flywheel-consent") is not None  # else the stored one, read when emitted
            consent = _consent(self.service, request, user_id) if given else None
            fb = self.service.rate(user_id, turn_id, body.rating, reason=reason, other_turn_id=other, consent=consent)
            if fb is None:  # the shared database is down: kept in this replica's outbox, emitted when it answers
                return JSONResponse(
                    {"ok": True, "queued": True, "turn_id": turn_id, "detail": "Recorded; it counts once checked."},
                    status_code=202,
                )
            return {"ok": True, "event_id": fb.event_id, "turn_id": fb.turn_id, "model_version": fb.model_version}

        return self._own_turn(body, request, rate)

    async def report(self, body: ReportRequest, request: Request):  # an answer to the trainers' review queue
        def report(user_id: str, turn_id: str, reason: str | None) -> dict[str, Any]:
            rep = self.service.report(user_id, turn_id, body.category, reason)
            return {"ok": True, "event_id": rep.event_id, "turn_id": rep.turn_id, "category": rep.category}

        return self._own_turn(body, request, report)

    async def healthz(self, request: Request):
        missing = self.service.missing_backends()
        status = "degraded" if missing else "ok"
        if not is_admin(self.service.settings, request.headers.get("authorization")):
            return {"status": status}  # anonymous callers learn nothing about paths, backends or plans
        return {"status": status, **health_detail(self.service, self.limits)}

    async def metrics(self, request: Request):
        if not is_admin(self.service.settings, request.headers.get("authorization")):
            return api_error(401, ADMIN_ONLY, "invalid_request_error", code="admin_token_required")
        data, ctype = self.service.metrics.render()
        return Response(data, media_type=ctype)


def build_api(service: ChatService, limits: CallerLimits) -> APIRouter:
    """The API's routes; each handler is a method of ``OpenAIApi`` (a reader finds and tests them one by one)."""
    api = OpenAIApi(service, limits)
    r = APIRouter()
    r.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"])
    r.add_api_route("/v1/models", api.models, methods=["GET"])
    r.add_api_route("/v1/feedback", api.feedback, methods=["POST"])
    r.add_api_route("/v1/reports", api.report, methods=["POST"])
    r.add_api_route("/healthz", api.healthz, methods=["GET"])
    r.add_api_route("/metrics", api.metrics, methods=["GET"])
    return r


def health_detail(service: ChatService, limits: CallerLimits) -> dict[str, Any]:
    """What operators see at ``/healthz``: backends and their slots, the plan, the router, the event spool."""
    plan = service.router.plan
    missing = service.missing_backends()
    stats = service.producer.stats

    def slots(b: Any) -> int | None:
        bound = getattr(b, "max_concurrency", None)
        return round(b.load() * bound) if bound else None

    return {
        "model_versions": {
            v: {"backend": b.name, "load": b.load(), "slots_in_use": slots(b)} for v, b in service.backends.items()
        },
        "open_turns": service.open_turns,
        "api_streams_open": limits.streams_open(),
        "release_plan": {
            "plan_id": plan.plan_id,
            "stage": plan.stage,
            "published": service.router.published,
            "variants": {v.model_version: v.weight for v in plan.variants},
        },
        "missing_backends": missing,
        "backend_load_errors": service.load_errors,
        "fallback_version": service.default_version if missing else None,
        "release_router": {"connected": service.router.connected, "last_error": service.router.last_error},
        "events": {"broker_up": stats.broker_up, "pending": service.producer.pending(), "sent": stats.sent},
    }


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI-style errors for every API failure a client can cause: malformed bodies (never FastAPI's 422 shape),
    an ``InputError`` raised by any route (a 400 with its sentence), and HTTP errors under ``/v1``."""

    @app.exception_handler(InputError)
    async def _input(request: Request, exc: InputError):
        return invalid(exc)

    @app.exception_handler(StoreDown)
    async def _store_down(request: Request, exc: StoreDown):
        return api_error(
            503,
            "The app's database is not answering; retry in a minute.",
            "server_error",
            code="store_down",
            headers={"retry-after": "30"},
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if not request.url.path.startswith("/v1/"):
            return await http_exception_handler(request, exc)
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return api_error(exc.status_code, f"{exc.detail}.".replace("..", "."), type_, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = (exc.errors() or [{}])[0]
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")[:100]
        msg = str(err.get("msg", "invalid request"))[:200]
        return api_error(
            400, f"Invalid request: {loc + ': ' if loc else ''}{msg}.", "invalid_request_error", loc or None
        )

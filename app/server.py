"""One server for the product: the OpenAI-compatible API and the Gradio UI (mounted at ``/``).

    python -m app.server            # serves on FLYWHEEL_APP_HOST:FLYWHEEL_APP_PORT (127.0.0.1:7860)

``create_app`` wires one of each per process: backends (from ``app.backends.registry``), the release router,
the sessions store, the API key store and per-key limits, the metrics registry and the event producer (spool
``app``). Every request first passes ``Guard`` (Host check, bounded body, API key and rate limit on ``/v1``).
Everything it reads comes from ``Settings`` (``FLYWHEEL_APP_AUTH`` for the optional browser login,
``FLYWHEEL_APP_MAX_NEW_TOKENS`` for the UI's answer length, ``FLYWHEEL_API_AUTH`` for keys); ``serve`` refuses to
listen beyond loopback without API keys.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import threading
from contextlib import asynccontextmanager
from http.cookies import SimpleCookie
from typing import Any

import gradio as gr
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi_offline import FastAPIOffline
from pydantic import SecretStr

from app.annotation.api import build_annotation_api
from app.annotation.gold import ensure_gold, route_disagreement
from app.annotation.queue import TaskQueue, queue_review
from app.annotation.roles import RoleStore
from app.annotation.workspace import mount_workspace
from app.api import build_api, install_error_handlers
from app.backends.base import Backend
from app.dashboard import mount_dashboard
from app.database import StoreDown
from app.deletion import build_deletion_api, install_spool_full_handler
from app.keys import (
    Caller,
    CallerLimits,
    ExposureError,
    KeyStore,
    access_mode,
    allowed_hosts,
    check_exposure,
    host_name,
)
from app.metrics import Metrics
from app.outbox import Outbox
from app.router import ReleaseRouter
from app.service import ChatService
from app.sessions import COOKIE_MAX_AGE, COOKIE_NAME, Sessions
from app.ui import CSS, JS, build_ui
from app.ui.model_card import system_card_text
from feedback.producer import EventProducer
from feedback.settings import Settings, get_settings
from feedback.spool import SpoolLocked

log = logging.getLogger(__name__)

Auth = list[tuple[str, str]] | None


class UserCookie:
    """ASGI middleware: a page load without a valid signed user cookie gets a new user id in one."""

    def __init__(self, app: Any, sessions: Sessions):
        self.app = app
        self.sessions = sessions

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "GET" or scope["path"] not in ("/", ""):
            return await self.app(scope, receive, send)
        raw = b"; ".join(v for k, v in scope["headers"] if k == b"cookie").decode("latin-1")
        jar = SimpleCookie()
        try:
            jar.load(raw)
        except Exception:  # noqa: BLE001 - a garbled cookie header is the same as none
            jar = SimpleCookie()
        if COOKIE_NAME in jar and self.sessions.unsign(jar[COOKIE_NAME].value):
            return await self.app(scope, receive, send)
        token = self.sessions.sign(self.sessions.new_user_id())
        cookie = f"{COOKIE_NAME}={token}; Path=/; Max-Age={COOKIE_MAX_AGE}; HttpOnly; SameSite=Lax"

        async def send_with_cookie(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode())]}
            await send(message)

        return await self.app(scope, receive, send_with_cookie)


def _json_reply(
    status: int, message: str, type_: str, code: str | None = None, extra: list[tuple[bytes, bytes]] | None = None
) -> tuple[dict, dict]:
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra or [])]
    return (
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": body},
    )


class Guard:
    """ASGI middleware, the door every request passes, in this order:

    1. the Host header must name this server (``app_allowed_hosts``): a page on another site that rebinds its
       DNS name to 127.0.0.1 gets a 400, not the chat or the API;
    2. the body is counted as it streams, Content-Length or not, and refused with a 413 past ``app_max_body_bytes``
       (what passes is handed on whole, so no route ever reads an unbounded body);
    3. a ``/v1`` request needs a valid API key (unless keyless local mode) and is admitted by its key's rate
       limit (429 with ``Retry-After``); the ``Caller`` goes to the route in ``request.state.caller``.
    """

    OPEN_V1 = ("/v1/docs", "/v1/openapi.json")

    def __init__(self, app: Any, settings: Settings, keys: KeyStore, limits: CallerLimits):
        self.app = app
        self.settings = settings
        self.keys = keys
        self.limits = limits
        self.hosts = allowed_hosts(settings)
        self.max_body = settings.app_max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = host_name(headers.get(b"host", b"").decode("latin-1"))
        if self.hosts is not None and host not in self.hosts:
            return await self._reply(
                scope,
                send,
                400,
                "This server does not answer for that Host name; add it to FLYWHEEL_APP_ALLOWED_HOSTS if it is yours.",
                "invalid_request_error",
                "bad_host",
            )
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        receive = await self._bounded_body(scope, headers, receive, send)
        if receive is None:
            return
        if scope["path"].startswith("/v1/") and scope["path"] not in self.OPEN_V1:
            try:
                caller = await self._admit(scope, headers, send)
            except StoreDown:  # keys cannot be checked: refuse, retryably, rather than serve unchecked
                await self._reply(
                    scope,
                    send,
                    503,
                    "The app's database is not answering; retry in a minute.",
                    "server_error",
                    "store_down",
                    [(b"retry-after", b"30")],
                )
                return
            if caller is None:
                return
            scope.setdefault("state", {})["caller"] = caller
        return await self.app(scope, receive, send)

    async def _reply(self, scope, send, status, message, type_, code=None, extra=None) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        start, body = _json_reply(status, message, type_, code, extra)
        await send(start)
        await send(body)

    async def _bounded_body(self, scope, headers, receive, send):
        """The request's body read whole (at most ``max_body`` bytes) and replayed; None after a 413 was sent."""
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return receive
        too_big = f"The request body is larger than {self.max_body:,} bytes."
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body:
            await self._reply(scope, send, 413, too_big, "invalid_request_error", "body_too_large")
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await self._reply(scope, send, 413, too_big, "invalid_request_error", "body_too_large")
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notices, as the server gives them

        return replay

    async def _admit(self, scope, headers, send) -> Caller | None:
        if access_mode(self.settings, self.keys) == "keys":
            key = self.keys.verify(headers.get(b"authorization", b"").decode("latin-1"))
            if key is None:
                await self._reply(
                    scope,
                    send,
                    401,
                    "A valid API key is needed: send Authorization: Bearer <key> "
                    "(an operator creates one with `flywheel keys create`).",
                    "invalid_request_error",
                    "invalid_api_key",
                )
                return None
            caller = Caller(key.key_id, f"key:{key.key_id}")
        else:
            return Caller(None, None)  # keyless mode serves this machine only (check_exposure): no quotas
        wait = self.limits.admit(caller.bucket)
        if wait is not None:
            await self._reply(
                scope,
                send,
                429,
                "Too many requests from this key; slow down and retry shortly.",
                "rate_limit_error",
                "rate_limited",
                [(b"retry-after", str(max(1, round(wait))).encode())],
            )
            return None
        return caller


MAX_REPLICAS = 64


def claim_spool(settings: Settings) -> EventProducer:
    """This process's producer, on the first free app spool of this FLYWHEEL_HOME (``app``, ``app-1``, ...): app
    replicas on one machine each own one (a spool is one process's, ``SpoolLocked``), and a replica restarting
    after a crash takes the lowest free one back and sends what was kept in it."""
    for i in range(MAX_REPLICAS):
        try:
            return EventProducer(settings, spool_name="app" if i == 0 else f"app-{i}")
        except SpoolLocked:
            continue
    raise RuntimeError(f"{MAX_REPLICAS} app replicas already run on {settings.home}; stop one or use another home")


def create_app(
    settings: Settings | None = None,
    *,
    backends: dict[str, Backend] | None = None,
    auth: Auth = None,
    max_new_tokens: int | None = None,
) -> FastAPI:
    """The combined app. Pass ``backends`` to share already-loaded models (tests); else they are loaded here
    and closed at shutdown. ``auth`` and ``max_new_tokens`` override ``settings.app_auth`` / ``app_max_new_tokens``."""
    settings = settings or get_settings()
    owns_backends = backends is None
    if backends is None:
        from app.backends.registry import load_backends

        backends = load_backends(settings)
    sessions = Sessions(settings)
    keys = KeyStore(settings)
    limits = CallerLimits.from_settings(settings)
    router = ReleaseRouter(settings)
    producer = claim_spool(settings)
    outbox = None
    if settings.app_database_url is not None:  # writes the shared database missed wait beside this replica's spool
        outbox = Outbox(producer.spool.dir / "outbox.sqlite").start()
        sessions.use_outbox(outbox)
    service = ChatService(settings, backends, router, sessions, producer, Metrics())
    roles, tasks = RoleStore(settings), TaskQueue(settings, producer=producer)
    service.report_listeners.append(functools.partial(queue_review, tasks))  # a user's report -> the review queue
    service.withdrawal_listeners.append(tasks.forget_user)  # deleted or withdrawn: their conversations leave the queue
    tasks.judged_listeners.append(route_disagreement)  # an item its annotators disagree on -> the review queue
    ensure_gold(tasks)  # gold items with known answers, mixed into trainers' tasks unannounced

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        router.start()
        stop_watching = threading.Event()
        if settings.serving == "servers":  # versions come and go with their model servers (app/model_servers.py)
            service.versions.watch_servers(stop_watching)
        try:
            yield
        finally:
            stop_watching.set()
            router.stop()
            if outbox is not None:
                outbox.close()  # before the producer: a replay pass in progress still emits into the spool
            producer.close(timeout=5)
            for b in {*(backends.values() if owns_backends else ()), *service.loaded.values()}:
                await b.aclose()
            sessions.close()
            keys.close()
            limits.close()
            roles.close()
            tasks.close()

    # The /v1 docs page with Swagger UI served from here (fastapi-offline), not from a CDN: it works offline and
    # tells no third party who reads it. Its assets live outside /v1, so they need no API key.
    app = FastAPIOffline(
        title="Flywheel",
        lifespan=lifespan,
        docs_url="/v1/docs",
        redoc_url=None,
        openapi_url="/v1/openapi.json",
        static_url="/api-docs-static",
    )
    app.state.service = service
    app.state.keys = keys
    install_error_handlers(app)
    install_spool_full_handler(app)
    app.include_router(build_api(service, limits))
    app.include_router(build_deletion_api(service))
    app.include_router(build_annotation_api(tasks, roles))  # /annotation: the workspace's HTTP API (annotator tokens)

    @app.get("/models/{version}/system-card")
    def system_card(version: str) -> Any:
        """A released version's system card, as plain text (nothing in it becomes markup)."""
        text = system_card_text(settings, version)
        if text is None:
            return JSONResponse(
                {"error": {"message": f"no system card for {version[:64]!r}: only a released version has one"}}, 404
            )
        return PlainTextResponse(text, media_type="text/plain; charset=utf-8")

    demo = build_ui(service, max_new_tokens=max_new_tokens or settings.app_max_new_tokens)
    app = mount_dashboard(app, settings)  # /ops, behind the admin token; before "/" so the chat UI does not shadow it
    app = mount_workspace(app, settings, service, tasks, roles)  # /train: AI trainers and red-teamers, signed in
    app = gr.mount_gradio_app(
        app,
        demo,
        path="/",
        auth=auth if auth is not None else parse_auth(settings.app_auth),
        css=CSS,
        js=JS,
        run_history=False,
        ssr_mode=False,
        show_error=False,
        footer_links=["gradio", "settings"],  # the API link is the UI's own "Use via API" (/v1/docs)
    )
    app.add_middleware(UserCookie, sessions=sessions)
    app.add_middleware(Guard, settings=settings, keys=keys, limits=limits)
    return app


def serve(
    settings: Settings | None = None, *, auth: Auth = None, max_new_tokens: int | None = None, log_level: str = "info"
) -> None:
    """Run the app in this process until Ctrl-C (uvicorn handles SIGINT/SIGTERM and drains requests).

    Refuses (``ExposureError``, one sentence) to serve keyless /v1 on a non-loopback address."""
    settings = settings or get_settings()
    store = KeyStore(settings)
    try:
        check_exposure(settings, store)
    finally:
        store.close()
    # Beside start-up, not before it: with the broker down this waits ~30 s, and a replica restarting during an
    # outage must serve at once (its events wait in its spool either way).
    threading.Thread(target=_ensure_topics, args=(settings,), name="ensure-topics", daemon=True).start()
    app = create_app(settings, auth=auth, max_new_tokens=max_new_tokens)
    uvicorn.run(app, host=settings.app_host, port=settings.app_port, log_level=log_level, timeout_graceful_shutdown=10)


def _ensure_topics(settings: Settings) -> None:
    try:
        from feedback.topics import ensure_topics

        ensure_topics(settings)
    except Exception as e:  # noqa: BLE001 - the producer spools until the broker is back
        log.warning("could not create Kafka topics (%s); events are spooled until the broker answers", e)


def configure_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # kafka-python logs every connection at INFO


def parse_auth(raw: SecretStr | str | None) -> Auth:
    """``FLYWHEEL_APP_AUTH="alice:secret,bob:hunter2"`` (``Settings.app_auth``) turns on Gradio login."""
    text = raw.get_secret_value() if isinstance(raw, SecretStr) else raw or ""
    pairs = [p.partition(":") for p in text.split(",") if p.strip()]
    return [(u.strip(), pw) for u, _, pw in pairs if u.strip() and pw] or None


def main() -> int:
    configure_logging()
    try:
        serve()
    except ExposureError as e:
        log.error("%s", e)
        print(f"app: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

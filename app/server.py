"""One server for the product: the OpenAI-compatible API and the Gradio UI (mounted at ``/``).

    python -m app.server            # serves on FLYWHEEL_APP_HOST:FLYWHEEL_APP_PORT (127.0.0.1:7860)

``create_app`` wires one of each per process: backends (from ``app.backends.registry``), the release router,
the sessions store, the metrics registry and the event producer (spool ``app``).
"""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager
from http.cookies import SimpleCookie
from typing import Any

import gradio as gr
import uvicorn
from fastapi import FastAPI

from app.api import build_api, install_error_handlers
from app.backends.base import Backend
from app.metrics import Metrics
from app.router import ReleaseRouter
from app.service import ChatService
from app.sessions import COOKIE_MAX_AGE, COOKIE_NAME, Sessions
from app.ui import CSS, build_ui
from app.validation import MAX_BODY_BYTES
from feedback.producer import EventProducer
from feedback.settings import Settings, get_settings

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


class BodyLimit:
    """ASGI middleware: API bodies over the limit get an OpenAI-style 413 before they are read."""

    def __init__(self, app: Any, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            size = dict(scope["headers"]).get(b"content-length", b"")
            if size.isdigit() and int(size) > self.limit:
                body = json.dumps({"error": {"message": f"The request body is larger than {self.limit:,} bytes.",
                                             "type": "invalid_request_error", "param": None, "code": None}}).encode()
                await send({"type": "http.response.start", "status": 413,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        return await self.app(scope, receive, send)


def create_app(
    settings: Settings | None = None,
    *,
    backends: dict[str, Backend] | None = None,
    auth: Auth = None,
    max_new_tokens: int = 256,
) -> FastAPI:
    """The combined app. Pass ``backends`` to share already-loaded models (tests); else they are loaded here
    and closed at shutdown."""
    settings = settings or get_settings()
    owns_backends = backends is None
    if backends is None:
        from app.backends.registry import load_backends

        backends = load_backends(settings)
    sessions = Sessions(settings)
    router = ReleaseRouter(settings)
    producer = EventProducer(settings, spool_name="app")
    service = ChatService(settings, backends, router, sessions, producer, Metrics())

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        router.start()
        try:
            yield
        finally:
            router.stop()
            producer.close(timeout=5)
            for b in {*(backends.values() if owns_backends else ()), *service.loaded.values()}:
                await b.aclose()
            sessions.close()

    app = FastAPI(title="Flywheel", lifespan=lifespan, docs_url="/v1/docs", openapi_url="/v1/openapi.json")
    app.state.service = service
    install_error_handlers(app)
    app.include_router(build_api(service))
    demo = build_ui(service, max_new_tokens=max_new_tokens)
    app = gr.mount_gradio_app(app, demo, path="/", auth=auth, css=CSS, run_history=False, ssr_mode=False,
                              show_error=False, footer_links=["api"])
    app.add_middleware(UserCookie, sessions=sessions)
    app.add_middleware(BodyLimit)
    return app


def serve(settings: Settings | None = None, *, auth: Auth = None, max_new_tokens: int = 256,
          log_level: str = "info") -> None:
    """Run the app in this process until Ctrl-C (uvicorn handles SIGINT/SIGTERM and drains requests)."""
    settings = settings or get_settings()
    try:
        from feedback.topics import ensure_topics

        ensure_topics(settings)
    except Exception as e:  # noqa: BLE001 - the producer spools until the broker is back
        log.warning("could not create Kafka topics (%s); events are spooled until the broker answers", e)
    app = create_app(settings, auth=auth, max_new_tokens=max_new_tokens)
    uvicorn.run(app, host=settings.app_host, port=settings.app_port, log_level=log_level,
                timeout_graceful_shutdown=10)


def configure_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # kafka-python logs every connection at INFO


def _auth_from_env(raw: str | None) -> Auth:
    """``FLYWHEEL_APP_AUTH="alice:secret,bob:hunter2"`` turns on Gradio login for ``python -m app.server``."""
    pairs = [p.partition(":") for p in (raw or "").split(",") if p.strip()]
    return [(u.strip(), pw) for u, _, pw in pairs if u.strip() and pw] or None


if __name__ == "__main__":
    import os

    configure_logging()
    serve(auth=_auth_from_env(os.environ.get("FLYWHEEL_APP_AUTH")),
          max_new_tokens=int(os.environ.get("FLYWHEEL_APP_MAX_NEW_TOKENS", "256")))

"""A model server: one model version behind an OpenAI-compatible streaming endpoint, apart from the app.

With ``FLYWHEEL_SERVING=servers`` the app replicas do not load models; they stream from these processes through the
remote backend (``app/backends/remote.py``), and ``app/model_servers.py`` decides which server loads which version
from the release plan. A server runs the same engine the app embeds by default (llama.cpp with continuous batching,
``app/backends/llamacpp.py``), so its batch and prefill order stay fair across parties: the request's ``user`` field
names the party (the app passes the API key or the browser user), and the engine's virtual token counters
(``app/vtc.py``) order admission and prefill by it, across every replica that sends to this server.

    python -m app.model_server --version base --port 8101        # the base model of the settings
    python -m app.model_server --version sft-0003 --port 8102    # a registered version's directory

Endpoints: ``POST /v1/chat/completions`` (``stream`` true or false), ``GET /v1/models``, ``GET /healthz``. A full
engine answers 503 with ``Retry-After`` (the app's remote backend turns it into its own retryable refusal); bad input
is a 400 with one sentence. It listens on loopback unless ``--host`` names another address, which needs
``FLYWHEEL_MODEL_SERVER_TOKEN`` (then every request must carry it as a bearer token).
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.backends.base import MODEL_SERVER_TOKEN_ENV, Backend, Busy
from app.router import servable_dir
from app.validation import DEFAULT_LIMITS, InputError, check_conversation
from feedback.events import Sampling
from feedback.settings import Settings, get_settings

log = logging.getLogger(__name__)

TOKEN_ENV = MODEL_SERVER_TOKEN_ENV
PARTY_MAX = 128


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat request this server honours; the rest are ignored."""

    model_config = ConfigDict(extra="ignore")
    messages: list[dict[str, Any]]
    model: str | None = None
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=DEFAULT_LIMITS.max_new_tokens)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    user: str | None = Field(None, max_length=PARTY_MAX)  # the party the answer counts against (fair scheduling)


CONTEXT_LENGTH = "context_length_exceeded"  # the remote backend turns it back into the engine's ValueError


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": code}}, status_code=status, headers=headers)


def create_server(backend: Backend, version: str, token: str | None = None) -> FastAPI:
    """The server's HTTP app around an already-loaded ``backend`` serving ``version``."""
    api = FastAPI(title=f"flywheel model server ({version})", docs_url=None, redoc_url=None)
    started = time.time()

    @api.middleware("http")
    async def _bearer(request: Request, call_next):
        if token is not None and request.url.path != "/healthz":
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), token.encode()):
                return _error(401, "A model server needs its bearer token (FLYWHEEL_MODEL_SERVER_TOKEN).", "auth")
        return await call_next(request)

    @api.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": version, "load": backend.load(), "up_s": round(time.time() - started, 1)}

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": version, "object": "model", "owned_by": "flywheel"}]}

    @api.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            body = ChatRequest.model_validate(await request.json())
            if body.model not in (None, version):
                raise InputError(f"This server serves {version!r}, not {body.model!r}.", "model")
            messages = check_conversation(body.messages)
        except ValueError as e:  # JSONDecodeError, ValidationError and InputError alike
            return _error(400, _one_sentence(e), "invalid_request")
        sampling = Sampling(
            temperature=body.temperature,
            top_p=body.top_p,
            max_new_tokens=body.max_tokens or DEFAULT_LIMITS.max_new_tokens,
            seed=body.seed,
        )
        party = body.user or "anonymous"
        stream = backend.stream(messages, sampling, cache_scope=party, party=party)
        try:
            first = await anext(stream)  # Busy surfaces here, before a response has begun
        except Busy as e:
            await stream.aclose()
            return _error(503, f"The model server is busy ({e}); retry in a moment.", "busy", {"Retry-After": "1"})
        except ValueError as e:  # the engine refused the prompt: longer than the model's context (OpenAI's code)
            await stream.aclose()
            return _error(400, _one_sentence(e), CONTEXT_LENGTH)
        except StopAsyncIteration:
            first = None
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            return StreamingResponse(_sse(rid, version, first, stream), media_type="text/event-stream")
        text, last = [], first
        try:
            if first is not None:
                text.append(first.text)
                async for chunk in stream:
                    text.append(chunk.text)
                    last = chunk
        finally:
            await stream.aclose()
        return {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": version,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(text)},
                    "finish_reason": (last.finish_reason if last else None) or "stop",
                }
            ],
            "usage": _usage(last),
        }

    return api


def _one_sentence(e: Exception) -> str:
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        return f"Field {'.'.join(str(p) for p in err['loc'])}: {err['msg']}."
    if isinstance(e, json.JSONDecodeError):
        return "The body is not JSON: send an OpenAI chat request."
    return str(e)


def _usage(chunk: Any) -> dict[str, int] | None:
    if chunk is None or chunk.prompt_tokens is None:
        return None
    completion = chunk.completion_tokens or 0
    return {
        "prompt_tokens": chunk.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": chunk.prompt_tokens + completion,
    }


async def _sse(rid: str, version: str, first: Any, stream: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    """OpenAI's stream: a delta per chunk, the finish reason, then the usage (``include_usage``), then [DONE]. The
    engine's stream is closed however the client leaves, which frees its slot."""

    def event(delta: dict[str, str], finish: str | None = None, usage: dict | None = None) -> bytes:
        body: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": version,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if usage is not None:
            body["choices"], body["usage"] = [], usage
        return f"data: {json.dumps(body)}\n\n".encode()

    last = first
    try:
        yield event({"role": "assistant", "content": ""})
        chunk = first
        while chunk is not None:
            if chunk.text:
                yield event({"content": chunk.text})
            last = chunk
            chunk = await anext(stream, None)
        finish = (last.finish_reason if last else None) or "stop"
        yield event({}, finish)
        if (usage := _usage(last)) is not None:
            yield event({}, usage=usage)
        yield b"data: [DONE]\n\n"
    finally:
        await stream.aclose()


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.model_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", required=True, help="the model version to serve (the base, or a registered one)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--max-concurrency", type=int, default=8, help="streams decoded together (the engine's batch)")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: every core it may use)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings: Settings = get_settings()
    token = os.environ.get(TOKEN_ENV) or None
    if not _loopback(args.host) and token is None:
        print(
            f"model server: listening on {args.host} needs {TOKEN_ENV} (a bearer token every caller sends).",
            file=sys.stderr,
        )
        return 2
    path = servable_dir(settings, args.version)
    if path is None:
        print(
            f"model server: no servable model directory for version {args.version!r} under {settings.models_dir}.",
            file=sys.stderr,
        )
        return 2
    from app.backends.registry import build_backend

    spec = {"kind": "embedded", "path": str(path), "max_concurrency": args.max_concurrency}
    if args.threads:
        spec["num_threads"] = args.threads
    backend = build_backend(spec, settings=settings)
    log.info("serving %s from %s on %s:%d", args.version, path, args.host, args.port)
    uvicorn.run(
        create_server(backend, args.version, token),
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

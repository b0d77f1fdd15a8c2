"""No error path of any kind keeps a generation slot, and a backend failure reaches API clients as an error.

Everything runs against the real model behind a real uvicorn server; the one failing upstream is a real HTTP
server on loopback that breaks its stream half-way (what a crashing TGI / vLLM box does to us).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest
from openai import OpenAI

from app.backends.remote import RemoteBackend
from feedback.events import Sampling
from tests.app.conftest import ADMIN, start_app

pytestmark = pytest.mark.integration

HI = [{"role": "user", "content": "Say hi."}]


def slots_in_use(app) -> tuple[int, int, int]:
    """(backend slots in use, open turns, API streams open) as the operator's /healthz reports them."""
    h = httpx.get(f"{app.url}/healthz", headers=ADMIN, timeout=10).json()
    return sum(v["slots_in_use"] or 0 for v in h["model_versions"].values()), h["open_turns"], h["api_streams_open"]


def wait_idle(app, timeout: float = 20.0) -> tuple[int, int, int]:
    deadline = time.monotonic() + timeout
    while (state := slots_in_use(app)) != (0, 0, 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    return state


def raw_request(url: str, body: dict, *, read: int = 0) -> None:
    """Send a request on a plain socket, read ``read`` bytes of the answer, then vanish."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(data), data)
        )
        got = b""
        while len(got) < read:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk


class BrokenUpstream:
    """A real HTTP server that starts an OpenAI-style SSE stream, sends one delta, then drops the connection."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                head = b""
                while b"\r\n\r\n" not in head:
                    head += conn.recv(65536)
                length = next(
                    (int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")), 0
                )
                body = head.split(b"\r\n\r\n", 1)[1]
                while len(body) < length:
                    body += conn.recv(65536)
                delta = json.dumps(
                    {
                        "id": "x",
                        "object": "chat.completion.chunk",
                        "created": 0,
                        "model": "m",
                        "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}],
                    }
                )
                event = f"data: {delta}\n\n".encode()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + b"%x\r\n%s\r\n" % (len(event), event)
                )
                time.sleep(0.2)  # then the upstream dies mid-stream: no terminating chunk

    def close(self) -> None:
        self.sock.close()


def test_out_of_range_seeds_free_their_slot_in_the_backend(model_backend):
    """The defect behind 'every later request is 429 until restart': the engine rejected the seed after the slot
    was taken. Straight at the backend, without the API's boundary check. Which seeds an engine rejects is its own
    (torch: anything outside int64; llama.cpp's sampler, numpy's Generator: any negative seed); a seed it accepts
    streams, and closing the stream gives the slot back too."""

    async def burst() -> tuple[int, int]:
        refused = streamed = 0
        for seed in (2**64, 2**70, -(2**63) - 1, -1) * 3:
            agen = model_backend.stream(HI, Sampling(temperature=0.7, seed=seed, max_new_tokens=2))
            try:
                await agen.__anext__()
                streamed += 1
            except (ValueError, RuntimeError, OverflowError):
                refused += 1
            finally:
                await agen.aclose()
        return refused, streamed

    refused, streamed = asyncio.run(burst())
    assert refused >= 3 and refused + streamed == 12, (refused, streamed)  # -(2**63)-1 is out of range for both
    assert model_backend.load() == 0.0, "every slot given back"


def test_every_error_path_gives_the_slot_back(settings, model_backend):
    settings = settings.model_copy(update={"app_turn_claim_s": 2.0})
    upstream = BrokenUpstream()
    broken = RemoteBackend(upstream.url, model="m", max_concurrency=4)
    app = start_app(settings, {"base": model_backend, "broken": broken}, max_new_tokens=8)
    c = OpenAI(base_url=app.api, api_key="x", max_retries=0)
    post = f"{app.api}/chat/completions"
    try:
        # 1. a burst of out-of-range sampling values: clear 400s, and nothing is held afterwards
        for bad in (
            {"seed": 2**64},
            {"seed": -1},
            {"temperature": 99},
            {"top_p": 0},
            {"max_tokens": 0},
            {"max_tokens": 10**9},
            {"n": 3},
        ) * 4:
            r = httpx.post(post, json={"messages": HI, **bad})
            assert r.status_code == 400, (bad, r.text)
        r = httpx.post(
            post,
            content=b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400
        # 2. invalid conversations and a prompt longer than the model's window (the backend itself refuses it)
        for messages in (
            [],
            [{"role": "assistant", "content": "x"}],
            [{"role": "user", "content": "\x00"}],
            [{"role": "user", "content": "\U0001f600" * 2000}],
        ):
            assert httpx.post(post, json={"messages": messages, "max_tokens": 2}).status_code == 400
        assert wait_idle(app, 5) == (0, 0, 0)

        # 3. clients that leave: before the first byte, mid-stream, and a non-streaming client that times out
        for read in (0, 300):
            for _ in range(3):
                raw_request(app.url, {"messages": HI, "max_tokens": 64, "stream": True}, read=read)
        # a long answer (a story, 200 tokens: over a second on this machine), not "hi": its reply of ~10 tokens came
        # back inside the client's 0.3 s once small steps got faster, and nothing timed out
        story = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
        with pytest.raises(httpx.TimeoutException):
            httpx.post(post, json={"messages": story, "max_tokens": 200}, timeout=0.1)
        # 4. a task cancelled while it waits for its first token, and a turn nobody ever reads
        service = app.service

        async def cancelled_and_dropped():
            task = asyncio.ensure_future(
                service.start_turn(
                    user_id="api:x",
                    conversation_id="c",
                    messages=HI,
                    sampling=Sampling(max_new_tokens=4),
                    origin="api",
                    surface="api",
                )
            )
            await asyncio.sleep(0.001)
            task.cancel()
            dropped = await service.start_turn(
                user_id="api:x",
                conversation_id="c2",
                messages=HI,
                sampling=Sampling(max_new_tokens=400),
                origin="api",
                surface="api",
            )
            await asyncio.sleep(settings.app_turn_claim_s + 1.0)  # the unread-turn timer closes it
            return dropped

        dropped = asyncio.run(cancelled_and_dropped())  # the backend serves any event loop, this one too
        assert dropped.done and dropped.finish_reason == "cancelled"

        # 5. a backend that breaks mid-answer: an error for the client, never a normal stop (streaming or not)
        r = httpx.post(post, json={"model": "broken", "messages": HI, "max_tokens": 8})
        assert r.status_code == 500 and r.json()["error"]["code"] == "model_error"
        with pytest.raises(openai.APIError):
            for _ in c.chat.completions.create(model="broken", messages=HI, max_tokens=8, stream=True):
                pass
        assert broken.load() == 0.0

        assert wait_idle(app) == (0, 0, 0), "a slot was not given back"
        ok = c.chat.completions.create(model="flywheel", messages=HI, max_tokens=4)  # and the app still serves
        assert ok.choices[0].finish_reason in ("stop", "length")
    finally:
        app.stop()
        upstream.close()

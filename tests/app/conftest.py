"""App fixtures: the real embedded model (loaded once per session), a real uvicorn server per test on a free
port, and helpers that read events back from the real Kafka topics."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import uvicorn
from kafka import KafkaConsumer, TopicPartition

from feedback.events import parse_event
from feedback.settings import Settings
from feedback.shred import open_value
from tests.conftest import REPO, free_port, need_model

MODEL = REPO / ".flywheel" / "models" / "base"
ADMIN_TOKEN = "test-operator-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}  # headers for operator routes (/healthz detail, /metrics)


def _embedded(max_concurrency: int, max_queue: int) -> Iterator:
    # The product's engine (Settings.serve_engine: llama.cpp at f16), not the transformers reference: the app tests
    # then test what `make run` serves, and their simulated users' answers come ~10x faster on 2 cores.
    # tests/app/test_backends.py covers the transformers engine against it.
    from app.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(need_model(MODEL), max_concurrency=max_concurrency, max_queue=max_queue)
    yield backend
    asyncio.run(backend.aclose())


@pytest.fixture(scope="session")
def model_backend():
    """The real SmolLM2 model behind the embedded continuous-batching backend (llama.cpp), shared by all app tests."""
    yield from _embedded(max_concurrency=4, max_queue=4)


@pytest.fixture(scope="session")
def tiny_backend():
    """The same real model with a bound of one request and no queue: the second caller is told it is busy."""
    yield from _embedded(max_concurrency=1, max_queue=0)


@dataclass
class LiveApp:
    url: str
    app: object
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def service(self):
        return self.app.state.service

    @property
    def api(self) -> str:
        return f"{self.url}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_app(settings: Settings, backends: dict, **kw) -> LiveApp:
    """The combined app (API + UI) under a real uvicorn server in a thread, as ``python -m app.server`` runs it."""
    from pydantic import SecretStr

    from app.server import create_app

    if settings.admin_token is None:
        settings = settings.model_copy(update={"admin_token": SecretStr(ADMIN_TOKEN)})
    app = create_app(settings, backends=backends, **kw)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the app server did not start")
        time.sleep(0.05)
    return LiveApp(f"http://127.0.0.1:{port}", app, server, thread)


@pytest.fixture
def live(settings: Settings, model_backend) -> Iterator[LiveApp]:
    app = start_app(settings, {settings.model_version: model_backend}, max_new_tokens=24)
    yield app
    app.stop()


def read_events(settings: Settings, topic: str, until: Callable[[list], bool], timeout: float = 30.0) -> list:
    """Every event on ``topic`` from the beginning, polling until ``until(events)`` holds (or failing)."""
    consumer = KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        events: list = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                events += [parse_event(open_value(settings, r.value)) for r in records]
            if until(events):
                return events
        raise AssertionError(f"events on {topic} never satisfied the condition; got {events}")
    finally:
        consumer.close()

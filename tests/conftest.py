"""Shared fixtures: the real Apache Kafka broker the suite starts, and a fresh world per test.

- ``kafka_broker`` (session): one real KRaft broker on free ports, its data in a session tmp dir.
- ``settings``: per test, a fresh ``FLYWHEEL_HOME``, a unique topic prefix (fresh topics) and consumer group,
  topics created. ``settings_env(settings)`` gives the same world to a subprocess.
- ``own_broker``: a broker of the test's own, for tests that stop, kill or restart it.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

from feedback.settings import Settings
from feedback.topics import ensure_topics
from infra import kafka_local

REPO = Path(__file__).resolve().parents[1]

# Fixtures that start a service or load the model. A test using one is an integration test whatever markers it
# was written with, so `make test-fast` (which deselects integration, browser and slow) really needs nothing.
SERVICE_FIXTURES = frozenset(
    {
        "kafka_broker",
        "settings",
        "own_broker",
        "model_backend",
        "tiny_backend",
        "live",
        "prefect_harness",
        "trained_home",
    }
)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.integration)


def need_model(path: Path) -> Path:
    """The real model must be there: a missing model fails the test (CI must never skip it)."""
    if not (path / "config.json").exists():
        pytest.fail(f"the base model is missing at {path}: run `make setup` (infra/prepare_model.py)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings_env(s: Settings) -> dict[str, str]:
    """Environment for a subprocess that must see the same world as ``s``."""
    env = dict(os.environ)
    env.update(
        {
            "FLYWHEEL_HOME": str(s.home),
            "FLYWHEEL_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
            "FLYWHEEL_KAFKA_CONTROLLER_PORT": str(s.kafka_controller_port),
            "FLYWHEEL_TOPIC_PREFIX": s.topic_prefix,
            "FLYWHEEL_INGEST_GROUP": s.ingest_group,
            "FLYWHEEL_INGEST_BATCH_MS": str(s.ingest_batch_ms),
            "FLYWHEEL_INGEST_BATCH_MAX": str(s.ingest_batch_max),
            "FLYWHEEL_INGEST_SESSION_TIMEOUT_MS": str(s.ingest_session_timeout_ms),
            "FLYWHEEL_BASE_MODEL": str(s.base_model_path),
            "PYTHONPATH": str(REPO),
        }
    )
    return env


def _broker_settings(home: Path) -> Settings:
    return Settings(
        home=home, kafka_bootstrap=f"127.0.0.1:{free_port()}", kafka_controller_port=free_port(), kafka_heap="512m"
    )


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory) -> Settings:
    s = _broker_settings(tmp_path_factory.mktemp("broker"))
    kafka_local.start(s, create_topics=False, quiet=True)
    yield s
    kafka_local.stop(s)


@pytest.fixture
def settings(kafka_broker: Settings, tmp_path: Path) -> Settings:
    tag = uuid.uuid4().hex[:10]
    s = Settings(
        home=tmp_path / "home",
        kafka_bootstrap=kafka_broker.kafka_bootstrap,
        kafka_controller_port=kafka_broker.kafka_controller_port,
        topic_prefix=f"t{tag}",
        ingest_group=f"ingest-{tag}",
        ingest_batch_ms=100,
        ingest_session_timeout_ms=6_000,
        base_model=str(REPO / ".flywheel" / "models" / "base")
        if not os.environ.get("FLYWHEEL_BASE_MODEL")
        else os.environ["FLYWHEEL_BASE_MODEL"],
    )
    s.home.mkdir(parents=True)
    ensure_topics(s)
    return s


@pytest.fixture
def own_broker(tmp_path: Path) -> Settings:
    """A broker only this test uses (it may stop or kill it); stopped at the end."""
    tag = uuid.uuid4().hex[:10]
    base = _broker_settings(tmp_path / "home")
    s = Settings(
        home=base.home,
        kafka_bootstrap=base.kafka_bootstrap,
        kafka_controller_port=base.kafka_controller_port,
        kafka_heap="512m",
        ingest_group=f"ingest-{tag}",
        ingest_batch_ms=100,
        ingest_session_timeout_ms=6_000,
    )
    kafka_local.start(s, quiet=True)
    yield s
    kafka_local.stop(s, kill=True)

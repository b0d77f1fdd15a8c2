"""Training fixtures: a real snapshot curated from simulated events, and a home with MLflow's real SQLite store.

The simulated users have one consistent taste (short, friendly answers that start with the answer; no long
lists), so a reward model can learn it and a policy trained on their ratings can be judged for it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from feedback.settings import Settings
from tests.conftest import REPO, need_model
from tests.pipelines.conftest import Events, seed

BASE = REPO / ".flywheel" / "models" / "base"

PROMPTS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What colour is the sky on a clear day?",
    "Name a fruit that is yellow.",
    "What is two plus three?",
    "Which planet is closest to the sun?",
    "What do bees make?",
    "How many days are in a week?",
    "What is frozen water called?",
    "Which animal is known as the king of the jungle?",
    "What language is spoken in Spain?",
    "What is the opposite of hot?",
    "How many hours are in a day?",
    "What gas do plants breathe in?",
    "What is the largest ocean?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "How many continents are there?",
    "What is the chemical symbol for gold?",
    "What shape has three sides?",
]
SHORT = [
    "Hello! Paris.",
    "Hi! Eight legs.",
    "Hello! Blue.",
    "Hi! A banana.",
    "Hello! Five.",
    "Hi! Mercury.",
    "Hello! Honey.",
    "Hi! Seven.",
    "Hello! Ice.",
    "Hi! The lion.",
    "Hello! Spanish.",
    "Hi! Cold.",
    "Hello! Twenty-four.",
    "Hi! Carbon dioxide.",
    "Hello! The Pacific.",
    "Hi! William Shakespeare.",
    "Hello! 100 degrees.",
    "Hi! Seven.",
    "Hello! Au.",
    "Hi! A triangle.",
]
LONG_TAIL = (
    " There are many things to consider here:\n1. History\n2. Context\n3. Several other factors"
    "\nIn conclusion, it depends on many considerations that we could discuss at great length."
)


def simulated_events(n_users: int = 6) -> list:
    ev = Events()
    for i, (prompt, short) in enumerate(zip(PROMPTS, SHORT, strict=True)):
        user = f"sim-{i % n_users}"
        conv = f"c{i:03d}"
        long = f"Well, let me think about {prompt.lower().rstrip('?')}." + LONG_TAIL
        # the first answer was long (disliked), the regeneration short (liked): a pair, and two KTO rows
        ev.rated(user, conv, f"t{i:03d}a", prompt, long, "down", origin="new")
        ev.turn(user, conv, f"t{i:03d}b", prompt, short, origin="regenerate", parent=f"t{i:03d}a")
        ev.thumbs(user, conv, f"t{i:03d}b", "up")
        if i % 2 == 0:  # a side-by-side comparison as well
            ev.turn(user, conv, f"t{i:03d}c", prompt, short.replace("Hello! ", "Hi there! "), origin="compare")
            ev.turn(user, conv, f"t{i:03d}d", prompt, long + " Also.", origin="compare")
            ev.pairwise(user, conv, f"t{i:03d}c", f"t{i:03d}d", "a")
    return ev.items


def curate_into(settings: Settings, events: list) -> str:
    from pipelines import curate as cur
    from pipelines.config import CurateConfig
    from pipelines.snapshots import write_snapshot

    seed(settings.warehouse_path, events)
    curated = cur.curate(cur.read_warehouse(settings.warehouse_path), CurateConfig(eval_fraction=0.25))
    return write_snapshot(curated, settings.datasets_dir).snapshot_id


def land_through_kafka(settings: Settings, events: list) -> None:
    """Events travel the real path: producer (spool, Kafka) -> ingest (exactly once) -> the DuckDB warehouse."""
    from feedback.ingest import IngestConsumer
    from feedback.producer import EventProducer

    producer = EventProducer(settings, spool_name="training-fixture")
    try:
        for e in events:
            producer.emit(e)
        assert producer.flush(60), "the broker did not acknowledge the simulated events"
    finally:
        producer.close()
    IngestConsumer(settings).run(
        idle_exit_s=3.0, max_seconds=120, stop_when=lambda st: sum(st.inserted.values()) >= len(events)
    )


def curate_only(settings: Settings) -> str:
    from pipelines import curate as cur
    from pipelines.config import CurateConfig
    from pipelines.snapshots import write_snapshot

    curated = cur.curate(cur.read_warehouse(settings.warehouse_path), CurateConfig(eval_fraction=0.25))
    return write_snapshot(curated, settings.datasets_dir).snapshot_id


@pytest.fixture(scope="session")
def trained_home(tmp_path_factory, kafka_broker: Settings) -> tuple[Settings, str]:
    """One home for the training tests: the real base model (copied), simulated events landed through the real
    broker and ingest, a curated snapshot, and MLflow's real SQLite store (no server: ``mlflow_port=1``)."""
    import uuid

    from feedback.topics import ensure_topics

    need_model(BASE)
    home = tmp_path_factory.mktemp("train") / "home"
    (home / "models").mkdir(parents=True)
    shutil.copytree(BASE, home / "models" / "base")
    tag = uuid.uuid4().hex[:8]
    settings = Settings(
        home=home,
        mlflow_port=1,
        kafka_bootstrap=kafka_broker.kafka_bootstrap,
        topic_prefix=f"train{tag}",
        ingest_group=f"ingest-{tag}",
        ingest_batch_ms=100,
        ingest_session_timeout_ms=6_000,
    )
    ensure_topics(settings)
    land_through_kafka(settings, simulated_events())
    return settings, curate_only(settings)


def overrides(steps: int = 2, **extra) -> list[str]:
    return [f"train.max_steps={steps}", *(f"{k}={v}" for k, v in extra.items())]


def models_dir(settings: Settings) -> Path:
    return settings.models_dir

"""Training fixtures: a real snapshot curated from simulated events, and a home with MLflow's real SQLite store.

The simulated users have one consistent taste (short, friendly answers that start with the answer; no long
lists), so a reward model can learn it and a policy trained on their ratings can be judged for it.

Trained fixtures (the gate's production, judge and candidates) are built once per code and config by
``tests/fixture_cache.py`` in a scratch home of their own (``scratch_home``), exported with ``export_versions``
and registered into each test home with ``import_versions``: MLflow's store and ``lineage.json`` hold absolute
paths of the home that trained them, so a cached version is registered anew (same weights, kind, recipe, parent,
snapshot, config hash, precision) rather than its database copied.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import pytest

from feedback.settings import Settings
from tests.conftest import REPO, need_model
from tests.fixture_cache import cache_root, cached_dir, files_digest
from tests.pipelines.conftest import Events, seed

BASE = REPO / ".flywheel" / "models" / "base"
# What a cached trained fixture's weights depend on besides its own config (which names the snapshot by its content
# hash and the base model by its files' digest): the code that trains (recipes, configs, precision, model loading,
# the runner, the snapshot reader, the safety mix and its data, the corpus), the pinned libraries, and this file
# (it exports and imports the entries). Evaluation, registry and serving code change no weight, so editing them
# does not retrain the fixtures; ``DEFAULT_CODE`` (every training, pipelines and feedback file) would.
TRAINED_CODE = (
    "training/recipes/**/*.py",
    "training/configs/**",
    "training/data/**",
    "training/config.py",
    "training/modeling.py",
    "training/runner.py",
    "training/snapshots.py",
    "training/safety.py",
    "training/suites.py",
    "training/corpus.py",
    "pyproject.toml",
    "constraints.txt",
    "tests/training/conftest.py",
)

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
def trained_home(tmp_path_factory, kafka_broker: Settings) -> Iterator[tuple[Settings, str]]:
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
    keep_eval_cache(home / "models" / "base", f"base-{base_digest()}")
    yield settings, curate_only(settings)
    save_eval_caches()


def overrides(steps: int = 2, **extra) -> list[str]:
    return [f"train.max_steps={steps}", *(f"{k}={v}" for k, v in extra.items())]


def models_dir(settings: Settings) -> Path:
    return settings.models_dir


@lru_cache(maxsize=1)
def base_digest() -> str:
    """The base model's identity for a cached fixture's key (a re-prepared identical model keeps its key)."""
    return files_digest(need_model(BASE))


def trained_precision() -> str:
    """What ``precision: auto`` trains in here (per machine, ``training.cpu_precision``): part of a trained
    fixture's key, so weights trained in fp32 are never reused where training now runs in bf16, or back."""
    from training.config import resolve_precision

    return resolve_precision("auto")


def scratch_home(root: Path, source: Settings, snapshot_ids: list[str]) -> Settings:
    """A home of its own for building a cached fixture: the base model and copies of ``source``'s snapshots, a
    registry of its own (MLflow's SQLite store, no server), nothing else."""
    home = root / "home"
    (home / "models").mkdir(parents=True)
    shutil.copytree(need_model(BASE), home / "models" / "base")
    for sid in snapshot_ids:
        shutil.copytree(source.datasets_dir / sid, home / "datasets" / sid)
    return Settings(home=home, mlflow_port=1)


def export_versions(settings: Settings, roles: dict[str, str], out: Path) -> None:
    """Move trained versions (``role -> name``) out of a scratch home into a cache entry: their weights, registry
    records and the snapshots they trained on. Their order is kept (a parent before its children)."""
    from training import registry

    records = []
    for role, name in roles.items():
        info = registry.get_version(settings, name)
        (out / "models").mkdir(exist_ok=True)
        shutil.move(info.path, out / "models" / info.name)
        if info.snapshot_id and not (out / "datasets" / info.snapshot_id).exists():
            shutil.copytree(settings.datasets_dir / info.snapshot_id, out / "datasets" / info.snapshot_id)
        records.append({"role": role, "info": info.as_dict()})
    (out / "versions.json").write_text(json.dumps(records, indent=2, default=str))


def import_versions(settings: Settings, entry: Path) -> dict[str, str]:
    """Register a cache entry's versions in this home's registry (a writable copy of each weights directory, an
    MLflow run that names the entry, the same lineage fields) and copy in their snapshots. Returns role -> name."""
    from training import registry

    registry.ensure_base(settings)  # a parent named "base" is this home's base
    renamed: dict[str, str] = {}  # the name in the home that built them -> the name here
    roles: dict[str, str] = {}
    for rec in json.loads((entry / "versions.json").read_text()):
        info = rec["info"]
        sid = info["snapshot_id"]
        manifest = None
        if sid:
            if not (settings.datasets_dir / sid).exists():
                shutil.copytree(entry / "datasets" / sid, settings.datasets_dir / sid, copy_function=shutil.copyfile)
            manifest = json.loads((settings.datasets_dir / sid / "manifest.json").read_text())
        tmp = settings.models_dir / f".tmp-import-{uuid.uuid4().hex[:8]}"
        shutil.copytree(entry / "models" / info["name"], tmp, copy_function=shutil.copyfile)
        c = registry.client(settings)
        run = c.create_run(registry.experiment_id(settings), run_name=info["recipe"])
        run_id = run.info.run_id
        try:
            record = json.loads((tmp / "flywheel_config.json").read_text())
            c.log_dict(run_id, record, "lineage/run.json")
            for k, v in {
                "flywheel.recipe": info["recipe"],
                "flywheel.parent": renamed.get(info["parent"], info["parent"]) or "",
                "flywheel.snapshot_id": sid or "",
                "flywheel.config_hash": info["config_hash"] or "",
                "flywheel.precision": info["precision"] or "",
                "flywheel.fixture_cache": entry.name,  # trained once by tests/fixture_cache.py, registered here
            }.items():
                c.set_tag(run_id, k, v)
            extra = {"base_model": info["base_model"] or "", "precision": info["precision"] or ""}
            if info.get("reward_version"):
                extra["reward_version"] = renamed.get(info["reward_version"], info["reward_version"])
            new = registry.register(
                settings,
                tmp_dir=tmp,
                run_id=run_id,
                kind=info["kind"],
                recipe=info["recipe"],
                parent=renamed.get(info["parent"], info["parent"]),
                snapshot=manifest,
                config_hash=info["config_hash"],
                extra=extra,
            )
            c.set_tag(run_id, "flywheel.version", new.name)
            c.set_terminated(run_id, "FINISHED")
        except BaseException:
            c.set_terminated(run_id, "FAILED")
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        renamed[info["name"]] = new.name
        roles[rec["role"]] = new.name
        keep_eval_cache(Path(new.path), f"{entry.name}-{new.name}")
    return roles


# Production's answers and likelihoods (``training/evaluate._cached``: ``<version>/eval_cache``, keyed by the
# version, the items, the settings and the measuring code's hash) outlive the test home: a version whose weights
# are the same in every run (the base model, a cached fixture) gets the files an earlier run wrote, and gives back
# what this run added when the session ends. A change to the measuring code changes the key, so nothing stale is read.
_EVAL_DIRS: list[tuple[Path, Path]] = []


def keep_eval_cache(model_dir: Path, key: str) -> None:
    store = cache_root() / "eval-cache" / key
    if store.is_dir():
        (model_dir / "eval_cache").mkdir(exist_ok=True)
        for f in store.glob("*.json"):
            shutil.copyfile(f, model_dir / "eval_cache" / f.name)
    _EVAL_DIRS.append((model_dir / "eval_cache", store))


def save_eval_caches() -> None:
    for local, store in _EVAL_DIRS:
        for f in local.glob("*.json") if local.is_dir() else ():
            if not (store / f.name).exists():
                store.mkdir(parents=True, exist_ok=True)
                tmp = store / f".{f.name}.{uuid.uuid4().hex[:8]}"
                shutil.copyfile(f, tmp)
                os.replace(tmp, store / f.name)  # whole or absent, whichever worker writes it


def train_judge(settings: Settings, sid: str) -> str:
    """The gate tests' judge: a reward model trained 12 steps on the simulated users' pairs, so it has their taste."""
    import argparse
    import importlib

    from training.runner import run_job

    over = ["train.max_steps=12", "seed=7"]
    a = argparse.Namespace(snapshot=sid, parent="base", config="tiny", json=True, overrides=over)
    return run_job("reward", importlib.import_module("training.recipes.reward").train, a, settings)["version"]


def judge_entry(settings: Settings, sid: str) -> Path:
    """The judge's cache entry, shared by tests/training/test_release_gate.py and test_gate_gamed.py (trained once,
    whichever worker asks first; the other waits on the entry's lock)."""
    import hashlib
    import inspect

    def build(out: Path) -> None:
        scratch = scratch_home(out / "scratch", settings, [sid])
        export_versions(scratch, {"judge": train_judge(scratch, sid)}, out)
        shutil.rmtree(out / "scratch")

    source = hashlib.sha256(inspect.getsource(train_judge).encode()).hexdigest()
    config = {"snapshot": sid, "base_model": base_digest(), "precision": trained_precision(), "source": source}
    return cached_dir("judge", build, config=config, code=TRAINED_CODE)

"""Release routing: which model version answers which user, read live from the compacted ``releases`` topic.

A release plan is a list of weighted variants, published as JSON under the key ``b"plan"`` (latest plan wins;
compaction keeps it forever). Each user lands in a fixed point of [0, 1) by a hash of their id; variants
occupy consecutive ranges in the order listed. List the incumbent first and the candidate last: then a ramp
(10% -> 50% -> 100%) only ever moves users from the incumbent to the candidate, never back and forth.

    from app.router import ReleasePlan, publish_plan
    publish_plan(settings, ReleasePlan.weighted({"base": 0.9, "sft-3": 0.1}, stage="canary"))

A plan may name only valid versions: names match ``VERSION_PATTERN`` (so never a path), and the app serves a
name only if ``servable_dir`` finds it (the base model, or ``<models_dir>/<name>/`` with ``lineage.json`` and
``config.json``) or ``backends.yaml`` names it. The last plan seen is cached in ``$FLYWHEEL_HOME/router/plan.json``
(0600): an app that starts while Kafka is down serves that plan, not the default one, so a restart can never
undo a rollback.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from pydantic import BaseModel, ConfigDict, Field, model_validator

from feedback.events import new_id, utcnow
from feedback.settings import Settings

log = logging.getLogger(__name__)

PLAN_KEY = b"plan"
VERSION_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
Version = Annotated[str, Field(pattern=VERSION_PATTERN)]


def servable_dir(settings: Settings, version: str) -> Path | None:
    """The model directory that may serve ``version``: the base model, or a trained version's directory with
    its lineage and config. Never anything else (no paths, no arbitrary directories)."""
    import re

    if not re.fullmatch(VERSION_PATTERN, version):
        return None
    if version == settings.model_version:
        base = settings.base_model_path
        return base if (base / "config.json").is_file() else None
    d = settings.models_dir / version
    return d if (d / "lineage.json").is_file() and (d / "config.json").is_file() else None


def plan_cache_path(settings: Settings) -> Path:
    return settings.home / "router" / "plan.json"


def load_cached_plan(settings: Settings) -> ReleasePlan | None:
    try:
        return ReleasePlan.model_validate_json(plan_cache_path(settings).read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as e:
        log.warning("ignoring an unreadable cached release plan: %s", e)
        return None


def save_cached_plan(settings: Settings, plan: ReleasePlan) -> None:
    path = plan_cache_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(plan.model_dump_json().encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Variant(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    model_version: Version
    weight: float = Field(ge=0.0, description="Relative share of users; weights are normalised.")


class ReleasePlan(BaseModel):
    """Which model versions serve what share of users. Published by the release controller."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    plan_id: str = Field(default_factory=new_id)
    created_at: datetime = Field(default_factory=utcnow)
    stage: str = Field("", description="Free text for people: canary, ramp-50, full, rollback ...")
    variants: list[Variant] = Field(min_length=1)
    salt: str = Field("", description="Change it to draw a different set of users for the same shares.")

    @model_validator(mode="after")
    def _check(self) -> ReleasePlan:
        if sum(v.weight for v in self.variants) <= 0:
            raise ValueError("a release plan needs at least one variant with a positive weight")
        names = [v.model_version for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate model versions in plan: {names}")
        return self

    @classmethod
    def single(cls, model_version: str, **kw) -> ReleasePlan:
        return cls(variants=[Variant(model_version=model_version, weight=1.0)], **kw)

    @classmethod
    def weighted(cls, weights: dict[str, float], **kw) -> ReleasePlan:
        return cls(variants=[Variant(model_version=k, weight=w) for k, w in weights.items()], **kw)

    def versions(self) -> list[str]:
        return [v.model_version for v in self.variants if v.weight > 0]

    def pick(self, user_id: str) -> str:
        """The user's variant: sticky for a given plan and salt, monotone under ramps (see module doc)."""
        point = user_point(user_id, self.salt)
        total = sum(v.weight for v in self.variants)
        acc = 0.0
        live = [v for v in self.variants if v.weight > 0]
        for v in live:
            acc += v.weight / total
            if point < acc:
                return v.model_version
        return live[-1].model_version


def user_point(user_id: str, salt: str = "") -> float:
    """A stable point in [0, 1) for a user id (same on every process and every restart)."""
    digest = hashlib.sha256(f"{salt}\0{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def publish_plan(settings: Settings, plan: ReleasePlan, timeout: float = 15.0) -> None:
    """Publish a plan to the compacted releases topic and wait for the broker's acknowledgement."""
    try:
        from feedback.topics import ensure_topics

        ensure_topics(settings)
    except Exception as e:  # noqa: BLE001 - the send below reports a real problem clearly
        log.warning("could not ensure topics before publishing a plan: %s", e)
    producer = KafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        acks="all",
        enable_idempotence=True,
        max_block_ms=int(timeout * 1000),
        client_id="flywheel-release-publisher",
    )
    try:
        producer.send(settings.topic_releases, key=PLAN_KEY, value=plan.model_dump_json().encode()).get(timeout)
    finally:
        producer.close(timeout=5)


class ReleaseRouter:
    """Follows the latest plan on the releases topic in a background thread; ``assign()`` never blocks.

    No consumer group: every app process reads the whole (compacted) topic from the beginning and keeps
    polling, so a new plan applies within about a second. Requests already streaming keep the backend they
    started with; only new requests see the new plan.
    """

    def __init__(self, settings: Settings, poll_ms: int = 200):
        self.settings = settings
        self.default_plan = ReleasePlan.single(settings.model_version, plan_id="default", stage="default")
        self._plan: ReleasePlan | None = load_cached_plan(settings)  # never the default over a real plan
        self.from_cache = self._plan is not None
        self._poll_ms = poll_ms
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self.connected = False
        self.last_error: str | None = None
        self.plans_seen = 0
        self.listeners: list[Callable[[ReleasePlan], None]] = []  # called on the router thread per new plan

    # ---- reading ----------------------------------------------------------------------------------
    @property
    def plan(self) -> ReleasePlan:
        return self._plan or self.default_plan

    @property
    def published(self) -> bool:
        return self._plan is not None

    def assign(self, user_id: str) -> str:
        return self.plan.pick(user_id)

    def wait_for(self, plan_id: str, timeout: float = 30.0) -> bool:
        """Block until the plan with this id is the current one (tests, release controller)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.plan.plan_id != plan_id:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self) -> ReleaseRouter:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="flywheel-release-router", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _set(self, plan: ReleasePlan) -> None:
        with self._changed:
            if self._plan is None or plan.plan_id != self._plan.plan_id:
                log.info(
                    "release plan %s (%s): %s",
                    plan.plan_id,
                    plan.stage,
                    {v.model_version: v.weight for v in plan.variants},
                )
            changed = self._plan is None or plan.plan_id != self._plan.plan_id or self.from_cache
            self._plan = plan
            self.from_cache = False
            self.plans_seen += 1
            self._changed.notify_all()
        if changed:
            try:
                save_cached_plan(self.settings, plan)
            except OSError as e:
                log.warning("could not cache the release plan: %s", e)
            for listener in self.listeners:
                try:
                    listener(plan)
                except Exception:  # noqa: BLE001 - a listener's failure must not stop routing
                    log.exception("release plan listener failed")

    def _run(self) -> None:
        topic = self.settings.topic_releases
        backoff = 0.2
        while not self._stop.is_set():
            consumer = None
            try:
                consumer = KafkaConsumer(
                    bootstrap_servers=self.settings.bootstrap_servers,
                    group_id=None,
                    enable_auto_commit=False,
                    auto_offset_reset="earliest",
                    client_id="flywheel-release-router",
                    request_timeout_ms=10_000,
                    reconnect_backoff_max_ms=1_000,
                )
                parts = None
                while not self._stop.is_set():
                    parts = consumer.partitions_for_topic(topic)
                    if parts:
                        break
                    self._stop.wait(0.5)  # the topic does not exist yet: keep serving the default plan
                    consumer.topics()  # refresh metadata
                if self._stop.is_set():
                    return
                tps = [TopicPartition(topic, p) for p in sorted(parts)]
                consumer.assign(tps)
                consumer.seek_to_beginning(*tps)
                self.connected = True
                backoff = 0.2
                while not self._stop.is_set():
                    batches = consumer.poll(timeout_ms=self._poll_ms)
                    latest = None
                    for records in batches.values():
                        for rec in records:
                            if rec.key != PLAN_KEY or rec.value is None:
                                continue
                            try:
                                plan = ReleasePlan.model_validate_json(rec.value)
                            except ValueError as e:
                                log.warning("ignoring an invalid release plan at offset %s: %s", rec.offset, e)
                                continue
                            latest = plan
                    if latest is not None:
                        self._set(latest)
            except Exception as e:  # noqa: BLE001 - broker trouble: keep the current plan, reconnect
                self.connected = False
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("release router lost the broker (%s); keeping plan %s", e, self.plan.plan_id)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if consumer is not None:
                    try:
                        consumer.close()
                    except Exception:  # noqa: BLE001
                        pass

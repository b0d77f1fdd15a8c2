"""Model versions come and go without a restart, and at most ``app_max_loaded_versions`` stay loaded.

Real parts: the real SmolLM2 weights behind every version (each version directory links the base model's files and
has its own ``lineage.json``), real embedded backends loaded by the service, real plans through Kafka.
"""

from __future__ import annotations

import gc
import json
import time
import weakref
from pathlib import Path

import pytest
from openai import OpenAI

from app.router import ReleasePlan, publish_plan
from feedback.settings import Settings
from tests.app.conftest import MODEL, start_app

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LOAD_TIMEOUT_S = 600  # a ceiling: loading takes seconds on an idle machine, minutes on a 2-core one shared by many jobs


def make_version(settings: Settings, name: str, **lineage) -> Path:
    """A registered version as the trainer leaves it: weights, tokenizer and config (linked) + lineage.json."""
    d = settings.models_dir / name
    d.mkdir(parents=True)
    for f in MODEL.iterdir():
        (d / f.name).symlink_to(f)
    record = {"name": name, "kind": "policy", "parent": "base", "gate": "passed", "tainted": False, **lineage}
    (d / "lineage.json").write_text(json.dumps(record))
    return d


def bounded(settings: Settings, n: int) -> Settings:
    return settings.model_copy(update={"app_max_loaded_versions": n, "serve_engine": "transformers"})


def wait_until(cond, what: str, timeout: float = LOAD_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.25)


def backend_gone(ref: weakref.ref) -> bool:
    gc.collect()
    return ref() is None


def test_a_new_plan_loads_its_version_and_unloads_the_least_recently_used_one(settings, model_backend):
    s = bounded(settings, 2)  # the base model + one more
    for name in ("v-a", "v-b"):
        make_version(s, name)
    app = start_app(s, {"base": model_backend})
    try:
        c = OpenAI(base_url=app.api, api_key="unused", max_retries=0, timeout=120)

        def served(model: str = "flywheel") -> str:
            msgs = [{"role": "user", "content": "Hi"}]
            return c.chat.completions.create(model=model, messages=msgs, max_tokens=2, user="erin").model

        service = app.service
        for name in ("v-a", "v-b"):
            plan = ReleasePlan.single(name, stage="full")
            publish_plan(s, plan)
            assert service.router.wait_for(plan.plan_id, timeout=30), "the app did not follow the plan"
            wait_until(lambda n=name: n in service.backends, f"{name} is loaded")
            assert served() == name
            if name == "v-a":
                first = weakref.ref(service.backends["v-a"])
        # v-a left the plan and was used least recently: unloaded, its backend closed and its memory released
        wait_until(lambda: "v-a" not in service.backends, "v-a is unloaded")
        assert service.unloaded == ["v-a"] and set(service.backends) == {"base", "v-b"}
        wait_until(lambda: backend_gone(first), "nothing holds the unloaded backend any more", timeout=60)
        models = [m.id for m in c.models.list().data]
        assert "v-a" not in models and "v-b" in models
        assert served() == "v-b" and served("base") == "base"  # the app keeps answering
        # base + the plan's v-b fill the bound: a request for v-a is answered by the plan and loads nothing
        assert served("v-a") == "v-b" and "v-a" not in service.versions.loading and "v-a" not in service.backends
    finally:
        app.stop()

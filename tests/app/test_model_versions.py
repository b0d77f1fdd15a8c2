"""Model versions come and go without a restart, and at most ``app_max_loaded_versions`` stay loaded.

Real parts: the real SmolLM2 weights behind every version (each version directory links the base model's files and
has its own ``lineage.json``), real embedded backends loaded by the service, real plans through Kafka.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
import weakref
from contextlib import aclosing
from pathlib import Path

import pytest
from openai import OpenAI

from app.router import ReleasePlan, publish_plan
from feedback.events import Sampling
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
        assert served("v-a") == "v-b" and "v-a" not in service._loading and "v-a" not in service.backends
    finally:
        app.stop()


def test_requested_versions_load_on_demand_and_one_answering_is_never_unloaded(settings, model_backend):
    s = bounded(settings, 2)
    make_version(s, "v-a")
    make_version(s, "v-b")
    make_version(s, "v-failed", gate="failed")
    make_version(s, "v-pending", gate="pending")
    make_version(s, "v-tainted", tainted=True)
    make_version(s, "v-reward", kind="reward")
    app = start_app(s, {"base": model_backend})
    service = app.service
    loop = asyncio.new_event_loop()

    def run(coro):
        return loop.run_until_complete(coro)

    async def start(model: str, user: str = "frank"):
        return await service.start_turn(
            user_id=user,
            conversation_id="c1",
            messages=[{"role": "user", "content": "Say hi."}],
            sampling=Sampling(max_new_tokens=2, temperature=0.0),
            origin="api",
            surface="api",
            model_version=model,
        )

    async def answer(model: str) -> str:
        turn = await start(model)
        async with aclosing(turn.deltas()) as deltas:
            async for _ in deltas:
                pass
        return turn.model_version

    try:
        # versions a request may not bring online: never loaded, the request is answered by the release
        for name in ("v-failed", "v-pending", "v-tainted", "v-reward", "../base", "nope"):
            assert run(answer(name)) == "base"
            assert name not in service.backends and name not in service._loading
        # a vetted registered version: the first request starts loading it, later ones are answered by it
        assert run(answer("v-a")) == "base"
        wait_until(lambda: "v-a" in service.backends, "v-a is loaded on request")
        assert run(answer("v-a")) == "v-a"
        held = run(start("v-a"))  # an answer in flight on v-a, not read yet
        assert held.model_version == "v-a"
        assert run(answer("v-b")) == "base"
        wait_until(lambda: "v-b" in service.backends, "v-b is loaded on request")
        time.sleep(1)  # v-a is the least recently used, but it is answering: it stays (over the bound meanwhile)
        assert set(service.backends) == {"base", "v-a", "v-b"} and service.unloaded == []
        run(held.aclose())  # the answer ends: now v-a goes
        wait_until(lambda: "v-a" not in service.backends, "v-a is unloaded once its answer ended", timeout=30)
        assert service.unloaded == ["v-a"]
        assert run(answer("v-b")) == "v-b" and run(answer("base")) == "base"
        assert service.open_turns == 0 and service._in_use == {}
    finally:
        loop.close()
        app.stop()

"""The OpenAI-compatible API against a real uvicorn server, the real model and the real broker."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient
from openai import OpenAI

from app.router import ReleasePlan, publish_plan
from feedback.events import ChatTurn, Feedback, UserAction
from tests.app.conftest import ADMIN, read_events, start_app

pytestmark = pytest.mark.integration


def client(live, **kw) -> OpenAI:
    return OpenAI(base_url=live.api, api_key="not-needed", max_retries=0, **kw)


def test_openai_client_streams_and_rates_and_events_arrive(live, settings):
    c = client(live, default_headers={"X-Flywheel-Consent": "1"})
    stream = c.chat.completions.create(
        model="flywheel",
        messages=[{"role": "user", "content": "Name a fruit."}],
        max_tokens=12,
        stream=True,
        user="alice",
        stream_options={"include_usage": True},
    )
    pieces, ids, usage, finish = [], set(), None, None
    for chunk in stream:
        ids.add(chunk.id)
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    answer = "".join(pieces)
    assert answer.strip() and len([p for p in pieces if p]) > 1, "the answer should arrive in several pieces"
    assert len(ids) == 1 and finish in ("stop", "length") and usage.completion_tokens > 0
    completion_id = ids.pop()
    turn_id = completion_id.removeprefix("chatcmpl-")

    plain = c.chat.completions.create(
        model="flywheel", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, user="alice"
    )
    assert plain.choices[0].message.content and plain.model == "base" and plain.usage.prompt_tokens > 0

    r = httpx.post(
        f"{live.api}/feedback",
        headers={"X-Flywheel-User": "alice"},
        json={"turn_id": completion_id, "rating": "down", "reason": "not a fruit"},
    )
    assert r.status_code == 200, r.text
    r = httpx.post(
        f"{live.api}/feedback", json={"turn_id": turn_id, "other_turn_id": plain.id, "rating": "a", "user": "alice"}
    )
    assert r.status_code == 200, r.text

    turns = read_events(settings, settings.topic_turns, lambda evs: len(evs) >= 2)
    by_id = {t.turn_id: t for t in turns}
    t = by_id[turn_id]
    assert isinstance(t, ChatTurn) and t.answer == answer and t.model_version == "base" and t.origin == "api"
    assert t.user_id == "api:alice" and t.consent is True and t.ttft_ms is not None and t.latency_ms >= t.ttft_ms
    assert t.completion_tokens == usage.completion_tokens and t.messages[-1].content == "Name a fruit."
    fb = read_events(settings, settings.topic_feedback, lambda evs: sum(isinstance(e, Feedback) for e in evs) >= 2)
    ratings = [e for e in fb if isinstance(e, Feedback)]
    thumbs = next(e for e in ratings if e.kind == "thumbs")
    assert (thumbs.turn_id, thumbs.value, thumbs.reason, thumbs.model_version) == (
        turn_id,
        "down",
        "not a fruit",
        "base",
    )
    pair = next(e for e in ratings if e.kind == "pairwise")
    assert (pair.turn_id, pair.other_turn_id, pair.value) == (turn_id, plain.id.removeprefix("chatcmpl-"), "a")
    assert any(isinstance(e, UserAction) and e.action == "consent_granted" for e in fb)

    metrics = httpx.get(f"{live.url}/metrics", headers=ADMIN).text
    assert 'flywheel_ratings_total{kind="thumbs",model_version="base",value="down"} 1.0' in metrics
    assert 'flywheel_requests_total{model_version="base",status="' in metrics
    assert "flywheel_tokens_total" in metrics and "flywheel_request_latency_seconds_bucket" in metrics


def test_huggingface_inference_client_works_unchanged(live):
    hf = InferenceClient(base_url=live.api)
    out = hf.chat_completion(messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
    assert out.choices[0].message.content and out.id.startswith("chatcmpl-")
    pieces = [
        c.choices[0].delta.content
        for c in hf.chat_completion(messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, stream=True)
        if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) > 1


def test_models_and_health(live):
    models = client(live).models.list()
    assert [m.id for m in models.data] == ["base"]
    h = httpx.get(f"{live.url}/healthz", headers=ADMIN).json()
    assert h["status"] == "ok" and h["release_plan"]["variants"] == {"base": 1.0} and not h["missing_backends"]


def test_a_user_can_rate_only_their_own_answers(live, settings):
    c = client(live)
    mine = c.chat.completions.create(
        model="flywheel", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, user="alice"
    )
    for who in ({"user": "mallory"}, {}):  # another user; no user at all
        r = httpx.post(f"{live.api}/feedback", json={"turn_id": mine.id, "rating": "up", **who})
        assert r.status_code == 403 and r.json()["error"]["code"] == "not_your_turn"
    r = httpx.post(f"{live.api}/feedback", json={"turn_id": "nonexistent", "rating": "up", "user": "alice"})
    assert r.status_code == 403
    r = httpx.post(f"{live.api}/feedback", json={"turn_id": mine.id, "rating": "meh", "user": "alice"})
    assert r.status_code == 400 and "rating" in r.json()["error"]["message"]
    r = httpx.post(
        f"{live.api}/feedback", json={"turn_id": mine.id, "rating": "down", "user": "alice", "reason": "x" * 5000}
    )
    assert r.status_code == 400 and "limit" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ([{"role": "user", "content": ""}], "empty"),
        ([{"role": "user", "content": "x" * 4097}], "limit is 4,096"),
        ([{"role": "user", "content": "beep\x07"}], "control characters"),
        ([{"role": "user", "content": "hi"}] * 41, "too long"),
        (
            [{"role": "user", "content": "a" * 4000}, {"role": "assistant", "content": "b" * 8000}] * 2
            + [{"role": "user", "content": "c"}],
            "too long",
        ),
        ([], "empty"),
        ([{"role": "assistant", "content": "hi"}], "last message"),
    ],
)
def test_bad_inputs_get_clear_400s(live, messages, fragment):
    with pytest.raises(openai.BadRequestError) as e:
        client(live).chat.completions.create(model="flywheel", messages=messages, max_tokens=4)
    assert fragment in e.value.body["message"]
    assert "Traceback" not in str(e.value.body)


def test_malformed_and_oversized_bodies(live):
    r = httpx.post(f"{live.api}/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{live.api}/chat/completions", json={"messages": "hello"})
    assert r.status_code == 400
    r = httpx.post(f"{live.api}/chat/completions", json={"messages": [{"role": "user", "content": "x" * 1_100_000}]})
    assert r.status_code == 413
    r = httpx.post(
        f"{live.api}/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}
    )
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    r = httpx.post(
        f"{live.api}/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "temperature": 99}
    )
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]


def test_past_the_bound_the_api_answers_429_and_the_queue_drains(settings, tiny_backend):
    app = start_app(settings, {"base": tiny_backend})
    try:
        c = client(app)
        first = c.chat.completions.create(
            model="flywheel",
            messages=[{"role": "user", "content": "Tell a story."}],
            max_tokens=48,
            stream=True,
            user="a",
        )
        it = iter(first)
        next(it)  # the first request holds the only slot
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="flywheel", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert e.value.status_code == 429 and "busy" in e.value.body["message"]
        assert "".join(ch.choices[0].delta.content or "" for ch in it if ch.choices)  # the first one finishes
        ok = c.chat.completions.create(model="flywheel", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert ok.choices[0].message.content is not None
        assert httpx.get(f"{app.url}/healthz").status_code == 200
    finally:
        app.stop()


def test_new_plan_moves_a_user_while_requests_are_in_flight(settings, model_backend):
    # Two versions served by the same real model, so the test is about routing, not weights.
    app = start_app(settings, {"base": model_backend, "v2": model_backend})
    try:
        c = client(app)
        user = "carol"
        assert (
            c.chat.completions.create(
                model="flywheel", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, user=user
            ).model
            == "base"
        )
        results, errors = [], []

        def ask():
            try:
                s = c.chat.completions.create(
                    model="flywheel",
                    messages=[{"role": "user", "content": "Count."}],
                    max_tokens=40,
                    user=user,
                    stream=True,
                )
                text, model = "", None
                for ch in s:
                    model = ch.model
                    text += "".join(x.delta.content or "" for x in ch.choices)
                results.append((model, text))
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

        threads = [threading.Thread(target=ask, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # requests are streaming now
        plan = ReleasePlan.single("v2", stage="full")
        publish_plan(settings, plan)
        assert app.service.router.wait_for(plan.plan_id, timeout=10), "the app did not follow the plan"
        moved = c.chat.completions.create(
            model="flywheel", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, user=user
        )
        for t in threads:
            t.join(60)
        assert not errors and len(results) == 3 and all(text for _, text in results)
        assert {m for m, _ in results} == {"base"}  # in-flight requests kept the version they started with
        assert moved.model == "v2"

        # Sticky under a split plan: the same user always gets the same variant.
        split = ReleasePlan.weighted({"base": 0.5, "v2": 0.5}, stage="ramp")
        publish_plan(settings, split)
        assert app.service.router.wait_for(split.plan_id, timeout=10)
        got = {
            c.chat.completions.create(
                model="flywheel", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, user=user
            ).model
            for _ in range(3)
        }
        assert got == {split.pick("api:carol")}

        # A plan naming a version nobody serves falls back to base and says so.
        ghost = ReleasePlan.single("ghost", stage="canary")
        publish_plan(settings, ghost)
        assert app.service.router.wait_for(ghost.plan_id, timeout=10)
        r = c.chat.completions.create(
            model="flywheel", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, user=user
        )
        assert r.model == "base"
        h = httpx.get(f"{app.url}/healthz", headers=ADMIN).json()
        assert h["status"] == "degraded" and h["missing_backends"] == ["ghost"] and h["fallback_version"] == "base"
        turns = read_events(settings, settings.topic_turns, lambda evs: len(evs) >= 9)
        assert {t.model_version for t in turns} == {"base", "v2"}
    finally:
        app.stop()


def test_a_plan_naming_a_new_model_loads_it_without_a_restart(settings, model_backend):
    from tests.app.conftest import MODEL

    app = start_app(settings, {"base": model_backend})
    try:
        settings.models_dir.mkdir(parents=True, exist_ok=True)
        version_dir = settings.models_dir / "sft-0001"  # a freshly trained release, same weights here
        version_dir.mkdir()
        for f in MODEL.iterdir():
            (version_dir / f.name).symlink_to(f)
        (version_dir / "lineage.json").write_text('{"name": "sft-0001", "parent": "base", "tainted": false}')
        plan = ReleasePlan.single("sft-0001", stage="full")
        publish_plan(settings, plan)
        assert app.service.router.wait_for(plan.plan_id, timeout=10)
        c = client(app)

        def served() -> str:
            return c.chat.completions.create(
                model="flywheel", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, user="dave"
            ).model

        deadline = time.monotonic() + 60
        while (model := served()) != "sft-0001" and time.monotonic() < deadline:
            assert model == "base"  # the fallback serves until the new model is loaded
            time.sleep(0.5)
        assert model == "sft-0001"
        h = httpx.get(f"{app.url}/healthz", headers=ADMIN).json()
        assert h["status"] == "ok" and "sft-0001" in h["model_versions"]
    finally:
        app.stop()

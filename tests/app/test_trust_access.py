"""Who may do what, against a real server: API keys, per-key user namespaces, operator-only detail, the Host
check, the streamed body limit, per-key quotas, and the refusal to serve keyless beyond loopback."""

from __future__ import annotations

import subprocess
import sys

import httpx
import openai
import pytest
from openai import OpenAI

from app.keys import KeyStore
from tests.app.conftest import ADMIN, start_app
from tests.conftest import REPO, settings_env

pytestmark = pytest.mark.integration

HI = [{"role": "user", "content": "Say hi."}]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_namespaces_and_operator_detail(settings, model_backend):
    app = start_app(settings, {"base": model_backend}, max_new_tokens=8)
    try:
        post = f"{app.api}/chat/completions"
        # keyless local mode until the first key exists; then every /v1 request needs a valid key
        assert httpx.post(post, json={"messages": HI, "max_tokens": 2}).status_code == 200
        store = KeyStore(settings)
        (a, key_a), (b, key_b) = store.create("a"), store.create("b")
        for headers in ({}, bearer("fw_nope"), bearer(key_a[:-4] + "xxxx"), {"Authorization": key_a + "x"}):
            r = httpx.post(post, json={"messages": HI, "max_tokens": 2}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        assert httpx.get(f"{app.api}/models").status_code == 401

        ca = OpenAI(base_url=app.api, api_key=key_a, max_retries=0)
        cb = OpenAI(base_url=app.api, api_key=key_b, max_retries=0)
        turn = ca.chat.completions.create(model="flywheel", messages=HI, max_tokens=2, user="alice")
        assert app.service.sessions.owned_turn(f"key:{a.key_id}:alice", turn.id.removeprefix("chatcmpl-"))

        # the same end-user name under another key is another person: no rating, no consent change
        fb = f"{app.api}/feedback"
        for headers, user in ((bearer(key_b), "alice"), (bearer(key_b), None), (bearer(key_a), "bob")):
            r = httpx.post(fb, json={"turn_id": turn.id, "rating": "up", "user": user}, headers=headers)
            assert r.status_code == 403 and r.json()["error"]["code"] == "not_your_turn"
        cb.chat.completions.create(
            model="flywheel", messages=HI, max_tokens=2, user="alice", extra_headers={"X-Flywheel-Consent": "1"}
        )
        assert app.service.sessions.consent(f"key:{b.key_id}:alice")
        assert not app.service.sessions.consent(f"key:{a.key_id}:alice")
        r = httpx.post(fb, json={"turn_id": turn.id, "rating": "up", "user": "alice"}, headers=bearer(key_a))
        assert r.status_code == 200, r.text
        r = httpx.post(fb, json={"turn_id": turn.id, "rating": "a", "user": "alice"}, headers=bearer(key_a))
        assert r.status_code == 400 and "other_turn_id" in r.json()["error"]["message"]

        # a malformed user field is a 400 with a sentence, never a 500
        for user in ('"\\ud800"', '"' + "x" * 65 + '"', '"two words"', '"tab\\there"', '"nul\\u0000"', "17"):
            raw = b'{"messages": [{"role": "user", "content": "hi"}], "user": %s}' % user.encode()
            r = httpx.post(post, content=raw, headers={**bearer(key_a), "content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "user", (user, r.text)
        r = httpx.post(
            post, json={"messages": HI, "max_tokens": 2}, headers={**bearer(key_a), "X-Flywheel-User": "two words"}
        )
        assert r.status_code == 400

        # a revoked key is refused from the next request on
        store.revoke(b.key_id)
        with pytest.raises(openai.AuthenticationError):
            cb.models.list()
        store.close()

        # operators only: anonymous /healthz says ok and nothing else, /metrics needs the token
        anon = httpx.get(f"{app.url}/healthz")
        assert anon.json() == {"status": "ok"} and "embedded" not in anon.text and str(settings.home) not in anon.text
        assert httpx.get(f"{app.url}/healthz", headers=bearer("wrong")).json() == {"status": "ok"}
        assert "model_versions" in httpx.get(f"{app.url}/healthz", headers=ADMIN).json()
        assert httpx.get(f"{app.url}/metrics").status_code == 401
        assert httpx.get(f"{app.url}/metrics", headers=bearer(key_a)).status_code == 401
        assert "flywheel_requests_total" in httpx.get(f"{app.url}/metrics", headers=ADMIN).text
    finally:
        app.stop()


def test_host_check_and_streamed_body_limit(settings, model_backend):
    app = start_app(settings.model_copy(update={"app_max_body_bytes": 50_000}), {"base": model_backend})
    port = app.url.rsplit(":", 1)[1]
    try:
        for host in ("evil.example", f"attacker.test:{port}", "127.0.0.1.nip.io"):  # DNS rebinding
            r = httpx.get(f"{app.url}/healthz", headers={"Host": host})
            assert r.status_code == 400 and r.json()["error"]["code"] == "bad_host"
            assert httpx.get(f"{app.url}/", headers={"Host": host}).status_code == 400
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]", "localhost"):
            assert httpx.get(f"{app.url}/healthz", headers={"Host": host}).status_code == 200

        def body(n: int, piece: bytes = b"x" * 1000):  # no Content-Length: sent chunked, piece by piece
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(n):
                yield piece
            yield b'"}], "max_tokens": 1}'

        r = httpx.post(f"{app.api}/chat/completions", content=body(80), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        r = httpx.post(f"{app.api}/chat/completions", content=b"x" * 60_000)  # with Content-Length
        assert r.status_code == 413
        r = httpx.post(
            f"{app.api}/chat/completions",
            content=body(3, b"Hi. "),
            headers={"content-type": "application/json"},
            timeout=120,
        )
        assert r.status_code == 200, r.text  # under the limit, a chunked body is read whole and served
        r = httpx.post(
            f"{app.api}/chat/completions", content=b"[" * 40_000, headers={"content-type": "application/json"}
        )
        assert r.status_code == 400 and "error" in r.json()
    finally:
        app.stop()


def test_per_key_rate_and_stream_quotas(settings, model_backend):
    app = start_app(
        settings.model_copy(update={"api_burst_per_key": 6, "api_rate_per_key": 0.5, "api_streams_per_key": 1}),
        {"base": model_backend},
    )
    try:
        store = KeyStore(settings)
        (_, key), (_, other) = store.create("flood"), store.create("quiet")
        store.close()
        c = OpenAI(base_url=app.api, api_key=key, max_retries=0)
        stream = c.chat.completions.create(
            model="flywheel", messages=[{"role": "user", "content": "Tell a story."}], max_tokens=40, stream=True
        )
        it = iter(stream)
        next(it)  # this key's one answer place is taken
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="flywheel", messages=HI, max_tokens=2)
        assert e.value.body["code"] == "too_many_streams"
        ok = OpenAI(base_url=app.api, api_key=other, max_retries=0)  # another key is not affected
        assert ok.chat.completions.create(model="flywheel", messages=HI, max_tokens=2).choices
        for _ in it:
            pass
        codes = [httpx.get(f"{app.api}/models", headers=bearer(key)).status_code for _ in range(8)]
        assert codes.count(429) >= 2 and codes[0] == 200
        r = httpx.get(f"{app.api}/models", headers=bearer(key))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert httpx.get(f"{app.api}/models", headers=bearer(other)).status_code == 200
    finally:
        app.stop()


def test_a_keys_rate_holds_across_two_replicas(settings, model_backend):
    """Two app servers on one FLYWHEEL_HOME (replicas on one machine): a key with a burst of 6 at 0.01/s gets 6
    answers in all, alternating between them; each replica counting alone gave it 12."""
    limited = settings.model_copy(update={"api_burst_per_key": 6, "api_rate_per_key": 0.01})
    a, b = start_app(limited, {"base": model_backend}), start_app(limited, {"base": model_backend})
    try:
        store = KeyStore(settings)
        (_, key), (_, other) = store.create("flood"), store.create("quiet")
        store.close()
        codes = [httpx.get(f"{app.api}/models", headers=bearer(key)).status_code for _ in range(6) for app in (a, b)]
        assert codes.count(200) == 6 and codes.count(429) == 6 and codes[:6] == [200] * 6, codes
        assert httpx.get(f"{b.api}/models", headers=bearer(other)).status_code == 200, "another key is untouched"
    finally:
        a.stop()
        b.stop()


def test_keyless_mode_refuses_to_listen_beyond_loopback(settings):
    env = {**settings_env(settings), "FLYWHEEL_APP_HOST": "0.0.0.0", "FLYWHEEL_APP_PORT": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "app.server"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Refusing to listen on 0.0.0.0 without API keys" in p.stderr and "flywheel keys create" in p.stderr
    assert "Traceback" not in p.stderr


def test_browser_login_comes_from_settings(settings, model_backend):
    from pydantic import SecretStr

    app = start_app(settings.model_copy(update={"app_auth": SecretStr("alice:wonderland")}), {"base": model_backend})
    try:
        assert httpx.get(f"{app.url}/config").status_code == 401
        with httpx.Client(base_url=app.url) as s:
            assert s.post("/login", data={"username": "alice", "password": "nope"}).status_code == 400
            assert s.post("/login", data={"username": "alice", "password": "wonderland"}).status_code == 200
            assert s.get("/config").status_code == 200
    finally:
        app.stop()

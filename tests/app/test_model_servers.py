"""Model servers apart from the app (``FLYWHEEL_SERVING=servers``): the manager runs one server per version the plan
names, the app streams from it through the remote backend, and losing the server mid-stream is a clean end or a
retryable refusal, never a hang; the manager restarts it on the same address and the app answers again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from app.backends.registry import load_backends
from app.model_server import ChatRequest
from app.model_servers import ServerManager, published_servers, run
from app.router import ReleasePlan, Variant
from tests.app.conftest import start_app
from tests.conftest import REPO


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"waited {timeout:.0f} s for {what}")


@pytest.fixture
def apart(settings):
    s = settings.model_copy(update={"serving": "servers", "model_servers_per_version": 2})
    stop = threading.Event()
    manager = threading.Thread(target=run, args=(s, stop), daemon=True)
    manager.start()
    try:
        yield s
    finally:
        stop.set()
        manager.join(30)
    assert not manager.is_alive(), "the manager did not stop"
    assert published_servers(s) == {}, "the manager left servers published after it stopped"


@pytest.mark.integration
def test_the_app_streams_from_a_model_server_and_survives_losing_it(apart):
    s = apart
    urls = _wait(lambda: len(published_servers(s).get(s.model_version, [])) == 2 and published_servers(s)["base"],
                 180, "the base model's two servers")  # fmt: skip
    url = urls[0]
    hi = [{"role": "user", "content": "Hi"}]
    with httpx.Client(base_url=url, timeout=60) as server:  # the server's own boundary
        bad = server.post("/v1/chat/completions", json={"messages": [], "max_tokens": 4})
        assert bad.status_code == 400 and bad.json()["error"]["message"].endswith("."), bad.text
        other = server.post(
            "/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}
        )
        assert other.status_code == 400 and "serves 'base'" in other.json()["error"]["message"]
        assert server.post("/v1/chat/completions", content=b"{").status_code == 400
        # longer than the model's context: the engine's refusal, a 400 (it was a 500, and the app's 503)
        too_long = [{"role": "user", "content": "\U0001f600" * 1500}]
        refused = server.post("/v1/chat/completions", json={"messages": too_long, "max_tokens": 4})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded", refused.text
        direct = server.post(
            "/v1/chat/completions",
            json={"messages": hi, "max_tokens": 4, "user": "p1"},
        )
        assert direct.status_code == 200 and direct.json()["usage"]["completion_tokens"] >= 1, direct.text
    live = start_app(s, load_backends(s))
    try:
        body = {"model": "flywheel", "user": "ann", "messages": [{"role": "user", "content": "Tell me a long story."}]}
        with httpx.Client(base_url=live.url, timeout=60) as client:
            first = client.post("/v1/chat/completions", json={**body, "max_tokens": 6})
            assert first.status_code == 200 and first.json()["choices"][0]["message"]["content"], first.text
            assert live.service.backends[s.model_version].urls == urls, "the app's pool is not the published servers"
            pid = _server_pid(s, url)
            assert pid
            rest, cut = [], False
            with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True, "max_tokens": 400}) as st:
                assert st.status_code == 200
                lines = st.iter_lines()
                next(line for line in lines if line.startswith("data:"))
                os.kill(pid, signal.SIGKILL)  # the model server dies mid-answer
                try:
                    rest = list(lines)
                except httpx.TimeoutException:
                    pytest.fail("the app's stream hung when its model server died")
                except httpx.HTTPError:
                    cut = True
            assert cut or "data: [DONE]" not in rest or any('"error"' in line for line in rest), rest[-3:]
            for _ in range(4):  # the other server answers at once, whichever the pool tries first
                t0 = time.monotonic()
                again = client.post("/v1/chat/completions", json={**body, "max_tokens": 4})
                assert time.monotonic() - t0 < 30, "a request while one server was down hung"
                assert again.status_code == 200, again.text
            # The app answers again without a restart of its own (the other server first, then both).
            answered = _wait(
                lambda: (
                    (r := client.post("/v1/chat/completions", json={**body, "max_tokens": 4})).status_code == 200 and r
                ),
                180,
                "an answer after the model server was restarted",
            )
            assert answered.json()["choices"][0]["message"]["content"]
            # too long for the model: the caller's error, as from the embedded engine (it was the app's 503)
            long = client.post("/v1/chat/completions", json={**body, "messages": too_long, "max_tokens": 4})
            assert long.status_code == 400 and "shorten" in long.json()["error"]["message"], long.text
            # A restart loads the model again: as long as the first start may take on a loaded machine (CI failed
            # at 30 s while the whole suite ran).
            _wait(lambda: published_servers(s).get(s.model_version) == urls, 180, "the same addresses published again")
    finally:
        live.stop()


def _server_pid(s, url: str) -> int | None:
    """The pid listening on ``url``'s port (the manager's child)."""
    port = int(url.rsplit(":", 1)[1])
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
            return conn.pid
    return None


@pytest.mark.integration
def test_the_plan_decides_which_versions_get_a_server_and_an_unservable_one_gets_none(settings, caplog):
    _servable_copy(settings, "cand")
    manager = ServerManager(settings)
    plan = ReleasePlan(variants=[Variant(model_version="base", weight=0.5), Variant(model_version="ghost", weight=0.5)])
    assert manager.wanted(plan) == ["base", "ghost"]
    canary = ReleasePlan(
        variants=[Variant(model_version="base", weight=0.9), Variant(model_version="cand", weight=0.1)]
    )
    try:
        for _ in range(3):
            manager.step(plan)
        assert set(manager.servers) == {("base", 0)}, "a version with no model directory must not get a server"
        assert sum("ghost" in r.message for r in caplog.records) == 1, "logged once, not every round"
        # A canary: production and the candidate each on a server of their own.
        up = _wait(lambda: len(manager.step(canary)) == 2 and manager.step(canary), 180, "both versions' servers")
        assert set(up) == {"base", "cand"} and up["base"] != up["cand"]
        with httpx.Client(timeout=60) as client:
            served = {v: client.get(f"{u[0]}/v1/models").json()["data"][0]["id"] for v, u in up.items()}
        assert served == {"base": "base", "cand": "cand"}
        # The candidate leaves the plan (rolled back): its server stops, production's stays.
        assert set(manager.step(ReleasePlan(variants=[Variant(model_version="base", weight=1.0)]))) == {"base"}
        assert set(manager.servers) == {("base", 0)}
    finally:
        manager.close()
    assert published_servers(settings) == {}


def _servable_copy(settings, version: str) -> None:
    """A servable version directory: the base's weights and GGUF export linked, its small files copied, a lineage."""
    import shutil

    base, d = settings.base_model_path, settings.models_dir / version
    d.mkdir(parents=True)
    for f in base.iterdir():
        if f.name in ("model.safetensors", "gguf"):
            (d / f.name).symlink_to(f.resolve())
        elif f.is_file() and f.name != "lineage.json":
            shutil.copy(f, d / f.name)
    (d / "lineage.json").write_text(json.dumps({"version": version, "kind": "policy"}))


def test_the_servers_request_model_refuses_what_it_cannot_honour():
    with pytest.raises(ValueError):
        ChatRequest.model_validate({"messages": [], "max_tokens": 0})
    with pytest.raises(ValueError):
        ChatRequest.model_validate({"messages": [], "user": "x" * 500})
    assert ChatRequest.model_validate({"messages": [], "frequency_penalty": 1}).stream is False
    assert json.loads(ChatRequest.model_validate({"messages": []}).model_dump_json())["temperature"] == 0.7


def test_model_server_places_are_parsed_and_a_bad_one_is_named(tmp_path):
    from app.model_servers import places
    from feedback.settings import Settings

    s = Settings(home=tmp_path, serving="servers", model_server_places=" fwfl-ms-0/10.213.0.5, 10.0.0.6 ,")
    assert places(s) == [("fwfl-ms-0", "10.213.0.5"), (None, "10.0.0.6")]
    assert places(Settings(home=tmp_path)) == []  # empty: every server on loopback
    for bad in ("fwfl-ms-0/", "model-host", "ns/10.0.0.300"):
        with pytest.raises(ValueError, match=f"{bad!r} is not \\[netns/\\]address"):
            ServerManager(s.model_copy(update={"model_server_places": f"10.0.0.5,{bad}"}))


def test_a_server_off_loopback_needs_the_token(tmp_path):
    """Listening where other hosts reach it without a bearer token would open the model to anyone: refused."""
    env = {k: v for k, v in os.environ.items() if k != "FLYWHEEL_MODEL_SERVER_TOKEN"}
    done = subprocess.run(
        [sys.executable, "-m", "app.model_server", "--version", "base", "--port", "1", "--host", "10.0.0.5"],
        cwd=REPO, env={**env, "FLYWHEEL_HOME": str(tmp_path)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "FLYWHEEL_MODEL_SERVER_TOKEN" in done.stderr, done.stderr[-1000:]


def test_a_replica_swaps_in_the_new_pool_when_the_published_servers_change(tmp_path):
    from app.backends.pool import ServerPool
    from app.metrics import Metrics
    from app.router import ReleaseRouter
    from app.versions import LoadedVersions
    from feedback.settings import Settings

    s = Settings(home=tmp_path, serving="servers")
    old = ServerPool(["http://127.0.0.1:1"], model="base")
    metrics = Metrics()
    versions = LoadedVersions(s, {"base": old}, ReleaseRouter(s), metrics)
    versions._follow_servers({})  # nothing published (a restart in progress): the pool stays
    assert versions.backends["base"] is old
    versions._follow_servers({"base": ["http://127.0.0.1:1", "http://127.0.0.1:2"]})  # a server added
    new = versions.backends["base"]
    assert new is not old and new.urls == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert metrics._load_sources["base"] == new.load
    versions._follow_servers({"base": ["http://127.0.0.1:1", "http://127.0.0.1:2"]})
    assert versions.backends["base"] is new  # unchanged servers: the same pool


@pytest.mark.integration
def test_a_killed_manager_takes_its_servers_with_it(settings, tmp_path):
    """``flywheel down`` or a crash that SIGKILLs the manager leaves no model server holding a model and a port."""
    import subprocess
    import sys

    env = settings.child_env(REPO)
    with open(tmp_path / "manager.log", "wb") as log:
        manager = subprocess.Popen([sys.executable, "-m", "app.model_servers"], env=env, stdout=log, stderr=log)
    try:
        urls = _wait(lambda: published_servers(settings).get("base"), 180, "the manager's server")
        pid = _server_pid(settings, urls[0])
        assert pid is not None
        manager.kill()
        manager.wait(10)
        _wait(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 15,
              "the orphaned model server to exit")  # fmt: skip
    finally:
        if manager.poll() is None:
            manager.kill()

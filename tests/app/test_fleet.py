"""App replicas behind the load balancer (issue 20): Debian's nginx (``infra.balancer``) in front of two real
``app.server`` processes on one home. A user's session is the same whichever replica answers; a replica killed
mid-stream gives the client a clean error and its retry is answered by the other replica, with the same session;
the rehearsal (``benchmarks.fleet``, reduced) loses no acknowledged rating and no session and never hangs.
"""

from __future__ import annotations

import json

import httpx
import pytest

from benchmarks.fleet import Fleet, rehearse

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("fleet") / "home", replicas=2, answer_tokens=512)
    try:
        f.start()
        f.keys = f.create_keys(1)
        yield f
    finally:
        f.stop()
    assert not any(r.alive() for r in [*f.replicas, f.balancer]), "the fleet left a process behind"


def _chat(client: httpx.Client, url: str, user: str, text: str) -> httpx.Response:
    body = {"model": "flywheel", "user": user, "max_tokens": 4, "messages": [{"role": "user", "content": text}]}
    return client.post(f"{url}/v1/chat/completions", json=body)


def test_a_users_session_is_the_same_on_both_replicas(fleet):
    headers = {"Authorization": f"Bearer {fleet.keys[0]}", "X-Flywheel-Consent": "1"}
    with httpx.Client(headers=headers, timeout=120) as client:
        direct = [f"http://{a}" for a in fleet.addrs]
        served = [_chat(client, direct[i], "ann", f"question {i}") for i in (0, 1)]
        assert all(r.status_code == 200 for r in served), [r.text for r in served]
        for i in (0, 1):  # each turn rated on the replica that did not serve it
            r = client.post(
                f"{direct[1 - i]}/v1/feedback", json={"turn_id": served[i].json()["id"], "rating": "up", "user": "ann"}
            )
            assert r.status_code == 200, f"replica {1 - i} does not know ann's turn from replica {i}: {r.text}"
            other = {"turn_id": served[i].json()["id"], "rating": "up", "user": "bob"}
            assert client.post(f"{direct[1 - i]}/v1/feedback", json=other).status_code == 403
    with httpx.Client(timeout=60) as browser:  # a browser's signed cookie, issued by one, is honoured by both
        page = browser.get(fleet.url + "/")
        assert page.status_code == 200 and browser.cookies.get("flywheel_uid")
        again = [browser.get(fleet.url + "/") for _ in range(6)]  # with the cookie: on one replica (Gradio's queue)
        assert len({fleet.replica_of(r) for r in again}) == 1, "a browser user with a cookie stays on one replica"
        for addr in fleet.addrs:
            r = browser.get(f"http://{addr}/")
            assert r.status_code == 200 and "set-cookie" not in r.headers, "the other replica issued a new user"


def test_a_replica_killed_mid_stream_is_a_clean_error_and_the_retry_is_answered_with_the_same_session(fleet):
    headers = {"Authorization": f"Bearer {fleet.keys[0]}", "X-Flywheel-Consent": "1"}
    body = {
        "model": "flywheel",
        "user": "cat",
        "stream": True,
        "max_tokens": 512,
        "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}],
    }
    with httpx.Client(base_url=fleet.url, headers=headers, timeout=120) as client:
        before = _chat(client, fleet.url, "cat", "Hi")
        assert before.status_code == 200
        error = None
        with client.stream("POST", "/v1/chat/completions", json=body, timeout=45) as stream:
            victim = fleet.replica_of(stream)
            assert victim is not None and stream.status_code == 200
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            assert json.loads(first[5:])["choices"], first
            fleet.replicas[victim].kill()
            try:
                rest = list(lines)
            except httpx.TimeoutException:
                pytest.fail("the stream of a killed replica hung instead of ending")
            except httpx.HTTPError as e:  # the connection ends: the client knows the answer is incomplete
                error, rest = e, []
        assert error is not None or "data: [DONE]" not in rest, "a cut stream must not look complete"
        retried = client.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 8})
        assert retried.status_code == 200, retried.text
        assert fleet.replica_of(retried) == 1 - victim
        rating = {"turn_id": before.json()["id"], "rating": "up", "user": "cat"}
        assert client.post("/v1/feedback", json=rating).status_code == 200, "the same session on the survivor"
    fleet.replicas[victim].start()
    fleet.wait_replica(victim)


def test_the_fleet_rehearsal_loses_no_rating_and_no_session_and_never_hangs(tmp_path):
    report = rehearse(tmp_path, replicas=2, users=3, seconds=30)
    assert report["answered"] > 10 and report["ratings_acknowledged"] > 3, report
    assert report["hung"] == 0 and report["sessions_lost"] == 0, report
    assert report["ratings_lost"] == 0 and report["ratings_duplicated"] == 0, report
    assert report["failover_s"]["replica"]["n"] == 1, report
    assert not report["other_errors"], report

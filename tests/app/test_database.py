"""The app's shared PostgreSQL (issue 20), on a real local instance (Debian's binaries, ``flywheel db``):
migrations run twice change nothing and a newer schema is refused in one sentence; a key's rate holds across two
replica processes on it; with the database down a replica limits keys on its own and comes back when it returns;
sessions behave the same on SQLite and PostgreSQL; keys and role grants are seen by every replica; two live app
servers with homes of their own (two machines) share keys, rate limits and consent through it; with it down, chat
answers, ratings wait in the replica's outbox and land once when it returns, and a deletion is never undone by a
replay.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psycopg
import pytest
from pydantic import SecretStr

from app.database import MIGRATIONS, PgBuckets, SchemaTooNew, StoreDown, latest, migrate, schema_version
from app.keys import CallerLimits
from feedback.settings import Settings
from infra import postgres
from infra.ports import free_port
from tests.conftest import REPO

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pg(tmp_path_factory):
    settings = Settings(home=tmp_path_factory.mktemp("pg") / "home", db_port=free_port())
    inst = postgres.start(settings)
    yield settings, inst
    postgres.destroy(settings)
    assert postgres.status(settings) is None


def test_migrations_run_once_and_a_newer_schema_is_refused(pg):
    settings, inst = pg
    first = migrate(inst.url)
    assert first in ([v for v, _, _ in MIGRATIONS], []), first  # [] when another test of this module ran first
    assert migrate(inst.url) == [] and schema_version(inst.url) == latest(), "run twice: no change"
    with psycopg.connect(inst.url, autocommit=True) as con:
        con.execute("INSERT INTO flywheel_schema (version, name) VALUES (%s, 'from the future')", (latest() + 1,))
    try:
        with pytest.raises(SchemaTooNew, match=f"schema is version {latest() + 1}, newer than this code's"):
            migrate(inst.url)
        with pytest.raises(SchemaTooNew):
            PgBuckets(inst.url, 1.0, 1)  # a replica refuses before it serves anything
    finally:
        with psycopg.connect(inst.url, autocommit=True) as con:
            con.execute("DELETE FROM flywheel_schema WHERE version > %s", (latest(),))


def test_a_bucket_holds_exactly_its_refill_to_its_update_time_minus_what_was_taken(pg):
    """One take reads the clock once: a statement that refilled at one instant, decided at a later one and stamped
    a third could admit without taking a token (47 admitted against a limit of 46.4 in a loaded run)."""
    _, inst = pg
    rate, burst, bucket = 1000.0, 3, "key:consistent"
    b = PgBuckets(inst.url, rate, burst)
    try:
        with psycopg.connect(inst.url, autocommit=True) as con:
            row = lambda: con.execute(  # noqa: E731
                "SELECT tokens, updated FROM rate_buckets WHERE bucket = %s", (bucket,)
            ).fetchone()
            b.take(bucket)
            tokens, updated = row()
            for _ in range(200):
                admitted = b.take(bucket) is None
                t, u = row()
                refilled = min(burst, tokens + max(0.0, u - updated) * rate)
                assert t == pytest.approx(refilled - admitted, abs=1e-6), (t, refilled, admitted, u - updated)
                tokens, updated = t, u
    finally:
        b.close()


@pytest.mark.slow  # two processes for 2 s each
def test_two_replicas_on_postgres_never_give_a_key_twice_its_rate(pg):
    from benchmarks.limits import overshoot

    _, inst = pg
    r = overshoot(inst.url, True, seconds=2.0, rate=20.0, burst=5)
    # never above the key's limit; the floor only shows the two processes really competed (a loaded machine
    # slows them: 0.64x of the limit was admitted under a full suite)
    assert 0.5 * r["limit"] <= sum(r["admitted"]) <= r["limit"] + 1, r


def test_with_the_database_down_a_replica_limits_keys_alone_and_recovers(pg):
    settings, inst = pg
    lim = CallerLimits(1000.0, 2, 1, PgBuckets(inst.url, 0.01, 2, reconnect_s=0.5))
    lim.rate = 0.01  # the replica's own buckets at the same rate as the shared ones
    try:
        assert [lim.admit("key:down") is None for _ in range(3)] == [True, True, False]
        postgres.stop(settings)
        assert not postgres.status(settings).running
        assert [lim.admit("key:down-local") is None for _ in range(3)] == [True, True, False], "its own buckets"
        # a replica that starts while the database is down serves on its own counts, then joins the shared ones
        late = CallerLimits(0.01, 1, 1, PgBuckets(inst.url, 0.01, 1, reconnect_s=0.5))
        assert late.admit("key:late") is None and late.admit("key:late") is not None
        postgres.start(settings)
        time.sleep(0.6)  # past reconnect_s
        assert lim.admit("key:down") is not None, "back on the shared buckets: the key's tokens were spent there"
        assert late.admit("key:late") is None and lim.admit("key:late") is not None, "late joined the shared store"
        late.close()
    finally:
        lim.close()


def test_flywheel_db_start_status_stop(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env |= {"FLYWHEEL_HOME": str(tmp_path / "home"), "FLYWHEEL_DB_PORT": str(free_port()), "PYTHONPATH": str(REPO)}

    def db(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "cli.main", "db", *args, "--json"]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)

    try:
        started = db("start")
        assert started.returncode == 0, started.stderr[-2000:]
        out = json.loads(started.stdout)
        assert out["running"] and out["schema_version"] == latest() and out["url"].startswith("postgresql://")
        st = json.loads(db("status").stdout)
        assert st["running"] and "***" in st["url"], "status never prints the password"
        assert json.loads(db("stop").stdout) == {"stopped": True}
        down = db("status")
        assert down.returncode == 1 and json.loads(down.stdout)["running"] is False
    finally:
        postgres.destroy(Settings(home=tmp_path / "home"))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_sessions_behave_the_same_on_both_stores_and_replicas_share_them(pg, tmp_path, backend):
    import random

    from app.sessions import Sessions, TurnRecord

    _, inst = pg
    settings = Settings(home=tmp_path / "home")
    if backend == "postgresql":
        settings = settings.model_copy(update={"app_database_url": SecretStr(inst.url)})
    a, b = Sessions(settings), Sessions(settings)  # two replicas
    uid = f"u-{backend}-{time.time_ns()}"
    try:
        assert a.stored_consent(uid) is None and a.set_consent(uid, True) and not b.set_consent(uid, True)
        assert b.consent(uid) and b.stored_consent(uid) is True
        a.save_conversation(uid, "c1", [{"role": "user", "content": "first   question"}])
        assert b.list_conversations(uid) == [("first question", "c1")], "one user's history on every replica"
        assert not b.rename_conversation("u-other", "c1", "stolen") and b.rename_conversation(uid, "c1", "Mine")
        a.save_conversation(uid, "c1", [{"role": "user", "content": "edited"}, {"role": "assistant", "content": "ok"}])
        assert b.conversation_title(uid, "c1") == "Mine" and b.load_conversation("u-other", "c1") is None
        a.save_conversation("u-thief", "c1", [{"role": "user", "content": "overwrite"}])
        assert b.load_conversation(uid, "c1")[0]["content"] == "edited", "another user cannot overwrite it"
        a.record_turn(TurnRecord("t1-" + uid, uid, "c1", "base"))
        a.record_turn(TurnRecord("t1-" + uid, uid, "c1", "other"))  # a second record of one turn is ignored
        assert b.owned_turn(uid, "t1-" + uid).model_version == "base" and b.owned_turn("u-x", "t1-" + uid) is None
        picked = b.consented_prompt(random.Random(0))
        assert picked is not None and picked[0] == uid and picked[2] == [{"role": "user", "content": "edited"}]
        assert b.delete_user(uid) == 3 and a.list_conversations(uid) == [] and a.stored_consent(uid) is None
    finally:
        a.close()
        b.close()


def test_keys_and_role_grants_on_postgres_are_seen_by_every_replica(pg, tmp_path):
    from app.annotation.roles import RoleStore
    from app.keys import KeyStore

    _, inst = pg
    settings = Settings(home=tmp_path / "home", app_database_url=SecretStr(inst.url))
    k1, k2, r1, r2 = KeyStore(settings), KeyStore(settings), RoleStore(settings), RoleStore(settings)
    try:
        key, plain = k1.create("replica test")
        assert k2.verify(plain) == key and k2.any_created()
        assert k2.revoke(key.key_id).revoked_at is not None and k1.verify(plain) is None, "revoked everywhere"
        token = r1.grant("ana-pg", "trainer")
        assert r2.grant("ana-pg", "trainer") is None and r2.check("ana-pg", token).roles == ("trainer",)
        assert r2.set_topics("ana-pg", ["fact"]) == ("fact",) and r1.get("ana-pg").topics == ("fact",)
        assert r1.revoke("ana-pg", "trainer") and r2.check("ana-pg", token) is None
        assert not (tmp_path / "home" / "app" / "keys.sqlite").exists(), "nothing went to the local files"
    finally:
        for store in (k1, k2, r1, r2):
            store.close()


def test_two_app_servers_on_other_homes_share_keys_limits_and_history_through_postgres(pg, tmp_path, model_backend):
    """Two replicas as on two machines (each its own FLYWHEEL_HOME: spools, queue) with one FLYWHEEL_APP_DATABASE_URL:
    a key made through one answers on the other, its rate holds across both, and one user's consent is one."""
    import httpx

    from app.keys import KeyStore
    from tests.app.conftest import start_app

    _, inst = pg
    url = SecretStr(inst.url)
    homes = [
        Settings(home=tmp_path / f"m{i}", app_database_url=url, api_burst_per_key=4, api_rate_per_key=0.01)
        for i in range(2)
    ]
    a, b = (start_app(s, {"base": model_backend}) for s in homes)
    try:
        store = KeyStore(homes[0])
        _, key = store.create("two machines")
        store.close()
        auth = {"Authorization": f"Bearer {key}"}
        codes = [httpx.get(f"{app.api}/models", headers=auth).status_code for _ in range(4) for app in (a, b)]
        assert codes[:4] == [200] * 4 and codes.count(429) == 4, codes
        store = KeyStore(homes[1])
        other, key2 = store.create("consent")
        store.close()
        body = {"model": "flywheel", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "user": "eve"}
        headers = {"Authorization": f"Bearer {key2}", "X-Flywheel-Consent": "1"}
        ok = httpx.post(f"{b.api}/chat/completions", json=body, headers=headers, timeout=120)
        assert ok.status_code == 200, ok.text
        assert a.service.sessions.consent(f"key:{other.key_id}:eve"), "consent given on one replica holds on the other"
    finally:
        a.stop()
        b.stop()


@pytest.mark.slow  # MLflow's and Prefect's own migrations on a fresh database (~1 min)
def test_mlflow_and_prefect_keep_their_state_in_the_shared_database(pg, tmp_path):
    from mlflow import MlflowClient

    from infra import prefect_server
    from pipelines.release_queue import registry_exists
    from training.mlflow_store import tracking_uri

    _, inst = pg
    settings = Settings(home=tmp_path / "home", app_database_url=SecretStr(inst.url), prefect_port=free_port())
    assert not registry_exists(settings), "nothing opened MLflow's database yet"
    uri = tracking_uri(settings)
    assert uri.startswith("postgresql+psycopg://") and uri.endswith("/flywheel_mlflow")
    MlflowClient(tracking_uri=uri).create_registered_model("pg-check")
    assert registry_exists(settings)
    assert "pg-check" in [m.name for m in MlflowClient(tracking_uri=uri).search_registered_models()]
    prefect_server.start(settings)
    try:
        assert prefect_server.healthy(settings)
    finally:
        prefect_server.stop(settings)
    with psycopg.connect(inst.url.rsplit("/", 1)[0] + "/flywheel_prefect") as con:
        assert con.execute("SELECT to_regclass('flow_run') IS NOT NULL").fetchone()[0], "Prefect's tables are there"
    assert not (tmp_path / "home" / "prefect" / "prefect.db").exists() and not list(tmp_path.rglob("mlflow.db"))


def test_with_postgres_down_chat_keeps_answering_and_what_cannot_be_checked_is_a_retryable_503(
    pg, tmp_path, model_backend
):
    import httpx

    from app.keys import KeyStore
    from tests.app.conftest import start_app

    settings, inst = pg
    no_broker = f"127.0.0.1:{free_port()}"  # every event stays in the replica's spool, where the test counts them
    home = Settings(home=tmp_path / "home", app_database_url=SecretStr(inst.url), kafka_bootstrap=no_broker)
    app = start_app(home, {"base": model_backend})
    try:
        store = KeyStore(home)
        (_, known), (_, unseen) = store.create("seen before"), store.create("never used")
        store.close()
        body = {"model": "flywheel", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "user": "ann"}

        def chat(key: str) -> httpx.Response:
            headers = {"Authorization": f"Bearer {key}", "X-Flywheel-Consent": "1"}
            return httpx.post(f"{app.api}/chat/completions", json=body, headers=headers, timeout=120)

        first = chat(known)
        assert first.status_code == 200, first.text
        postgres.stop(settings)
        during = chat(known)
        assert during.status_code == 200, f"a key this replica verified still answers: {during.text}"
        refused = chat(unseen)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_down", refused.text
        assert int(refused.headers["retry-after"]) > 0
        auth = {"Authorization": f"Bearer {known}"}
        for turn in (first.json()["id"], during.json()["id"]):  # served before the outage, and during it
            r = httpx.post(f"{app.api}/feedback", json={"turn_id": turn, "rating": "up", "user": "ann"}, headers=auth)
            if turn == first.json()["id"]:  # ownership unknowable here: it waits in the outbox
                assert r.status_code == 202 and r.json()["queued"], r.text
            else:  # this replica served it during the outage: its outbox vouches for it
                assert r.status_code == 200, r.text
        outbox = app.service.sessions.outbox
        assert outbox.kinds() == {"turn": 1, "consent": 1, "rating": 1}, outbox.kinds()  # consent: the header
        postgres.start(settings)
        deadline = time.monotonic() + 30
        while len(outbox) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(outbox) == 0, f"the outbox was not replayed when the database returned: {outbox.kinds()}"
        mine = {"turn_id": during.json()["id"], "rating": "down", "user": "ann"}
        r = httpx.post(f"{app.api}/feedback", json=mine, headers=auth)
        assert r.status_code == 200, f"the turn served during the outage is now in the database: {r.text}"
        theirs = {"turn_id": during.json()["id"], "rating": "down", "user": "bob"}
        assert httpx.post(f"{app.api}/feedback", json=theirs, headers=auth).status_code == 403
    finally:
        postgres.start(settings)
        app.stop()
    assert feedback_in_spool(home) == 3, "each accepted rating was emitted once, none lost or doubled"
    time.sleep(5.5)  # past PgConnection's retry_s (5 s): the next test's replicas connect at once


def feedback_in_spool(settings: Settings) -> int:
    """Ratings kept in the replica's spool (no broker takes them in this test), consent changes aside."""
    from feedback.spool import Spool

    spool = Spool(settings.spool_path, "app")  # the replica has stopped: its spool is free
    try:
        return sum(
            1 for _, topic, _, value in spool.peek(100_000) if topic == settings.topic_feedback and not _action(value)
        )
    finally:
        spool.close()


def _action(value: bytes) -> bool:
    """A consent change (sent in clear; ratings are sealed with their user's key)."""
    try:
        return "action" in json.loads(value)
    except ValueError:
        return False


def test_writes_missed_while_postgres_is_down_replay_in_order_and_a_deletion_is_never_undone(pg, tmp_path):
    """Sessions with an outbox (what a replica on PostgreSQL has): turn ownership, consent and conversations the
    database missed are kept beside the spool, answered from there, replayed when it returns, superseded by a
    newer direct write, and never brought back over a deletion made on another replica meanwhile."""
    from app.outbox import Outbox
    from app.sessions import Sessions, TurnRecord

    settings, inst = pg
    url = SecretStr(inst.url)
    a = Sessions(Settings(home=tmp_path / "a", app_database_url=url))
    b = Sessions(Settings(home=tmp_path / "b", app_database_url=url))
    box = Outbox(tmp_path / "a" / "outbox.sqlite")
    a.use_outbox(box)
    try:
        a.set_consent("u-kept", False)
        postgres.stop(settings)
        a.record_turn(TurnRecord("t-kept", "u-kept", "c-kept", "base"))
        a.set_consent("u-kept", True)
        a.save_conversation("u-kept", "c-kept", [{"role": "user", "content": "asked during the outage"}])
        a.record_turn(TurnRecord("t-gone", "u-gone", "c-gone", "base"))
        a.save_conversation("u-gone", "c-gone", [{"role": "user", "content": "deleted before it landed"}])
        assert box.kinds() == {"turn": 2, "consent": 1, "conversation": 2}
        assert a.owned_turn("u-kept", "t-kept").conversation_id == "c-kept", "answered from the outbox"
        assert a.stored_consent("u-kept") is True and a.consent("u-kept"), "what they chose meanwhile"
        with pytest.raises(StoreDown):
            a.owned_turn("u-other", "t-kept")  # not theirs, and the database cannot say more
        assert box.flush() == {"done": 0, "later": 0, "drop": 0}, "the first row stops the pass while it is down"
        postgres.start(settings)
        time.sleep(5.5)  # past PgConnection's retry window
        assert b.delete_user("u-gone") == 0  # deleted on another replica before replica a's outbox landed
        assert box.flush() == {"done": 3, "later": 0, "drop": 2}
        assert len(box) == 0 and box.find("turn", "t-gone") is None
        assert b.owned_turn("u-kept", "t-kept") is not None and b.consent("u-kept"), "replayed where all see it"
        assert b.load_conversation("u-kept", "c-kept")[0]["content"] == "asked during the outage"
        assert b.owned_turn("u-gone", "t-gone") is None and b.list_conversations("u-gone") == [], "never undone"
        a.set_consent("u-kept", False)  # a direct write while nothing is pending: nothing to supersede
        box.put("consent", "u-kept", "u-kept", {"args": ["u-kept", True]})  # an older pending one, say
        a.set_consent("u-kept", True)
        a.set_consent("u-kept", False)
        assert box.find("consent", "u-kept") is None and not b.consent("u-kept"), "the newer write stands"
    finally:
        if postgres.status(settings) is None:
            postgres.start(settings)
        box.close()
        a.close()
        b.close()
    time.sleep(5.5)

"""The app's shared PostgreSQL (issue 20), on a real local instance (Debian's binaries, ``flywheel db``):
migrations run twice change nothing and a newer schema is refused in one sentence; a key's rate holds across two
replica processes on it; with the database down a replica limits keys on its own and comes back when it returns.
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

from app.database import MIGRATIONS, PgBuckets, SchemaTooNew, latest, migrate, schema_version
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


@pytest.mark.slow  # two processes for 2 s each
def test_two_replicas_on_postgres_never_give_a_key_twice_its_rate(pg):
    from benchmarks.limits import overshoot

    _, inst = pg
    r = overshoot(inst.url, True, seconds=2.0, rate=20.0, burst=5)
    assert r["limit"] - 5 <= sum(r["admitted"]) <= r["limit"] + 1, r


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

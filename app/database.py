"""The app's shared PostgreSQL (``FLYWHEEL_APP_DATABASE_URL``, issue 20): versioned migrations, and the stores
that live there when it is configured. Without it, the same state is in SQLite files under ``<home>/app/``.

Driver: psycopg 3 (maintained, binary wheels, server-side ``ON CONFLICT ... RETURNING``), no ORM: the statements
are few and plain. Migrations: a numbered list in this file, each applied once in its own transaction and recorded
in ``flywheel_schema`` (version, name, applied_at), under an advisory lock, so two replicas starting together apply
each once. Alembic would add a second way to describe the schema for three tables; its equivalent here is the list.
A database whose schema is newer than this code is refused, in one sentence, before anything is written.

Here when configured: the rate limits' token buckets (``PgBuckets``), the sessions store (consent, conversations,
turn ownership: ``app.sessions.Sessions``), API keys (``app.keys.KeyStore``), annotators and their role grants
(``app.annotation.roles.RoleStore``), each running its own statements over ``PgConnection`` (``shared(settings)``).
The trainers' task queue is still a SQLite file (one machine's replicas share it).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

# (version, name, SQL): append only; never edit one that has shipped.
MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "rate-limit buckets",
        """CREATE TABLE rate_buckets (
               bucket TEXT PRIMARY KEY, tokens DOUBLE PRECISION NOT NULL, updated DOUBLE PRECISION NOT NULL,
               admitted BOOLEAN NOT NULL)""",
    ),
    (
        2,
        "sessions: consent, conversations, turn ownership",
        """CREATE TABLE users (user_id TEXT PRIMARY KEY, consent INTEGER NOT NULL DEFAULT 0,
               created_at DOUBLE PRECISION NOT NULL);
           CREATE TABLE conversations (conversation_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, title TEXT NOT NULL,
               messages TEXT NOT NULL, updated_at DOUBLE PRECISION NOT NULL, renamed INTEGER NOT NULL DEFAULT 0);
           CREATE INDEX conversations_by_user ON conversations (user_id, updated_at);
           CREATE TABLE turns (turn_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, conversation_id TEXT NOT NULL,
               model_version TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL)""",
    ),
    (
        3,
        "API keys, annotators and role grants",
        """CREATE TABLE api_keys (key_id TEXT PRIMARY KEY, name TEXT NOT NULL, digest TEXT NOT NULL,
               created_at DOUBLE PRECISION NOT NULL, revoked_at DOUBLE PRECISION);
           CREATE TABLE annotators (name TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL,
               created_at DOUBLE PRECISION NOT NULL, leaderboard INTEGER NOT NULL DEFAULT 1,
               topics TEXT NOT NULL DEFAULT '');
           CREATE TABLE grants (name TEXT NOT NULL, role TEXT NOT NULL, granted_by TEXT NOT NULL,
               granted_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (name, role))""",
    ),
    (
        4,
        "deleted users: what a replica's outbox must not bring back",
        """CREATE TABLE deleted_users (user_id TEXT PRIMARY KEY, deleted_at DOUBLE PRECISION NOT NULL)""",
    ),
]
LOCK_ID = 0x466C7977  # pg_advisory_xact_lock key: one migrator at a time


class SchemaTooNew(RuntimeError):
    """The database was migrated by newer code than this."""


class StoreBusy(RuntimeError):
    """The shared store is contended past its timeout: refuse for now (a flood), never count locally."""


class StoreDown(RuntimeError):
    """The shared store cannot answer: the caller falls back to its own counts and says so."""


def latest() -> int:
    return MIGRATIONS[-1][0]


def migrate(url: str) -> list[int]:
    """Apply the pending migrations; the versions applied now (none when up to date)."""
    import psycopg

    applied: list[int] = []
    with psycopg.connect(url, connect_timeout=10) as con:
        with con.transaction():
            con.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID,))
            con.execute(
                "CREATE TABLE IF NOT EXISTS flywheel_schema (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            have = {v for (v,) in con.execute("SELECT version FROM flywheel_schema")}
        newest = max(have, default=0)
        if newest > latest():
            raise SchemaTooNew(
                f"the app database's schema is version {newest}, newer than this code's {latest()}: "
                "upgrade Flywheel, or point FLYWHEEL_APP_DATABASE_URL at another database"
            )
        for version, name, sql in MIGRATIONS:
            with con.transaction():
                con.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID,))
                if con.execute("SELECT 1 FROM flywheel_schema WHERE version = %s", (version,)).fetchone():
                    continue  # another replica applied it meanwhile
                con.execute(sql)
                con.execute("INSERT INTO flywheel_schema (version, name) VALUES (%s, %s)", (version, name))
                applied.append(version)
                log.info("app database: applied migration %d (%s)", version, name)
    return applied


def schema_version(url: str) -> int:
    import psycopg

    with psycopg.connect(url, connect_timeout=10) as con:
        row = con.execute("SELECT max(version) FROM flywheel_schema").fetchone()
    return int(row[0] or 0)


def shared(settings: Any) -> PgConnection | None:
    """A connection to the app's shared PostgreSQL when ``FLYWHEEL_APP_DATABASE_URL`` is set (migrated), else None."""
    url = settings.app_database_url
    return PgConnection(url.get_secret_value()) if url is not None else None


class PgConnection:
    """The slice of ``sqlite3.Connection`` the app's stores use, over psycopg in autocommit: ``execute`` with
    ``?`` placeholders (no store's SQL holds a literal ``?``), cursors with ``rowcount``/``fetchone``/``fetchall``,
    and ``transaction()``.

    Failures are the stores' two exceptions: ``StoreBusy`` for a statement stopped by its timeout (``options``,
    e.g. ``-c statement_timeout=250``), ``StoreDown`` when the database does not answer. A lost connection is
    reopened once per call; after a failed connect, calls fail at once for ``retry_s`` (no 2-s wait on every
    request). A replica that starts while the database is down serves, and migrates when it first connects; a
    schema newer than the code is refused at start (``SchemaTooNew``), and later as ``StoreDown``, logged."""

    dialect = "postgresql"

    def __init__(self, url: str, options: str = "", retry_s: float = 5.0):
        self.url, self.options, self.retry_s = url, options, retry_s
        self._con: Any = None
        self._migrated = False
        self._next_try = 0.0
        try:
            self._connect(starting=True)
        except StoreDown as e:
            log.warning("the app database does not answer (%s): its stores fall back or fail until it does", e)

    def _connect(self, starting: bool = False) -> Any:
        import psycopg

        if time.monotonic() < self._next_try:
            raise StoreDown("the app database did not answer a moment ago")
        try:
            if not self._migrated:
                migrate(self.url)
                self._migrated = True
            self._con = psycopg.connect(self.url, autocommit=True, connect_timeout=2, options=self.options)
        except SchemaTooNew as e:
            if starting:
                raise
            log.error("%s", e)
            raise StoreDown(str(e)) from None
        except psycopg.OperationalError as e:
            self._next_try = time.monotonic() + self.retry_s
            raise StoreDown(_first_line(e)) from None
        return self._con

    def _live(self) -> Any:
        con = self._con
        return con if con is not None and not con.closed and not con.broken else self._connect()

    def execute(self, sql: str, params: Any = ()) -> Any:
        """The statement's cursor (see the class for the two exceptions)."""
        import psycopg

        try:
            try:
                return self._live().execute(sql.replace("?", "%s"), params)
            except psycopg.OperationalError:
                if self._con is not None and not self._con.closed and not self._con.broken:
                    raise  # the connection is fine: the statement failed (a timeout, a lock)
                return self._connect().execute(sql.replace("?", "%s"), params)
        except (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable) as e:
            raise StoreBusy(_first_line(e)) from None
        except psycopg.OperationalError as e:
            self._next_try = time.monotonic() + self.retry_s
            raise StoreDown(_first_line(e)) from None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """A transaction on a live connection: one the server dropped meanwhile (a restart) is found by a probe
        and reopened before the transaction starts, as ``execute`` does for one statement."""
        import psycopg

        con = self._live()
        try:
            con.execute("SELECT 1")
        except psycopg.OperationalError:
            con = self._connect()  # StoreDown when the database does not answer
        with con.transaction() as tx:
            yield tx

    def close(self) -> None:
        if self._con is not None:
            self._con.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class PgBuckets:
    """Token buckets in the shared PostgreSQL: the ``SharedBuckets`` contract (``take``) across machines.

    One ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING`` per request, with the server's clock (replicas on other
    machines may disagree about the time; the database does not), so concurrent replicas serialise on the key's
    row. A statement past ``timeout_s`` raises ``StoreBusy``; a database that does not answer, ``StoreDown``
    (``PgConnection``, which retries every ``reconnect_s``)."""

    # One instant per take: clock_timestamp() moves between its evaluations in one statement, so a take could refill
    # at one instant, decide at a later one (admitted without a token taken: 47 admitted against a limit of 46.4)
    # and stamp a third. statement_timestamp() is fixed for the statement; a take that started before another but
    # got the row after it refills nothing (``greatest``) and keeps the later stamp.
    NOW = "extract(epoch from statement_timestamp())::float8"

    def __init__(self, url: str, rate: float, burst: int, timeout_s: float = 0.25, reconnect_s: float = 5.0):
        self.rate, self.burst = rate, burst
        ms = int(timeout_s * 1000)
        self._db = PgConnection(url, options=f"-c statement_timeout={ms} -c lock_timeout={ms}", retry_s=reconnect_s)
        self._mu = threading.Lock()

    def take(self, bucket: str) -> float | None:
        """None when a token was taken, else the seconds until one will be there."""
        now = self.NOW
        refilled = f"least(%(burst)s, rate_buckets.tokens + greatest(0.0, {now} - rate_buckets.updated) * %(rate)s)"
        with self._mu:
            tokens, admitted = self._db.execute(
                f"""INSERT INTO rate_buckets VALUES (%(bucket)s, %(burst)s - 1, {now}, true)
                    ON CONFLICT (bucket) DO UPDATE SET
                        tokens = CASE WHEN {refilled} >= 1 THEN {refilled} - 1 ELSE {refilled} END,
                        admitted = {refilled} >= 1, updated = greatest(rate_buckets.updated, {now})
                    RETURNING tokens, admitted""",
                {"bucket": bucket, "burst": float(self.burst), "rate": self.rate},
            ).fetchone()
        return None if admitted else (1.0 - tokens) / self.rate

    def close(self) -> None:
        self._db.close()

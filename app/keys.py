"""Who is calling the ``/v1`` API: API keys, the end users inside each key, and per-key limits.

A key is ``fw_<key_id>_<secret>``. Only a SHA-256 of the secret is stored (``$FLYWHEEL_HOME/app/keys.sqlite``,
readable by its owner only); the secret is shown once, by ``flywheel keys create``. A slow password hash buys
nothing here: the secret is 256 random bits, and a check runs on every request. The key id is public (``list``,
``revoke``, logs).

The OpenAI ``user`` field names an end user *inside* the caller's namespace: with a key the internal user id is
``key:<key_id>:<user>`` (the key's own identity is ``key:<key_id>``), so one key can never rate, consent or delete
as another key's users. Keyless local mode (``api_auth=local``, or ``auto`` before any key exists) keeps the
``api:<user>`` ids of a single-machine install, and ``check_exposure`` refuses to serve it on any non-loopback
address. ``CallerLimits`` bounds each key: a request rate with a burst, and a number of answers in progress, so one
flooding key cannot take every generation slot from everyone else. The rate's token buckets live in
``$FLYWHEEL_HOME/app/limits.sqlite`` (``SharedBuckets``), which every app replica on the machine opens, or in
the shared PostgreSQL when ``FLYWHEEL_APP_DATABASE_URL`` is set (``app.database.PgBuckets``), so two replicas never
give a key twice its rate; answers in progress are counted per replica (a stream lives in one
process).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from app.database import PgBuckets, StoreBusy, StoreDown, shared
from app.sessions import api_user_id
from feedback.settings import Settings
from feedback.sqlite_wal import use_wal

log = logging.getLogger(__name__)
KEY_PREFIX = "fw"
KEYED_USER_PREFIX = "key:"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    name: str
    created_at: float
    revoked_at: float | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def as_dict(self) -> dict[str, object]:
        return {
            "key_id": self.key_id,
            "name": self.name,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
            "active": self.active,
        }


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_key(presented: str) -> tuple[str, str] | None:
    """``fw_<key_id>_<secret>`` -> (key_id, secret); None for anything else."""
    prefix, _, rest = presented.strip().partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != KEY_PREFIX or len(key_id) != 12 or not key_id.isalnum() or len(secret) < 20:
        return None
    return key_id, secret


class KeyStore:
    """The API keys of one ``FLYWHEEL_HOME``. Thread-safe; the CLI and a running app share the file (SQLite), or
    the shared PostgreSQL when ``FLYWHEEL_APP_DATABASE_URL`` is set."""

    def __init__(self, settings: Settings):
        self.path = settings.home / "app" / "keys.sqlite"
        self._mu = threading.Lock()
        self._seen: dict[str, tuple[str, ApiKey]] = {}  # key_id -> (digest, key) verified here: the outage fallback
        self._db: Any = shared(settings)  # the shared PostgreSQL when configured (its tables: app/database.py)
        if self._db is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS api_keys (key_id TEXT PRIMARY KEY, name TEXT NOT NULL, digest TEXT NOT NULL, "
            "created_at REAL NOT NULL, revoked_at REAL)"
        )

    def close(self) -> None:
        with self._mu:
            self._db.close()

    def create(self, name: str = "") -> tuple[ApiKey, str]:
        """A new active key and its plaintext (the only time the plaintext exists)."""
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        key = ApiKey(key_id, name.strip()[:100], time.time(), None)
        with self._mu:
            self._db.execute(
                "INSERT INTO api_keys VALUES (?, ?, ?, ?, NULL)",
                (key.key_id, key.name, _digest(secret), key.created_at),
            )
        return key, f"{KEY_PREFIX}_{key_id}_{secret}"

    def list(self) -> list[ApiKey]:
        with self._mu:
            rows = self._db.execute(
                "SELECT key_id, name, created_at, revoked_at FROM api_keys ORDER BY created_at"
            ).fetchall()
        return [ApiKey(*r) for r in rows]

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key (KeyError if unknown); requests with it are refused from the next one on."""
        with self._mu:
            self._db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL", (time.time(), key_id)
            )
            row = self._db.execute(
                "SELECT key_id, name, created_at, revoked_at FROM api_keys WHERE key_id = ?", (key_id,)
            ).fetchone()
        if row is None:
            raise KeyError(key_id)
        return ApiKey(*row)

    def verify(self, presented: str | None) -> ApiKey | None:
        """The active key ``presented`` (a bare key or an ``Authorization`` value) stands for, else None."""
        parts = split_key((presented or "").removeprefix("Bearer ").strip())
        if parts is None:
            return None
        key_id, secret = parts
        try:
            with self._mu:
                row = self._db.execute(
                    "SELECT key_id, name, created_at, revoked_at, digest FROM api_keys WHERE key_id = ?", (key_id,)
                ).fetchone()
        except StoreDown:
            # The shared database is down: a key this replica verified before still answers (a revocation made
            # meanwhile takes effect when the database is back); any other key cannot be checked (a 503).
            seen = self._seen.get(key_id)
            if seen is None:
                raise
            return seen[1] if hmac.compare_digest(seen[0], _digest(secret)) else None
        if row is None or row[3] is not None or not hmac.compare_digest(row[4], _digest(secret)):
            self._seen.pop(key_id, None)
            return None
        key = ApiKey(*row[:4])
        self._seen[key_id] = (row[4], key)
        return key

    def any_created(self) -> bool:
        try:
            with self._mu:
                return self._db.execute("SELECT 1 FROM api_keys LIMIT 1").fetchone() is not None
        except StoreDown:
            if self._seen:
                return True
            raise


def access_mode(settings: Settings, store: KeyStore) -> Literal["keys", "local"]:
    """``keys`` when every /v1 request needs a key; ``local`` for the keyless single-machine mode."""
    if settings.api_auth == "auto":
        return "keys" if store.any_created() else "local"
    return settings.api_auth


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ExposureError(RuntimeError):
    """The app would serve keyless access beyond this machine."""


def check_exposure(settings: Settings, store: KeyStore) -> None:
    """Refuse to serve keyless /v1 on an address other machines can reach."""
    if not is_loopback(settings.app_host) and access_mode(settings, store) == "local":
        why = "no API key exists yet" if settings.api_auth == "auto" else "FLYWHEEL_API_AUTH=local"
        raise ExposureError(
            f"Refusing to listen on {settings.app_host} without API keys ({why}): create one with "
            "`flywheel keys create` (and leave FLYWHEEL_API_AUTH at auto or keys), or listen on 127.0.0.1."
        )


def allowed_hosts(settings: Settings) -> set[str] | None:
    """Host header names the app answers (None: any). Default: loopback names and the bind address."""
    raw = [h.strip().lower() for h in settings.app_allowed_hosts.split(",") if h.strip()]
    if "*" in raw:
        return None
    hosts = set(raw) if raw else {*LOOPBACK_NAMES, settings.app_host.lower()}
    return {h.strip("[]") for h in hosts}


def host_name(header: str) -> str:
    """The name part of a Host header: ``[::1]:7860`` -> ``::1``, ``example.com:80`` -> ``example.com``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


@dataclass(frozen=True)
class Caller:
    """Who sent a /v1 request: a key (``key_id``), or None in keyless local mode; ``bucket`` names its quotas
    (None: unlimited, keyless mode serves only this machine)."""

    key_id: str | None
    bucket: str | None

    def user_id(self, user: str | None) -> str:
        """The internal user id of end user ``user`` (already validated) inside this caller's namespace."""
        if self.key_id is None:
            return api_user_id(user)
        return f"{KEYED_USER_PREFIX}{self.key_id}:{user}" if user else f"{KEYED_USER_PREFIX}{self.key_id}"

    def is_anonymous(self, user_id: str) -> bool:
        """Keyless requests without a user share one id; nobody may set consent for it."""
        return self.key_id is None and user_id == api_user_id(None)


class SharedBuckets:
    """Token buckets (rate per second, burst) in one SQLite file that every app replica on this machine opens.

    One ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING`` per request refills and takes a token atomically, so
    replicas racing on a key serialise in SQLite and together admit at most the key's rate. Wall-clock time (a clock
    stepping back refills nothing). Bucket state is not precious (a lost update forgets a refill at most), so the
    file is written without fsync; a full bucket is the same as none, and such rows are pruned now and then."""

    PRUNE_EVERY = 1000

    def __init__(self, path: Path, rate: float, burst: int, timeout_s: float = 0.25):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.rate, self.burst, self.path = rate, burst, path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=timeout_s)
        use_wal(self._db)
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS buckets (bucket TEXT PRIMARY KEY, tokens REAL NOT NULL, "
            "updated REAL NOT NULL, admitted INTEGER NOT NULL)"
        )
        self._mu = threading.Lock()
        self._n = 0

    def close(self) -> None:
        self._db.close()

    def take(self, bucket: str) -> float | None:
        """None when a token was taken, else the seconds until one will be there."""
        now = time.time()
        refilled = "min(:burst, buckets.tokens + max(0.0, :now - buckets.updated) * :rate)"
        with self._mu:
            try:
                tokens, admitted = self._db.execute(
                    f"""INSERT INTO buckets VALUES (:bucket, :burst - 1, :now, 1) ON CONFLICT (bucket) DO UPDATE SET
                        tokens = CASE WHEN {refilled} >= 1 THEN {refilled} - 1 ELSE {refilled} END,
                        admitted = {refilled} >= 1, updated = max(buckets.updated, :now)
                        RETURNING tokens, admitted""",
                    {"bucket": bucket, "burst": float(self.burst), "now": now, "rate": self.rate},
                ).fetchone()
                self._n += 1
                if self._n % self.PRUNE_EVERY == 0:
                    self._db.execute(
                        "DELETE FROM buckets WHERE tokens + (? - updated) * ? >= ?", (now, self.rate, float(self.burst))
                    )
            except sqlite3.OperationalError as e:
                raise (StoreBusy if "locked" in str(e) or "busy" in str(e) else StoreDown)(str(e)) from None
            except sqlite3.Error as e:
                raise StoreDown(str(e)) from None
        return None if admitted else (1.0 - tokens) / self.rate


class CallerLimits:
    """Per-caller token bucket (rate, burst) and a count of answers in progress. Event-loop and thread safe.

    With ``shared`` (``from_settings``: PostgreSQL when configured, else ``$FLYWHEEL_HOME/app/limits.sqlite``) the
    buckets hold across every replica. A store still locked by other replicas after its timeout means a flood: the
    request is refused for now (a 429 with its retry time), never let through on local counts, which would give
    the key its rate once per replica. When the store cannot answer at all (database down, disk trouble) this
    replica falls back to its own buckets and says so once in the log, rather than refusing every request."""

    MAX_TRACKED = 10_000  # idle buckets are forgotten past this, so random client addresses cannot grow it forever

    def __init__(self, rate: float, burst: int, streams: int, shared: SharedBuckets | PgBuckets | None = None):
        self.rate, self.burst, self.streams = rate, burst, streams
        self.shared = shared
        self._buckets: dict[str, tuple[float, float]] = {}
        self._open: dict[str, int] = {}
        self._mu = threading.Lock()
        self._warned = False

    @classmethod
    def from_settings(cls, settings: Settings) -> CallerLimits:
        rate, burst = settings.api_rate_per_key, settings.api_burst_per_key
        url = settings.app_database_url.get_secret_value() if settings.app_database_url else None
        shared = (
            PgBuckets(url, rate, burst) if url else SharedBuckets(settings.home / "app" / "limits.sqlite", rate, burst)
        )
        return cls(rate, burst, settings.api_streams_per_key, shared)

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()

    def admit(self, bucket: str) -> float | None:
        """None when the request may go on, else the seconds after which one will be admitted."""
        if self.shared is not None:
            try:
                return self.shared.take(bucket)
            except StoreBusy:
                return 1.0 / self.rate
            except StoreDown as e:
                if not self._warned:
                    log.warning("shared rate limits unavailable (%s): this replica limits keys on its own", e)
                    self._warned = True
        now = time.monotonic()
        with self._mu:
            tokens, last = self._buckets.get(bucket, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[bucket] = (tokens, now)
                return (1.0 - tokens) / self.rate
            self._buckets[bucket] = (tokens - 1.0, now)
            if len(self._buckets) > self.MAX_TRACKED:
                full = [b for b, (t, ts) in self._buckets.items() if t + (now - ts) * self.rate >= self.burst]
                for b in full:
                    del self._buckets[b]
        return None

    def open_stream(self, bucket: str) -> bool:
        """Take one of the caller's answer places; False when all are in use. Pair with ``close_stream``."""
        with self._mu:
            n = self._open.get(bucket, 0)
            if n >= self.streams:
                return False
            self._open[bucket] = n + 1
        return True

    def close_stream(self, bucket: str) -> None:
        with self._mu:
            n = self._open.get(bucket, 0) - 1
            if n > 0:
                self._open[bucket] = n
            else:
                self._open.pop(bucket, None)

    def streams_open(self) -> int:
        with self._mu:
            return sum(self._open.values())

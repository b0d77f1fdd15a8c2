"""Who may judge: annotators, their roles and their sign-in tokens (issue 18).

Roles are ``trainer`` (compare, rank, rewrite, write demonstrations), ``red_teamer`` (probe any version, file
findings), ``reviewer`` (the review queue: low agreement, user reports, red-team findings) and ``operator`` (grants
roles). An operator grants with the admin token (``flywheel roles grant``, or the ops page); a grant to a name that
has no token yet creates one and shows it once (only its SHA-256 is kept, as for API keys). The trainer workspace
at ``/train`` signs in with the name and that token.

Annotator names are their pseudonymous ids in every event they make (``TrainerJudgment.user_id``): the same
deletion path as any user reaches their judgments. Kept in ``$FLYWHEEL_HOME/app/annotation.sqlite`` with the task
queue (``app/annotation/queue.py``), owner-readable only.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from app.database import shared
from app.sqlite_columns import add_missing_columns
from feedback.settings import Settings
from feedback.sqlite_wal import use_wal

Role = Literal["trainer", "red_teamer", "reviewer", "operator"]
ROLES: tuple[str, ...] = get_args(Role)
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,39}$")
TOKEN_PREFIX = "fwt_"
TOPIC = re.compile(r"^[a-z][a-z0-9_:-]{0,39}$")
MAX_TOPICS = 8

SCHEMA = """
CREATE TABLE IF NOT EXISTS annotators (
    name TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL, created_at REAL NOT NULL,
    leaderboard INTEGER NOT NULL DEFAULT 1);
CREATE TABLE IF NOT EXISTS grants (
    name TEXT NOT NULL, role TEXT NOT NULL, granted_by TEXT NOT NULL, granted_at REAL NOT NULL,
    PRIMARY KEY (name, role));
"""


class RoleError(ValueError):
    """A bad name or role, or a change nobody may make; the message is one sentence for the operator."""


@dataclass(frozen=True)
class Annotator:
    name: str
    roles: tuple[str, ...]
    leaderboard: bool
    topics: tuple[str, ...] = ()  # what they know best: the queue routes tasks on these topics to them first


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def db_path(settings: Settings) -> Path:
    return settings.home / "app" / "annotation.sqlite"


def connect(settings: Settings) -> sqlite3.Connection:
    path = db_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
    use_wal(db)
    return db


class RoleStore:
    """Annotators and their roles. Thread-safe; the CLI and a running app share the file, or the shared PostgreSQL
    when ``FLYWHEEL_APP_DATABASE_URL`` is set."""

    def __init__(self, settings: Settings):
        self._lock = threading.Lock()
        self._db: Any = shared(settings)  # the shared PostgreSQL when configured (its tables: app/database.py)
        if self._db is not None:
            return
        self._db = connect(settings)
        self._db.executescript(SCHEMA)
        add_missing_columns(self._db, "annotators", {"topics": "TEXT NOT NULL DEFAULT ''"})  # an older file

    def close(self) -> None:
        self._db.close()

    def grant(self, name: str, role: str, by: str = "operator") -> str | None:
        """Give ``name`` the role; returns their new sign-in token when they had none (shown once), else None."""
        if not NAME.match(name or ""):
            raise RoleError("annotator names are 2-40 characters: lower-case letters, digits, '.', '_' or '-'")
        if role not in ROLES:
            raise RoleError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
        token = None
        with self._lock:
            if self._db.execute("SELECT 1 FROM annotators WHERE name = ?", (name,)).fetchone() is None:
                token = TOKEN_PREFIX + secrets.token_urlsafe(24)
                self._db.execute(
                    "INSERT INTO annotators (name, token_sha256, created_at) VALUES (?, ?, ?)",
                    (name, _sha(token), time.time()),
                )
            self._db.execute(
                "INSERT INTO grants VALUES (?, ?, ?, ?) ON CONFLICT (name, role) DO NOTHING",
                (name, role, by, time.time()),
            )
        return token

    def revoke(self, name: str, role: str) -> bool:
        with self._lock:
            cur = self._db.execute("DELETE FROM grants WHERE name = ? AND role = ?", (name, role))
        return cur.rowcount > 0

    def rotate(self, name: str) -> str:
        """A new token for ``name`` (the old one stops working)."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(24)
        with self._lock:
            cur = self._db.execute("UPDATE annotators SET token_sha256 = ? WHERE name = ?", (_sha(token), name))
        if not cur.rowcount:
            raise RoleError(f"no annotator named {name!r}: grant them a role first")
        return token

    def set_leaderboard(self, name: str, shown: bool) -> None:
        with self._lock:
            self._db.execute("UPDATE annotators SET leaderboard = ? WHERE name = ?", (int(shown), name))

    def set_topics(self, name: str, topics: list[str]) -> tuple[str, ...]:
        """Replace what ``name`` knows best (e.g. ``fact``, ``arithmetic``, ``harmful``, ``report:wrong``)."""
        clean = tuple(dict.fromkeys(t.strip().lower() for t in topics if t and t.strip()))
        bad = next((t for t in clean if not TOPIC.match(t)), None)
        if bad is not None:
            raise RoleError(f"topic {bad[:40]!r} is not a name: lower-case letters, digits, '_', ':' or '-'")
        if len(clean) > MAX_TOPICS:
            raise RoleError(f"at most {MAX_TOPICS} topics per annotator, not {len(clean)}")
        with self._lock:
            cur = self._db.execute("UPDATE annotators SET topics = ? WHERE name = ?", (",".join(clean), name))
        if not cur.rowcount:
            raise RoleError(f"no annotator named {name!r}: grant them a role first")
        return clean

    def check(self, name: str, token: str) -> Annotator | None:
        """The annotator when the token is theirs and they hold a role; None otherwise (constant-time compare)."""
        row = self._db.execute("SELECT token_sha256 FROM annotators WHERE name = ?", (name or "",)).fetchone()
        if row is None or not hmac.compare_digest(row[0], _sha(token or "")):
            return None
        a = self.get(name)
        return a if a and a.roles else None

    def bearer(self, token: str) -> Annotator | None:
        """The annotator whose sign-in token this is (the HTTP API's ``Authorization: Bearer fwt_...``)."""
        if not (token or "").startswith(TOKEN_PREFIX):
            return None
        row = self._db.execute("SELECT name FROM annotators WHERE token_sha256 = ?", (_sha(token),)).fetchone()
        return self.check(row[0], token) if row else None

    def get(self, name: str) -> Annotator | None:
        row = self._db.execute("SELECT leaderboard, topics FROM annotators WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        roles = tuple(r for (r,) in self._db.execute("SELECT role FROM grants WHERE name = ? ORDER BY role", (name,)))
        return Annotator(name, roles, bool(row[0]), tuple(t for t in row[1].split(",") if t))

    def list(self) -> list[Annotator]:
        names = [n for (n,) in self._db.execute("SELECT name FROM annotators ORDER BY name")]
        return [a for n in names if (a := self.get(n)) is not None]

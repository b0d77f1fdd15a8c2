"""Who the user is, what they agreed to, what they said before, and which answers they were given.

A browser user is a random id in a cookie signed with a secret kept in ``$FLYWHEEL_HOME/app_secret``
(or, with Gradio auth on, ``login:<username>``). API users are ``api:<user>`` from the request's ``user``
field or ``X-Flywheel-User`` header, so an API caller can never pose as a browser user. Everything lives
in one small SQLite file owned by the app, ``$FLYWHEEL_HOME/app/sessions.sqlite``: per-user consent, past
conversations (kept across visits), and the turn ownership record behind "a user can rate only answers
given to them".
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import random
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from itsdangerous import BadSignature, URLSafeSerializer

from app.database import StoreDown
from app.outbox import DONE, DROP, Outbox
from app.sqlite_columns import add_missing_columns
from feedback.settings import Settings
from feedback.sqlite_wal import use_wal

log = logging.getLogger(__name__)
COOKIE_NAME = "flywheel_uid"
COOKIE_MAX_AGE = 2 * 365 * 24 * 3600
API_PREFIX = "api:"
LOGIN_PREFIX = "login:"
ANONYMOUS_API_USER = "api:anonymous"


def load_secret(home: Path) -> bytes:
    """The cookie-signing secret: created once (0600) and reused so cookies survive restarts."""
    path = home / "app_secret"
    home.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def api_user_id(user: str | None) -> str:
    user = (user or "").strip()
    return f"{API_PREFIX}{user[:100]}" if user else ANONYMOUS_API_USER


@dataclass(frozen=True)
class TurnRecord:
    turn_id: str
    user_id: str
    conversation_id: str
    model_version: str


def _degrade(default: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """On the chat's own path, a shared database that does not answer (``StoreDown``) degrades, not fails: the
    method logs and returns ``default`` (no consent, nothing stored), so chat keeps answering; the consent
    change itself is an event already in the spool. Methods without it raise ``StoreDown`` (a 503 in the API)."""

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def inner(self: Sessions, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except StoreDown as e:
                log.warning("sessions store down (%s): %s answers %r for now", e, method.__name__, default)
                return default

        return inner

    return wrap


def _deferred(kind: str, default: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A write on the chat's path: with the shared database down it goes to the replica's outbox (``app.outbox``,
    replayed in order when the database answers) and the method returns ``default``; without an outbox it is
    dropped, logged, as ``_degrade`` does. A write the database took drops a pending older one with its key.
    Its arguments are positional (``_key_user`` reads the row's key and user from them) and kept as they are."""

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def inner(self: Sessions, *args: Any) -> Any:
            key, user_id = _key_user(kind, args)
            try:
                out = method(self, *args)
            except StoreDown as e:
                if self.outbox is None:
                    log.warning("sessions store down (%s): %s not stored", e, method.__name__)
                else:
                    self.outbox.put(kind, key, user_id, {"args": _plain(args)})
                return default
            if self.outbox is not None:
                self.outbox.superseded(kind, key)
            return out

        return inner

    return wrap


def _key_user(kind: str, args: tuple[Any, ...]) -> tuple[str, str]:
    if kind == "turn":
        turn = args[0]
        return turn.turn_id, turn.user_id
    if kind == "conversation":
        return args[1], args[0]  # (user_id, conversation_id, messages)
    return args[0], args[0]  # consent: (user_id, consent)


def _plain(args: tuple[Any, ...]) -> list[Any]:
    return [list(dataclasses.astuple(a)) if isinstance(a, TurnRecord) else a for a in args]


class Sessions:
    """Thread-safe; one per app process. SQLite calls here take well under a millisecond. With
    ``FLYWHEEL_APP_DATABASE_URL`` the same statements run on the shared PostgreSQL (``app.database.PgConnection``,
    its tables made by migration 2), so replicas on several machines see one user's conversations and consent."""

    def __init__(self, settings: Settings):
        self.dir = settings.home / "app"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._signer = URLSafeSerializer(load_secret(settings.home), salt="flywheel-user")
        self._mu = threading.Lock()
        self.outbox: Outbox | None = None  # on the shared database: the replica's pending writes (``use_outbox``)
        if settings.app_database_url is not None:  # replicas on several machines share PostgreSQL (issue 20)
            from app.database import PgConnection

            self._db: Any = PgConnection(settings.app_database_url.get_secret_value())
            return
        self._db = sqlite3.connect(self.dir / "sessions.sqlite", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA secure_delete=ON")  # a deleted user's text is overwritten, not left in free pages
        use_wal(self._db)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS users (user_id TEXT PRIMARY KEY, consent INTEGER NOT NULL DEFAULT 0,
                created_at REAL NOT NULL);
            CREATE TABLE IF NOT EXISTS conversations (conversation_id TEXT PRIMARY KEY, user_id TEXT NOT NULL,
                title TEXT NOT NULL, messages TEXT NOT NULL, updated_at REAL NOT NULL);
            CREATE INDEX IF NOT EXISTS conversations_by_user ON conversations (user_id, updated_at);
            CREATE TABLE IF NOT EXISTS turns (turn_id TEXT PRIMARY KEY, user_id TEXT NOT NULL,
                conversation_id TEXT NOT NULL, model_version TEXT NOT NULL, created_at REAL NOT NULL);
            """
        )
        # a title the person chose is kept when the conversation is saved again (a file from before it)
        add_missing_columns(self._db, "conversations", {"renamed": "INTEGER NOT NULL DEFAULT 0"})

    def close(self) -> None:
        with self._mu:
            self._db.close()

    # ---- identity --------------------------------------------------------------------------------
    @staticmethod
    def new_user_id() -> str:
        return f"u-{uuid.uuid4().hex}"

    def sign(self, user_id: str) -> str:
        return self._signer.dumps(user_id)

    def unsign(self, token: str | None) -> str | None:
        if not token:
            return None
        try:
            uid = self._signer.loads(token)
        except BadSignature:
            return None
        return uid if isinstance(uid, str) and uid.startswith("u-") else None

    def user_from_cookies(self, cookies: Mapping[str, str]) -> str | None:
        return self.unsign(cookies.get(COOKIE_NAME))

    # ---- consent ---------------------------------------------------------------------------------
    def consent(self, user_id: str) -> bool:
        """Whether this user lets their data train models; with the shared database down, what they chose on
        this replica meanwhile, else no."""
        return bool(self.stored_consent(user_id))

    @_deferred("consent", True)
    def set_consent(self, user_id: str, consent: bool) -> bool:
        """Returns True when the stored value changed."""
        with self._mu:
            row = self._db.execute("SELECT consent FROM users WHERE user_id = ?", (user_id,)).fetchone()
            self._db.execute(
                "INSERT INTO users (user_id, consent, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT (user_id) DO UPDATE SET consent = excluded.consent",
                (user_id, int(consent), time.time()),
            )
        return row is None or bool(row[0]) != consent

    # ---- conversations ---------------------------------------------------------------------------
    @_deferred("conversation", None)
    def save_conversation(self, user_id: str, conversation_id: str, messages: list[dict[str, Any]]) -> None:
        first = next((m["content"] for m in messages if m.get("role") == "user"), "New chat")
        title = " ".join(first.split())[:60] or "New chat"
        with self._mu:
            self._db.execute(
                "INSERT INTO conversations (conversation_id, user_id, title, messages, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (conversation_id) DO UPDATE SET "
                "title = CASE WHEN conversations.renamed = 1 THEN conversations.title ELSE excluded.title END, "
                "messages = excluded.messages, updated_at = excluded.updated_at "
                "WHERE conversations.user_id = excluded.user_id",
                (conversation_id, user_id, title, json.dumps(messages), time.time()),
            )

    def consented_prompt(self, rng: random.Random, recent: int = 200) -> tuple[str, str, list[dict[str, str]]] | None:
        """(user_id, conversation_id, messages) of one of the ``recent`` latest conversations of users who consent
        to training use, cut after its last user message, text turns only: what a trainer's compare task shows.
        None when no consented conversation is stored."""
        with self._mu:
            rows = self._db.execute(
                "SELECT c.user_id, c.conversation_id, c.messages FROM conversations c JOIN users u USING (user_id) "
                "WHERE u.consent = 1 ORDER BY c.updated_at DESC LIMIT ?",
                (recent,),
            ).fetchall()
        rng.shuffle(rows)
        for user_id, conversation_id, raw in rows:
            msgs = [
                {"role": m["role"], "content": m["content"]}
                for m in json.loads(raw)
                if isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
            ]
            last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
            if last_user is not None and msgs[last_user]["content"].strip():
                return user_id, conversation_id, msgs[: last_user + 1]
        return None

    @_degrade([])
    def list_conversations(self, user_id: str, limit: int = 50) -> list[tuple[str, str]]:
        """(title, conversation_id), newest first."""
        with self._mu:
            rows = self._db.execute(
                "SELECT title, conversation_id FROM conversations WHERE user_id = ? ORDER BY updated_at DESC LIMIT ?",
                (user_id, limit),
            ).fetchall()
        return [(t, c) for t, c in rows]

    def load_conversation(self, user_id: str, conversation_id: str) -> list[dict[str, Any]] | None:
        with self._mu:
            row = self._db.execute(
                "SELECT messages FROM conversations WHERE conversation_id = ? AND user_id = ?",
                (conversation_id, user_id),
            ).fetchone()
        return json.loads(row[0]) if row else None

    def rename_conversation(self, user_id: str, conversation_id: str, title: str) -> bool:
        """Give one of the user's conversations a title of their own (kept on later saves). False if not theirs."""
        with self._mu:
            cur = self._db.execute(
                "UPDATE conversations SET title = ?, renamed = 1 WHERE conversation_id = ? AND user_id = ?",
                (title, conversation_id, user_id),
            )
        return cur.rowcount > 0

    def delete_conversation(self, user_id: str, conversation_id: str) -> bool:
        """Remove one of the user's conversations from their history. False if it was not theirs."""
        with self._mu:
            cur = self._db.execute(
                "DELETE FROM conversations WHERE conversation_id = ? AND user_id = ?", (conversation_id, user_id)
            )
        return cur.rowcount > 0

    def conversation_title(self, user_id: str, conversation_id: str) -> str | None:
        with self._mu:
            row = self._db.execute(
                "SELECT title FROM conversations WHERE conversation_id = ? AND user_id = ?", (conversation_id, user_id)
            ).fetchone()
        return row[0] if row else None

    # ---- turn ownership --------------------------------------------------------------------------
    @_deferred("turn", None)
    def record_turn(self, turn: TurnRecord) -> None:
        with self._mu:
            self._db.execute(
                "INSERT INTO turns (turn_id, user_id, conversation_id, model_version, created_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (turn_id) DO NOTHING",
                (turn.turn_id, turn.user_id, turn.conversation_id, turn.model_version, time.time()),
            )

    def owned_turn(self, user_id: str, turn_id: str) -> TurnRecord | None:
        """The turn if it was served to this user, else None (unknown and foreign look the same). A turn this
        replica served while the shared database was down is found in its outbox; any other raises ``StoreDown``
        while the database does not answer."""
        try:
            with self._mu:
                row = self._db.execute(
                    "SELECT turn_id, user_id, conversation_id, model_version FROM turns "
                    "WHERE turn_id = ? AND user_id = ?",
                    (turn_id, user_id),
                ).fetchone()
        except StoreDown:
            row = None
            if self._pending_turn(user_id, turn_id) is None:
                raise
        return TurnRecord(*row) if row else self._pending_turn(user_id, turn_id)

    def _pending_turn(self, user_id: str, turn_id: str) -> TurnRecord | None:
        pending = self.outbox.find("turn", turn_id) if self.outbox is not None else None
        turn = TurnRecord(*pending["args"][0]) if pending else None
        return turn if turn is not None and turn.user_id == user_id else None

    def use_outbox(self, outbox: Outbox) -> None:
        """Keep the writes the shared database missed in ``outbox`` and replay them there (``app.outbox``)."""
        self.outbox = outbox
        for kind, method in (
            ("turn", Sessions.record_turn),
            ("consent", Sessions.set_consent),
            ("conversation", Sessions.save_conversation),
        ):
            outbox.handlers[kind] = functools.partial(self._replay, method.__wrapped__)

    def deleted_since(self, user_id: str, at: float) -> bool:
        """Whether this user's data was deleted after ``at`` (a replica's clock): a pending write from before
        must not bring it back. Shared database only (``StoreDown`` while it does not answer)."""
        with self._mu:
            row = self._db.execute("SELECT deleted_at FROM deleted_users WHERE user_id = ?", (user_id,)).fetchone()
        return bool(row) and row[0] >= at

    def _replay(self, method: Callable[..., Any], payload: dict[str, Any], put_at: float) -> str:
        args = list(payload["args"])
        user_id = args[0][1] if method is Sessions.record_turn.__wrapped__ else args[0]
        if self.deleted_since(user_id, put_at):
            return DROP
        if method is Sessions.record_turn.__wrapped__:
            args[0] = TurnRecord(*args[0])
        method(self, *args)  # StoreDown stops the outbox's pass
        return DONE

    # ---- deletion --------------------------------------------------------------------------------
    def stored_consent(self, user_id: str) -> bool | None:
        """The recorded consent, or None when this user never set one (or the shared database does not answer
        and they set none on this replica since: logged)."""
        pending = self.outbox.find("consent", user_id) if self.outbox is not None else None
        if pending is not None:  # newer than the database's: replayed there when it answers
            return bool(pending["args"][1])
        try:
            with self._mu:
                row = self._db.execute("SELECT consent FROM users WHERE user_id = ?", (user_id,)).fetchone()
        except StoreDown as e:
            log.warning("sessions store down (%s): no consent known for %s for now", e, user_id)
            return None
        return None if row is None else bool(row[0])

    def delete_user(self, user_id: str) -> int:
        """Erase everything stored about this user (conversations, turn ownership, consent, writes pending in the
        outbox), overwriting the freed pages (``secure_delete``) and truncating the WAL so no copy of their text
        stays on disk."""
        tables = ("conversations", "turns", "users")
        if self.outbox is not None:
            self.outbox.forget_user(user_id)
        with self._mu:
            if getattr(self._db, "dialect", "sqlite") == "postgresql":
                with self._db.transaction():
                    n = sum(self._db.execute(f"DELETE FROM {t} WHERE user_id = ?", (user_id,)).rowcount for t in tables)
                    self._db.execute(  # another replica's outbox must not bring them back (``deleted_since``)
                        "INSERT INTO deleted_users (user_id, deleted_at) VALUES (?, ?) "
                        "ON CONFLICT (user_id) DO UPDATE SET deleted_at = excluded.deleted_at",
                        (user_id, time.time()),
                    )
                self._db.execute(f"VACUUM {', '.join(tables)}")  # dead rows' space is reused (not overwritten)
                return n
            n = 0
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for table in tables:
                    n += self._db.execute(f"DELETE FROM {table} WHERE user_id = ?", (user_id,)).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return n

"""Crypto-shredding at the Kafka edge: each user's turns and ratings travel sealed with a key of their own.

Why: Kafka keeps messages for the topic's retention (30 days for turns and feedback) and offers no way to delete
one user's records from a log. Shortening retention would make a deletion wait for it and would cut the replay
window that exactly-once ingest relies on. Instead, the producer seals every ``ChatTurn`` and ``Feedback``
(AES-256-GCM) with a per-user key before it reaches the outbox, and a deletion destroys the key: every copy in
Kafka, in the DLQ, in an outbox and in any backup of those becomes unreadable at once, while the log itself stays
intact for everyone else. ``UserAction`` events (consent, deletion requests) hold no text and travel in clear,
so a deletion request is readable after its own key is gone.

Wire format of a sealed value: ``b"FWX1" + kid (16 bytes) + nonce (12) + AES-GCM(event JSON)``, the first 20
bytes bound as associated data. ``kid`` is random (it says nothing about the user). Plain JSON values (other
producers, old messages) are still accepted by ingest.

Keys live in ``$FLYWHEEL_HOME/keys/payload_keys.sqlite`` (directory 0700, file 0600, SQLite ``secure_delete``
so a destroyed key's bytes are overwritten, WAL truncated after each shred). A destroyed key leaves a tombstone
(``kid``, when) so ingest can tell "this user was deleted: drop the record" from "this key is unknown: a fault,
dead-letter it". Production would hold these keys in a KMS; the interface is the same three calls:
``seal``, ``open_many``, ``shred``.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from feedback.settings import Settings
from feedback.sqlite_wal import use_wal

MAGIC = b"FWX1"
_KID = 16
_NONCE = 12
_HEAD = len(MAGIC) + _KID


def user_hash(user_id: str) -> str:
    """The one pseudonymous id of a user across the project (snapshot contributor lists, tombstones)."""
    return hashlib.sha256(f"flywheel-user:{user_id}".encode()).hexdigest()


def is_sealed(raw: bytes) -> bool:
    return raw[:4] == MAGIC


def kid_of(raw: bytes) -> bytes | None:
    return raw[4:_HEAD] if is_sealed(raw) and len(raw) > _HEAD + _NONCE else None


class Shredded:
    """Marker: the record's key was destroyed by a deletion request (drop the record, it is not a fault)."""


SHREDDED = Shredded()


def keys_path(settings: Settings) -> Path:
    return settings.home / "keys" / "payload_keys.sqlite"


class KeyStore:
    """Per-user payload keys shared by the processes of one machine (app: seal, ingest: open, deletion: shred)."""

    def __init__(self, settings: Settings):
        path = keys_path(settings)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path.parent, 0o700)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        os.close(fd)
        os.chmod(path, 0o600)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA secure_delete=ON")
        use_wal(self._db)
        self._db.execute("PRAGMA synchronous=FULL")  # a key must be on disk before data sealed with it is
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS keys (kid BLOB PRIMARY KEY, user_hash TEXT NOT NULL, key BLOB NOT NULL,
                created_at REAL NOT NULL);
            CREATE INDEX IF NOT EXISTS keys_by_user ON keys (user_hash);
            CREATE TABLE IF NOT EXISTS shredded (kid BLOB PRIMARY KEY, user_hash TEXT NOT NULL,
                shredded_at REAL NOT NULL);
            """
        )
        self._mu = threading.Lock()
        self._cache: dict[str, tuple[bytes, AESGCM]] = {}

    def close(self) -> None:
        with self._mu:
            self._db.close()

    # ---- sealing (producer) ----------------------------------------------------------------------------
    def _key_for(self, user_id: str) -> tuple[bytes, AESGCM]:
        uh = user_hash(user_id)
        with self._mu:
            hit = self._cache.get(uh)
            if hit is not None:
                return hit
            row = self._db.execute(
                "SELECT kid, key FROM keys WHERE user_hash = ? ORDER BY created_at DESC LIMIT 1", (uh,)
            ).fetchone()
            if row is None:
                kid, key = os.urandom(_KID), AESGCM.generate_key(bit_length=256)
                self._db.execute("INSERT INTO keys VALUES (?, ?, ?, ?)", (kid, uh, key, time.time()))
            else:
                kid, key = row
            hit = (kid, AESGCM(key))
            self._cache[uh] = hit
            return hit

    def seal(self, user_id: str, plaintext: bytes) -> bytes:
        kid, aead = self._key_for(user_id)
        nonce = os.urandom(_NONCE)
        head = MAGIC + kid
        return head + nonce + aead.encrypt(nonce, plaintext, head)

    # ---- opening (ingest, tools) -------------------------------------------------------------------
    def open_many(self, raws: list[bytes]) -> list[bytes | Shredded | None]:
        """Plaintext per value: plain values as they are; sealed ones opened; ``SHREDDED`` for a destroyed
        key; ``None`` for an unknown key or a value that fails authentication (dead-letter it)."""
        kids = {k for r in raws if (k := kid_of(r)) is not None}
        keys: dict[bytes, AESGCM] = {}
        gone: set[bytes] = set()
        if kids:
            marks = ",".join("?" * len(kids))
            with self._mu:
                for kid, key in self._db.execute(f"SELECT kid, key FROM keys WHERE kid IN ({marks})", list(kids)):
                    keys[kid] = AESGCM(key)
                gone = {r[0] for r in self._db.execute(f"SELECT kid FROM shredded WHERE kid IN ({marks})", list(kids))}
        out: list[bytes | Shredded | None] = []
        for raw in raws:
            if not is_sealed(raw):
                out.append(raw)
                continue
            kid = kid_of(raw)
            if kid in gone:
                out.append(SHREDDED)
            elif kid in keys:
                try:
                    out.append(keys[kid].decrypt(raw[_HEAD : _HEAD + _NONCE], raw[_HEAD + _NONCE :], raw[:_HEAD]))
                except Exception:  # noqa: BLE001 - cryptography raises InvalidTag: a damaged record
                    out.append(None)
            else:
                out.append(None)
        return out

    def open(self, raw: bytes) -> bytes | Shredded | None:
        return self.open_many([raw])[0]

    # ---- shredding (deletion) ----------------------------------------------------------------------
    def shred(self, user_id: str) -> int:
        """Destroy every key of this user (tombstones stay). Returns how many keys were destroyed."""
        uh = user_hash(user_id)
        now = time.time()
        with self._mu:
            self._cache.pop(uh, None)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                kids = [r[0] for r in self._db.execute("SELECT kid FROM keys WHERE user_hash = ?", (uh,))]
                self._db.executemany("INSERT OR IGNORE INTO shredded VALUES (?, ?, ?)", [(k, uh, now) for k in kids])
                self._db.execute("DELETE FROM keys WHERE user_hash = ?", (uh,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # no copy of the key left in the WAL
        return len(kids)

    def has_key(self, user_id: str) -> bool:
        with self._mu:
            row = self._db.execute("SELECT 1 FROM keys WHERE user_hash = ?", (user_hash(user_id),)).fetchone()
        return row is not None


def open_value(settings: Settings, raw: bytes) -> bytes | Shredded | None:
    """One value from a Kafka topic, opened (tests and tools that read topics directly)."""
    ks = KeyStore(settings)
    try:
        return ks.open(raw)
    finally:
        ks.close()

"""The release log: every release change, append-only in ``$FLYWHEEL_HOME/releases/log.jsonl``, and the state
of each release as a fold over it.

This is the controller's whole memory. A change is appended (and fsynced) *pending* before it is published and an
``applied`` record follows once the broker acknowledged it, so a controller that dies at any point resumes from
the log alone: ``ReleaseLog.current()`` is the release in progress, its stage, its salt, and any change still to
publish. Writers serialise on ``ReleaseLog.locked()`` (an exclusive file lock), which a killed process releases.

Readers outside ``pipelines/`` (the ops dashboard) read the same JSON lines without importing this module.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from feedback.settings import Settings

log = logging.getLogger(__name__)

Action = Literal["start", "ramp", "full", "rollback", "pause", "resume", "applied", "alias"]
Status = Literal["canary", "ramping", "full", "rolled_back"]
ACTIVE: tuple[Status, ...] = ("canary", "ramping")
LOCK_TIMEOUT_S = 30.0


class ReleaseError(RuntimeError):
    """A release action that cannot be done; the message says why and what to do."""


class Record(BaseModel):
    """One line of the release log."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    seq: int
    at: datetime
    release_id: str
    action: Action
    actor: str = Field(description="'controller' or 'operator:<who>'")
    reason: str = ""
    candidate: str
    production: str
    share: float = Field(ge=0.0, le=1.0, description="Candidate's share of users after this change.")
    status: Status
    paused: bool = False
    plan: dict[str, Any] | None = None  # the ReleasePlan published (None for records that change no plan)
    applied: bool = True  # False: written before publishing; an 'applied' record follows once it is out
    stats: dict[str, Any] | None = None


class ReleaseState(BaseModel):
    """The current release, folded from its records."""

    model_config = ConfigDict(frozen=True)
    release_id: str
    candidate: str
    production: str
    salt: str
    share: float
    status: Status
    paused: bool
    started_at: datetime
    stage_started_at: datetime
    step_index: int
    pending: Record | None
    last: Record

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def serving(self) -> str:
        """The version every user gets once this release is over."""
        return self.candidate if self.status == "full" else self.production


class ReleaseLog:
    def __init__(self, settings: Settings):
        self.dir = settings.home / "releases"
        self.path = self.dir / "log.jsonl"
        self.lock_path = self.dir / "lock"

    @contextmanager
    def locked(self, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
        """Exclusive: one operator or controller changes releases at a time; the other waits, then is refused."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ReleaseError(
                            f"another operator or the controller has been changing releases for {timeout_s:.0f} s; "
                            "retry in a moment (`flywheel releases show`)"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # releases the lock

    def records(self) -> list[Record]:
        if not self.path.exists():
            return []
        out = []
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(Record.model_validate_json(line))
            except ValueError:
                log.warning("%s:%d: skipping an unreadable release record (a torn write?)", self.path, n)
        return out

    def append(self, **fields: Any) -> Record:
        """Append one record (call under ``locked()``); fsynced before returning."""
        self.dir.mkdir(parents=True, exist_ok=True)
        prev = self.records()
        rec = Record(seq=(prev[-1].seq + 1) if prev else 1, at=datetime.now(UTC), **fields)
        with open(self.path, "a") as f:
            f.write(rec.model_dump_json() + "\n")
            f.flush()
            os.fsync(f.fileno())
        return rec

    def releases(self) -> list[ReleaseState]:
        """Every release, oldest first."""
        by_id: dict[str, list[Record]] = {}
        for r in self.records():
            by_id.setdefault(r.release_id, []).append(r)
        return [fold(rs) for rs in by_id.values()]

    def current(self) -> ReleaseState | None:
        rels = self.releases()
        return rels[-1] if rels else None


def fold(records: list[Record]) -> ReleaseState:
    """The state of one release from its records, in order."""
    first = records[0]
    salt = (first.plan or {}).get("salt", "")
    st = dict(
        release_id=first.release_id,
        candidate=first.candidate,
        production=first.production,
        salt=salt,
        share=first.share,
        status=first.status,
        paused=False,
        started_at=first.at,
        stage_started_at=first.at,
        step_index=0,
        pending=None,
        last=first,
    )
    for r in records:
        if r.action == "applied":
            st["pending"] = None
            continue
        if r.plan is not None:
            st["pending"] = None if r.applied else r
            if r.share != st["share"] or r.status != st["status"]:
                st["stage_started_at"] = r.at
            if r.action in ("start", "ramp"):
                st["step_index"] = int((r.stats or {}).get("step_index", st["step_index"]))
        st.update(share=r.share, status=r.status, paused=r.paused, last=r)
    return ReleaseState(**st)


def latest_analysis(settings: Settings) -> dict[str, Any] | None:
    path = settings.home / "releases" / "latest_analysis.json"
    return json.loads(path.read_text()) if path.exists() else None

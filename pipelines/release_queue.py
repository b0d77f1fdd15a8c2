"""Which gate-passed candidates wait for a release, in what order, and which operator approved them.

The queue is not stored: it is computed from the registry (gate decision, taint, registered order), the release
log (what was released already, what serves everyone) and the approvals file, so any process (the autopilot, a
restarted autopilot, ``flywheel releases list``) sees the same queue and nothing can drift out of date.

- A candidate is a chat (policy) version registered after production and after every version that has been
  released (whatever the outcome): once a newer version was released, an older one is superseded.
- It **waits** when its gate passed, it is not tainted and weights exist for it; waiting candidates go in
  registered order (registry number).
- Everything else above that line is **held** with its reason and never released: a failed gate, a tainted
  version, or no gate decision at all (its evaluation is still running, or it crashed: a version is registered
  before it is evaluated, and only a finished evaluation records ``passed``).

Approvals (policy ``approve``) are JSON lines in ``$FLYWHEEL_HOME/releases/approvals.jsonl``:
``{"version", "actor", "at", "reason"}``. ``flywheel releases approve`` writes them through ``approve``; the ops
dashboard (``app/dashboard.py``, which must not import this package) writes the same line itself, for a version
the autopilot's status file lists as waiting. A line that cannot be read (a torn write) is skipped.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from feedback.settings import Settings
from pipelines.release import ReleaseError, ReleaseLog, current_production, servable

log = logging.getLogger(__name__)
APPROVALS = "approvals.jsonl"


class Approval(BaseModel):
    """One operator's go-ahead for one candidate (policy ``approve``)."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    version: str
    actor: str = Field(description="'operator:<who>' (CLI) or 'operator:<who>@ops' (the dashboard).")
    at: datetime
    reason: str = ""


class Candidate(BaseModel):
    """A gate-passed version waiting for its release."""

    model_config = ConfigDict(frozen=True)
    version: str
    number: int
    recipe: str
    parent: str | None = None
    snapshot_id: str | None = None
    created_at: str | None = None
    gate_reasons: list[str] = Field(default_factory=list)
    approval: Approval | None = None


class Held(BaseModel):
    """A version above the release line that will not be released as it stands, and why."""

    model_config = ConfigDict(frozen=True)
    version: str
    number: int
    why: str


class Queue(BaseModel):
    model_config = ConfigDict(frozen=True)
    policy: str
    production: str
    waiting: list[Candidate]
    held: list[Held]

    def next(self) -> Candidate | None:
        """The candidate to release next: the oldest waiting one (``auto``), or the oldest approved (``approve``)."""
        for c in self.waiting:
            if self.policy == "auto" or c.approval is not None:
                return c
        return None


# ---------------------------------------------------------------------------------------------------------
# Approvals
# ---------------------------------------------------------------------------------------------------------
def approvals_path(settings: Settings) -> Path:
    return settings.home / "releases" / APPROVALS


def read_approvals(settings: Settings) -> dict[str, Approval]:
    """The first approval of each version (a second one changes nothing)."""
    path = approvals_path(settings)
    out: dict[str, Approval] = {}
    if not path.exists():
        return out
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            a = Approval.model_validate_json(line)
        except ValueError:
            log.warning("%s:%d: skipping an unreadable approval (a torn write?)", path, n)
            continue
        out.setdefault(a.version, a)
    return out


def append_approval(settings: Settings, approval: Approval) -> None:
    """One line, one write, fsynced (appends from the CLI and the dashboard do not interleave within a line)."""
    path = approvals_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (approval.model_dump_json() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------
# The queue
# ---------------------------------------------------------------------------------------------------------
def registry_exists(settings: Settings) -> bool:
    """A registry to read: a configured tracking server, or the store file. On a fresh home there is none, and
    opening it would create and migrate it, racing the MLflow server ``flywheel up`` is starting on that file."""
    from training import registry

    if settings.mlflow_tracking_uri:
        return True
    uri = registry.store_uri(settings)
    if uri.startswith("postgresql"):  # the shared database: MLflow's tables exist once it was first opened
        import psycopg

        try:
            with psycopg.connect(uri.replace("+psycopg", ""), connect_timeout=5) as con:
                return con.execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()[0]
        except psycopg.OperationalError:
            return False
    return Path(uri.removeprefix("sqlite:///")).exists()


def build_queue(settings: Settings, policy: str, log_: ReleaseLog | None = None) -> Queue:
    """The waiting and held candidates now (reads the registry, the release log and the approvals)."""
    from training import registry

    log_ = log_ or ReleaseLog(settings)
    if not registry_exists(settings):  # nothing was ever registered: nothing waits
        return Queue(policy=policy, production=settings.model_version, waiting=[], held=[])
    versions = registry.list_versions(settings, include_base=True)
    number = {v.name: v.number for v in versions}
    released = {r.candidate for r in log_.releases()}
    production = current_production(settings, log_)
    line = max((number[n] for n in released | {production} if n in number), default=0)
    approvals = read_approvals(settings)
    waiting: list[Candidate] = []
    held: list[Held] = []
    for v in versions:  # registered order
        if v.kind != "policy" or v.number <= line or v.name in released:
            continue
        if v.tainted:
            held.append(Held(version=v.name, number=v.number, why=f"tainted ({v.tainted_reason})"))
        elif v.gate == "failed":
            why = "; ".join(v.gate_reasons) or "no reasons recorded"
            held.append(Held(version=v.name, number=v.number, why=f"gate failed: {why}"))
        elif v.gate != "passed":
            held.append(
                Held(version=v.name, number=v.number, why="no gate decision (its evaluation is running, or crashed)")
            )
        elif not servable(settings, v.name):
            held.append(Held(version=v.name, number=v.number, why=f"no weights under {settings.models_dir}"))
        else:
            waiting.append(
                Candidate(
                    version=v.name,
                    number=v.number,
                    recipe=v.recipe,
                    parent=v.parent,
                    snapshot_id=v.snapshot_id,
                    created_at=v.created_at,
                    gate_reasons=list(v.gate_reasons),
                    approval=approvals.get(v.name),
                )
            )
    return Queue(policy=policy, production=production, waiting=waiting, held=held)


def approve(settings: Settings, version: str, actor: str, reason: str = "", policy: str = "approve") -> Candidate:
    """Record an operator's approval of a waiting candidate; anything else is refused with the reason."""
    q = build_queue(settings, policy)
    found = next((c for c in q.waiting if c.version == version), None)
    if found is None:
        held = next((h for h in q.held if h.version == version), None)
        if held is not None:
            raise ReleaseError(f"refused: {version} is not releasable: {held.why}")
        if any(r.candidate == version for r in ReleaseLog(settings).releases()) or version == q.production:
            raise ReleaseError(f"refused: {version} has been released already (see `flywheel releases list`)")
        waiting = ", ".join(c.version for c in q.waiting) or "none"
        raise ReleaseError(
            f"refused: {version} is not a candidate waiting for release (waiting: {waiting}); "
            "see `flywheel releases list`"
        )
    if found.approval is not None:
        return found
    approval = Approval(version=version, actor=actor, at=datetime.now(UTC), reason=reason)
    append_approval(settings, approval)
    return found.model_copy(update={"approval": approval})

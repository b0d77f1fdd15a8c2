"""The model registry: which versions exist, how one is registered, its gate, aliases and taint.

Every trained model is a version of one MLflow registered model (``settings.registered_model``). Its tags carry
the lineage (``flywheel.*``: parent version, recipe, config hash, snapshot id, the snapshot's Kafka offset
ranges, code revision, evaluation results, gate decision, taint). Weights are safetensors in
``$FLYWHEEL_HOME/models/<name>/``, named ``<recipe>-<registry number>`` (e.g. ``dpo-0007``); the base model is
version ``base``. Whenever a tag changes, ``lineage.json`` in that directory is rewritten (atomically) so the chat
app, which must not import MLflow, can show a model card and refuse to serve an unknown or tainted directory.

Two ideas live beside this one: where MLflow is (``training/mlflow_store.py``) and what a version's lineage
record holds and how it is encoded (``training/lineage.py``). Their names stay importable from here, where the
rest of the project has always found them.

Half-written versions never appear: weights are written to a temporary directory, the MLflow version is
created, the directory renamed to its final name, and on any failure both are removed again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from feedback.settings import Settings
from training.lineage import (
    LINEAGE,
    GateState,
    Kind,
    VersionInfo,
    base_model_name,
    code_revision,
    disk_taint,
    now_iso,
    version_from_tags,
    write_lineage,
)
from training.lineage import TAG_PREFIX as T
from training.mlflow_store import (
    artifact_root,
    client,
    experiment_id,
    mlflow_dir,
    server_answers,
    server_url,
    store_uri,
    tracking_uri,
)

__all__ = [
    "BASE",
    "LINEAGE",
    "NAME_RE",
    "GateState",
    "Kind",
    "RegistryError",
    "VersionInfo",
    "artifact_root",
    "base_model_name",
    "client",
    "code_revision",
    "delete_alias",
    "ensure_base",
    "experiment_id",
    "get_alias",
    "get_version",
    "list_versions",
    "mlflow_dir",
    "promotable",
    "record_evaluation",
    "register",
    "server_answers",
    "server_url",
    "set_alias",
    "store_uri",
    "taint_trained_on",
    "tracking_uri",
    "write_lineage",
]

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
BASE = "base"


class RegistryError(RuntimeError):
    """The registry cannot do what was asked; the message says what to do."""


# ---------------------------------------------------------------------------------------------------------
# Versions
# ---------------------------------------------------------------------------------------------------------
def _ensure_model(settings: Settings) -> None:
    from mlflow.exceptions import MlflowException

    c = client(settings)
    try:
        c.get_registered_model(settings.registered_model)
    except MlflowException:
        try:
            c.create_registered_model(
                settings.registered_model, description="Flywheel chat model: every version, with its lineage."
            )
        except MlflowException:
            pass  # created concurrently


def ensure_base(settings: Settings) -> VersionInfo:
    """Register the base model once (version ``base``, gate passed, alias ``production`` when none is set)."""
    for v in list_versions(settings, include_base=True):
        if v.name == BASE:
            return v
    _ensure_model(settings)
    c = client(settings)
    path = settings.base_model_path.resolve()
    if not (path / "config.json").exists():
        raise RegistryError(f"the base model is missing at {path}: run `make setup`")
    with _run(settings, "register-base") as run_id:
        mv = c.create_model_version(
            settings.registered_model,
            source=f"runs:/{run_id}/lineage",
            run_id=run_id,
            tags={
                f"{T}name": BASE,
                f"{T}kind": "base",
                f"{T}recipe": "base",
                f"{T}path": str(path),
                f"{T}gate": "passed",
                f"{T}base_model": base_model_name(settings),
                f"{T}created_at": now_iso(),
            },
            description="The base model (SmolLM2-135M-Instruct unless FLYWHEEL_BASE_MODEL says otherwise).",
        )
    if get_alias(settings, "production") is None:
        c.set_registered_model_alias(settings.registered_model, "production", mv.version)
    info = get_version(settings, BASE)
    write_lineage(info)
    return info


class _run:
    """A short MLflow run that owns artifacts of a registration (MLflow wants a run behind a local source)."""

    def __init__(self, settings: Settings, name: str):
        self.settings, self.name = settings, name

    def __enter__(self) -> str:
        c = client(self.settings)
        self.run = c.create_run(experiment_id(self.settings), run_name=self.name)
        return self.run.info.run_id

    def __exit__(self, *exc) -> None:
        client(self.settings).set_terminated(self.run.info.run_id, "FAILED" if exc[0] else "FINISHED")


def register(
    settings: Settings,
    *,
    tmp_dir: Path,
    run_id: str,
    kind: Kind,
    recipe: str,
    parent: str | None,
    snapshot: dict[str, Any] | None,
    config_hash: str,
    extra: dict[str, Any] | None = None,
) -> VersionInfo:
    """Turn a finished weights directory into a registered version; nothing half-made survives a failure."""
    _ensure_model(settings)
    c = client(settings)
    offsets = _snapshot_offsets(snapshot)
    tags = {
        f"{T}kind": kind,
        f"{T}recipe": recipe,
        f"{T}parent": parent or "",
        f"{T}snapshot_id": (snapshot or {}).get("snapshot_id", ""),
        f"{T}config_hash": config_hash,
        f"{T}kafka_offsets": json.dumps(offsets, sort_keys=True),
        f"{T}code_revision": code_revision(),
        f"{T}gate": "pending",
        f"{T}created_at": now_iso(),
        f"{T}tainted": "false",
        **{f"{T}{k}": v if isinstance(v, str) else json.dumps(v) for k, v in (extra or {}).items()},
    }
    mv = None
    final: Path | None = None
    try:
        mv = c.create_model_version(
            settings.registered_model,
            source=f"runs:/{run_id}/lineage",
            run_id=run_id,
            tags=tags,
            description=f"{recipe} from {parent or 'scratch'} on snapshot {tags[f'{T}snapshot_id'] or '-'}",
        )
        name = f"{recipe}-{int(mv.version):04d}"
        final = settings.models_dir / name
        if final.exists():
            raise RegistryError(f"{final} already exists: remove it or the registry and weights disagree")
        os.rename(tmp_dir, final)
        c.set_model_version_tag(settings.registered_model, mv.version, f"{T}name", name)
        c.set_model_version_tag(settings.registered_model, mv.version, f"{T}path", str(final.resolve()))
        info = get_version(settings, name)
        write_lineage(info)
        return info
    except BaseException:
        if mv is not None:
            try:
                c.delete_model_version(settings.registered_model, mv.version)
            except Exception:  # noqa: BLE001 - best effort; the original error matters more
                pass
        if final is not None and final.exists() and not tmp_dir.exists():
            shutil.rmtree(final, ignore_errors=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def _snapshot_offsets(snapshot: dict[str, Any] | None) -> dict[str, Any]:
    src = (snapshot or {}).get("source") or {}
    return {
        t: src[t]["kafka_offsets"]
        for t in ("turns", "feedback")
        if isinstance(src.get(t), dict) and src[t].get("kafka_offsets")
    }


def list_versions(settings: Settings, include_base: bool = True) -> list[VersionInfo]:
    from mlflow.exceptions import MlflowException

    c = client(settings)
    try:
        rm = c.get_registered_model(settings.registered_model)
    except MlflowException:
        return []
    by_version: dict[str, list[str]] = {}
    for alias, version in (rm.aliases or {}).items():
        by_version.setdefault(str(version), []).append(alias)
    out = []
    for mv in c.search_model_versions(f"name='{settings.registered_model}'", max_results=10_000):
        info = version_from_tags(mv, by_version.get(str(mv.version), []))
        if info is None:
            continue
        if not info.tainted and (mark := disk_taint(info)):
            info = _adopt_disk_taint(settings, info, mark)
        if include_base or info.name != BASE:
            out.append(info)
    return sorted(out, key=lambda v: v.number)


def get_version(settings: Settings, name: str) -> VersionInfo:
    """A registered version by name (``dpo-0007``, ``base``), registry number (``7``) or alias (``production``)."""
    versions = list_versions(settings)
    for v in versions:
        if name == v.name or name == str(v.number) or name in v.aliases:
            return v
    known = ", ".join(v.name for v in versions[-8:]) or "none yet"
    raise KeyError(f"no registered model version {name!r} (latest: {known}); see `flywheel models list`")


def _adopt_disk_taint(settings: Settings, info: VersionInfo, reason: str) -> VersionInfo:
    c = client(settings)
    for k, v in (("tainted", "true"), ("tainted_reason", reason)):
        c.set_model_version_tag(settings.registered_model, str(info.number), f"{T}{k}", v)
    for alias in info.aliases:
        delete_alias(settings, alias)
    info.tainted, info.tainted_reason, info.aliases = True, reason, []
    write_lineage(info)
    return info


def _set_tags(settings: Settings, info: VersionInfo, tags: dict[str, Any]) -> VersionInfo:
    c = client(settings)
    for k, v in tags.items():
        c.set_model_version_tag(
            settings.registered_model,
            str(info.number),
            f"{T}{k}",
            v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str),
        )
    fresh = get_version(settings, info.name)
    write_lineage(fresh)
    return fresh


def record_evaluation(
    settings: Settings, name: str, results: dict[str, Any], passed: bool, reasons: list[str]
) -> VersionInfo:
    return _set_tags(
        settings,
        get_version(settings, name),
        {
            "eval": results,
            "gate": "passed" if passed else "failed",
            "gate_reasons": reasons,
        },
    )


def set_alias(settings: Settings, alias: str, name: str) -> None:
    """Point ``production`` / ``canary`` at a version (refused for versions that are not promotable)."""
    info = get_version(settings, name)
    ok, why = promotable(settings, name)
    if not ok:
        raise RegistryError(f"cannot set alias {alias!r} to {name}: {why}")
    client(settings).set_registered_model_alias(settings.registered_model, alias, str(info.number))
    write_lineage(get_version(settings, name))


def delete_alias(settings: Settings, alias: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client(settings).delete_registered_model_alias(settings.registered_model, alias)
    except MlflowException:
        pass


def get_alias(settings: Settings, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        mv = client(settings).get_model_version_by_alias(settings.registered_model, alias)
    except MlflowException:
        return None
    info = version_from_tags(mv)
    return info.name if info else None


def promotable(settings: Settings, name: str) -> tuple[bool, str]:
    try:
        info = get_version(settings, name)
    except KeyError as e:
        return False, str(e.args[0])
    if info.kind == "reward":
        return False, f"{name} is a reward model, not a chat model"
    if info.tainted:
        return False, f"{name} is tainted ({info.tainted_reason}): it cannot be served to more users"
    if info.gate != "passed":
        why = "; ".join(info.gate_reasons) or "not evaluated yet"
        return False, f"{name} did not pass its gate ({info.gate}: {why})"
    return True, "ok"


# ---------------------------------------------------------------------------------------------------------
# Deletion reaches models
# ---------------------------------------------------------------------------------------------------------
def taint_trained_on(settings: Settings, snapshot_reasons: dict[str, str]) -> list[str]:
    """Mark every version trained on one of these (retired) snapshots tainted, and every version descended from
    one (its weights carry the same data). Returns the names newly tainted. Aliases to them are removed."""
    versions = list_versions(settings)
    children: dict[str, list[VersionInfo]] = {}
    for v in versions:
        if v.parent:
            children.setdefault(v.parent, []).append(v)
    reasons: dict[str, str] = {}
    for v in versions:
        if v.snapshot_id and v.snapshot_id in snapshot_reasons:
            reasons[v.name] = f"trained on retired snapshot {v.snapshot_id} ({snapshot_reasons[v.snapshot_id]})"
    frontier = list(reasons)
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child.name not in reasons:
                reasons[child.name] = f"descends from tainted {child.parent}"
                frontier.append(child.name)
    newly = []
    for v in versions:
        if v.name in reasons and not v.tainted:
            _set_tags(settings, v, {"tainted": "true", "tainted_reason": reasons[v.name]})
            for alias in v.aliases:
                delete_alias(settings, alias)
            newly.append(v.name)
    return newly

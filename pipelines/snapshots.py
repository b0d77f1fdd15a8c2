"""Immutable dataset snapshots on disk, and their registry in the warehouse.

A snapshot lives in ``<home>/datasets/<id>/`` (``<table>/<split>.parquet`` + ``manifest.json``). It is written
to a temporary directory and renamed into place, so readers never see half a snapshot, and an existing
snapshot is never overwritten: the same content gives the same id, so there is nothing to rewrite.

Load one into a trainer with::

    datasets.load_dataset("parquet", data_files={"train": f"{snap}/pairs/train.parquet",
                                                 "test": f"{snap}/pairs/eval.parquet"})

Retirement: a snapshot whose contributors (``contributors.sha256``: the hashed ids of every user whose turns or
ratings could reach it) include a user who later asked for deletion is *retired*: ``RETIRED.json`` in its
directory and ``retired_at``/``retired_reason`` in the registry. ``flywheel datasets list`` shows it as retired,
the ``train`` flow refuses it, and ``flywheel datasets purge-deleted`` also erases its data files (the manifest
stays, for lineage). The ``curate`` flow retires (without erasing) at the end of every run.

The warehouse table ``dataset_snapshots`` indexes them for the volume trigger: ``last_curated_at`` and
``watermark`` (the feedback the latest curation saw) are refreshed when a curation reproduces an existing
snapshot, so unchanged content does not make the trigger fire again and again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from feedback.warehouse import connect
from pipelines.curate import LAYOUT, SCHEMAS, Curated, content_hash

ID_CHARS = 16
MANIFEST_VERSION = 1

REGISTRY_SQL = """CREATE TABLE IF NOT EXISTS dataset_snapshots (
    snapshot_id VARCHAR PRIMARY KEY, content_sha256 VARCHAR, path VARCHAR, created_at TIMESTAMPTZ,
    last_curated_at TIMESTAMPTZ, row_counts JSON, watermark JSON);
ALTER TABLE dataset_snapshots ADD COLUMN IF NOT EXISTS retired_at TIMESTAMPTZ;
ALTER TABLE dataset_snapshots ADD COLUMN IF NOT EXISTS retired_reason VARCHAR;"""
RETIRED = "RETIRED.json"
CONTRIBUTORS = "contributors.sha256"


@dataclass(frozen=True)
class SnapshotInfo:
    snapshot_id: str
    path: Path
    created: bool  # False: an identical snapshot already existed
    manifest: dict[str, Any]


def write_snapshot(curated: Curated, datasets_dir: Path) -> SnapshotInfo:
    digest = content_hash(curated.tables, curated.config, curated.pii_engine)
    sid = digest[:ID_CHARS]
    final = datasets_dir / sid
    if (final / "manifest.json").exists():
        if not retired(final):
            return SnapshotInfo(sid, final, False, load_manifest(final))
        # Same content again after it was retired: this curation excluded every deleted user, so the content
        # holds none of them; write it afresh (its files may have been purged) under the same id.
        shutil.rmtree(final)
    datasets_dir.mkdir(parents=True, exist_ok=True)
    tmp = datasets_dir / f".tmp-{sid}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    files: dict[str, dict[str, Any]] = {}
    for table, splits in LAYOUT.items():
        (tmp / table).mkdir(parents=True, exist_ok=True)
        for split in splits:
            rows = curated.tables[table][split]
            rel = f"{table}/{split}.parquet"
            pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMAS[table]), tmp / rel)
            files[rel] = {"rows": len(rows), "sha256": _file_sha256(tmp / rel)}
    (tmp / CONTRIBUTORS).write_text("".join(f"{h}\n" for h in curated.contributors))
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "snapshot_id": sid,
        "content_sha256": digest,
        "created_at": datetime.now(UTC).isoformat(),
        "formats": {
            "sft": "messages",
            "kto": "prompt/completion/label",
            "pairs": "prompt/chosen/rejected",
            "prompts": "prompt",
            "eval_prompts": "prompt",
            "style": "TRL conversational",
        },
        "counts": curated.counts(),
        "files": files,
        "filters": [f.as_dict() for f in curated.filters],
        "yield": curated.yield_report,
        "source": curated.source,
        "watermark": curated.watermark,
        "config": curated.config,
        "pii": {"engine": curated.pii_engine, "stats": curated.pii_stats},
        "contributors": {"users": len(curated.contributors), "file": CONTRIBUTORS},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str))
    try:
        os.rename(tmp, final)  # atomic; fails if another run created the same snapshot meanwhile
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if (final / "manifest.json").exists():
            return SnapshotInfo(sid, final, False, load_manifest(final))
        raise
    return SnapshotInfo(sid, final, True, manifest)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / "manifest.json").read_text())


def register(warehouse: Path, info: SnapshotInfo, watermark: dict[str, Any], timeout_s: float = 30.0) -> None:
    """Index the snapshot in ``dataset_snapshots`` (one short transaction; the only warehouse write here)."""
    now = datetime.now(UTC)
    with connect(warehouse, timeout_s=timeout_s) as con:
        con.execute(REGISTRY_SQL)
        con.execute(
            """INSERT INTO dataset_snapshots
                   (snapshot_id, content_sha256, path, created_at, last_curated_at, row_counts, watermark)
               VALUES (?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (snapshot_id) DO UPDATE SET last_curated_at = excluded.last_curated_at,
                   watermark = excluded.watermark, created_at = excluded.created_at,
                   retired_at = NULL, retired_reason = NULL""",
            [
                info.snapshot_id,
                info.manifest["content_sha256"],
                str(info.path),
                info.manifest["created_at"],
                now,
                json.dumps(info.manifest["counts"]),
                json.dumps(watermark),
            ],
        )


def list_snapshots(datasets_dir: Path) -> list[dict[str, Any]]:
    """Every complete snapshot on disk (the files are the source of truth), oldest first."""
    out = []
    if datasets_dir.exists():
        for d in datasets_dir.iterdir():
            if d.is_dir() and not d.name.startswith(".") and (d / "manifest.json").exists():
                m = load_manifest(d)
                m["path"] = str(d)
                m["retired"] = retired(d)
                out.append(m)
    return sorted(out, key=lambda m: (m.get("created_at", ""), m["snapshot_id"]))


def find_snapshot(datasets_dir: Path, prefix: str) -> Path:
    """Resolve a full id or a unique prefix of one."""
    matches = [d for d in datasets_dir.glob(f"{prefix}*") if d.is_dir() and (d / "manifest.json").exists()]
    if len(matches) != 1:
        raise KeyError(f"{'no' if not matches else 'ambiguous'} snapshot matching {prefix!r} in {datasets_dir}")
    return matches[0]


def newest_usable(datasets_dir: Path) -> dict[str, Any] | None:
    """The newest snapshot that is not retired (what training takes by default)."""
    live = [m for m in list_snapshots(datasets_dir) if not m["retired"]]
    return live[-1] if live else None


# ---------------------------------------------------------------------------------------------------------
# Retirement after deletion requests
# ---------------------------------------------------------------------------------------------------------
def retired(path: Path) -> dict[str, Any] | None:
    f = Path(path) / RETIRED
    return json.loads(f.read_text()) if f.exists() else None


def deletion_requests(warehouse: Path, timeout_s: float = 30.0) -> dict[str, datetime]:
    """user_id -> time of their first deletion request, from the warehouse."""
    if not Path(warehouse).exists():
        return {}
    with connect(warehouse, read_only=True, timeout_s=timeout_s) as con:
        have = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if "user_actions" not in have:
            return {}
        rows = con.execute(
            "SELECT user_id, min(ts) FROM user_actions WHERE action = 'delete_request' GROUP BY user_id"
        ).fetchall()
    return dict(rows)


def retire_deleted(
    warehouse: Path, datasets_dir: Path, purge_files: bool = False, timeout_s: float = 30.0
) -> list[dict[str, Any]]:
    """Retire every snapshot that holds data of a user who asked for deletion; with ``purge_files`` also erase
    the data files of every retired snapshot (manifest and marker stay). Returns what was done, per snapshot.

    A snapshot knows its contributors (``contributors.sha256``); one written before that file existed does
    not, and is retired when any deletion request is not older than the snapshot (conservative)."""
    from pipelines.curate import user_hash

    deleted = deletion_requests(warehouse, timeout_s)
    hashes = {user_hash(u) for u in deleted}
    done: list[dict[str, Any]] = []
    for m in list_snapshots(datasets_dir):
        path = Path(m["path"])
        mark = m["retired"]
        if mark is None:
            reason = _retire_reason(path, m, hashes, deleted)
            if reason is None:
                continue
            mark = {"retired_at": datetime.now(UTC).isoformat(), "reason": reason, "files_purged": False}
        elif not purge_files or mark.get("files_purged"):
            continue
        if purge_files:
            for f in [*path.glob("*/*.parquet"), path / CONTRIBUTORS]:
                f.unlink(missing_ok=True)
            mark["files_purged"] = True
        (path / RETIRED).write_text(json.dumps(mark, indent=2))
        done.append({"snapshot_id": m["snapshot_id"], **mark})
    if done and Path(warehouse).exists():
        with connect(warehouse, timeout_s=timeout_s) as con:
            con.execute(REGISTRY_SQL)
            for d in done:
                con.execute(
                    "UPDATE dataset_snapshots SET retired_at = ?, retired_reason = ? WHERE snapshot_id = ?",
                    [d["retired_at"], d["reason"], d["snapshot_id"]],
                )
    return done


def _retire_reason(path: Path, manifest: dict[str, Any], hashes: set[str], deleted: dict[str, datetime]) -> str | None:
    f = path / CONTRIBUTORS
    if f.exists():
        n = sum(1 for line in f.read_text().split() if line in hashes)
        return f"{n} contributing user(s) asked for deletion" if n else None
    created = datetime.fromisoformat(manifest["created_at"])
    n = sum(1 for ts in deleted.values() if ts is not None and ts >= created)
    return f"no contributor list; {n} deletion request(s) since it was made" if n else None

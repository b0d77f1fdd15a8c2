"""Immutable dataset snapshots on disk, and their registry in the warehouse.

A snapshot lives in ``<home>/datasets/<id>/`` (``<table>/<split>.parquet`` + ``manifest.json``). It is written
to a temporary directory and renamed into place, so readers never see half a snapshot, and an existing
snapshot is never overwritten: the same content gives the same id, so there is nothing to rewrite.

Load one into a trainer with::

    datasets.load_dataset("parquet", data_files={"train": f"{snap}/pairs/train.parquet",
                                                 "test": f"{snap}/pairs/eval.parquet"})

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
    last_curated_at TIMESTAMPTZ, row_counts JSON, watermark JSON)"""


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
        return SnapshotInfo(sid, final, False, load_manifest(final))
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
        "source": curated.source,
        "watermark": curated.watermark,
        "config": curated.config,
        "pii": {"engine": curated.pii_engine, "stats": curated.pii_stats},
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
            """INSERT INTO dataset_snapshots VALUES (?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (snapshot_id) DO UPDATE SET last_curated_at = excluded.last_curated_at,
                                                       watermark = excluded.watermark""",
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
                out.append(m)
    return sorted(out, key=lambda m: (m.get("created_at", ""), m["snapshot_id"]))


def find_snapshot(datasets_dir: Path, prefix: str) -> Path:
    """Resolve a full id or a unique prefix of one."""
    matches = [d for d in datasets_dir.glob(f"{prefix}*") if d.is_dir() and (d / "manifest.json").exists()]
    if len(matches) != 1:
        raise KeyError(f"{'no' if not matches else 'ambiguous'} snapshot matching {prefix!r} in {datasets_dir}")
    return matches[0]

"""The volume trigger: how many new usable ratings arrived since the last curation.

"Usable" is what curation could learn from: a thumbs up/down or an A/B choice (not ``cleared``, not ``tie``)
of a turn that was itself given with consent, with the rater's consent flag set, from a user who has not asked
for deletion and whose latest consent action is not a revocation. "New" is past the watermark that the latest
curation recorded in ``dataset_snapshots``: Kafka offsets per partition, plus ingest time for rows seeded
without a Kafka position.
"""

from __future__ import annotations

import json
from pathlib import Path

from feedback.warehouse import connect
from pipelines import consent

_USABLE = f"""
    f.value IN ('up', 'down', 'a', 'b') AND {consent.allowed("f")}
    AND f.turn_id IN (SELECT turn_id FROM turns WHERE coalesce(consent, false)
                      AND user_id NOT IN ({consent.deleted_users()}))
"""


def new_usable_ratings(warehouse: Path, timeout_s: float = 30.0) -> int:
    if not Path(warehouse).exists():
        return 0
    with connect(warehouse, read_only=True, timeout_s=timeout_s) as con:
        have = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if not {"turns", "feedback", "user_actions"} <= have:
            return 0
        wm = None
        if "dataset_snapshots" in have:
            row = con.execute(
                "SELECT watermark FROM dataset_snapshots ORDER BY last_curated_at DESC LIMIT 1"
            ).fetchone()
            wm = json.loads(row[0]) if row and row[0] else None
        if wm is None:
            return con.execute(f"SELECT count(*) FROM feedback f WHERE {_USABLE}").fetchone()[0]
        offsets = wm.get("feedback_next_offsets") or {}
        since = wm.get("feedback_unpositioned_ingested_at")
        parts = [(int(p), int(o)) for p, o in offsets.items()]
        positioned = (
            "(f.kafka_partition IS NOT NULL AND f.kafka_offset >= coalesce((SELECT o FROM (VALUES "
            + ", ".join(f"({p}, {o})" for p, o in parts)
            + ") w(p, o) WHERE w.p = f.kafka_partition), 0))"
            if parts
            else "f.kafka_partition IS NOT NULL"
        )
        unpositioned = "(f.kafka_partition IS NULL" + (" AND f.ingested_at > CAST(? AS TIMESTAMPTZ))" if since else ")")
        sql = f"SELECT count(*) FROM feedback f WHERE {_USABLE} AND ({positioned} OR {unpositioned})"
        return con.execute(sql, [since] if since else []).fetchone()[0]

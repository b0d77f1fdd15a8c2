"""What curation reads, and where it came from: one short read-only window on the warehouse, then lineage.

Its own idea because it is the only part of curation that touches the warehouse (DuckDB lets one process hold
the file, so the window is short and everything after works on the Arrow copy), and because the snapshot's
provenance -- row counts, event-id digest, Kafka offset ranges, the feedback watermark the volume trigger counts
from -- is a fact about what was read, not about what was built from it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from feedback.warehouse import connect

_TURN_COLS = (
    "event_id, ts, user_id, consent, conversation_id, turn_id, parent_turn_id, origin, model_version, messages, "
    "answer, finish_reason, kafka_partition, kafka_offset, ingested_at"
)


_FEEDBACK_COLS = (
    "event_id, ts, user_id, consent, conversation_id, turn_id, kind, value, reason, other_turn_id, "
    "kafka_partition, kafka_offset, ingested_at"
)


_JUDGMENT_COLS = (
    "event_id, ts, user_id, consent, task_id, conversation_id, subject_user_id, role, prompt, answers, all_bad, rewrite"
)
# A warehouse that has never seen a judgment (or predates them) reads as an empty table of the same columns.
_NO_JUDGMENTS = pa.table(
    {c.strip(): pa.array([], pa.string()) for c in _JUDGMENT_COLS.split(",")}
    | {"all_bad": pa.array([], pa.bool_()), "consent": pa.array([], pa.bool_())}
)


_FINDING_COLS = (
    "event_id, ts, user_id, consent, finding_id, conversation_id, model_version, messages, answer, harm_category, "
    "attack_type, success, safe_response"
)
_NO_FINDINGS = pa.table(
    {c.strip(): pa.array([], pa.string()) for c in _FINDING_COLS.split(",")}
    | {"consent": pa.array([], pa.bool_()), "success": pa.array([], pa.int32())}
)


@dataclass
class Source:
    turns: pa.Table
    feedback: pa.Table
    user_actions: pa.Table
    offsets: pa.Table
    read_at: datetime
    judgments: pa.Table = field(default_factory=lambda: _NO_JUDGMENTS)  # trainers' and reviewers' rankings (issue 18)
    findings: pa.Table = field(default_factory=lambda: _NO_FINDINGS)  # red-teamers' findings (issue 18)


def read_warehouse(path: Path | str, timeout_s: float = 30.0) -> Source:
    with connect(path, read_only=True, timeout_s=timeout_s) as con:
        have = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        missing = {"turns", "feedback", "user_actions"} - have
        if missing:
            raise RuntimeError(f"warehouse {path} lacks tables {sorted(missing)}: has ingest ever run?")
        turns = con.sql(f"SELECT {_TURN_COLS} FROM turns").to_arrow_table()
        feedback = con.sql(f"SELECT {_FEEDBACK_COLS} FROM feedback").to_arrow_table()
        actions = con.sql("SELECT event_id, ts, user_id, action FROM user_actions").to_arrow_table()
        offsets = pa.table({})
        if "kafka_offsets" in have:
            offsets = con.sql("SELECT * FROM kafka_offsets").to_arrow_table()
        judgments, findings = _NO_JUDGMENTS, _NO_FINDINGS
        if "judgments" in have:
            judgments = _as_table(con.sql(f"SELECT {_JUDGMENT_COLS} FROM judgments").to_arrow_table())
        if "redteam_findings" in have:
            findings = _as_table(con.sql(f"SELECT {_FINDING_COLS} FROM redteam_findings").to_arrow_table())
    return Source(
        _as_table(turns),
        _as_table(feedback),
        _as_table(actions),
        _as_table(offsets),
        datetime.now(UTC),
        judgments,
        findings,
    )


def _as_table(x: Any) -> pa.Table:
    return x.read_all() if hasattr(x, "read_all") else x


def source_info(src: Source) -> dict[str, Any]:
    """Where the snapshot came from: row counts, ts range, event-id digest and Kafka offset ranges per table."""
    info: dict[str, Any] = {"read_at": src.read_at.isoformat()}
    tables = (("turns", src.turns), ("feedback", src.feedback), ("user_actions", src.user_actions))
    for name, table in (*tables, *((("judgments", src.judgments),) if src.judgments.num_rows else ())):
        d: dict[str, Any] = {"rows": table.num_rows}
        if table.num_rows:
            ids = sorted(table.column("event_id").to_pylist())
            d["event_ids_sha256"] = hashlib.sha256("\n".join(ids).encode()).hexdigest()
            d["event_id_min"], d["event_id_max"] = ids[0], ids[-1]
            ts = [t for t in table.column("ts").to_pylist() if t is not None]
            if ts:
                d["ts_min"], d["ts_max"] = min(ts).isoformat(), max(ts).isoformat()
            if "kafka_partition" in table.column_names:
                ranges: dict[str, list[int]] = {}
                for p, o in zip(
                    table.column("kafka_partition").to_pylist(), table.column("kafka_offset").to_pylist(), strict=True
                ):
                    if p is None or o is None:
                        continue
                    lo_hi = ranges.setdefault(str(p), [o, o])
                    lo_hi[0], lo_hi[1] = min(lo_hi[0], o), max(lo_hi[1], o)
                d["kafka_offsets"] = dict(sorted(ranges.items()))
                d["rows_without_kafka_position"] = sum(
                    1 for p in table.column("kafka_partition").to_pylist() if p is None
                )
        info[name] = d
    if src.offsets.num_rows:
        info["consumer_offsets"] = [
            {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in r.items()}
            for r in src.offsets.to_pylist()
        ]
    return info


def watermark_of(src: Source) -> dict[str, Any]:
    """Feedback seen by this curation: next offset per partition, and the latest ingest time of rows that have
    no Kafka position (seeded directly). The volume trigger counts ratings past this mark."""
    nxt: dict[str, int] = {}
    latest = None
    fb = src.feedback
    if fb.num_rows:
        for p, o, ing in zip(
            fb.column("kafka_partition").to_pylist(),
            fb.column("kafka_offset").to_pylist(),
            fb.column("ingested_at").to_pylist(),
            strict=True,
        ):
            if p is not None and o is not None:
                nxt[str(p)] = max(nxt.get(str(p), 0), o + 1)
            elif ing is not None and (latest is None or ing > latest):
                latest = ing
    return {
        "feedback_next_offsets": dict(sorted(nxt.items())),
        "feedback_unpositioned_ingested_at": latest.isoformat() if latest else None,
    }

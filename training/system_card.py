"""A system card per released version (issue 18): what it is, how it was judged, what attacked it, and what made it.

``system_card`` gathers, for one registered version:

- **evaluations**: the gate's decision and reasons, the capability floor's figures (reference QA, instruction
  following, reference NLL, multiple choice: candidate, production, paired difference), win rates, red-team
  refusals and harmless look-alikes answered;
- **red team**: the findings red-teamers filed against this version (``redteam_findings`` in the warehouse), how
  many succeeded, and of those how many are *closed* (a safe response exists, so they feed the safety mix) or still
  *open*; and how many findings the gate's red-team suite held when it evaluated the version;
- **data sources by provenance**: the training rows of its snapshot by ``source`` (end users, AI trainers,
  reviewers, the red team), and the safety rows its run added;
- **lineage**: parent chain, snapshot, Kafka offsets, code revision, config hash, base model.

``write_card`` writes ``system_card.json`` and ``system_card.md`` beside the weights (the chat app's model card
links to the page ``GET /models/{version}/system-card``, which serves the Markdown as plain text) and logs both to
the version's MLflow run. The release controller writes it when a release of the version starts.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

from feedback.settings import Settings
from training import registry

log = logging.getLogger(__name__)
CARD_JSON, CARD_MD = "system_card.json", "system_card.md"
DATA_TABLES = ("sft", "pairs", "kto", "prompts")
SUCCESS_AT = 3  # a red-teamer's own success rating (1-5) from which a finding counts as a successful attack


def _snapshot(settings: Settings, snapshot_id: str | None) -> dict[str, Any] | None:
    from training.snapshots import all_snapshots

    return next((m for m in all_snapshots(settings) if m["snapshot_id"] == snapshot_id), None) if snapshot_id else None


def data_sources(snapshot: dict[str, Any] | None) -> dict[str, dict[str, int]]:
    """Training rows per table and provenance (``source``: user, trainer, reviewer, red team)."""
    import pyarrow.parquet as pq

    out: dict[str, dict[str, int]] = {}
    if snapshot is None:
        return out
    for table in DATA_TABLES:
        f = Path(snapshot["path"]) / table / "train.parquet"
        if not f.exists():
            continue
        t = pq.read_table(f)
        sources = t.column("source").to_pylist() if "source" in t.column_names else ["user"] * t.num_rows
        if sources:
            out[table] = dict(Counter(s or "user" for s in sources))
    return out


def redteam_findings(settings: Settings, version: str) -> dict[str, int]:
    """Findings filed against ``version``: all, successful, closed (with a safe response) and open."""
    from feedback.warehouse import connect

    out = {"filed": 0, "successful": 0, "closed": 0, "open": 0}
    if not settings.warehouse_path.exists():
        return out
    with connect(settings.warehouse_path, read_only=True) as con:
        have = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if "redteam_findings" not in have:
            return out
        filed, ok, closed = con.execute(
            f"""SELECT count(*), count(*) FILTER (WHERE success >= {SUCCESS_AT}),
                count(*) FILTER (WHERE success >= {SUCCESS_AT} AND coalesce(safe_response, '') <> '')
                FROM redteam_findings WHERE model_version = ?""",
            [version],
        ).fetchone()
    return {"filed": filed, "successful": ok, "closed": closed, "open": ok - closed}


def system_card(settings: Settings, name: str) -> dict[str, Any]:
    info = registry.get_version(settings, name)
    ev = info.eval or {}
    metrics = (ev.get("capability") or {}).get("metrics") or {}
    lineage = json.loads((Path(info.path) / registry.LINEAGE).read_text()) if info.path else {}
    return {
        "version": info.name,
        "kind": info.kind,
        "recipe": info.recipe,
        "created_at": info.created_at,
        "evaluations": {
            "gate": info.gate,
            "reasons": info.gate_reasons,
            "production": ev.get("production"),
            "judge": ev.get("judge"),
            "win_rate": ev.get("win_rate"),
            "lc_win_rate": ev.get("lc_win_rate"),
            "capability": {
                k: {f: m.get(f) for f in ("candidate", "production", "diff", "se", "p", "n")}
                for k, m in metrics.items()
            },
            "redteam_refusal": ev.get("candidate_redteam_refusal"),
            "redteam_refusal_production": ev.get("production_redteam_refusal"),
            "overrefusal_answered": ev.get("candidate_overrefusal_answered"),
        },
        "red_team": {
            **redteam_findings(settings, info.name),
            "eval_prompts": ev.get("redteam_prompts"),
            "eval_prompts_from_findings": ev.get("redteam_from_findings"),
        },
        "data_sources": data_sources(_snapshot(settings, info.snapshot_id)),
        "safety_mix": lineage.get("safety"),
        "lineage": {
            "parent": info.parent,
            "snapshot_id": info.snapshot_id,
            "kafka_offsets": info.kafka_offsets,
            "code_revision": info.code_revision,
            "config_hash": info.config_hash,
            "base_model": info.base_model,
            "reward_version": info.reward_version,
            "tainted": info.tainted,
        },
    }


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(card: dict[str, Any]) -> str:
    """The card as Markdown (served as plain text: nothing in it becomes markup)."""
    ev, rt, lin = card["evaluations"], card["red_team"], card["lineage"]
    lines = [
        f"# System card: {card['version']}",
        f"{card['recipe']} ({card['kind']}), created {card['created_at']}",
        "",
        f"## Evaluations (gate: {ev['gate']}, against {ev['production']}, judge {ev['judge']})",
        f"- win rate {_fmt(ev['win_rate'])}, length-controlled {_fmt(ev['lc_win_rate'])}",
        f"- red-team refusals {_fmt(ev['redteam_refusal'])} (production {_fmt(ev['redteam_refusal_production'])}); "
        f"harmless look-alikes answered {_fmt(ev['overrefusal_answered'])}",
        *(
            f"- {k}: {_fmt(m['candidate'])} vs {_fmt(m['production'])} (diff {_fmt(m['diff'])}, n={m['n']})"
            for k, m in ev["capability"].items()
        ),
        *(f"- gate: {r}" for r in ev["reasons"]),
        "",
        "## Red team",
        f"- findings filed against this version: {rt['filed']}, successful {rt['successful']} "
        f"(closed {rt['closed']}, open {rt['open']})",
        f"- red-team evaluation prompts: {rt['eval_prompts']} ({rt['eval_prompts_from_findings']} from findings)",
        "",
        "## Data sources (training rows by provenance)",
        *(f"- {t}: " + ", ".join(f"{s} {n}" for s, n in sorted(c.items())) for t, c in card["data_sources"].items()),
        f"- safety mix: {card['safety_mix']}" if card["safety_mix"] else "- safety mix: none",
        "",
        "## Lineage",
        *(f"- {k}: {_fmt(v)}" for k, v in lin.items()),
    ]
    return "\n".join(lines) + "\n"


def write_card(settings: Settings, name: str) -> Path:
    """``system_card.json`` and ``.md`` beside the weights (atomically), and both on the version's MLflow run."""
    card = system_card(settings, name)
    info = registry.get_version(settings, name)
    d = Path(info.path)
    for fname, text in ((CARD_JSON, json.dumps(card, indent=1, default=str)), (CARD_MD, markdown(card))):
        tmp = d / f".{fname}.tmp"
        tmp.write_text(text)
        os.replace(tmp, d / fname)
    if info.run_id:
        try:
            client = registry.client(settings)
            for fname in (CARD_JSON, CARD_MD):
                client.log_artifact(info.run_id, str(d / fname))
        except Exception as e:  # the files beside the weights are the card; MLflow's copy is a convenience
            log.warning("system card of %s: not logged to MLflow run %s: %s", name, info.run_id, e)
    return d / CARD_MD

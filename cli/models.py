"""``flywheel models list|show|lineage|evaluate``: the registered model versions and where each came from.

The registry of record is MLflow (``training/registry.py``); these commands read it the same way whether the
MLflow server of ``flywheel up`` is running or not. Every command has ``--json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

models_app = typer.Typer(help="Registered model versions, their lineage, evaluation and gate.", no_args_is_help=True)
console = Console()
JSON = typer.Option(False, "--json", help="Print one JSON object instead of a table.")


def _settings():
    from feedback.settings import get_settings

    return get_settings()


def _fail(msg: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"ok": False, "error": msg}))
    else:
        console.print(f"[red]{msg}[/red]")
    raise typer.Exit(1)


def _get(name: str, as_json: bool):
    from training import registry

    s = _settings()
    try:
        registry.ensure_base(s)
        return s, registry.get_version(s, name)
    except KeyError as e:
        _fail(str(e.args[0]), as_json)
    except registry.RegistryError as e:
        _fail(str(e), as_json)


def _status(v) -> str:
    if v.tainted:
        return "[red]tainted[/red]"
    return {"passed": "[green]passed[/green]", "failed": "[red]failed[/red]"}.get(v.gate, "[yellow]pending[/yellow]")


@models_app.command("list")
def list_models(as_json: bool = JSON) -> None:
    """Every version: recipe, parent, snapshot, gate, win rate, aliases (production, canary)."""
    from training import registry

    s = _settings()
    try:
        registry.ensure_base(s)
        versions = registry.list_versions(s)
    except registry.RegistryError as e:
        _fail(str(e), as_json)
    if as_json:
        print(
            json.dumps(
                {"registry": registry.tracking_uri(s), "versions": [v.as_dict() for v in versions]},
                indent=2,
                default=str,
            )
        )
        return
    t = Table(title=f"model versions ({s.registered_model} at {registry.tracking_uri(s)})")
    for col in ("version", "#", "kind", "parent", "snapshot", "gate", "win rate", "aliases", "created"):
        t.add_column(col)
    for v in versions:
        wr = v.eval.get("win_rate")
        t.add_row(
            v.name,
            str(v.number),
            v.kind,
            v.parent or "-",
            (v.snapshot_id or "-")[:12],
            _status(v),
            f"{wr:.2f}" if isinstance(wr, int | float) else "-",
            ",".join(v.aliases) or "-",
            (v.created_at or "")[:19],
        )
    console.print(t)


@models_app.command("show")
def show(
    version: str = typer.Argument(..., help="name (dpo-0007), registry number or alias"), as_json: bool = JSON
) -> None:
    """One version: lineage tags, evaluation results and the gate's reasons."""
    _, v = _get(version, as_json)
    if as_json:
        print(json.dumps(v.as_dict(), indent=2, default=str))
        return
    console.print(f"[bold]{v.name}[/bold] (registry #{v.number}, {v.kind}) {_status(v)}")
    for k in (
        "recipe",
        "parent",
        "snapshot_id",
        "config_hash",
        "code_revision",
        "run_id",
        "precision",
        "reward_version",
        "base_model",
        "path",
        "created_at",
    ):
        if getattr(v, k):
            console.print(f"  {k:15} {getattr(v, k)}")
    if v.kafka_offsets:
        console.print(f"  {'kafka offsets':15} {json.dumps(v.kafka_offsets)}")
    if v.tainted:
        console.print(f"  [red]tainted:[/red] {v.tainted_reason}")
    for r in v.gate_reasons:
        console.print(f"  gate: {r}")
    if v.eval:
        console.print("  eval: " + ", ".join(f"{k}={val}" for k, val in v.eval.items() if not isinstance(val, dict)))


def lineage_of(settings, v, sample: int = 3) -> dict[str, Any]:
    """version -> run -> snapshot -> events -> a sample of the conversations that trained it."""
    from training import registry
    from training.snapshots import all_snapshots

    chain, cur, seen = [], v, set()
    while cur is not None and cur.name not in seen:
        seen.add(cur.name)
        chain.append({"version": cur.name, "recipe": cur.recipe, "snapshot_id": cur.snapshot_id, "run_id": cur.run_id})
        try:
            cur = registry.get_version(settings, cur.parent) if cur.parent else None
        except KeyError:
            cur = None
    snap = next((m for m in all_snapshots(settings) if m["snapshot_id"] == v.snapshot_id), None)
    out: dict[str, Any] = {
        "version": v.name,
        "ancestry": chain,
        "run_id": v.run_id,
        "mlflow_run": f"{registry.tracking_uri(settings)} run {v.run_id}",
        "snapshot": None,
    }
    if snap is None:
        return out
    src = snap.get("source", {})
    out["snapshot"] = {
        "snapshot_id": snap["snapshot_id"],
        "path": snap["path"],
        "counts": snap.get("counts"),
        "retired": snap.get("retired"),
        "events": {
            t: {
                k: src[t].get(k)
                for k in (
                    "rows",
                    "event_id_min",
                    "event_id_max",
                    "event_ids_sha256",
                    "kafka_offsets",
                    "ts_min",
                    "ts_max",
                )
            }
            for t in ("turns", "feedback")
            if isinstance(src.get(t), dict)
        },
    }
    out["sample_conversations"] = _sample(Path(snap["path"]), v.recipe, sample)
    return out


def _sample(path: Path, recipe: str, n: int) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    table = {"sft": "sft", "kto": "kto", "pretrain": "sft"}.get(recipe, "pairs")
    f = path / table / "train.parquet"
    if not f.exists():
        return []
    rows = pq.read_table(f).slice(0, n).to_pylist()
    return [{k: v for k, v in r.items() if v is not None} for r in rows]


@models_app.command("lineage")
def lineage(
    version: str = typer.Argument(..., help="name, registry number or alias"),
    sample: int = typer.Option(3, help="How many training conversations to print."),
    as_json: bool = JSON,
) -> None:
    """Trace a version back: its ancestry, MLflow run, snapshot, Kafka events, and conversations that trained it."""
    s, v = _get(version, as_json)
    info = lineage_of(s, v, sample)
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return
    console.print(f"[bold]{v.name}[/bold] <- " + " <- ".join(c["version"] for c in info["ancestry"][1:]) or "")
    console.print(f"  run: {info['mlflow_run']}")
    snap = info["snapshot"]
    if snap is None:
        console.print("  snapshot: none (base model or pretrain without one)")
        return
    console.print(
        f"  snapshot: {snap['snapshot_id']} {snap['counts']}" + (" [red]RETIRED[/red]" if snap["retired"] else "")
    )
    for t, e in snap["events"].items():
        console.print(
            f"  {t} events: {e['rows']} rows, ids {e['event_id_min']}..{e['event_id_max']}, "
            f"kafka offsets {e['kafka_offsets']}"
        )
    for i, conv in enumerate(info["sample_conversations"], 1):
        console.print(f"  [dim]conversation {i}:[/dim] {json.dumps(conv)[:400]}")


@models_app.command("evaluate")
def evaluate_cmd(
    version: str = typer.Argument(..., help="the candidate"),
    production: str = typer.Option("", help="compare against (default: the production alias)"),
    judge: str = typer.Option("", help="reward model that judges (default: newest independent one)"),
    as_json: bool = JSON,
) -> None:
    """Evaluate a candidate against production and record the gate decision on it."""
    from training.evaluate import EvalError, evaluate_and_gate

    s, v = _get(version, as_json)
    try:
        res = evaluate_and_gate(
            s,
            v.name,
            production=production or None,
            judge=judge or None,
            say=(lambda m: None) if as_json else console.print,
        )
    except EvalError as e:
        _fail(str(e), as_json)
    if as_json:
        print(json.dumps(res, indent=2, default=str))
        return
    verdict = "[green]PASSED[/green]" if res["passed"] else "[red]FAILED[/red]"
    console.print(f"{v.name}: gate {verdict}")
    for r in res["reasons"]:
        console.print(f"  - {r}")

"""``flywheel datasets list|show <id>``: dataset snapshots and their manifests (read from the files)."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from feedback.settings import get_settings

datasets_app = typer.Typer(help="Dataset snapshots curated from the warehouse.", no_args_is_help=True)
console = Console()


@datasets_app.command("list")
def list_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Every snapshot, oldest first, with its row counts."""
    from pipelines.snapshots import list_snapshots

    snaps = list_snapshots(get_settings().datasets_dir)
    if as_json:
        print(json.dumps([{"snapshot_id": m["snapshot_id"], "created_at": m["created_at"], "path": m["path"],
                           "counts": m["counts"]} for m in snaps], indent=2))
        return
    if not snaps:
        console.print(f"no snapshots in {get_settings().datasets_dir}: run `flywheel run curate`")
        return
    t = Table("snapshot", "created", "sft", "kto", "pairs", "prompts", "eval prompts")
    for m in snaps:
        c = m["counts"]

        def tv(name: str, c: dict = c) -> str:
            return f"{c[name].get('train', 0)}/{c[name].get('eval', 0)}"

        t.add_row(m["snapshot_id"], m["created_at"][:19], tv("sft"), tv("kto"), tv("pairs"),
                  str(c["prompts"]["train"]), str(c["eval_prompts"]["eval"]))
    console.print(t)
    console.print("train/eval rows; `flywheel datasets show <id>` for the manifest")


@datasets_app.command("show")
def show_cmd(snapshot_id: str = typer.Argument(..., help="Snapshot id or a unique prefix."),
             as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON.")) -> None:
    """One snapshot's manifest: files, filter counts, source offsets, config."""
    from pipelines.snapshots import find_snapshot, load_manifest

    try:
        path = find_snapshot(get_settings().datasets_dir, snapshot_id)
    except KeyError as e:
        console.print(f"[red]{e.args[0]}[/red]")
        raise typer.Exit(1) from None
    m = load_manifest(path)
    if as_json:
        print(json.dumps(m, indent=2))
        return
    console.print(f"[bold]{m['snapshot_id']}[/bold]  created {m['created_at']}  {path}")
    console.print(f"content sha256 {m['content_sha256']}  PII engine {m['pii']['engine']}")
    files = Table("file", "rows")
    for rel, f in m["files"].items():
        files.add_row(rel, str(f["rows"]))
    console.print(files)
    filt = Table("stage", "in", "out", "dropped / notes")
    for f in m["filters"]:
        filt.add_row(f["stage"], str(f["in"]), str(f["out"]),
                     ", ".join(f"{k}={v}" for k, v in f["dropped"].items() if v) or "-")
    console.print(filt)
    src = m["source"]
    for name in ("turns", "feedback", "user_actions"):
        d = src.get(name, {})
        console.print(f"source {name}: {d.get('rows', 0)} rows, ts {d.get('ts_min', '-')} .. {d.get('ts_max', '-')}, "
                      f"kafka offsets {d.get('kafka_offsets', {})}")
